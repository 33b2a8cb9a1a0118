"""Which SuperNode may answer for which owner: owner names bound to SuperNode keys.

An owner's name is what its SuperNode's node config says, so without more any node could claim
any expected owner's name and, by connecting first, be sent the spec and accepted in its place.
With SuperNode authentication every SuperNode holds an EC key pair; the SuperLink registers the
public keys (``flwr supernode register``), checks that every request of a node is signed with the
key registered for its node id, and tells the ServerApp each connected node's public key
(``Grid.get_nodes()``, ``NodeInfo.public_key``, since Flower 1.42). The coordinator's run config
``owner-keys`` binds each expected owner to the public key it registered; a node is then that
owner exactly when it presents that key, whatever its node config says (docs/federation.md says
what this does and does not prove).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from flexmoe.core.errors import InputError


def key_id(key_bytes: bytes) -> bytes | None:
    """A public key in one canonical form (DER SubjectPublicKeyInfo), from the PEM Flower stores
    or an OpenSSH public key file's line; ``None`` for anything that is not a public key."""
    data = key_bytes.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class OwnerKeys:
    """Owner names bound to public keys, read from ``owner -> key file`` (the ``.pub`` file each
    owner gave the coordinator to register, OpenSSH or PEM). Every expected owner needs one, and no
    two owners may share a key: a partial binding would leave the unbound names to whoever claims
    them first."""

    def __init__(self, paths: Mapping[str, str], expected_owners: Iterable[str]):
        expected = list(expected_owners)
        unbound = [o for o in expected if o not in paths]
        unknown = sorted(set(paths) - set(expected))
        if unbound or unknown:
            raise InputError(
                f"run config 'owner-keys' must bind every expected owner to its key file and nothing else: "
                f"missing {unbound}, not expected {unknown}"
            )
        self.owner_of: dict[bytes, str] = {}
        for owner in expected:
            path = Path(paths[owner]).expanduser()
            try:
                key = key_id(path.read_bytes()[:16384])
            except OSError as e:
                raise InputError(
                    f"run config 'owner-keys': the key file of owner {owner!r} ({path}) cannot be read: {e}"
                ) from e
            if key is None:
                raise InputError(
                    f"run config 'owner-keys': {path} (owner {owner!r}) is not a public key; give the .pub file the "
                    "owner registered with 'flwr supernode register'"
                )
            if key in self.owner_of:
                raise InputError(
                    f"run config 'owner-keys': owners {self.owner_of[key]!r} and {owner!r} have the same key ({path})"
                )
            self.owner_of[key] = owner

    def owner(self, public_key: bytes) -> str | None:
        """The owner bound to a node's ``public_key`` (as ``NodeInfo`` holds it), or ``None``."""
        key = key_id(public_key) if public_key else None
        return self.owner_of.get(key) if key is not None else None
