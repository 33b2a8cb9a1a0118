"""What crosses the wire between an owner's ClientApp and the coordinator's ServerApp, and the
settings each side reads from Flower's configs.

Wire format (Flower Message API, DESIGN.md "Federation"):

* coordinator -> owner, message type ``train``: ``spec`` (ConfigRecord: the FederationSpec JSON
  and its sha256) and ``train`` (ConfigRecord: the seed).
* owner -> coordinator, the reply: ``expert`` (ArrayRecord: every tensor of the owner's artifact
  file, raw little-endian bytes, names as in the file), ``manifest`` (ConfigRecord: the artifact's
  metadata, strings as in the file), ``metrics`` (MetricRecord: tokens, losses, routing shares)
  and, only when the owner allows it, ``proxy`` (ConfigRecord: a :class:`~flexmoe.ProxySelection`,
  ids and scores of *public* documents). Nothing else leaves an owner.
* coordinator -> owner, message type ``query``: asks a SuperNode which owner it is (its
  ``node_config`` name); the reply is ``owner`` (ConfigRecord: ``name``, ``share-proxy``).
* coordinator -> owner, message type ``train.router`` (federated router tuning, one per round):
  ``spec``, ``round`` (ConfigRecord: round index, owners in expert order, each expert's
  :func:`content_sha256`, seed), ``routers`` (ArrayRecord: every layer's router rows and biases) and, until the
  owner has them, every accepted expert as ``expert:<owner>`` + ``manifest:<owner>``. The reply is
  ``routers`` (the rows after the owner's local steps on its own text) and ``metrics``.

The coordinator rebuilds the artifact file from ``expert`` + ``manifest`` and runs every
:class:`~flexmoe.ExpertArtifact` check on it before using any weight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from flexmoe.artifact import ArtifactError

# Record names in messages.
SPEC, TRAIN, OWNER = "spec", "train", "owner"  # coordinator -> owner (and the query's reply)
EXPERT, MANIFEST, METRICS, PROXY = "expert", "manifest", "metrics", "proxy"  # owner -> coordinator
REPLY_RECORDS = frozenset({EXPERT, MANIFEST, METRICS, PROXY})
# Federated router tuning: the round's settings, the router rows both ways, and (until an owner
# has them) every accepted expert as ``expert:<owner>`` + ``manifest:<owner>``.
ROUND, ROUTERS = "round", "routers"
# Message types: Flower dispatches ``query`` and ``train`` to the ClientApp's handlers of that name,
# ``train.router`` to the handler registered as ``@app.train("router")``.
QUERY_MESSAGE, TRAIN_MESSAGE, ROUTER_MESSAGE = "query", "train", "train.router"

# Tensors travel as raw bytes under this serialisation type; only floating dtypes are accepted,
# so no integer data (token ids) can ride along as "weights".
STYPE = "flexmoe.raw-le"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

FAULTS = ("", "nan", "wrong-shape", "wrong-fingerprint")


# -- artifact <-> records ----------------------------------------------------------------------


def tensors_to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An :class:`ArrayRecord` holding every tensor bit for bit (bfloat16 included)."""
    arrays = {}
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}; only {', '.join(_DTYPES)} tensors are sent")
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        arrays[name] = Array(dtype=_DTYPE_NAMES[t.dtype], shape=tuple(t.shape), stype=STYPE, data=data)
    return ArrayRecord(arrays)


def arrays_to_tensors(arrays: ArrayRecord, owner: str) -> dict[str, torch.Tensor]:
    """Tensors of a received :class:`ArrayRecord`; any malformed entry is an :class:`ArtifactError`."""
    out = {}
    for name, a in arrays.items():
        if a.stype != STYPE:
            raise ArtifactError(owner, f"serialisation of tensor {name}", STYPE, a.stype)
        if a.dtype not in _DTYPES:
            raise ArtifactError(owner, f"dtype of tensor {name}", f"one of {', '.join(_DTYPES)}", a.dtype)
        dtype = _DTYPES[a.dtype]
        shape = tuple(a.shape)
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ArtifactError(owner, f"shape of tensor {name}", "non-negative integers", list(shape))
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if len(a.data) != expected:
            raise ArtifactError(owner, f"bytes of tensor {name}", expected, len(a.data))
        flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
        out[name] = flat.view(dtype).reshape(shape).clone()
    return out


def read_artifact_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of an artifact file, as written (the owner's own file)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 of an expert's tensors (name, dtype, shape, bytes, by sorted name) and metadata (sorted
    items): the same for the same expert however its file was written, so owners and coordinator can
    name the experts of a merge by hash."""
    import hashlib

    from flexmoe.upcycle import hash_tensor

    h = hashlib.sha256()
    for name in sorted(tensors):
        hash_tensor(h, name, tensors[name])
    for key in sorted(metadata):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


def manifest_to_metadata(manifest: ConfigRecord, owner: str) -> dict[str, str]:
    metadata = {}
    for key, value in manifest.items():
        if not isinstance(value, str):
            raise ArtifactError(owner, f"manifest field {key!r}", "a string", type(value).__name__)
        metadata[key] = value
    return metadata


def record_bytes(*records) -> int:
    """Bytes of the records' payloads, as Flower counts them (``count_bytes``)."""
    return sum(r.count_bytes() for r in records if r is not None)


# -- proxy selection <-> record ----------------------------------------------------------------


def proxy_to_record(selection) -> ConfigRecord:
    """A :class:`~flexmoe.ProxySelection` (public document ids and scores) as a ConfigRecord."""
    return ConfigRecord(
        {
            "version": int(selection.version),
            "budget": int(selection.budget),
            "num-public": int(selection.num_public),
            "indices": [int(i) for i in selection.indices],
            "scores": [float(s) for s in selection.scores],
        }
    )


def record_to_proxy(record: ConfigRecord):
    from flexmoe.proxy import ProxySelection

    d = dict(record)
    return ProxySelection.from_dict(
        {
            "version": d.get("version", 1),
            "budget": d.get("budget"),
            "num_public": d.get("num-public"),
            "indices": list(d.get("indices") or []),
            "scores": list(d.get("scores") or []),
        }
    )


# -- settings ---------------------------------------------------------------------------------


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


def metrics_record(values: Mapping[str, float | int | list[float]]) -> MetricRecord:
    """A MetricRecord of the finite numbers in ``values`` (NaN/None dropped: Flower refuses neither,
    but a report should not show them as measurements)."""
    clean = {}
    for k, v in values.items():
        if isinstance(v, list):
            if v and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                clean[k] = [float(x) for x in v]
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            clean[k] = v
    return MetricRecord(clean)
