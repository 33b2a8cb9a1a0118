"""The file guard: read another party's safetensors header without trusting the file.

Before any tensor is read, :func:`read_safetensors_header` checks that the path is a regular file
(not a FIFO or a device), its size against a cap, the header's length, its JSON (bounded depth, no
duplicate names, no oversized numbers), every tensor name, dtype and shape, that the tensors tile
the data section exactly (each one as long as its shape and dtype say, no gaps, no overlaps, no
bytes after), and the metadata's size. Given :class:`HeaderBounds` (what the public model implies
an expert holds: :meth:`HeaderBounds.for_expert`), it also refuses a file whose size, tensor count
or any tensor is larger than that, from the header alone: memory spent refusing a file never
follows what the file declares. Pickles and ``torch.save`` zips are recognised and refused, never
loaded. Every problem is an :class:`ArtifactError` naming the owner, the field, what was expected
and what was found, each cut to a readable length. The expert loaders (full and LoRA-sized) and
the coordinator's streaming assembly all start here.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.core.errors import InputError
from flexmoe.core.parsing import MAX_OWNER_NAME, load_json, parse_count, shorten, valid_owner_name
from flexmoe.modeling.domain_posterior import MAX_BIGRAM_BITS

DEFAULT_MAX_BYTES = 64 * 2**30  # a 64 GiB expert is already far past FlexOlmo's 7B experts

# An expert's header lists a few tensors per layer (~100 bytes each): 32 layers of a 7B model
# take about 30 KB. safetensors itself allows 100 MB; parsing that much JSON costs ~1 GB.
_MAX_HEADER_BYTES = 16 * 2**20
_MAX_METADATA_KEYS = 256
_MAX_METADATA_VALUE = 64 * 2**10
_MAX_NAME = 512
_MAX_DIMS = 8
# Header JSON: {name: {"dtype", "shape": [...], "data_offsets": [...]}} is three levels deep.
_HEADER_DEPTH = 4

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# Bytes per element of every dtype safetensors writes; anything else is refused by name.
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Printable ASCII without spaces: every name flexmoe writes (``layers.3.expert.up_proj.weight``).
# A fullmatch, so a trailing newline is not accepted the way ``$`` accepts it.
_NAME = re.compile(rf"[!-~]{{1,{_MAX_NAME}}}")


class ArtifactError(InputError):
    """An expert artifact is unusable. ``owner``, ``field``, ``expected`` and ``got`` say why.

    The message cuts each part to a readable length: they may come from the file itself."""

    def __init__(self, owner: str, field: str, expected, got, *, source: str | os.PathLike | None = None, hint=""):
        self.owner, self.field, self.expected, self.got = owner, field, expected, got
        self.source = str(source) if source is not None else None
        where = f" ({shorten(self.source)})" if self.source else ""
        msg = (
            f"expert artifact of owner {shorten(owner, 80)!r}{where}: {shorten(field, 160)}: "
            f"expected {shorten(expected)}, got {shorten(got)}"
        )
        super().__init__(msg + (f". {shorten(hint)}" if hint else ""))


@dataclass(frozen=True)
class HeaderBounds:
    """The most a file may hold, from what the receiver expects of it: tensor count, the largest
    tensor and the whole data section, in bytes. :func:`read_safetensors_header` refuses a header
    declaring more before it reads a tensor."""

    max_tensors: int
    max_tensor_bytes: int
    max_data_bytes: int

    @property
    def max_file_bytes(self) -> int:
        return 8 + self.max_header_bytes + self.max_data_bytes

    @property
    def max_header_bytes(self) -> int:
        # Every entry, its name and offsets written out, plus the metadata.
        return min(_MAX_HEADER_BYTES, self.max_tensors * (_MAX_NAME + 160) + 2 * 2**20)

    @classmethod
    def for_expert(cls, config, *, bigram_buckets: int | None = None) -> HeaderBounds:
        """The bounds an expert file for the public model with ``config`` (a ``transformers``
        config) keeps, full or LoRA-sized: per layer the expert MLP (gate, up, down and their
        biases, or their LoRA factors at any rank up to full), the router rows and bias, the
        statistics (mean and covariance), and the unigram (``vocab_size``) and bigram counts
        (``bigram_buckets``, default the largest table the posterior recipe allows); every
        element at most 4 bytes (float32)."""
        hidden = _config_int(config, "hidden_size")
        inter = _config_int(config, "intermediate_size")
        layers = _config_int(config, "num_hidden_layers")
        vocab = _config_int(config, "vocab_size")
        buckets = 2**MAX_BIGRAM_BITS if bigram_buckets is None else int(bigram_buckets)
        # A LoRA pair at rank r <= min(out, in) is never larger than twice the full matrix.
        mlp = 2 * (3 * hidden * inter + 2 * inter + hidden)
        per_layer = mlp + 4 * hidden + 1 + hidden * hidden
        return cls(
            max_tensors=layers * 32 + 4,
            max_tensor_bytes=4 * max(hidden * inter, hidden * hidden, vocab, buckets),
            max_data_bytes=4 * (layers * per_layer + vocab + buckets),
        )


def _config_int(config, name: str) -> int:
    return parse_count(getattr(config, name, None), what=f"public model config {name}", minimum=1, maximum=2**40)


def read_safetensors_header(
    path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES, bounds: HeaderBounds | None = None
) -> dict:
    """Parse and check a safetensors header without trusting the file.

    Checks: a regular file, the size cap (``max_bytes``, and ``bounds.max_file_bytes``), the
    header's length and JSON, each entry's name, dtype, shape and offsets, that the entries tile
    the data section exactly (catches truncation, appended bytes, overlapping or oversized
    tensors), the metadata's size and owner name, and with ``bounds`` the tensor count and sizes.
    Recognises pickles and ``torch.save`` zips and says so.
    """
    path = Path(path)
    who = path.name
    try:
        st = os.stat(path)
    except OSError:
        raise ArtifactError(who, "file", "an existing file", "nothing at that path", source=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(who, "file", "a regular file", "a directory, FIFO, socket or device", source=path)
    size = st.st_size
    header_cap = _MAX_HEADER_BYTES
    if bounds is not None:
        max_bytes = min(max_bytes, bounds.max_file_bytes)
        header_cap = bounds.max_header_bytes
    if size > max_bytes:
        raise ArtifactError(who, "file size", f"at most {max_bytes} bytes", f"{size} bytes", source=path)
    with open(path, "rb") as f:
        head = f.read(8)
        # A header starts with "{" after its length; only then is a leading 0x80 a length byte.
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if (pickled or head[:4] == b"PK\x03\x04") and f.read(1) != b"{":
            kind = "a pickle" if pickled else "a zip archive (torch.save format)"
            raise ArtifactError(
                who,
                "format",
                "safetensors",
                kind,
                source=path,
                hint="flexmoe never unpickles files from other parties; export the expert with ExpertArtifact.save",
            )
        if len(head) < 8:
            raise ArtifactError(who, "file", "a safetensors file (>= 8 bytes)", f"{len(head)} bytes", source=path)
        (n,) = struct.unpack("<Q", head)
        f.seek(8)
        if n > min(header_cap, size - 8):
            raise ArtifactError(
                who,
                "header length",
                f"at most {min(header_cap, size - 8)}",
                n,
                source=path,
                hint="not a safetensors file, or a truncated one",
            )
        raw = f.read(n)
    try:
        header = load_json(raw, what="header", max_depth=_HEADER_DEPTH, max_bytes=header_cap)
    except InputError as e:
        raise ArtifactError(who, "header", "a JSON object", str(e), source=path) from None
    if not isinstance(header, dict):
        raise ArtifactError(who, "header", "a JSON object", type(header).__name__, source=path)
    who = _check_metadata(header.get("__metadata__"), who, path)
    _check_entries(header, who, path, size, n, bounds)
    return header


def _check_metadata(metadata, who: str, path: Path) -> str:
    """Check ``__metadata__`` (a bounded map of strings to strings, a sane owner name); return
    the owner's name to report problems under."""
    if metadata is None:
        return who
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ArtifactError(who, "__metadata__", "a map of strings to strings", type(metadata).__name__, source=path)
    if len(metadata) > _MAX_METADATA_KEYS:
        raise ArtifactError(who, "__metadata__", f"at most {_MAX_METADATA_KEYS} keys", len(metadata), source=path)
    for k, v in metadata.items():
        if len(k) > _MAX_NAME or len(v) > _MAX_METADATA_VALUE:
            raise ArtifactError(
                who,
                f"metadata {k!r}",
                f"a key of at most {_MAX_NAME} and a value of at most {_MAX_METADATA_VALUE} characters",
                f"{len(k)} and {len(v)}",
                source=path,
            )
    owner = metadata.get("owner")
    if owner is None:
        return who
    if not check_owner_name(owner):
        raise ArtifactError(
            who,
            "metadata 'owner'",
            f"1 to {MAX_OWNER_NAME} printable characters, no '/' or '\\', not '.' or '..', no surrounding spaces",
            owner,
            source=path,
        )
    return owner


def check_owner_name(name) -> bool:
    """Whether ``name`` is an owner name flexmoe accepts from another party
    (:func:`flexmoe.core.parsing.valid_owner_name`, the one rule)."""
    return valid_owner_name(name)


def _check_entries(header: dict, who: str, path: Path, size: int, n: int, bounds: HeaderBounds | None) -> None:
    """Every entry well formed and within ``bounds``; together they tile the data section (the
    ``size - 8 - n`` bytes after the ``n``-byte header) exactly."""
    spans = []
    if bounds is not None and len(header) - ("__metadata__" in header) > bounds.max_tensors:
        raise ArtifactError(who, "tensor count", f"at most {bounds.max_tensors}", len(header), source=path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if _NAME.fullmatch(name) is None:
            raise ArtifactError(
                who, "tensor name", f"1 to {_MAX_NAME} printable ASCII characters without spaces", name, source=path
            )
        ok = (
            isinstance(entry, dict)
            and set(entry) == {"dtype", "shape", "data_offsets"}
            and isinstance(entry["dtype"], str)  # a list or dict is unhashable: checked before the lookup
            and entry["dtype"] in _ITEMSIZE
            and isinstance(entry["shape"], list)
            and len(entry["shape"]) <= _MAX_DIMS
            and all(type(d) is int and d >= 0 for d in entry["shape"])
            and isinstance(entry["data_offsets"], list)
            and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        )
        if not ok:
            raise ArtifactError(
                who,
                f"header entry {name!r}",
                f"{{dtype (one of {', '.join(_ITEMSIZE)}), shape (at most {_MAX_DIMS} sizes), data_offsets}}",
                entry,
                source=path,
            )
        start, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * _ITEMSIZE[entry["dtype"]]
        if end - start != nbytes:
            raise ArtifactError(
                who, f"data_offsets of {name!r}", f"{nbytes} bytes (shape x dtype)", f"{end - start}", source=path
            )
        if bounds is not None and nbytes > bounds.max_tensor_bytes:
            raise ArtifactError(
                who,
                f"size of tensor {name!r}",
                f"at most {bounds.max_tensor_bytes} bytes for this public model",
                f"{nbytes} bytes (shape {entry['shape']})",
                source=path,
            )
        spans.append((start, end, name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start != at:
            what = "overlaps the previous tensor" if start < at else f"leaves {start - at} unused bytes before it"
            raise ArtifactError(
                who, f"data_offsets of {name!r}", f"to start at byte {at}", f"{start} ({what})", source=path
            )
        at = end
    data = size - 8 - n
    if data != at:
        what = "truncated" if data < at else "trailing bytes after the data"
        raise ArtifactError(who, "file length", f"{8 + n + at} bytes", f"{size} bytes ({what})", source=path)
