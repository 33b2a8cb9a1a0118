"""One merge kernel; model soups, task arithmetic, TIES and DARE are settings of it.

For every floating-point tensor name (in sorted order), with base ``θ_0`` and models ``θ_i``
weighted ``w_i``, the kernel computes

* ``combine="mean"`` (model soup, no base):  ``Σ w_i θ_i / Σ w_i``
* otherwise, on the task vectors ``τ_i = θ_i − θ_0``:

  1. sparsify each ``τ_i`` into ``τ̂_i``: keep its ``density`` largest magnitudes (TIES "trim",
     over the tensor or over the whole model), or drop each entry with probability ``drop``
     and rescale the survivors by ``1/(1−drop)`` (DARE), or keep it as is;
  2. combine: ``"sum"``: ``Σ w_i τ̂_i`` (task arithmetic); ``"disjoint_mean"`` (TIES):
     elect a sign per entry, ``γ = sgn(Σ_i c_i τ̂_i)``, then average only the entries that
     agree with it, ``Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i`` with ``A = {i : sgn(τ̂_i) = γ ≠ 0}``;
  3. ``θ = θ_0 + λ · combined``.

Sign election (``sign``): ``"mass"`` uses ``c_i = 1`` (the TIES paper: the sign of the
total trimmed mass, weights not involved), ``"weighted_mass"`` uses ``c_i = w_i``, and
``"count"`` elects the sign more models agree on (``c_i τ̂_i`` replaced by ``sgn(τ̂_i)``).
Without weights (every ``w_i = 1``) the two mass rules coincide.

A tied vote (``γ = 0`` where some model kept the entry) gives 0 with ``tie_break="zero"``
(algorithm 1 as printed). With ``"majority"`` (the TIES authors' released code) it takes
``sgn(Σ γ)``, the majority of the elected signs over the trim scope: the whole model for
``trim="global"`` (and for DARE, whose drop has no scope of its own), the tensor for
``"per_tensor"``; a tied majority leaves the entry at 0. That sum needs every block of the
scope before any of it is merged, so it is a pre-pass of the vote over the scope (skipped when
the scope is a single block).

Exactly ``round(density · n)`` entries survive the trim: of ``n`` entries in a tensor
(``trim="per_tensor"``) or in all of a model's floating-point tensors together
(``trim="global"``, the paper). Entries tied at the threshold are kept in storage order
(sorted tensor names, then row-major), so the result never depends on a sort's tie-breaking.
The global threshold is found exactly, in two streaming passes that build histograms of the
bit patterns of ``|τ_i|`` in float32 (for non-negative floats the bit pattern orders like the
value), so no model is ever held whole.

Computation is in float32 (float64 for float64 inputs); the result takes the base's dtype
(the first model's for a soup) unless ``dtype`` says otherwise. Tensors that are not
floating point are copied from the base (first model). DARE's masks come from a generator
seeded by ``(seed, model index, tensor name, first row of the block)``, so they do not depend on
reading order. Large tensors are processed in blocks of rows of at most ``BLOCK_ENTRIES``
entries: a per-tensor trim of a tensor larger than that reads it three times, like a global one.

Memory does not grow with the number of models: every method reads one input block at a time
into fixed accumulators for the current block of rows (TIES keeps, per entry, the weighted sums
and weights of the positive and of the negative deltas, and the sign rule's vote, which is
all a sign election followed by a disjoint mean needs). ``trim="global"`` reads the inputs
three times: twice for the thresholds, once to merge; ``tie_break="majority"`` adds one more
read of its scope (of the whole model when global, of a tensor larger than a block otherwise).

One module of under 600 lines: every method is a setting of the same streaming loop,
and keeping them together is what stops the methods from drifting apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch
from torch import nn

from flexmoe.core.io import atomic_dir
from flexmoe.merge.stream import (
    DEFAULT_SHARD_BYTES,
    INDEX,
    SINGLE,
    SafetensorsDir,
    ShardWriter,
    StateDictSource,
    check_same_architecture,
    unique_tensors,
)

Combine = Literal["mean", "sum", "disjoint_mean"]
Trim = Literal["global", "per_tensor"]
Sign = Literal["mass", "weighted_mass", "count"]
TieBreak = Literal["zero", "majority"]
Models = Union[nn.Module, Mapping[str, torch.Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)


@dataclass(frozen=True)
class MergeMethod:
    """The kernel's settings (see the module docstring). Built by the public functions
    (:func:`~flexmoe.merge.average`, :func:`~flexmoe.merge.ties`, ...) and by merge configs."""

    combine: Combine
    density: float | None = None
    trim: Trim = "global"
    drop: float | None = None
    seed: int = 0
    sign: Sign = "mass"
    lam: float = 1.0
    tie_break: TieBreak = "zero"

    def __post_init__(self):
        if self.combine not in ("mean", "sum", "disjoint_mean"):
            raise ValueError(f"combine must be 'mean', 'sum' or 'disjoint_mean', got {self.combine!r}")
        if self.density is not None and not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density is the fraction of entries kept, in [0, 1]; got {self.density}")
        if self.drop is not None and not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop is a probability in [0, 1); got {self.drop}")
        if self.density is not None and self.drop is not None:
            raise ValueError("give density (magnitude trim) or drop (random drop), not both")
        if self.trim not in ("global", "per_tensor"):
            raise ValueError(f"trim must be 'global' or 'per_tensor', got {self.trim!r}")
        if self.sign not in ("mass", "weighted_mass", "count"):
            raise ValueError(f"sign must be 'mass', 'weighted_mass' or 'count', got {self.sign!r}")
        if self.tie_break not in ("zero", "majority"):
            raise ValueError(
                f"tie_break must be 'zero' (a tied sign vote keeps the base value, TIES algorithm 1 as "
                f"printed) or 'majority' (the majority elected sign, as the TIES authors' code), "
                f"got {self.tie_break!r}"
            )
        if self.tie_break != "zero" and self.combine != "disjoint_mean":
            raise ValueError("tie_break resolves tied sign votes; it applies to TIES and DARE with then='ties' only")
        if self.combine == "mean" and (self.density is not None or self.drop is not None or self.lam != 1.0):
            raise ValueError("a model soup averages parameters; density, drop and lam apply to task vectors")

    @property
    def needs_base(self) -> bool:
        return self.combine != "mean"


# -- checks that run before any weight is read -----------------------------------------------


def check_compatible(sources: Sequence, base=None) -> list[str]:
    """The tensor names every source shares, sorted; raises if names or shapes differ."""
    ref = base if base is not None else sources[0]
    names = set(ref.names())
    for src in sources:
        if src is ref:
            continue
        theirs = set(src.names())
        if theirs != names:
            missing, extra = sorted(names - theirs), sorted(theirs - names)
            raise ValueError(
                f"{src.label} does not have the same tensors as {ref.label}: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, extra {extra[:4]}{' ...' if len(extra) > 4 else ''}"
                "; merged models must share one architecture"
            )
        for name in sorted(names):
            a, b = ref.spec(name)[1], src.spec(name)[1]
            if a != b:
                raise ValueError(
                    f"{name} has shape {list(b)} in {src.label} but {list(a)} in {ref.label}; "
                    "merged models must share one architecture"
                )
    return sorted(names)


def _weights(weights, n: int, method: MergeMethod) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} models")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    if method.combine != "sum" and (any(x < 0 for x in w) or sum(w) <= 0):
        raise ValueError(f"weights of a soup or TIES must be non-negative and not all zero, got {w}")
    return w


# -- the kernel ---------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|delta|`` in float32: ordered exactly like the magnitudes."""
    return delta.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


@dataclass
class _Quota:
    """Keep entries whose magnitude bits are ``> bits``, plus the first ``ties`` equal to it
    (``every_tie``: as many as there are, so ``>= bits`` says it all)."""

    bits: int
    ties: int
    every_tie: bool = False

    def mask(self, b: torch.Tensor) -> torch.Tensor:
        if self.every_tie:
            return b >= self.bits
        keep = b > self.bits
        if self.ties > 0:
            eq = b == self.bits
            count = int(eq.sum())
            if count <= self.ties:
                keep |= eq
            else:  # keep the first `ties` of them, in storage order
                keep |= eq & (eq.to(torch.int64).cumsum(0) <= self.ties)
            self.ties = max(0, self.ties - count)
        return keep


def kept_count(density: float, n: int) -> int:
    """How many of ``n`` entries a trim to ``density`` keeps."""
    return round(density * n)


_NONE = 2**31 - 1  # bits above every magnitude: keep nothing


def _kth_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin of a 65536-bin histogram holding the k-th largest entry, and how many entries
    lie in higher bins."""
    hist = hist.cpu()
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k)))
    return 65535 - idx, int(from_top[idx] - hist[65535 - idx])


def _quota_from_histograms(high: torch.Tensor, low_of_bin, k: int) -> _Quota:
    """Exact threshold for the k largest magnitudes: ``high`` counts the top 16 bits of every
    entry; ``low_of_bin(hi)`` counts the low 16 bits of the entries whose top bits are ``hi``."""
    if k <= 0:
        return _Quota(bits=_NONE, ties=0)
    hi, above = _kth_bin(high, k)
    low = low_of_bin(hi)
    low = low.cpu()
    lo, above_lo = _kth_bin(low, k - above)
    ties = k - above - above_lo
    return _Quota(bits=(hi << 16) | lo, ties=ties, every_tie=ties == int(low[lo]))


def _quota_for_tensor(b: torch.Tensor, k: int) -> _Quota:
    top = b >> 16
    return _quota_from_histograms(
        torch.bincount(top, minlength=65536), lambda hi: torch.bincount(b[top == hi] & 0xFFFF, minlength=65536), k
    )


def _quotas(base, models, pieces: list[tuple[str, tuple[int, int]]], k: int) -> list[_Quota]:
    """Per model, the exact threshold for its ``k`` largest delta magnitudes over ``pieces``
    (row ranges of tensors), from two streamed passes: a histogram of the high 16 bits, then of
    the low 16 bits within the bin the threshold falls in."""

    def histograms(select) -> list[torch.Tensor]:
        hists = [torch.zeros(65536, dtype=torch.int64) for _ in models]
        for name, rows in pieces:
            b0 = base.get(name, *rows)
            b0 = b0.to(_compute_dtype(b0.dtype))
            for i, m in enumerate(models):
                hists[i] += select(i, _magnitude_bits(m.get(name, *rows).to(b0.dtype) - b0)).cpu()
        return hists

    if k <= 0:
        return [_Quota(bits=_NONE, ties=0) for _ in models]
    high = histograms(lambda i, bits: torch.bincount(bits >> 16, minlength=65536))
    bins = [_kth_bin(h, k)[0] for h in high]
    low = histograms(lambda i, bits: torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=65536))
    return [_quota_from_histograms(h, lambda hi, i=i: low[i], k) for i, h in enumerate(high)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# Tensors are processed in row blocks of at most this many entries, so temporaries and
# accumulators stay small whatever the size of the largest tensor (a 128k x 4096 embedding).
BLOCK_ENTRIES = 1 << 20


def row_blocks(shape) -> list[tuple[int, int | None]]:
    """``[(start, stop)]`` row ranges (along dim 0) covering a tensor of ``shape``."""
    if len(shape) == 0 or shape[0] == 0:
        return [(0, None)]  # the whole tensor
    step = max(1, BLOCK_ENTRIES // max(1, _numel(shape[1:])))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def _dare_generator(seed: int, i: int, name: str, row: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{i}/{name}/{row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merge_tensors(
    method: MergeMethod, models: Sequence, base=None, weights=None, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, rows of the merged tensor)`` for every tensor in sorted name order, each
    tensor as consecutive row blocks (:func:`row_blocks`), reading the sources
    (:mod:`flexmoe.merge.stream`) one block at a time."""
    models = list(models)
    if not models:
        raise ValueError("nothing to merge: no models given")
    if method.needs_base and base is None:
        raise ValueError("this merge works on task vectors θ_i − θ_base and needs a base model")
    if not method.needs_base:
        base = None
    names = check_compatible(models, base)
    w = _weights(weights, len(models), method)
    ref = base if base is not None else models[0]
    majority_votes = method.combine == "disjoint_mean" and method.tie_break == "majority"
    quotas = majority = None
    pieces = [(n, b) for n in names if ref.spec(n)[0].is_floating_point for b in row_blocks(ref.spec(n)[1])]
    if method.density is not None and method.trim == "global":
        total = sum(_numel(ref.spec(n)[1]) for n in names if ref.spec(n)[0].is_floating_point)
        quotas = _quotas(base, models, pieces, kept_count(method.density, total))
    if majority_votes and method.trim == "global":
        majority = _majority(method, base, models, pieces, w, quotas)
    for name in names:
        src_dtype, shape = ref.spec(name)
        blocks = row_blocks(shape)
        if not src_dtype.is_floating_point:
            for rows in blocks:
                yield name, ref.get(name, *rows)
            continue
        out_dtype = dtype or src_dtype
        tensor_quotas, tensor_majority = quotas, majority
        if method.trim == "per_tensor" and len(blocks) > 1:
            tensor_pieces = [(name, rows) for rows in blocks]
            if method.density is not None:
                tensor_quotas = _quotas(base, models, tensor_pieces, kept_count(method.density, _numel(shape)))
            if majority_votes:
                tensor_majority = _majority(method, base, models, tensor_pieces, w, tensor_quotas)
        for rows in blocks:
            if method.combine == "mean":
                yield name, _soup(models, name, rows, w).to(out_dtype)
            else:
                merged = _merge_deltas(method, base, models, name, rows, w, tensor_quotas, tensor_majority)
                yield name, merged.to(out_dtype)


def _soup(models, name, rows, w) -> torch.Tensor:
    # A running weighted mean, m += (w_k / W_k)(θ_k − m): identical models average to exactly
    # themselves, which Σ w_i θ_i / Σ w_i does not promise in floating point.
    acc, total = None, 0.0
    for wi, m in zip(w, models):
        if wi == 0:
            continue
        total += wi
        t = m.get(name, *rows)
        t = t.to(_compute_dtype(t.dtype))
        if acc is None:
            acc = t.clone()
        else:
            acc.add_(t - acc, alpha=wi / total)
    return acc


def _merge_deltas(method: MergeMethod, base, models, name, rows, w, quotas, majority=None) -> torch.Tensor:
    """One row block of one tensor; ``quotas``: per-model trim thresholds (None: this block is
    the whole tensor and a per-tensor threshold is computed here); ``majority``: the sign a tied
    vote takes under ``tie_break="majority"`` (None: this block is the whole scope and the
    majority is taken from its own votes)."""
    b0, acc = _sparsified_deltas(method, base, models, name, rows, w, quotas)
    if method.combine == "sum":
        merged = acc
    else:
        tie = 0
        if method.tie_break == "majority":
            tie = _sign(acc.balance()) if majority is None else majority
        merged = acc.result(tie)
    return b0 + method.lam * merged  # out of place: b0 may be the base model's own tensor


def _majority(method: MergeMethod, base, models, pieces, w, quotas) -> int:
    """The majority elected sign over ``pieces`` (row ranges of tensors; the trim scope):
    ``sgn(Σ γ)`` from a pass of the sign vote, counted in integers so that it is exact at any
    size. ``quotas`` as in :func:`_merge_deltas`."""
    # A quota counts down the ties at its threshold as blocks go by: the merge pass needs its own.
    quotas = None if quotas is None else [copy.copy(q) for q in quotas]
    balance = 0
    for name, rows in pieces:
        balance += _sparsified_deltas(method, base, models, name, rows, w, quotas)[1].balance()
    return _sign(balance)


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _sparsified_deltas(method: MergeMethod, base, models, name, rows, w, quotas):
    """The base's rows (in the compute dtype) and the models' trimmed or dropped task vectors
    of one row block, accumulated: summed for ``combine="sum"``, else a :class:`_DisjointMean`."""
    b0 = base.get(name, *rows)
    b0 = b0.to(_compute_dtype(b0.dtype))
    acc = _DisjointMean(b0, method.sign) if method.combine == "disjoint_mean" else None
    for i, m in enumerate(models):
        d = m.get(name, *rows).to(b0.dtype) - b0
        if method.density is not None:
            bits = _magnitude_bits(d)
            q = quotas[i] if quotas is not None else _quota_for_tensor(bits, kept_count(method.density, bits.numel()))
            d.mul_(q.mask(bits).reshape(d.shape))
        elif method.drop is not None and method.drop > 0:
            draw = torch.rand(d.shape, generator=_dare_generator(method.seed, i, name, rows[0]))  # on the CPU
            keep = (draw >= method.drop).to(d.device)
            d.mul_(keep).div_(1.0 - method.drop)
        if method.combine == "sum":
            if acc is None:
                acc = d if w[i] == 1 else d.mul_(w[i])
            else:
                acc.add_(d, alpha=w[i])
        else:
            acc.add(d, w[i])
    return b0, acc


class _DisjointMean:
    """TIES steps 2-3 in one pass over the models, in memory independent of their number.

    Per entry it accumulates the weighted sums and weights of the positive and of the negative
    deltas separately, plus the vote of the sign rule. The elected sign then picks one side:
    ``Σ_{τ_i > 0} w_i τ_i / Σ_{τ_i > 0} w_i`` if the vote is positive, the negative side's mean
    if it is negative, and on a tied vote the side of the sign :meth:`result` is given (0: none,
    the entry keeps the base value). Where no model kept the entry both sides are empty: 0.
    """

    def __init__(self, like: torch.Tensor, sign: Sign):
        self.sign = sign
        self.pos, self.neg, self.w_pos, self.w_neg = (torch.zeros_like(like) for _ in range(4))
        self.vote = torch.zeros_like(like) if sign != "weighted_mass" else None

    def add(self, d: torch.Tensor, w: float) -> None:
        up, down = d > 0, d < 0
        self.pos.add_(d.clamp(min=0), alpha=w)
        self.neg.add_(d.clamp(max=0), alpha=w)
        self.w_pos.add_(up, alpha=w)
        self.w_neg.add_(down, alpha=w)
        if self.sign == "mass":
            self.vote.add_(d)
        elif self.sign == "count":
            self.vote.add_(up.to(d.dtype)).sub_(down.to(d.dtype))

    def _vote(self) -> torch.Tensor:
        return self.pos + self.neg if self.sign == "weighted_mass" else self.vote

    def balance(self) -> int:
        """``Σ γ`` over the block: entries elected positive minus entries elected negative."""
        vote = self._vote()
        return int((vote > 0).sum()) - int((vote < 0).sum())

    def result(self, tie: int = 0) -> torch.Tensor:
        """The disjoint mean, a tied vote taking sign ``tie`` (-1, 0 or 1). Consumes the sums."""
        elected = self._vote().sign()
        if tie != 0:
            elected = torch.where(elected == 0, float(tie), elected)
        tiny = torch.finfo(elected.dtype).tiny
        # a side with no weight has a zero sum too, so 0 / tiny = 0 there
        up = self.pos.div_(self.w_pos.clamp_min_(tiny))
        down = self.neg.div_(self.w_neg.clamp_min_(tiny))
        return torch.where(elected > 0, up, down).mul_(elected != 0)


# -- in memory and directory to directory ---------------------------------------------------------------


def merge_in_memory(
    method: MergeMethod,
    models: Sequence[Models],
    base: Models | None = None,
    weights=None,
    *,
    dtype: torch.dtype | None = None,
):
    """Run the kernel on models or state dicts held in memory; the result is of the same kind
    as ``base`` (the first model for a soup): a new module (a deep copy with the merged
    weights) or a new state dict. The inputs are not modified."""
    models = list(models)
    if not models:
        raise ValueError("nothing to merge: no models given")
    sources = [StateDictSource(m, label=f"model {i}") for i, m in enumerate(models)]
    base_src = StateDictSource(base, label="base") if base is not None else None
    template = base if (base is not None and method.needs_base) else models[0]
    blocks: dict[str, list[torch.Tensor]] = {}
    for name, t in merge_tensors(method, sources, base_src, weights, dtype=dtype):
        blocks.setdefault(name, []).append(t)
    merged = {name: ts[0] if len(ts) == 1 else torch.cat(ts) for name, ts in blocks.items()}
    return rebuild_like(template, merged)


def rebuild_like(template: Models, tensors: Mapping[str, torch.Tensor]):
    """A module (deep copy of ``template``) or state dict holding ``tensors``; tied aliases
    that :func:`~flexmoe.merge.stream.unique_tensors` dropped are filled from their twin."""
    if isinstance(template, nn.Module):
        out = copy.deepcopy(template)
        state = unique_tensors(out.state_dict())
        with torch.no_grad():
            for name, t in state.items():
                new = tensors[name]
                if t.dtype != new.dtype:  # a dtype override: replace rather than copy into
                    _set_tensor(out, name, new.to(t.device))
                else:
                    t.copy_(new)
        return out
    state = dict(template)
    kept = unique_tensors(state)
    twin = {}
    for name, t in state.items():
        if name not in kept:
            twin[name] = next(k for k, v in kept.items() if v.data_ptr() == t.data_ptr() and v.shape == t.shape)
    return {name: tensors[twin.get(name, name)] for name in state}


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(owner, attr, value)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def merge_dirs(
    method: MergeMethod,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    weights=None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Run the kernel from ``save_pretrained`` directories (safetensors) to a new directory.

    Reads one tensor per model at a time and writes each merged tensor as soon as it is done;
    peak memory is a few tensors per model whatever the number of models. Every file of the
    base directory (the first model's for a soup) that is not a weight file, such as
    ``config.json``, ``generation_config.json`` and the tokenizer, is copied along. ``out``
    must not exist yet (or be empty); it appears only when the merge is complete.
    """
    models = [Path(m) for m in models]
    if not models:
        raise ValueError("nothing to merge: no models given")
    if method.needs_base and base is None:
        raise ValueError("this merge works on task vectors θ_i − θ_base and needs a base model")
    base = Path(base) if (base is not None and method.needs_base) else None
    check_same_architecture([base, *models] if base is not None else models)
    sources = [SafetensorsDir(m) for m in models]
    base_src = SafetensorsDir(base) if base is not None else None
    ref = base_src or sources[0]
    names = check_compatible(sources, base_src)
    specs = []
    for name in names:
        d, shape = ref.spec(name)
        specs.append((name, (dtype or d) if d.is_floating_point else d, shape))
    template_dir = base if base is not None else models[0]
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, specs, max_shard_bytes)
        try:
            for name, t in merge_tensors(method, sources, base_src, weights, dtype=dtype):
                writer.write(name, t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        for f in sorted(template_dir.iterdir()):
            if f.is_file() and f.name != INDEX and f.name != SINGLE and not f.name.endswith(_WEIGHT_SUFFIXES):
                _copy_file(f, tmp / f.name, dtype)
    for s in [*sources, base_src]:
        if s is not None:
            s.close()
    return Path(out)


def _copy_file(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None and src.name == "config.json":
        config = json.loads(src.read_text())
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = str(dtype).removeprefix("torch.")
        dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    shutil.copy2(src, dst)
