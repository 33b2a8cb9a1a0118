"""What crosses the wire between an owner's ClientApp and the coordinator's ServerApp (the
settings each side reads from Flower's configs are :mod:`flexmoe.federation.settings`).

Wire format (Flower Message API; docs/federation.md):

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

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from safetensors import safe_open

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.owner.proxy import ProxySelection

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
    with safe_open(os.fspath(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def manifest_to_metadata(manifest: ConfigRecord, owner: str) -> dict[str, str]:
    """An artifact's metadata from a received ``manifest`` record: strings only, as in the file."""
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


def proxy_to_record(selection: ProxySelection) -> ConfigRecord:
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


def record_to_proxy(record: ConfigRecord) -> ProxySelection:
    """The :class:`~flexmoe.ProxySelection` of a received ``proxy`` record."""
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


# -- metrics ----------------------------------------------------------------------------------


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
