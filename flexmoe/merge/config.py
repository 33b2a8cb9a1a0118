"""Merge configuration files: one YAML file says which models to merge, how, and with what.

::

    # ties.yaml                          # paths are relative to this file
    method: ties                         # average | task_arithmetic | ties | dare
    base: public/                        # the model the task vectors are taken from
    models: [code_expert/, math_expert/] # save_pretrained directories (safetensors)
    weights: [1.0, 0.5]                  # optional
    density: 0.2                         # required for ties: the fraction of entries kept
    trim: global                         # global (the paper) | per_tensor
    sign: mass                           # mass | weighted_mass | count
    tie_break: zero                      # zero (the paper) | majority (the authors' code)
    lam: 1.0
    dtype: bfloat16                      # optional: float32 | float16 | bfloat16 (default: the base's)

and ``flexmoe merge ties.yaml --out merged/`` (or :func:`merge`) writes a ``transformers``
directory: merged safetensors shards, and the base's ``config.json``, generation config and
tokenizer. Per method (see :data:`METHODS`):

==================  ==============  ====================================================
method              required        optional
==================  ==============  ====================================================
``average``         --              ``weights``, ``dtype`` (no ``base``: a soup of models)
``task_arithmetic`` ``base``        ``weights``, ``lam``, ``dtype``
``ties``            ``base``,       ``weights``, ``lam``, ``trim``, ``sign``, ``tie_break``,
                    ``density``     ``dtype``
``dare``            ``base``,       ``weights``, ``lam``, ``seed``, ``then``
                    ``drop``        (``linear`` | ``ties``), ``sign`` and ``tie_break``
                                    (with ``then: ties``), ``dtype``
==================  ==============  ====================================================

Everything is checked before any weight is read: the method and its parameters (an unknown
key, a parameter the method does not use, a missing ``density``), that every directory
exists and holds safetensors, that their ``config.json`` architectures agree (model type,
hidden size, layers, heads, vocabulary) and that their tensor names and shapes match.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexmoe.core.errors import InputError
from flexmoe.core.parsing import MAX_YAML_BYTES, load_yaml, shorten
from flexmoe.merge.dare import dare_method
from flexmoe.merge.kernel import MergeMethod, check_compatible, merge_dirs
from flexmoe.merge.stream import DEFAULT_SHARD_BYTES, SafetensorsDir, check_same_architecture
from flexmoe.merge.ties import ties_method


class MergeConfigError(InputError):
    """A merge configuration that cannot be run; the message says what and where."""


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs: a base or not, required and optional parameters, and how to turn
    them into kernel settings."""

    needs_base: bool
    required: tuple[str, ...]
    optional: tuple[str, ...]
    build: object  # (MergeConfig) -> MergeMethod


METHODS: dict[str, MethodInfo] = {
    "average": MethodInfo(False, (), ("weights",), lambda c: MergeMethod(combine="mean")),
    "task_arithmetic": MethodInfo(
        True, (), ("weights", "lam"), lambda c: MergeMethod(combine="sum", lam=_or(c.lam, 1.0))
    ),
    "ties": MethodInfo(
        True,
        ("density",),
        ("weights", "lam", "trim", "sign", "tie_break"),
        lambda c: ties_method(
            c.density, _or(c.lam, 1.0), _or(c.trim, "global"), _or(c.sign, "mass"), _or(c.tie_break, "zero")
        ),
    ),
    "dare": MethodInfo(
        True,
        ("drop",),
        ("weights", "lam", "seed", "then", "sign", "tie_break"),
        lambda c: dare_method(
            c.drop,
            _or(c.seed, 0),
            _or(c.then, "linear"),
            _or(c.lam, 1.0),
            _or(c.sign, "mass"),
            _or(c.tie_break, "zero"),
        ),
    ),
}
# Names other tools use, and what they are called here.
_ALIASES = {
    "linear": "average",
    "soup": "average",
    "model_soup": "average",
    "uniform_soup": "average",
    "task_vector": "task_arithmetic",
    "dare_linear": "dare",
    "dare_ties": "dare (with then: ties)",
    "ties_merging": "ties",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PARAMETERS = ("density", "trim", "sign", "tie_break", "lam", "drop", "seed", "then")
# What each key holds, checked before anything uses it: (accepts, in words).
_Path = (str, os.PathLike)
_TYPES = {
    "method": (str, "a method name"),
    "base": (_Path, "a model directory"),
    "density": ("number", "a number"),
    "lam": ("number", "a number"),
    "drop": ("number", "a number"),
    "seed": ("integer", "an integer"),
    "trim": (str, "a string"),
    "sign": (str, "a string"),
    "tie_break": (str, "a string"),
    "then": (str, "a string"),
    "dtype": (str, "a string"),
    "max_shard_size": ((str, "integer"), "a number of bytes or a size like '5GB'"),
}
_MAX_SHARD_BYTES = 2**50


def _or(value, default):
    return default if value is None else value


@dataclass
class MergeConfig:
    """One merge, as written in a YAML file (module docstring). Paths are kept as given;
    :meth:`from_yaml` resolves relative ones against the file's folder."""

    method: str
    models: list[str]
    base: str | None = None
    weights: list[float] | None = None
    density: float | None = None
    trim: str | None = None
    sign: str | None = None
    tie_break: str | None = None
    lam: float | None = None
    drop: float | None = None
    seed: int | None = None
    then: str | None = None
    dtype: str | None = None
    max_shard_size: int | str | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # the file it came from

    def __post_init__(self):
        where = f"{self.source}: " if self.source else ""

        def fail(msg: str):
            raise MergeConfigError(where + msg)

        problem = _type_problem(self)
        if problem is not None:
            fail(problem)
        if self.method not in METHODS:
            hint = _ALIASES.get(self.method) or next(iter(difflib.get_close_matches(str(self.method), METHODS)), None)
            fail(
                f"unknown merge method {self.method!r}"
                + (f" (did you mean {hint}?)" if hint else "")
                + f"; choose one of: {', '.join(METHODS)}"
            )
        info = METHODS[self.method]
        if isinstance(self.models, (str, os.PathLike)) or not self.models:
            fail("models: give a list of model directories, e.g. models: [expert_a/, expert_b/]")
        self.models = [str(m) for m in self.models]
        if info.needs_base and self.base is None:
            fail(f"{self.method} merges task vectors θ_i − θ_base; name the base model with base: DIR")
        if not info.needs_base and self.base is not None:
            fail(f"{self.method} averages the listed models and takes no base; list every model under models")
        for name in info.required:
            if getattr(self, name) is None:
                what = {
                    "density": "the fraction of each task vector's entries kept (the TIES paper uses 0.2)",
                    "drop": "the probability of dropping each delta entry (the DARE paper uses 0.9)",
                }[name]
                fail(
                    f"{self.method} needs {name}: {what}; there is no default, so that nothing is kept or "
                    "dropped silently"
                )
        unused = [
            p
            for p in (*_PARAMETERS, "weights")
            if getattr(self, p) is not None and p not in (*info.required, *info.optional)
        ]
        if unused:
            fail(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not a parameter of {self.method} "
                f"(it takes {', '.join((*info.required, *info.optional)) or 'no parameters'})"
            )
        if self.method == "dare" and _or(self.then, "linear") != "ties":
            for key in ("sign", "tie_break"):
                if getattr(self, key) is not None:
                    fail(f"{key} only matters for dare with then: ties")
        if self.weights is not None:
            if isinstance(self.weights, (int, float)) or len(self.weights) != len(self.models):
                fail(f"weights: give one number per model ({len(self.models)} models)")
            self.weights = [float(w) for w in self.weights]
        if self.dtype is not None and self.dtype not in _DTYPES:
            fail(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        try:
            self.method_settings()
            self.shard_bytes()
        except (ValueError, TypeError) as e:
            fail(str(e))
        negative = self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0)
        if negative and self.method_settings().combine != "sum":  # soups and sign elections
            fail(f"weights of {self.method} must be non-negative and not all zero, got {self.weights}")

    def method_settings(self) -> MergeMethod:
        """The kernel settings this config stands for."""
        return METHODS[self.method].build(self)

    def shard_bytes(self) -> int:
        return _parse_size(self.max_shard_size) if self.max_shard_size is not None else DEFAULT_SHARD_BYTES

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeConfig:
        """Read and validate a YAML merge config (no weights are read)."""
        path = Path(path)
        if not path.is_file():
            raise MergeConfigError(f"{path}: no such config file")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        try:
            # Bounded: no alias bomb, no nesting deep enough to overflow the parser (core.parsing).
            data = load_yaml(raw.decode("utf-8"), what=str(path))
        except UnicodeDecodeError as e:
            raise MergeConfigError(f"{path}: not valid YAML: not UTF-8 text ({e.reason})") from None
        except InputError as e:
            raise MergeConfigError(str(e)) from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data, *, source: str | os.PathLike | None = None) -> MergeConfig:
        """Build from a mapping (as parsed from YAML); relative paths resolve against the folder
        of ``source`` when given."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise MergeConfigError(
                f"{where}expected a mapping of keys (method, base, models, ...), got {type(data).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = [
                f"{shorten(k, 80)!r} (did you mean {m[0]!r}?)"
                if (m := difflib.get_close_matches(str(k)[:80], known, 1))
                else shorten(repr(k), 80)
                for k in unknown[:10]
            ]
            raise MergeConfigError(f"{where}unknown key {', '.join(hints)}; known keys: {', '.join(known)}")
        for key in ("method", "models"):
            if key not in data:
                raise MergeConfigError(
                    f"{where}missing {key}: (method is one of {', '.join(METHODS)}; "
                    "models is a list of model directories)"
                )
        data = dict(data)
        if source is not None:
            root = Path(source).resolve().parent
            if isinstance(data.get("models"), list):
                data["models"] = [str(root / m) if isinstance(m, str) else m for m in data["models"]]
            if isinstance(data.get("base"), str):
                data["base"] = str(root / data["base"])
        return cls(**data, source=str(source) if source is not None else None)

    def to_dict(self) -> dict:
        """The keys that are set, as they would be written in YAML."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "source"}

    def check_inputs(self) -> None:
        """Every directory exists and holds safetensors of one architecture and the same tensors.
        Reads ``config.json`` and the safetensors headers only."""
        where = f"{self.source}: " if self.source else ""
        dirs = ([self.base] if self.base is not None else []) + self.models
        for d in dirs:
            if not Path(d).is_dir():
                raise MergeConfigError(f"{where}model directory {d} does not exist")
        try:
            check_same_architecture(dirs)
            sources = [SafetensorsDir(d) for d in dirs]
            check_compatible(sources)
        except (ValueError, FileNotFoundError) as e:
            raise MergeConfigError(where + str(e)) from e
        for s in sources:
            s.close()

    def run(self, out: str | os.PathLike) -> Path:
        """Check the inputs, then merge into ``out`` (which must not exist yet, or be empty)."""
        self.check_inputs()
        dtype = _DTYPES[self.dtype] if self.dtype is not None else None
        return merge_dirs(
            self.method_settings(),
            self.models,
            out,
            self.base,
            self.weights,
            dtype=dtype,
            max_shard_bytes=self.shard_bytes(),
        )


def _type_problem(config: MergeConfig) -> str | None:
    """What is of the wrong type in ``config`` (as parsed from YAML, anything can be anywhere),
    or ``None``: every later check may then rely on the types."""

    def ok(value, accepts) -> bool:
        accepts = accepts if isinstance(accepts, tuple) else (accepts,)
        for a in accepts:
            if a == "number" and _is_number(value):
                return True
            if a == "integer" and isinstance(value, int) and not isinstance(value, bool):
                return True
            if isinstance(a, type) and isinstance(value, a):
                return True
        return False

    for name, (accepts, words) in _TYPES.items():
        value = getattr(config, name)
        if value is not None and not ok(value, accepts):
            return f"{name}: expected {words}, got {type(value).__name__} {shorten(value, 80)}"
    if not isinstance(config.models, (list, tuple)) or not all(isinstance(m, _Path) for m in config.models):
        return "models: give a list of model directories, e.g. models: [expert_a/, expert_b/]"
    if config.weights is not None and not (
        isinstance(config.weights, (list, tuple)) and all(_is_number(w) for w in config.weights)
    ):
        return f"weights: give one finite number per model ({len(config.models)} models)"
    if config.seed is not None and not 0 <= config.seed < 2**63:
        return f"seed: expected an integer in [0, 2**63), got {shorten(str(config.seed), 40)}"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= _MAX_SHARD_BYTES:
        return size
    m = re.fullmatch(r"\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*([KMGT]i?B)\s*", str(size)[:100], re.IGNORECASE)
    value = 0
    if m:
        unit = m.group(2).upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1))
    if not 0 < value <= _MAX_SHARD_BYTES:
        raise ValueError(
            f"max_shard_size must be a number of bytes or like '5GB' / '500MiB', at most 1 PiB, "
            f"got {shorten(size, 80)!r}"
        )
    return value


def merge(config: str, out: str) -> Path:
    """Merge models as a YAML config file says, into a new ``transformers`` directory.

    Args:
        config: The merge config (YAML): method, base, models, and the method's parameters.
        out: Output directory (must not exist yet, or be empty).
    """
    return MergeConfig.from_yaml(config).run(out)
