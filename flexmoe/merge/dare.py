"""DARE: Drop And REscale (Yu et al., 2024, "Language models are Super Mario", eq. 1-2).

Each entry of every task vector ``τ_i = θ_i − θ_base`` is dropped with probability ``drop``
and the survivors are multiplied by ``1 / (1 − drop)``, so the expected task vector is
unchanged. The sparsified vectors are then merged by ``then``:

* ``"linear"``: task arithmetic, ``θ_base + λ · Σ_i w_i τ̃_i`` (weights default to 1);
* ``"ties"``: TIES's sign election and disjoint mean (``sign`` as in :func:`~flexmoe.merge.ties`),
  with DARE's random drop in place of TIES's magnitude trim. ``tie_break`` as in TIES: a tied
  vote gives 0 (``"zero"``) or the majority elected sign of the whole model (``"majority"``,
  as TIES with a global trim).

Masks are drawn from a generator seeded by ``(seed, model index, tensor name, row block)``:
the same seed gives the same merge in memory and from directories, in any reading order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from flexmoe.merge.kernel import MergeMethod, Sign, TieBreak, merge_dirs, merge_in_memory

Then = Literal["linear", "ties"]


def dare_method(
    drop: float,
    seed: int = 0,
    then: Then = "linear",
    lam: float = 1.0,
    sign: Sign = "mass",
    tie_break: TieBreak = "zero",
) -> MergeMethod:
    """The kernel settings of DARE (see the module docstring)."""
    if then not in ("linear", "ties"):
        raise ValueError(f"then must be 'linear' or 'ties', got {then!r}")
    combine = "sum" if then == "linear" else "disjoint_mean"
    return MergeMethod(combine=combine, drop=drop, seed=seed, lam=lam, sign=sign, tie_break=tie_break)


def dare(
    base,
    finetuned: Sequence,
    drop: float = 0.9,
    seed: int = 0,
    then: Then = "linear",
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    sign: Sign = "mass",
    *,
    tie_break: TieBreak = "zero",
    dtype: torch.dtype | None = None,
):
    """DARE-merge ``finetuned`` models (modules or state dicts) onto ``base``; returns the same
    kind as ``base``. With ``drop=0`` it is exactly task arithmetic (``then="linear"``) or
    TIES without trimming (``then="ties"``)."""
    method = dare_method(drop, seed, then, lam, sign, tie_break)
    return merge_in_memory(method, finetuned, base, weights, dtype=dtype)


def dare_dirs(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    drop: float,
    seed: int = 0,
    then: Then = "linear",
    lam: float = 1.0,
    weights=None,
    sign: Sign = "mass",
    *,
    tie_break: TieBreak = "zero",
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`dare` from ``save_pretrained`` directories to a new one, a tensor at a time
    (``tie_break="majority"`` reads the inputs twice: once to count the majority sign)."""
    method = dare_method(drop, seed, then, lam, sign, tie_break)
    return merge_dirs(method, finetuned, out, base, weights, dtype=dtype)
