"""Where merge inputs come from and where merged tensors go, one tensor at a time.

A *tensor source* answers ``names()``, ``spec(name) -> (dtype, shape)`` and ``get(name)``.
Two kinds exist: :class:`StateDictSource` (a model or state dict in memory) and
:class:`SafetensorsDir` (a ``save_pretrained`` directory, read lazily). The merge kernel
(:mod:`flexmoe.merge.kernel`) reads every source through this interface, so an in-memory
merge and a directory merge run the same code in the same order and give the same bytes.

Reading and writing bypass ``safe_open`` / ``save_file`` on purpose. ``safe_open`` memory-maps
the whole file, and every mapped page a merge touches counts in the process's resident set,
so peak RSS would grow with the total size of the inputs; ``save_file`` builds a whole shard
in memory first. :class:`SafetensorsDir` reads each tensor with one ``readinto`` from its
offsets, and :class:`ShardWriter` writes every header up front (all shapes are known before
the merge starts) and then appends each tensor's bytes as soon as it is merged. Both follow
the safetensors format: an 8-byte little-endian header length, a JSON header of dtype, shape
and ``data_offsets`` per tensor, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses by default

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024**2


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without aliases: a tensor sharing storage with an earlier one (a tied
    ``lm_head.weight``) is left out, as ``save_pretrained`` leaves it out on disk."""
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


class StateDictSource:
    """A model (``nn.Module``: its ``state_dict()``, tied aliases dropped) or a plain state dict."""

    def __init__(self, obj: nn.Module | Mapping[str, torch.Tensor], label: str = "model"):
        if isinstance(obj, nn.Module):
            state = unique_tensors(obj.state_dict())
        elif isinstance(obj, Mapping):
            state = dict(obj)
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f"{label}: state dict values must be tensors; {bad[:3]} are not")
        else:
            raise TypeError(f"{label}: expected an nn.Module or a state dict, got {type(obj).__name__}")
        self.label, self._state = label, state

    def names(self) -> list[str]:
        return list(self._state)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._state[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0) of tensor ``name``, a view; the whole tensor by default."""
        t = self._state[name].detach()
        return t if (start == 0 and stop is None) or t.dim() == 0 else t[start:stop]


class SafetensorsDir:
    """The weights of a ``save_pretrained`` directory (``model.safetensors`` or shards plus
    ``model.safetensors.index.json``), read one tensor at a time without memory-mapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = self.label = Path(path)
        self._files: dict[Path, object] = {}  # open file handles, by path
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such model directory")
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            files = [SINGLE]
        else:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = (
                (
                    f"; it has {pickles[:2]}, which flexmoe does not unpickle: re-save the model with "
                    "save_pretrained(..., safe_serialization=True)"
                )
                if pickles
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no {SINGLE} or {INDEX}{hint}")
        self._where: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        for file in files:
            path = self.path / file
            for name, (offset, dtype, shape) in _read_header(path).items():
                if name in self._where:
                    raise ValueError(
                        f"{self.path}: tensor {name!r} is stored twice ({file} and {self._where[name][0].name})"
                    )
                self._where[name] = (path, offset, dtype, shape)

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        _, _, dtype, shape = self._where[name]
        return _DTYPES[dtype], shape

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0) of tensor ``name``, read from disk; the whole
        tensor by default."""
        path, offset, code, shape = self._where[name]
        dtype = _DTYPES[code]
        if shape and (start != 0 or stop is not None):
            stop = shape[0] if stop is None else min(stop, shape[0])
            offset += start * _nbytes(dtype, shape[1:])
            shape = (max(0, stop - start), *shape[1:])
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8)
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
        f.seek(offset)
        if buf.numel() and f.readinto(buf.numpy()) != buf.numel():
            raise ValueError(f"{path}: {name} is truncated")
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self):
        self.close()


def _read_header(path: Path) -> dict[str, tuple[int, str, tuple[int, ...]]]:
    """name -> (absolute byte offset, dtype code, shape), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file, or a truncated one (header length {n})")
        header = json.loads(f.read(n))
    out, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if code not in _DTYPES:
            raise ValueError(f"{path}: {name} has dtype {code}, which flexmoe cannot merge")
        if stop - start != _nbytes(_DTYPES[code], shape) or 8 + n + stop > size:
            raise ValueError(f"{path}: {name} has inconsistent offsets {start}..{stop} (file truncated?)")
        out[name] = (8 + n + start, code, shape)
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"{path}: data section is {size - 8 - n} bytes, the header describes {end}")
    return out


class ShardWriter:
    """Writes tensors, in a fixed order known up front, into safetensors shards of at most
    ``max_shard_bytes`` (a single ``model.safetensors`` when they fit in one, else
    ``model-0000i-of-0000n.safetensors`` plus the index ``from_pretrained`` reads).

    Every shard's header is written when the writer opens; :meth:`write` appends a tensor's
    bytes (or the next block of its rows) to its shard, so nothing else is held in memory.
    """

    def __init__(
        self,
        directory: Path,
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.directory = Path(directory)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in specs:
            n = _nbytes(dtype, shape)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += n
        count = len(shards)
        files = [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        self._plan = {}  # name -> (file index, dtype, shape)
        self._order = [name for shard in shards for name, _, _ in shard]
        self._next, self._current, self._left = 0, None, 0
        self._files, self.total_bytes = [], 0
        for i, (file, shard) in enumerate(zip(files, shards)):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape in shard:
                n = _nbytes(dtype, shape)
                header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
                self._plan[name] = (i, dtype, shape)
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            f = open(self.directory / file, "wb")  # noqa: SIM115 (closed in close())
            f.write(struct.pack("<Q", len(raw)) + raw)
            self._files.append(f)
            self.total_bytes += offset
        self._names = files

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, the whole of tensor ``name`` or its next block of rows."""
        if self._left == 0:  # the previous tensor is complete: this must be the next one
            expected = self._order[self._next] if self._next < len(self._order) else None
            if name != expected:
                raise RuntimeError(f"ShardWriter expected {expected!r} next, got {name!r}")
            self._current = name
            self._left = _nbytes(self._plan[name][1], self._plan[name][2])
            self._next += 1
        elif name != self._current:
            raise RuntimeError(f"ShardWriter got {name!r} before the rest of {self._current!r}")
        i, dtype, shape = self._plan[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:]:
            raise RuntimeError(f"{name}: planned {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        n = t.numel() * t.element_size()
        if n > self._left:
            raise RuntimeError(f"{name}: more data than its planned shape {list(shape)} holds")
        if n:
            self._files[i].write(t.view(torch.uint8).numpy().data)
        self._left -= n

    def close(self) -> None:
        for f in self._files:
            f.close()
        if self._next != len(self._order) or self._left:
            raise RuntimeError(
                f"ShardWriter closed after {self._next} of {len(self._order)} tensors"
                f"{f' ({self._current} incomplete)' if self._left else ''}"
            )
        if len(self._names) > 1:
            weight_map = {name: self._names[i] for name, (i, _, _) in self._plan.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for f in self._files:
            f.close()


# Fields that must agree for two model directories to be merged tensor by tensor.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def architecture(path: str | os.PathLike) -> dict:
    """The architecture fields of a model directory's ``config.json`` (or, for a flexmoe native
    export, ``base_config.json`` plus its number of experts)."""
    path = Path(path)
    for name in ("config.json", "base_config.json"):
        if (path / name).is_file():
            config = json.loads((path / name).read_text())
            break
    else:
        raise FileNotFoundError(f"{path}: no config.json (is this a save_pretrained directory?)")
    arch = {k: config[k] for k in ARCHITECTURE_FIELDS if k in config}
    if (path / "flexmoe_config.json").is_file():
        arch["num_experts"] = len(json.loads((path / "flexmoe_config.json").read_text()).get("owners", []))
    return arch


def check_same_architecture(paths) -> None:
    """Raise a ``ValueError`` naming the first field on which a directory differs from the first."""
    paths = [Path(p) for p in paths]
    ref = architecture(paths[0])
    for p in paths[1:]:
        arch = architecture(p)
        diff = {k: (ref.get(k), arch.get(k)) for k in sorted(set(ref) | set(arch)) if ref.get(k) != arch.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{p} is not the same architecture as {paths[0]} ({shown}); "
                "only models of one architecture can be merged"
            )
