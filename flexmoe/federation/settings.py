"""TODO docstring."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.federation.records import FAULTS


def as_bool(value, key: str) -> bool:
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
        top_k: experts per token in the exported model; 0 means all.
        router_tuning: tune the router after the merge (needs ``public_data``); ``None`` (run config
            ``"spec"``) does what the spec's ``router_tuning.enabled`` says.
        resume: keep artifacts already accepted in ``out_dir``; train only the missing owners.
        export_format: ``auto``, ``flexolmo``, ``mixtral`` or ``native``.
        allow_approximate: export to a transformers format even when it drops router biases.
        seed: training seed sent to every owner.
        poll_interval: seconds between polls of the SuperLink.
    """

    spec: str
    expected_owners: list[str]
    quorum: int = 0
    connect_timeout: float = 600.0
    train_timeout: float = 3600.0
    out_dir: str = "federation_out"
    public_model: str = ""
    public_data: str = ""
    top_k: int = 0
    router_tuning: bool | None = None
    resume: bool = False
    export_format: str = "auto"
    allow_approximate: bool = False
    seed: int = 0
    poll_interval: float = 1.0

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
        if self.top_k < 0:
            raise ValueError(f"run config 'top-k' must be >= 0 (0 = all experts), got {self.top_k}")
        if self.export_format not in ("auto", "flexolmo", "mixtral", "native"):
            raise ValueError(
                f"run config 'export-format' must be auto, flexolmo, mixtral or native, got {self.export_format!r}"
            )
        if self.router_tuning and not self.public_data:
            raise ValueError(
                "router tuning needs the public data: set run config 'public-data' or 'router-tuning=false'"
            )

    @property
    def required(self) -> int:
        return self.quorum or len(self.expected_owners)

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> CoordinatorSettings:
        """Read the settings; keys this class does not know (the simulation's) are ignored."""
        c = dict(run_config)

        def get(key, cast, default=None):
            return cast(c[key]) if key in c else default

        return cls(
            spec=_path(str(c.get("spec", ""))),
            expected_owners=as_list(c.get("expected-owners", ""), "expected-owners"),
            quorum=get("quorum", int, 0),
            connect_timeout=get("connect-timeout", float, 600.0),
            train_timeout=get("train-timeout", float, 3600.0),
            out_dir=_path(str(c.get("out-dir", "federation_out"))),
            public_model=_path(str(c.get("public-model", ""))),
            public_data=_path(str(c.get("public-data", ""))),
            top_k=get("top-k", int, 0),
            router_tuning=None
            if c.get("router-tuning", "spec") == "spec"
            else as_bool(c["router-tuning"], "router-tuning"),
            resume=as_bool(c.get("resume", False), "resume"),
            export_format=str(c.get("export-format", "auto")),
            allow_approximate=as_bool(c.get("allow-approximate", False), "allow-approximate"),
            seed=get("seed", int, 0),
            poll_interval=get("poll-interval", float, 1.0),
        )


@dataclass
class OwnerSettings:
    """One owner's settings, from its SuperNode's ``--node-config`` (deployment) or, in the
    simulation engine (node config holds only ``partition-id``), from the run config.

    Node-config keys: ``owner`` (name), ``data-path`` (local text: file, folder, glob, JSONL),
    ``public-model`` (local copy of the public model; default the spec's path), ``public-data``
    (local copy of the public corpus, needed to choose a proxy set), ``share-proxy`` (send the
    proxy selection; default false), ``work-dir`` (where the owner keeps its artifact and logs).

    ``fault-injection`` is a **test hook only**: ``nan``, ``wrong-shape`` or
    ``wrong-fingerprint`` corrupts this owner's reply after training, so tests can prove the
    coordinator rejects such experts. Never set it on a real SuperNode.
    """

    owner: str
    data_path: str
    public_model: str = ""
    public_data: str = ""
    share_proxy: bool = False
    work_dir: str = ""
    fault_injection: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.owner:
            raise ValueError(
                'this SuperNode has no owner name: start it with --node-config \'owner="NAME" data-path="PATH"\''
            )
        if not self.data_path:
            raise ValueError(
                f'owner {self.owner!r} has no data: add data-path="PATH" to the SuperNode\'s --node-config'
            )
        if self.fault_injection not in FAULTS:
            raise ValueError(f"node config 'fault-injection' must be one of {FAULTS[1:]}, got {self.fault_injection!r}")
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
                work_dir=_path(os.path.join(str(r.get("out-dir", "federation_out")), "simulated-owners", owners[i])),
            )
        return cls(
            owner=str(n.get("owner", "")),
            data_path=_path(str(n.get("data-path", ""))),
            public_model=_path(str(n.get("public-model", ""))),
            public_data=_path(str(n.get("public-data", ""))),
            share_proxy=as_bool(n.get("share-proxy", False), "share-proxy"),
            work_dir=_path(str(n.get("work-dir", ""))),
            fault_injection=str(n.get("fault-injection", "")),
        )
