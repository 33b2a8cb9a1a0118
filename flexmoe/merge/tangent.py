"""Task arithmetic in the tangent space (Ortiz-Jiménez et al., 2023, "Task arithmetic in the
tangent space: improved editing of pre-trained models", section 5).

The first-order Taylor expansion of a network around its pre-trained weights ``θ0`` (eq. 4)::

    f_lin(x; θ) = f(x; θ0) + (θ − θ0)ᵀ ∇_θ f(x; θ0)

is linear in ``θ``, so task vectors of ``f_lin`` add exactly: the output of
``θ0 + α1 τ1 + α2 τ2`` is the two edits' output changes summed. Fine-tuning ``f_lin`` instead of
``f`` (the paper's "linearized fine-tuning") gives task vectors that are weight-disentangled by
construction wherever the two tasks' inputs give little gradient to each other's directions,
which is the paper's explanation of why task arithmetic works and its recipe for making it work
better. :class:`LinearizedModel` is that ``f_lin``, evaluated with one Jacobian-vector product
(:func:`torch.func.jvp` of :func:`torch.func.functional_call`) per forward pass, so it costs
about two forward passes and never forms the Jacobian.

Its parameters are the wrapped model's, under ``model.``: ``TaskVector.from_models`` of two
:class:`LinearizedModel` s, :func:`flexmoe.merge.disentanglement_error` and ``functional_call``
all see ``θ`` and treat the wrapper as an ordinary model: ``TaskVector.from_models(linearized,
linearize(base))`` is a task vector of the linearised model, with which
``disentanglement_error(linearize(base), None, τ1, τ2, ...)`` measures ``f_lin``'s weight
disentanglement. :meth:`LinearizedModel.task_vector` gives the same ``θ − θ0`` under the wrapped
model's own names, to apply to (or compare with) the ordinary model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexmoe.merge.task_arithmetic import TaskVector


@dataclass
class LinearizedOutput:
    """What a linearised language model returns: ``f_lin``'s logits and, given ``labels``, the
    mean next-token cross-entropy of those logits (the causal-LM loss, labels shifted by one,
    ``-100`` ignored)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LinearizedModel(nn.Module):
    """``f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0) · (θ − θ0)`` around the weights ``model`` has now.

    ``model``'s parameters become ``θ`` (trained as usual: ``linearized.parameters()``); ``θ0``
    is a frozen copy taken here. Buffers stay the model's. The forward pass takes the model's
    arguments; a model that returns a tensor gives a tensor, one that returns ``.logits`` (a
    ``transformers`` causal LM) gives a :class:`LinearizedOutput`, with the loss when ``labels``
    is passed. ``use_cache`` is forced off: a key-value cache is not part of ``f``'s output.

    Dropout and other randomness must be off (the module in inference mode, ``train(False)``):
    ``f(x; θ0)`` and its Jacobian are taken in one pass, which is only the Taylor expansion of a
    deterministic ``f``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def forward(self, *args, labels: torch.Tensor | None = None, **kwargs):
        names = list(self.theta0)
        # Read θ from the module each call: functional_call may have swapped tensors in.
        current = dict(self.model.named_parameters())
        missing = [n for n in names if n not in current]
        if missing:
            raise RuntimeError(f"LinearizedModel: the wrapped model lost parameters {missing[:3]} since it was wrapped")
        theta = tuple(current[n] for n in names)
        theta0 = tuple(self.theta0[n].to(t.device, t.dtype) for n, t in zip(names, theta))
        delta = tuple(t - t0 for t, t0 in zip(theta, theta0))
        if "use_cache" in kwargs or hasattr(getattr(self.model, "config", None), "use_cache"):
            kwargs["use_cache"] = False
        has_logits = []

        def f(*params):
            out = functional_call(self.model, dict(zip(names, params)), args=args, kwargs=kwargs)
            if isinstance(out, torch.Tensor):
                return out
            has_logits.append(True)
            return out.logits

        # The fused attention kernels have no forward-mode derivative; the math one is the same
        # function, written out in differentiable operations.
        with sdpa_kernel(SDPBackend.MATH):
            value, tangent = jvp(f, theta0, delta)
        out = value + tangent
        if not has_logits:
            if labels is not None:
                raise TypeError("labels: only for models that return .logits (causal language models)")
            return out
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return LinearizedOutput(logits=out, loss=loss)

    def task_vector(self) -> TaskVector:
        """``θ − θ0`` under the wrapped model's parameter names (float32 deltas)."""
        params = dict(self.model.named_parameters())
        return TaskVector({n: (params[n].detach() - t0).float() for n, t0 in self.theta0.items()})


def linearize(model: nn.Module) -> LinearizedModel:
    """The first-order Taylor expansion of ``model`` around its current weights (see
    :class:`LinearizedModel`); the wrapper trains ``model``'s own parameters in place."""
    return LinearizedModel(model)
