"""What each side of the federation reads from Flower's configs: the coordinator's run config
(:class:`CoordinatorSettings`) and an owner's node config (:class:`OwnerSettings`).

Flower configs hold scalars only, so lists are comma-separated strings and "all experts" is
``top-k = 0``; each is converted to its Python form (a list, ``top_k=None``) in one place here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


def as_bool(value, key: str) -> bool:
    """A config boolean: ``true``/``false`` (TOML), or the strings and integers people type for
    them (``"true"``, ``"yes"``, ``1`` ...). Anything else, the empty string included, is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"config key {key!r} must be true or false, got {value!r}")


def as_list(value, key: str) -> list[str]:
    """A comma-separated string (Flower configs hold scalars only) as a list of names."""
    if not isinstance(value, str):
        raise TypeError(f"config key {key!r} must be a comma-separated string, got {value!r}")
    return [v.strip() for v in value.split(",") if v.strip()]


def as_bindings(value, key: str) -> dict[str, str]:
    """``"alice=/keys/alice.pub,bob=/keys/bob.pub"`` as ``{"alice": "/keys/alice.pub", ...}``."""
    out = {}
    for item in as_list(value, key):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"config key {key!r} must be 'owner=path' pairs separated by commas, got {item!r}")
        if name in out:
            raise ValueError(f"config key {key!r} names owner {name!r} twice")
        out[name] = _path(path)
    return out


def _path(value: str) -> str:
    return os.path.expanduser(value) if value else ""


@dataclass
class CoordinatorSettings:
    """The coordinator's settings: the ``[tool.flwr.app.config]`` of the Flower app
    (``--run-config`` overrides), keys spelt with dashes (``expected-owners``).

    Args:
        spec: path of the FederationSpec JSON every owner trains under.
        expected_owners: the owners' node-config names, in expert order (``"alice,bob"``).
        quorum: fewest accepted experts to merge; 0 means every expected owner.
        connect_timeout: seconds to wait for expected owners to connect.
        train_timeout: seconds to wait for an owner's reply after sending it the spec.
        out_dir: where artifacts, the merged model and the report go.
        public_model: the coordinator's copy of the public model (default: the spec's).
        public_data: public corpus: router tuning data, and what proxy ids index.
        top_k: experts per token in the exported model; ``None`` means all (run config
            ``top-k = 0``, as TOML has no null).
        router_tuning: tune the router after the merge (needs ``public_data``); ``None`` (run config
            ``"spec"``) does what the spec's ``router_tuning.enabled`` says.
        resume: keep artifacts already accepted in ``out_dir``; train only the missing owners.
        export_format: ``auto``, ``flexolmo``, ``mixtral`` or ``native``.
        allow_approximate: export to a transformers format even when it drops router biases.
        seed: training seed sent to every owner.
        poll_interval: seconds between polls of the SuperLink.
        owner_keys: each expected owner's public key file (the ``.pub`` it registered with the
            SuperLink), run config ``owner-keys = "alice=/keys/alice.pub,bob=/keys/bob.pub"``: a
            SuperNode is then an owner only if it presents that owner's key
            (:mod:`flexmoe.federation.identity`). Empty: owners are who their node config says.
        secure_aggregation: federated router rounds with the coordinator seeing only the sum of
            the owners' changes (Flower's SecAgg+, :mod:`flexmoe.federation.secure_sum`):
            ``"own-rows"`` (run config ``true``: each owner changes only its own row and ``r_0``, as
            in plain rounds), ``"all-rows"`` (each owner's text tunes every row), or ``"off"``
            (``false``, the default: plain rounds, checked and aggregated per owner).
    """

    spec: str
    expected_owners: list[str]
    quorum: int = 0
    connect_timeout: float = 600.0
    train_timeout: float = 3600.0
    out_dir: str = "federation_out"
    public_model: str = ""
    public_data: str = ""
    top_k: int | None = None
    router_tuning: bool | None = None
    resume: bool = False
    export_format: str = "auto"
    allow_approximate: bool = False
    seed: int = 0
    poll_interval: float = 1.0
    owner_keys: dict[str, str] = field(default_factory=dict)
    secure_aggregation: str = "off"

    def __post_init__(self):
        if not self.spec:
            raise ValueError("run config 'spec' is empty: give the path of the FederationSpec JSON")
        if not self.expected_owners:
            raise ValueError("run config 'expected-owners' is empty: list the owners' names, e.g. 'alice,bob'")
        if len(set(self.expected_owners)) != len(self.expected_owners):
            raise ValueError(f"run config 'expected-owners' names an owner twice: {self.expected_owners}")
        if not 0 <= self.quorum <= len(self.expected_owners):
            raise ValueError(f"run config 'quorum' must be in [0, {len(self.expected_owners)}], got {self.quorum}")
        for name in ("connect_timeout", "train_timeout", "poll_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"run config {name.replace('_', '-')!r} must be > 0 seconds, got {getattr(self, name)}"
                )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, or None for all experts (run config top-k = 0), got {self.top_k}")
        if self.export_format not in ("auto", "flexolmo", "mixtral", "native"):
            raise ValueError(
                f"run config 'export-format' must be auto, flexolmo, mixtral or native, got {self.export_format!r}"
            )
        if self.router_tuning and not self.public_data:
            raise ValueError(
                "router tuning needs the public data: set run config 'public-data' or 'router-tuning=false'"
            )
        if self.secure_aggregation not in SECURE_AGGREGATION:
            raise ValueError(
                "run config 'secure-aggregation' must be false, true (own-rows), 'own-rows' or 'all-rows', "
                f"got {self.secure_aggregation!r}"
            )
        if self.owner_keys and set(self.owner_keys) != set(self.expected_owners):
            raise ValueError(
                "run config 'owner-keys' must name a key file for every expected owner and no one else: missing "
                f"{sorted(set(self.expected_owners) - set(self.owner_keys))}, "
                f"not expected {sorted(set(self.owner_keys) - set(self.expected_owners))}"
            )

    @property
    def required(self) -> int:
        return self.quorum or len(self.expected_owners)

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> CoordinatorSettings:
        """Read the settings; keys this class does not know (the simulation's) are ignored, and
        keys left out keep the defaults above."""
        c = dict(run_config)
        kwargs = {"spec": "", "expected_owners": []}  # missing ones are refused by __post_init__, with what to set
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in c:
                kwargs[f.name] = _run_config_value(f, key, c[key])
        return cls(**kwargs)


SECURE_AGGREGATION = ("off", "own-rows", "all-rows")
_CASTS = {"int": int, "float": float, "str": str}
_PATHS = ("spec", "out_dir", "public_model", "public_data")


def _run_config_value(f, key: str, value):
    """One run-config value as the :class:`CoordinatorSettings` field ``f`` holds it."""
    if f.name == "expected_owners":
        return as_list(value, key)
    if f.name == "owner_keys":
        return as_bindings(value, key)
    if f.name == "router_tuning":
        return None if value == "spec" else as_bool(value, key)
    if f.name == "secure_aggregation":  # true/false, or the scope by name
        if isinstance(value, str) and value in SECURE_AGGREGATION:
            return value
        return "own-rows" if as_bool(value, key) else "off"
    if f.type == "bool":
        return as_bool(value, key)
    if f.name in _PATHS:
        return _path(str(value))
    cast = _CASTS[f.type.removesuffix(" | None")]
    try:
        value = cast(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"run config {key!r} must be {cast.__name__}, got {value!r}") from e
    if f.name == "top_k":  # the run config's "all experts" (0) is Python's None
        if value < 0:
            raise ValueError(f"run config 'top-k' must be >= 0 (0 = all experts), got {value}")
        return value or None
    return value


@dataclass
class OwnerSettings:
    """One owner's settings, from its SuperNode's ``--node-config`` (deployment) or, in the
    simulation engine (node config holds only ``partition-id``), from the run config.

    Node-config keys: ``owner`` (name), ``data-path`` (local text: file, folder, glob, JSONL),
    ``public-model`` (local copy of the public model; default the spec's path), ``public-data``
    (local copy of the public corpus, needed to choose a proxy set), ``share-proxy`` (send the
    proxy selection; default false), ``work-dir`` (where the owner keeps its artifact and logs),
    ``require-secure-aggregation`` (refuse router rounds whose changes are not securely summed:
    the owner's own guarantee that the coordinator sees only a sum; default false).
    """

    owner: str
    data_path: str
    public_model: str = ""
    public_data: str = ""
    share_proxy: bool = False
    work_dir: str = ""
    require_secure_aggregation: bool = False

    def __post_init__(self):
        if not self.owner:
            raise ValueError(
                'this SuperNode has no owner name: start it with --node-config \'owner="NAME" data-path="PATH"\''
            )
        if not self.data_path:
            raise ValueError(
                f'owner {self.owner!r} has no data: add data-path="PATH" to the SuperNode\'s --node-config'
            )
        if self.share_proxy and not self.public_data:
            raise ValueError(
                f"owner {self.owner!r} allows sharing a proxy set but has no public corpus to choose it from: "
                'add public-data="PATH" to the SuperNode\'s --node-config'
            )

    @property
    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        root = os.environ.get("FLEXMOE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexmoe"
        )
        return Path(root) / "federation" / self.owner

    @classmethod
    def from_configs(cls, node_config: Mapping, run_config: Mapping) -> OwnerSettings:
        n, r = dict(node_config), dict(run_config)
        if "owner" not in n and "partition-id" in n:  # the simulation engine: owners listed in the run config
            owners = as_list(r.get("expected-owners", ""), "expected-owners")
            paths = as_list(r.get("data-paths", ""), "data-paths")
            i = int(n["partition-id"])
            if len(paths) != len(owners) or i >= len(owners):
                raise ValueError(
                    f"simulation: run config 'expected-owners' ({len(owners)} names) and 'data-paths' "
                    f"({len(paths)} paths) must name one owner per SuperNode; this is SuperNode {i}"
                )
            return cls(
                owner=owners[i],
                data_path=_path(paths[i]),
                public_model=_path(str(r.get("public-model", ""))),
                public_data=_path(str(r.get("public-data", ""))),
                share_proxy=as_bool(r.get("share-proxy", False), "share-proxy"),
                work_dir=_path(
                    os.path.join(str(r.get("out-dir", CoordinatorSettings.out_dir)), "simulated-owners", owners[i])
                ),
            )
        return cls(
            owner=str(n.get("owner", "")),
            data_path=_path(str(n.get("data-path", ""))),
            public_model=_path(str(n.get("public-model", ""))),
            public_data=_path(str(n.get("public-data", ""))),
            share_proxy=as_bool(n.get("share-proxy", False), "share-proxy"),
            work_dir=_path(str(n.get("work-dir", ""))),
            require_secure_aggregation=as_bool(
                n.get("require-secure-aggregation", False), "require-secure-aggregation"
            ),
        )
