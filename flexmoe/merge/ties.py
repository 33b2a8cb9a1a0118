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

The kernel that does this is shared with the other methods: :mod:`flexmoe.merge.kernel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from flexmoe.merge.kernel import MergeMethod, Sign, Trim, merge_dirs, merge_in_memory


def ties_method(density: float, lam: float = 1.0, trim: Trim = "global", sign: Sign = "mass") -> MergeMethod:
    """The kernel settings of TIES (see the module docstring)."""
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
    dtype: torch.dtype | None = None,
):
    """TIES-merge ``finetuned`` models (modules or state dicts) onto ``base``; returns the same
    kind as ``base``. ``density``: fraction of each task vector kept (the paper's k = 20%)."""
    return merge_in_memory(ties_method(density, lam, trim, sign), finetuned, base, weights, dtype=dtype)


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
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`ties` from ``save_pretrained`` directories to a new one, a tensor at a time
    (``trim="global"`` reads the inputs three times: two passes find each model's threshold)."""
    return merge_dirs(ties_method(density, lam, trim, sign), finetuned, out, base, weights, dtype=dtype)
