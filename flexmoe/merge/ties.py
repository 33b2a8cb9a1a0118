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
  local (an entry's merge depends on that entry's deltas only), so it needs no pass beyond the
  merge itself; with real-valued fine-tuning deltas an exact tie is rare enough that the
  choice seldom changes a merge.
* ``"majority"``: a tied entry takes the majority sign, ``sgn(Σ γ)`` over the elected signs
  ``γ`` of the whole trim scope (the whole task vector for ``trim="global"``, which is how the
  authors' released code flattens a model; the tensor for ``trim="per_tensor"``), and then
  averages the entries of that sign like any other entry. This reproduces the released code's
  merges; if the majority itself is tied the entry stays at the base value. The kernel counts
  the majority in a pass of the vote before the merge, so it streams from directories too
  (:func:`ties_dirs`, YAML configs), at one more read of the inputs for a global trim.

The kernel that does steps 1-4 is shared with the other methods: :mod:`flexmoe.merge.kernel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from flexmoe.merge.kernel import MergeMethod, Sign, TieBreak, Trim, merge_dirs, merge_in_memory


def ties_method(
    density: float, lam: float = 1.0, trim: Trim = "global", sign: Sign = "mass", tie_break: TieBreak = "zero"
) -> MergeMethod:
    """The kernel settings of TIES (see the module docstring)."""
    return MergeMethod(combine="disjoint_mean", density=density, lam=lam, trim=trim, sign=sign, tie_break=tie_break)


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
    return merge_in_memory(ties_method(density, lam, trim, sign, tie_break), finetuned, base, weights, dtype=dtype)


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
    (``trim="global"`` reads the inputs three times: two passes find each model's threshold;
    ``tie_break="majority"`` adds a pass that counts the majority sign)."""
    method = ties_method(density, lam, trim, sign, tie_break)
    return merge_dirs(method, finetuned, out, base, weights, dtype=dtype)
