"""TIES-Merging (Yadav et al., 2023, "Resolving interference when merging models", algorithm 1).

For task vectors ``τ_i = θ_i − θ_base``:

1. **Trim**: keep the ``density`` fraction of entries of largest magnitude, zero the rest.
   ``trim="global"`` ranks all of a model's floating-point entries together (the paper: top-k%
   of the whole task vector); ``trim="per_tensor"`` ranks each tensor on its own (what peft and
   mergekit do). Exactly ``round(density · n)`` entries survive, ties kept in storage order.
2. **Elect** a sign per entry. ``sign="mass"``: the sign of ``Σ_i τ̂_i`` (the paper; weights
   are *not* used); ``"weighted_mass"``: the sign of ``Σ_i w_i τ̂_i``; ``"count"``: the sign
   most models have.
3. **Disjoint merge**: average only the entries whose sign agrees with the elected one
   (weighted, ``Σ_A w_i τ̂_i / Σ_A w_i``, when ``weights`` are given); entries no model keeps
   stay at the base value.
4. ``θ = θ_base + λ · τ_merged``.

**A tied vote** (the elected sum is exactly 0 although some model kept the entry, e.g. two
models with opposite deltas of equal size, or an even split under ``sign="count"``) is where the
paper and its authors' code differ; ``tie_break`` chooses:

* ``"zero"`` (the default): the entry keeps the base value. This is algorithm 1 as printed:
  ``γ = sgn(Σ τ̂) = 0`` and no model's sign equals 0, so the disjoint set is empty. It is also
  local (an entry's merge depends on that entry's deltas only), so it streams tensor by tensor
  through the shared kernel, merges from directories (:func:`ties_dirs`) and agrees with
  DARE-TIES; with real-valued fine-tuning deltas an exact tie is rare enough that the choice
  seldom changes a merge.
* ``"majority"``: a tied entry takes the majority sign, ``sgn(Σ γ)`` over the elected signs
  ``γ`` of the whole trim scope (the whole task vector for ``trim="global"``, which is how the
  authors' released code flattens a model; the tensor for ``trim="per_tensor"``), and then
  averages the entries of that sign like any other entry. This reproduces the released code's
  merges; if the majority itself is tied the entry stays at the base value. It needs every
  trimmed task vector at once, so it runs in memory only.

The kernel that does steps 1-4 is shared with the other methods: :mod:`flexmoe.merge.kernel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from flexmoe.merge.kernel import MergeMethod, Sign, Trim, merge_dirs, merge_in_memory, rebuild_like
from flexmoe.merge.stream import StateDictSource
from flexmoe.merge.task_arithmetic import TaskVector

TieBreak = Literal["zero", "majority"]
TIE_BREAKS = ("zero", "majority")


def ties_method(density: float, lam: float = 1.0, trim: Trim = "global", sign: Sign = "mass") -> MergeMethod:
    """The kernel settings of TIES (see the module docstring; ties of the vote give 0)."""
    return MergeMethod(combine="disjoint_mean", density=density, lam=lam, trim=trim, sign=sign)


def ties(
    base,
    finetuned: Sequence,
    density: float = 0.2,
    lam: float = 1.0,
    trim: Trim = "global",
    sign: Sign = "mass",
    weights: Sequence[float] | None = None,
    *,
    tie_break: TieBreak = "zero",
    dtype: torch.dtype | None = None,
):
    """TIES-merge ``finetuned`` models (modules or state dicts) onto ``base``; returns the same
    kind as ``base``. ``density``: fraction of each task vector kept (the paper's k = 20%).
    ``tie_break``: what a tied sign vote gives (module docstring)."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be 'zero' (algorithm 1 as printed) or 'majority', got {tie_break!r}")
    method = ties_method(density, lam, trim, sign)
    if tie_break == "zero":
        return merge_in_memory(method, finetuned, base, weights, dtype=dtype)
    return _ties_majority(method, base, list(finetuned), weights, dtype)


def _ties_majority(method: MergeMethod, base, finetuned: list, weights, dtype) -> object:
    """TIES with tied votes resolved to the majority elected sign of the trim scope.

    The kernel computes the merge with ties at 0 and each model's trimmed task vector (both on
    task vectors against a zero base, so the values are exact); the tied entries are then
    filled with the mean of the majority side, exactly as the disjoint mean treats any entry
    whose vote has that sign."""
    taus = [TaskVector.from_models(ft, base).deltas for ft in finetuned]
    zeros = {name: torch.zeros_like(d) for name, d in taus[0].items()}
    tie_free = merge_in_memory(
        MergeMethod(combine="disjoint_mean", density=method.density, trim=method.trim, sign=method.sign),
        taus,
        zeros,
        weights,
    )
    trim_only = MergeMethod(combine="sum", density=method.density, trim=method.trim)
    trimmed = [merge_in_memory(trim_only, [tau], zeros) for tau in taus]
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]

    votes, fills = {}, {}
    for name in zeros:
        stack = torch.stack([t[name] for t in trimmed])  # [N, ...]
        wb = torch.tensor(w, dtype=stack.dtype, device=stack.device).reshape(-1, *[1] * (stack.dim() - 1))
        vote = {"mass": stack, "weighted_mass": stack * wb, "count": stack.sign()}[method.sign].sum(0)
        votes[name] = elected = vote.sign()
        tied = (elected == 0) & (stack != 0).any(0)
        up, down = stack > 0, stack < 0
        tiny = torch.finfo(stack.dtype).tiny
        fills[name] = (
            tied,
            (stack * up * wb).sum(0) / (up * wb).sum(0).clamp_min(tiny),
            (stack * down * wb).sum(0) / (down * wb).sum(0).clamp_min(tiny),
        )
    if method.trim == "global":
        total = sum(float(v.sum()) for v in votes.values())
        majority = dict.fromkeys(votes, (total > 0) - (total < 0))
    else:
        majority = {name: int(v.sum().sign()) for name, v in votes.items()}

    src = StateDictSource(base, "base")
    out = {}
    for name in src.names():
        b = src.get(name)
        if name not in zeros:
            out[name] = b
            continue
        tied, up_mean, down_mean = fills[name]
        m = majority[name]
        merged = tie_free[name]
        if m != 0:
            merged = torch.where(tied, up_mean if m > 0 else down_mean, merged)
        b0 = b.to(merged.dtype)
        out[name] = (b0 + method.lam * merged).to(dtype or b.dtype)
    return rebuild_like(base, out)


def ties_dirs(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    density: float,
    lam: float = 1.0,
    trim: Trim = "global",
    sign: Sign = "mass",
    weights=None,
    *,
    tie_break: TieBreak = "zero",
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`ties` from ``save_pretrained`` directories to a new one, a tensor at a time
    (``trim="global"`` reads the inputs three times: two passes find each model's threshold).
    Streams with ``tie_break="zero"`` only; for ``"majority"`` load the models and use :func:`ties`."""
    if tie_break != "zero":
        raise ValueError(
            f"ties_dirs streams one tensor at a time, which resolves tied sign votes to 0 only; "
            f"tie_break={tie_break!r} needs every trimmed task vector at once: load the models and call ties()"
        )
    return merge_dirs(ties_method(density, lam, trim, sign), finetuned, out, base, weights, dtype=dtype)
