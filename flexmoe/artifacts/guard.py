"""The file guard: read another party's safetensors header without trusting the file.

Before any tensor is read, :func:`read_safetensors_header` checks the size cap, the header's
length and JSON, every entry's layout, and that the data section is exactly as long as the header
says; pickles and ``torch.save`` zips are recognised and refused, never loaded. Every problem is an
:class:`ArtifactError` naming the owner, the field, what was expected and what was found. The
expert loaders (full and LoRA-sized) and the coordinator's streaming assembly all start here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from flexmoe.core.errors import InputError

DEFAULT_MAX_BYTES = 64 * 2**30  # a 64 GiB expert is already far past FlexOlmo's 7B experts


_MAX_HEADER_BYTES = 100 * 2**20


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ArtifactError(InputError):
    """An expert artifact is unusable. ``owner``, ``field``, ``expected`` and ``got`` say why."""

    def __init__(self, owner: str, field: str, expected, got, *, source: str | os.PathLike | None = None, hint=""):
        self.owner, self.field, self.expected, self.got = owner, field, expected, got
        self.source = str(source) if source is not None else None
        where = f" ({self.source})" if self.source else ""
        msg = f"expert artifact of owner {owner!r}{where}: {field}: expected {expected}, got {got}"
        super().__init__(msg + (f". {hint}" if hint else ""))


def read_safetensors_header(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Parse and check a safetensors header without trusting the file.

    Checks: size cap, header length, JSON well-formedness, entry layout, and that the data
    section is exactly as long as the header says (catches truncation and appended bytes).
    Recognises pickles and ``torch.save`` zips and says so.
    """
    path = Path(path)
    who = path.name
    if not path.is_file():
        raise ArtifactError(who, "file", "an existing file", "nothing at that path", source=path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ArtifactError(who, "file size", f"at most {max_bytes} bytes", f"{size} bytes", source=path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            kind = "a pickle" if head[:1] == b"\x80" else "a zip archive (torch.save format)"
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
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ArtifactError(
                who,
                "header length",
                f"at most {min(_MAX_HEADER_BYTES, size - 8)}",
                n,
                source=path,
                hint="not a safetensors file, or a truncated one",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(who, "header", "a JSON object", f"unreadable ({e})", source=path) from e
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and isinstance(metadata.get("owner"), str):
        who = metadata["owner"]
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ArtifactError(who, "__metadata__", "a map of strings to strings", type(metadata).__name__, source=path)
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        )
        if not ok:
            raise ArtifactError(who, f"header entry {name!r}", "{dtype, shape, data_offsets}", entry, source=path)
        end = max(end, entry["data_offsets"][1])
    data = size - 8 - n
    if data != end:
        what = "truncated" if data < end else "trailing bytes after the data"
        raise ArtifactError(who, "file length", f"{8 + n + end} bytes", f"{size} bytes ({what})", source=path)
    return header
