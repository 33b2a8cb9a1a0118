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
:class:`~flexmoe.ExpertArtifact` check on it before using any weight. Before that, every reply
from any node is checked here as it arrived, without trusting it: the records present and of
their type (:func:`check_records`), each array's declared name, shape, dtype and byte count against
what the public model implies (:func:`expert_layout`, :func:`check_layout`) before one byte is
copied, manifest fields as short strings, metrics as finite numbers of the expected kinds
(:func:`train_metrics`, :func:`round_metrics`) and the query's owner name
(:func:`query_owner`). Each problem is an :class:`ArtifactError` or :class:`ReplyError` naming the
sender, the field, what was expected and what came.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import safe_open

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.artifacts.unigram import BIGRAM_TENSOR, UNIGRAM_TENSOR
from flexmoe.core.errors import InputError
from flexmoe.core.surgery import decoder_layers
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

# Bounds on what a node may put in a reply besides tensors: an honest owner's manifest has about
# 15 fields of under 100 characters, its metrics about 10 numbers and one list per layer.
MAX_FIELDS = 64
MAX_TEXT = 4096  # characters of one manifest value or owner name
MAX_SHOWN = 200  # characters of an offending value quoted in an error


class ReplyError(InputError):
    """A node's reply is unusable: ``who`` sent it, ``field`` is what is wrong, ``expected`` and
    ``got`` say how. The coordinator turns it into that node's rejection, never a crash."""

    def __init__(self, who: str, field: str, expected, got):
        self.who, self.field, self.expected, self.got = who, field, expected, got
        super().__init__(f"reply of {who}: {field}: expected {expected}, got {shown(got)}")


def shown(value) -> str:
    """``value`` as an error quotes it: its repr, cut to :data:`MAX_SHOWN` characters (a node
    may send a 20 MB string; the report needs to say what it was, not repeat it)."""
    text = repr(value[: MAX_SHOWN + 1] if isinstance(value, (str, bytes, list)) else value)
    if len(text) <= MAX_SHOWN and not (isinstance(value, (str, bytes, list)) and len(value) > MAX_SHOWN):
        return text
    size = f" ({len(value)} long)" if isinstance(value, (str, bytes, list)) else ""
    return f"{text[:MAX_SHOWN]}...{size}"


def check_records(content: RecordDict, who: str, *, required: Mapping[str, type], optional: Mapping[str, type] = {}):
    """Refuse a reply unless it holds exactly the ``required`` records, perhaps some ``optional``
    ones, each of the record type named (``ArrayRecord``, ``ConfigRecord``, ``MetricRecord``)."""
    allowed = {**required, **optional}
    names = list(content.keys())
    extra = sorted(n for n in names if n not in allowed)
    if extra:
        raise ReplyError(who, "records", f"only {sorted(allowed)}", f"also {shown(extra)}")
    missing = sorted(n for n in required if n not in names)
    if missing:
        raise ReplyError(who, "records", f"{sorted(required)}", f"{sorted(names)} (missing {missing})")
    for name in names:
        record = content[name]
        if not isinstance(record, allowed[name]):
            raise ReplyError(who, f"record {name!r}", f"a {allowed[name].__name__}", type(record).__name__)


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


def expert_layout(public, *, bigram_buckets: int = 0) -> dict[str, tuple[int, ...]]:
    """Every tensor an owner's expert may carry, with its shape, as the (dense) ``public`` model
    implies it (the artifact layout of :mod:`flexmoe.artifacts.expert`): per layer the expert MLP's
    tensors, the router row, bias and public row, the MLP-input statistics; the token unigram
    counts over the vocabulary and, with ``bigram_buckets``, the hashed pair counts. A reply that
    declares anything else, or any other shape, is refused before a byte of it is copied, so what
    the coordinator holds for one reply is bounded by the public model's expert size."""
    hidden = public.config.hidden_size
    layout: dict[str, tuple[int, ...]] = {}
    for L, layer in enumerate(decoder_layers(public)):
        for name, t in layer.mlp.state_dict().items():
            layout[f"layers.{L}.expert.{name}"] = tuple(t.shape)
        layout[f"layers.{L}.router.embedding"] = (hidden,)
        layout[f"layers.{L}.router.bias"] = (1,)
        layout[f"layers.{L}.router.public_embedding"] = (hidden,)
        layout[f"layers.{L}.stats.mean"] = (hidden,)
        layout[f"layers.{L}.stats.covariance"] = (hidden, hidden)
    layout[UNIGRAM_TENSOR] = (public.config.vocab_size,)
    if bigram_buckets:
        layout[BIGRAM_TENSOR] = (bigram_buckets,)
    return layout


def check_layout(arrays: ArrayRecord, layout: Mapping[str, tuple[int, ...]], who: str) -> int:
    """Check what ``arrays`` *declares* (names, serialisation, dtypes, shapes, byte counts)
    against ``layout`` (name -> shape) without copying any data; returns the bytes declared.
    Names must be among ``layout``'s, each with exactly its shape."""
    if len(arrays) > len(layout):
        raise ArtifactError(who, "number of tensors", f"at most {len(layout)}", len(arrays))
    total = 0
    for name, a in arrays.items():
        if name not in layout:
            raise ArtifactError(who, "tensor names", "the artifact layout the public model implies", shown(name))
        if a.stype != STYPE:
            raise ArtifactError(who, f"serialisation of tensor {name}", STYPE, shown(a.stype))
        if a.dtype not in _DTYPES:
            raise ArtifactError(who, f"dtype of tensor {name}", f"one of {', '.join(_DTYPES)}", shown(a.dtype))
        shape = tuple(a.shape)
        if shape != tuple(layout[name]):
            raise ArtifactError(who, f"shape of {name}", list(layout[name]), shown(list(shape)))
        expected = math.prod(shape) * _DTYPES[a.dtype].itemsize
        if len(a.data) != expected:
            raise ArtifactError(who, f"bytes of tensor {name}", expected, len(a.data))
        total += expected
    return total


def arrays_to_tensors(
    arrays: ArrayRecord, owner: str, layout: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of a received :class:`ArrayRecord`; any malformed entry is an :class:`ArtifactError`.

    Every entry is checked before any is copied (with ``layout``, against it: :func:`check_layout`);
    then each is copied once out of Flower's buffer."""
    if layout is not None:
        check_layout(arrays, layout, owner)
    for name, a in arrays.items():
        if a.stype != STYPE:
            raise ArtifactError(owner, f"serialisation of tensor {name}", STYPE, shown(a.stype))
        if a.dtype not in _DTYPES:
            raise ArtifactError(owner, f"dtype of tensor {name}", f"one of {', '.join(_DTYPES)}", shown(a.dtype))
        shape = tuple(a.shape)
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ArtifactError(owner, f"shape of tensor {name}", "non-negative integers", shown(list(shape)))
        expected = math.prod(shape) * _DTYPES[a.dtype].itemsize
        if len(a.data) != expected:
            raise ArtifactError(owner, f"bytes of tensor {name}", expected, len(a.data))
    out = {}
    for name, a in arrays.items():
        flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
        out[name] = flat.view(_DTYPES[a.dtype]).reshape(tuple(a.shape))  # the bytearray is this tensor's own
    return out


def read_artifact_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of an artifact file, as written (the owner's own file)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def manifest_to_metadata(manifest: ConfigRecord, owner: str) -> dict[str, str]:
    """An artifact's metadata from a received ``manifest`` record: strings only, as in the file,
    at most :data:`MAX_FIELDS` of them, each at most :data:`MAX_TEXT` characters."""
    if len(manifest) > MAX_FIELDS:
        raise ArtifactError(owner, "manifest", f"at most {MAX_FIELDS} fields", f"{len(manifest)} fields")
    metadata = {}
    for key, value in manifest.items():
        if not isinstance(value, str):
            raise ArtifactError(owner, f"manifest field {shown(key)}", "a string", type(value).__name__)
        if len(key) > MAX_TEXT or len(value) > MAX_TEXT:
            raise ArtifactError(
                owner, f"manifest field {shown(key)}", f"at most {MAX_TEXT} characters", f"{len(value)} characters"
            )
        metadata[key] = value
    return metadata


def query_owner(content: RecordDict, who: str) -> str:
    """The owner name in a ``query`` reply (record ``owner``, field ``name``): a non-empty string
    of at most :data:`MAX_TEXT` characters."""
    check_records(content, who, required={OWNER: ConfigRecord})
    name = content[OWNER].get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_TEXT:
        raise ReplyError(who, "owner name", f"a non-empty string of at most {MAX_TEXT} characters", name)
    return name


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


def record_to_proxy(record: ConfigRecord, who: str = "the owner") -> ProxySelection:
    """The :class:`~flexmoe.ProxySelection` of a received ``proxy`` record (fields of the wrong
    type are a :class:`ReplyError`; :class:`~flexmoe.ProxySelection` checks the rest)."""
    d = dict(record)
    ints = {k: d.get(k) for k in ("version", "budget", "num-public")}
    ints["version"] = ints["version"] if "version" in d else 1
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
            raise ReplyError(who, f"proxy field {key!r}", "a non-negative integer", value)
    indices, scores = d.get("indices") or [], d.get("scores") or []
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ReplyError(who, "proxy field 'indices'", "a list of integers", indices)
    if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise ReplyError(who, "proxy field 'scores'", "a list of numbers", scores)
    return ProxySelection.from_dict(
        {
            "version": ints["version"],
            "budget": ints["budget"],
            "num_public": ints["num-public"],
            "indices": list(indices),
            "scores": [float(x) for x in scores],
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


# What an honest owner measures (flexmoe.federation.task): each a number, except the per-layer
# routing share. Other numeric keys (a Lightning metric it logs) are kept as they came.
TRAIN_SCALARS = ("training-tokens", "steps", "train-seconds", "train-loss", "z-loss", "val-loss", "val-ppl")
PER_LAYER_SHARE = "router-top1-own"
ROUND_SCALARS = ("round", "steps", "loss-first", "loss-last", "seconds")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_metrics(record: MetricRecord, who: str, scalars: tuple[str, ...], per_layer: int = 0) -> dict:
    """A received ``metrics`` record as a plain dict, refused unless each value is a finite number
    (a list of them at most ``per_layer`` long for :data:`PER_LAYER_SHARE`, each in [0, 1]),
    the keys named in ``scalars`` are single numbers, and there are at most :data:`MAX_FIELDS`."""
    if len(record) > MAX_FIELDS:
        raise ReplyError(who, "metrics", f"at most {MAX_FIELDS} values", f"{len(record)} values")
    out = {}
    for key, value in record.items():
        if len(key) > 64:
            raise ReplyError(who, "metric name", "at most 64 characters", key)
        if key == PER_LAYER_SHARE:
            ok = (
                isinstance(value, list)
                and 0 < len(value) <= per_layer
                and all(_number(x) and 0 <= x <= 1 for x in value)
            )
            if not ok:
                raise ReplyError(who, f"metric {key!r}", f"a list of at most {per_layer} shares in [0, 1]", value)
            out[key] = [float(x) for x in value]
        elif key in scalars or not isinstance(value, list):
            if not _number(value):
                raise ReplyError(who, f"metric {key!r}", "a finite number", value)
            out[key] = value
        else:
            if len(value) > per_layer or not all(_number(x) for x in value):
                raise ReplyError(who, f"metric {key!r}", f"a list of at most {per_layer} finite numbers", value)
            out[key] = list(value)
    return out


def train_metrics(record: MetricRecord, who: str, num_layers: int) -> dict:
    """The ``metrics`` of a ``train`` reply (:func:`check_metrics` with the training metrics)."""
    return check_metrics(record, who, TRAIN_SCALARS, num_layers)


def round_metrics(record: MetricRecord, who: str) -> dict:
    """The ``metrics`` of a ``train.router`` reply: numbers only."""
    return check_metrics(record, who, ROUND_SCALARS, 0)
