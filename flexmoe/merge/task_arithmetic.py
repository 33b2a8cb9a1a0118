"""Task vectors and task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic").

A task vector is ``τ = θ_ft − θ_pre``. Adding task vectors to the pre-trained weights adds
the tasks; negating one removes its task (forgetting); ``λ1·τ_A + λ2·τ_B − λ3·τ_C`` is an
analogy. :func:`disentanglement_error` (Ortiz-Jiménez et al., 2023, "Task arithmetic in the
tangent space") says for which scalings two task vectors can be added without
interfering, and :func:`plot_disentanglement` draws it over a grid of scalings.

Task vectors hold float32 deltas (float64 for float64 weights) of the floating-point tensors
only; integer buffers and the like are skipped and stay as the base has them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from flexmoe.merge.kernel import MergeMethod, check_compatible, merge_dirs, merge_in_memory, rebuild_like
from flexmoe.merge.stream import StateDictSource


class TaskVector:
    """``τ = θ_ft − θ_pre`` per floating-point tensor name. Supports ``τ1 + τ2``, ``-τ``,
    ``τ1 - τ2``, ``λ * τ``, ``τ * λ``, ``τ / λ``, ``sum([τ1, τ2, ...])`` and
    ``τ.apply(base, scale=λ)``."""

    def __init__(self, deltas: Mapping[str, torch.Tensor]):
        bad = [k for k, v in deltas.items() if not (isinstance(v, torch.Tensor) and v.is_floating_point())]
        if bad:
            raise TypeError(f"task vector entries must be floating-point tensors; {bad[:3]} are not")
        self.deltas = dict(deltas)

    @classmethod
    def from_models(cls, finetuned, base) -> TaskVector:
        """``finetuned − base``: modules (``transformers`` or flexmoe MoE) or state dicts of one
        architecture. Tied aliases count once; non-floating-point tensors are skipped."""
        ft, pre = StateDictSource(finetuned, "finetuned"), StateDictSource(base, "base")
        names = check_compatible([ft], pre)
        deltas = {}
        for name in names:
            b = pre.get(name)
            if b.is_floating_point():
                dtype = torch.float64 if b.dtype == torch.float64 else torch.float32
                deltas[name] = ft.get(name).to(dtype) - b.to(dtype)
        return cls(deltas)

    # -- algebra ---------------------------------------------------------------------------

    def _zip(self, other: TaskVector, op) -> TaskVector:
        if set(self.deltas) != set(other.deltas):
            diff = sorted(set(self.deltas) ^ set(other.deltas))
            raise ValueError(f"task vectors of different models (tensors only in one: {diff[:4]})")
        return TaskVector({k: op(v, other.deltas[k]) for k, v in self.deltas.items()})

    def __add__(self, other) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # sum() starts from 0
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, torch.add)

    __radd__ = __add__

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __sub__(self, other) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, torch.sub)

    def __mul__(self, scale) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return TaskVector({k: v * scale for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return self * (1.0 / scale)

    @staticmethod
    def sum(vectors: Iterable[TaskVector]) -> TaskVector:
        """``τ_1 + ... + τ_n`` (the builtin ``sum(vectors)`` works too)."""
        vectors = list(vectors)
        if not vectors:
            raise ValueError("sum of no task vectors")
        out = vectors[0]
        for v in vectors[1:]:
            out = out + v
        return out

    # -- use ---------------------------------------------------------------------------------

    def apply(self, base, scale: float = 1.0):
        """``θ_base + scale · τ``, as a new module (a deep copy of ``base``) or state dict."""
        src = StateDictSource(base, "base")
        names = set(src.names())
        missing = sorted(set(self.deltas) - names)
        if missing:
            raise ValueError(f"the base has no tensors {missing[:4]}; was this task vector made from another model?")
        merged = {}
        for name in src.names():
            b = src.get(name)
            if name in self.deltas:
                if tuple(b.shape) != tuple(self.deltas[name].shape):
                    raise ValueError(
                        f"{name}: task vector shape {list(self.deltas[name].shape)}, base shape {list(b.shape)}"
                    )
                d = self.deltas[name]
                b = (b.to(d.dtype) + scale * d).to(b.dtype)
            merged[name] = b
        return rebuild_like(base, merged)

    def norm(self) -> float:
        """The L2 norm over all entries."""
        return math.sqrt(sum(float(v.double().square().sum()) for v in self.deltas.values()))

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity with ``other`` over all entries (near 0 for unrelated tasks)."""
        dot = sum(float((v.double() * other.deltas[k].double()).sum()) for k, v in self.deltas.items())
        return dot / max(self.norm() * other.norm(), 1e-300)

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.deltas.values())
        return f"TaskVector({len(self.deltas)} tensors, {n} entries, norm {self.norm():.4g})"


def analogy(
    tau_a: TaskVector, tau_b: TaskVector, tau_c: TaskVector, lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> TaskVector:
    """``λ1·τ_A + λ2·τ_B − λ3·τ_C`` ("A is to B as C is to D", Ilharco et al., section 5)."""
    l1, l2, l3 = lambdas
    return l1 * tau_a + l2 * tau_b - l3 * tau_c


def task_arithmetic(
    base,
    finetuned: Sequence,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
):
    """``θ_base + λ · Σ_i w_i (θ_i − θ_base)`` (weights default to 1; negative ones subtract),
    returned as the same kind as ``base``. Streams tensor by tensor; equals
    ``sum(w_i * TaskVector.from_models(θ_i, base)).apply(base, lam)``."""
    return merge_in_memory(MergeMethod(combine="sum", lam=lam), finetuned, base, weights, dtype=dtype)


def task_arithmetic_dirs(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    lam: float = 1.0,
    weights=None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`task_arithmetic` from ``save_pretrained`` directories to a new one."""
    return merge_dirs(MergeMethod(combine="sum", lam=lam), finetuned, out, base, weights, dtype=dtype)


# -- weight disentanglement (Ortiz-Jiménez et al., 2023) -------------------------------------------


def _batches(data) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``input_ids`` ``[B, T]``, an iterable of them, or of dicts with ``input_ids`` (and
    optionally ``attention_mask``) -> ``[(ids, mask)]``."""
    if isinstance(data, torch.Tensor):
        data = [data]
    out = []
    for item in data:
        if isinstance(item, Mapping):
            out.append((item["input_ids"], item.get("attention_mask")))
        else:
            out.append((item, None))
    return out


@torch.no_grad()
def _predictions(model: nn.Module, params: dict, batches) -> list[torch.Tensor]:
    """Next-token argmax at every position, ``-1`` at padding."""
    preds = []
    for ids, mask in batches:
        out = functional_call(
            model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False}, strict=False
        )
        p = out.logits.argmax(-1)
        preds.append(p if mask is None else p.masked_fill(mask == 0, -1))
    return preds


def _edited(base_state: dict, taus_and_alphas) -> dict:
    params = {}
    for name, b in base_state.items():
        if not b.is_floating_point():
            params[name] = b
            continue
        acc = b.float()
        for tau, alpha in taus_and_alphas:
            if alpha and name in tau.deltas:
                acc = acc + alpha * tau.deltas[name].to(acc.device, acc.dtype)
        params[name] = acc.to(b.dtype)
    return params


def _disagreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    differ = sum(int(((x != y) & (x >= 0)).sum()) for x, y in zip(a, b))
    total = sum(int((x >= 0).sum()) for x in a)
    return differ / max(total, 1)


def _base_state(model: nn.Module, base) -> dict:
    src = StateDictSource(base if base is not None else model, "base")
    return {n: src.get(n) for n in src.names()}


def disentanglement_error(
    model: nn.Module, base, tau1: TaskVector, tau2: TaskVector, alpha1: float, alpha2: float, data
) -> float:
    """Weight disentanglement error ``ξ(α1, α2)`` (Ortiz-Jiménez et al., 2023)::

        ξ(α1, α2) = Σ_{t=1,2} E_{x ~ D_t} [ f(x; θ0 + α_t τ_t) ≠ f(x; θ0 + α1 τ1 + α2 τ2) ]

    ``f`` is the next-token prediction (argmax) at each non-padding position, so each term is
    the fraction of task ``t``'s tokens on which adding the other task vector changes the
    prediction of the model edited with ``τ_t`` alone. 0 means the two edits do not interfere
    on these inputs; the maximum is 2.

    ``model``: the architecture to evaluate (a ``transformers`` causal LM; its weights are
    swapped in with ``torch.func.functional_call`` and left untouched). ``base``: the
    pre-trained weights ``θ0`` (a module or state dict; ``None``: ``model``'s own).
    ``data``: ``(data_1, data_2)``, inputs of each task: ``input_ids`` ``[B, T]``, or an
    iterable of those or of dicts with ``input_ids`` and ``attention_mask``.
    """
    state = _base_state(model, base)
    d1, d2 = (_batches(d) for d in data)
    both = _edited(state, [(tau1, alpha1), (tau2, alpha2)])
    xi = _disagreement(_predictions(model, _edited(state, [(tau1, alpha1)]), d1), _predictions(model, both, d1))
    xi += _disagreement(_predictions(model, _edited(state, [(tau2, alpha2)]), d2), _predictions(model, both, d2))
    return xi


def disentanglement_grid(
    model: nn.Module,
    base,
    tau1: TaskVector,
    tau2: TaskVector,
    data,
    alphas: Sequence[float] = (-2.0, -1.0, 0.0, 1.0, 2.0),
) -> torch.Tensor:
    """``ξ(α1, α2)`` for every pair of ``alphas`` (rows: α1, columns: α2), reusing each
    single-edit model's predictions across the grid."""
    state = _base_state(model, base)
    d1, d2 = (_batches(d) for d in data)
    single1 = {a: _predictions(model, _edited(state, [(tau1, a)]), d1) for a in alphas}
    single2 = {a: _predictions(model, _edited(state, [(tau2, a)]), d2) for a in alphas}
    grid = torch.zeros(len(alphas), len(alphas))
    for i, a1 in enumerate(alphas):
        for j, a2 in enumerate(alphas):
            both = _edited(state, [(tau1, a1), (tau2, a2)])
            grid[i, j] = _disagreement(single1[a1], _predictions(model, both, d1)) + _disagreement(
                single2[a2], _predictions(model, both, d2)
            )
    return grid


def plot_disentanglement(
    grid: torch.Tensor,
    alphas: Sequence[float],
    path: str | os.PathLike | None = None,
    ax=None,
    title: str = "weight disentanglement error ξ(α1, α2)",
):
    """Heat map of :func:`disentanglement_grid` (matplotlib, imported here only). Saves to
    ``path`` when given; returns the figure."""
    try:
        import matplotlib  # deferred: matplotlib is slow to import, and flexmoe.merge stays quick to import

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: as above, only when plotting
    except ImportError as e:  # pragma: no cover - matplotlib is in the dev extra
        raise ImportError("plot_disentanglement needs matplotlib: pip install matplotlib") from e
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4))
    else:
        fig = ax.figure
    image = ax.imshow(grid.numpy(), origin="lower", cmap="viridis", vmin=0.0, vmax=max(float(grid.max()), 1e-9))
    ticks = range(len(alphas))
    ax.set_xticks(ticks, [f"{a:g}" for a in alphas])
    ax.set_yticks(ticks, [f"{a:g}" for a in alphas])
    ax.set_xlabel("α2")
    ax.set_ylabel("α1")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    if path is not None:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return fig
