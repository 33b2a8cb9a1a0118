"""Router recipes for the merged model, chosen by measurement (docs/routing.md).

FlexOlmo's merge (Shi et al., 2025, section 3.3) stacks router rows that were each trained
only as "my expert vs the public one" on the owner's own data. Nothing in that training
compares one owner's row with another's, so in the merged model the logits of different
owners live on unrelated scales. This module rewrites the router of an assembled model,
without retraining any expert, from statistics that the rules allow to cross the wire:

* :func:`calibrate_router` -- standardise each expert's logit ``r_j . x + b_j`` on public
  tokens, per layer: ``(r_j . x + b_j - m_j) / s_j`` with ``m_j, s_j`` the mean and standard
  deviation over the calibration tokens. Folded into the router: ``r_j <- r_j / s_j``,
  ``b_j <- (b_j - m_j) / s_j``. The new biases have either sign and the public one is not 0,
  so the full form needs an :class:`AffineRouter`; ``scale_only=True`` divides rows and
  biases by ``s_j`` only and stays a plain FlexOlmo router.
* :func:`lda_router` -- a linear discriminant (Fisher/LDA with a shared covariance) over the
  classes ``public, owner_1 .. owner_n`` at every layer, from each class's mean MLP input
  ``mu_c`` and one shared covariance ``Sigma`` (public data's, or pooled over every class)::

      logit_c(x) = (mu_c^T Sigma^-1 x - 1/2 mu_c^T Sigma^-1 mu_c + log pi_c) / T

  which is ``log p(c | x)`` up to a constant when the classes are Gaussians with a shared
  covariance (Hastie et al., "Elements of Statistical Learning", eq. 4.10). An owner's
  ``mu_c`` is the per-layer mean of its MLP input, taken in its own 2-expert model on its own
  data (:func:`mlp_input_moments`): one ``[layers, hidden]`` aggregate, never text. The
  biases are needed (public included), so the result is an :class:`AffineRouter`.
* :func:`fold_router_bias` -- moves a router's biases into its rows, so a biased router exports
  to a ``transformers`` FlexOlmo or Mixtral checkpoint (whose routers have no bias).

:func:`route` is the coordinator's step: the spec's :class:`~flexmoe.spec.RoutingRecipe` (LDA from
the statistics the owners shipped, or FlexOlmo's merge as published), folded when the export
needs it. It sits above ``data`` (it reads packed rows) and below ``assembly``, which applies
it. Routers no checkpoint can express (sequence-level, mixtures) are research code in
``benchmarks/routing_table.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from flexmoe.artifacts.expert import MLPInputStats, Plausibility
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.moe import AffineRouter, Router
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.data.packing import spread_rows
from flexmoe.spec import RoutingRecipe

# -- statistics of MLP inputs ------------------------------------------------------------------


class _Stop(Exception):
    pass


def _batches(rows: torch.Tensor, batch_size: int):
    for start in range(0, rows.shape[0], batch_size):
        yield rows[start : start + batch_size]


@torch.inference_mode()
def mlp_inputs(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8) -> list[torch.Tensor]:
    """Every decoder layer's MLP input (the router's input in a flexmoe MoE) on ``rows``
    ``[N, S]``, kept whole: a list of ``[N, S, H]`` tensors on ``rows``' device (inference tensors:
    copy them to train on them). For a probe or a plot; :func:`mlp_input_moments` keeps only the
    moments, for corpora too big to hold."""
    layers = decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, args, L=L: seen[L].append(args[0].detach()))
        for L, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        for batch in _batches(rows.long(), batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(x).to(rows.device) for x in seen]


@torch.inference_mode()
def mlp_input_moments(
    model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8, covariance: bool = False
) -> MLPInputStats:
    """Mean (and covariance) over every token of ``rows`` ``[N, S]`` (packed, no padding) of
    each decoder layer's MLP input, with ``model`` (dense, or a flexmoe MoE at its current
    routing) as it is. An owner calls this on its own 2-expert model and its own data."""
    layers = decoder_layers(model)
    hidden = int(model.config.hidden_size)
    sums = torch.zeros(len(layers), hidden, dtype=torch.float64)
    outer = torch.zeros(len(layers), hidden, hidden, dtype=torch.float64) if covariance else None
    count = 0

    def hook(L):
        def capture(module, args):
            x = args[0].reshape(-1, hidden).to("cpu", torch.float64)
            sums[L] += x.sum(0)
            if outer is not None:
                outer[L] += x.T @ x

        return capture

    device = next(model.parameters()).device
    handles = [layer.mlp.register_forward_pre_hook(hook(L)) for L, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        for batch in _batches(rows.long(), batch_size):
            model(input_ids=batch.to(device), use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    mean = sums / count
    cov = None
    if outer is not None:
        cov = outer / count - mean[:, :, None] * mean[:, None, :]
    return MLPInputStats(mean=mean, count=count, covariance=cov)


@torch.inference_mode()
def _layer_logit_moments(model: nn.Module, L: int, rows: torch.Tensor, batch_size: int):
    """Mean and std of layer ``L``'s router logits (per expert) over ``rows``; the forward
    pass stops at layer ``L``."""
    block = moe_blocks(model)[L]
    s1 = s2 = None
    n = 0

    def capture(module, args):
        nonlocal s1, s2, n
        h = args[0].reshape(-1, args[0].shape[-1])
        logits = module.router(h).double()
        s1 = logits.sum(0) if s1 is None else s1 + logits.sum(0)
        s2 = (logits**2).sum(0) if s2 is None else s2 + (logits**2).sum(0)
        n += logits.shape[0]
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(capture)
    try:
        for batch in _batches(rows.long(), batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    mean = s1 / n
    std = (s2 / n - mean**2).clamp_min(0).sqrt()
    return mean, std


def calibrate_router(
    model: nn.Module,
    rows: torch.Tensor,
    *,
    batch_size: int = 8,
    scale_only: bool = False,
    eps: float = 1e-6,
) -> nn.Module:
    """Standardise every expert's router logit on the calibration tokens ``rows`` (public
    data), layer by layer, in place (see the module docstring).

    Layers are done in order and each one's statistics are taken with every earlier layer
    already calibrated, so after the call each expert's logits on ``rows`` have mean 0 and
    standard deviation 1 at every layer (``scale_only``: standard deviation 1, means kept).
    The full form turns the routers into :class:`AffineRouter`; ``scale_only`` keeps plain
    routers (a positive scale keeps ``min(beta, 0)`` and the public bias of 0 valid). Any router
    with a :meth:`~flexmoe.core.moe.ExpertRouter.linear_gate` can be calibrated.
    """
    was_training = model.training
    model.eval()
    try:
        for L, block in enumerate(moe_blocks(model)):
            mean, std = _layer_logit_moments(model, L, rows, batch_size)
            weight, bias = block.router.linear_gate()
            scale = 1.0 / std.clamp_min(eps)
            b = bias.double()
            new_b = (b * scale if scale_only else (b - mean) * scale).float()
            weight = weight * scale.to(weight)[:, None]
            block.router = _linear_router(weight, new_b) if scale_only else AffineRouter.from_rows(weight, new_b)
    finally:
        model.train(was_training)
    return model


def _linear_router(weight: torch.Tensor, bias: torch.Tensor) -> Router:
    """A router computing ``x @ weight.T + bias``: a plain FlexOlmo :class:`Router` when ``bias``
    is one it holds as it is (public 0, owners <= 0), else an :class:`AffineRouter`."""
    plain = float(bias[0]) == 0.0 and bool((bias[1:] <= 0).all())
    return (Router if plain else AffineRouter).from_rows(weight, bias)


# -- the discriminant router -------------------------------------------------------------------


def lda_weights(
    means: torch.Tensor,
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDA discriminant rows and biases for one layer.

    ``means`` ``[C, H]`` (class means), ``covariance`` ``[H, H]`` (shared). The covariance is
    shrunk towards ``tr(Sigma)/H * I`` by ``shrinkage`` (Ledoit-Wolf style, a fixed amount) so
    that directions the public data barely spans do not blow up. Returns ``(W [C, H],
    b [C])`` float64 with ``logit_c = W_c . x + b_c`` as in the module docstring.
    """
    means = means.double()
    C, H = means.shape
    cov = covariance.double()
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / H) * torch.eye(H, dtype=cov.dtype)
    if prior is None:
        log_prior = torch.full((C,), -math.log(C), dtype=torch.float64)
    else:
        p = torch.as_tensor(prior, dtype=torch.float64)
        if p.shape != (C,) or (p <= 0).any():
            raise ValueError(f"prior must hold {C} positive weights, got {p.tolist()}")
        log_prior = torch.log(p / p.sum())
    W = torch.linalg.solve(cov, means.T).T  # [C, H] = (Sigma^-1 mu_c)^T
    b = -0.5 * (W * means).sum(-1) + log_prior
    return W / temperature, b / temperature


def layer_lda(blocks, public_mean, owner_means, covariance, prior, shrinkage, temperature):
    """:func:`lda_weights` for each of ``blocks`` (layers ``0..len(blocks)-1``) from the public
    and owners' per-layer means, in the model's expert order."""
    if len(owner_means) != blocks[0].num_experts - 1:
        raise ValueError(f"{len(owner_means)} owner means for a model with {blocks[0].num_experts - 1} owner experts")
    out = []
    for L in range(len(blocks)):
        means = torch.stack([torch.as_tensor(public_mean)[L]] + [torch.as_tensor(m)[L] for m in owner_means])
        out.append(lda_weights(means, covariance[L], prior=prior, shrinkage=shrinkage, temperature=temperature))
    return out


def lda_router(
    model: nn.Module,
    public_mean: torch.Tensor,
    owner_means: Sequence[torch.Tensor],
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    temperature: float = 1.0,
) -> nn.Module:
    """Write a token-level LDA router into an assembled model, in place.

    ``public_mean`` ``[L, H]``: the public model's mean MLP input on public data; ``owner_means``
    one ``[L, H]`` per owner, in the model's expert order (experts ``1..n``), each taken by the
    owner in its own 2-expert model on its own data; ``covariance`` ``[L, H, H]`` from public
    data. Every layer's rows and biases are replaced (:func:`lda_weights`); the routers become
    :class:`AffineRouter`. Only layer 0's input is exactly the statistic's (it depends on no
    expert); deeper layers see the merged model's own hidden states, an approximation.
    """
    blocks = moe_blocks(model)
    scores = layer_lda(blocks, public_mean, owner_means, covariance, prior, shrinkage, temperature)
    for block, (W, b) in zip(blocks, scores):
        rows = next(block.experts[0].parameters())  # router rows live in the model's dtype and device
        block.router = AffineRouter.from_rows(W.to(rows), b.float().to(rows.device))
    return model


__all__ = [
    "calibrate_router",
    "lda_router",
    "lda_weights",
    "mlp_input_moments",
]


# -- exportable form ---------------------------------------------------------------------------


def constant_direction(
    mean: torch.Tensor, covariance: torch.Tensor, *, shrinkage: float = 0.1
) -> tuple[torch.Tensor, float]:
    """The direction ``u`` along which the MLP input is most nearly constant, scaled so that
    ``E[u . x] = 1``, and the signal-to-noise ratio ``q = mu^T Sigma^-1 mu`` of ``u . x``.

    Among all ``u`` with ``u . mu = 1`` the variance ``u^T Sigma u`` is smallest for
    ``u = Sigma^-1 mu / q`` (a Lagrange-multiplier one-liner), where it is ``1 / q``; so a bias
    ``b`` moved into the weights as ``b * u`` changes a logit by ``b (u . x - 1)``, whose
    standard deviation is ``|b| / sqrt(q)``. ``Sigma`` is shrunk as in :func:`lda_weights`.
    """
    mean = mean.double()
    cov = covariance.double()
    H = mean.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / H) * torch.eye(H, dtype=cov.dtype)
    v = torch.linalg.solve(cov, mean)
    q = float(mean @ v)
    return v / q, q


def fold_router_bias(model: nn.Module, stats: MLPInputStats, *, shrinkage: float = 0.1) -> list[float]:
    """Move every layer's router biases into its rows, in place, so the router has no bias and
    exports to a ``transformers`` FlexOlmo or Mixtral checkpoint (whose routers have none).

    ``stats``: mean and covariance of the MLP inputs (:func:`mlp_input_moments` with
    ``covariance=True``, e.g. on public data). Softmax ignores a common shift, so biases are
    first taken relative to the public expert's; each layer's then becomes ``b_j * u``
    (:func:`constant_direction`). The routers become plain :class:`~flexmoe.core.moe.Router`\\ s with
    zero biases. Returns the per-layer ``q``: the folded logits' error has standard deviation
    ``|b_j| / sqrt(q)`` on data like ``stats``'s, so a large ``q`` means a near-exact fold.
    """
    if stats.covariance is None:
        raise ValueError("fold_router_bias needs the MLP inputs' covariance: mlp_input_moments(..., covariance=True)")
    qs = []
    for L, block in enumerate(moe_blocks(model)):
        weight, bias = block.router.linear_gate()
        u, q = constant_direction(stats.mean[L], stats.covariance[L], shrinkage=shrinkage)
        qs.append(q)
        b = bias.double()
        b = b - b[0]
        folded = (weight.double() + b[:, None] * u.to(b.device)[None, :]).to(weight.dtype)
        block.router = Router.from_rows(folded, torch.zeros_like(bias))
    return qs


# -- the default recipe, end to end ------------------------------------------------------------


def owner_statistics(model: nn.Module, rows: torch.Tensor, recipe=None, *, batch_size: int = 8) -> MLPInputStats | None:
    """What an owner ships for the routing recipe (``spec.routing``): the per-layer mean (and
    covariance, for ``covariance="pooled"``) of the MLP inputs of its own 2-expert ``model`` on
    its own training ``rows``, over at most ``recipe.stats_tokens`` tokens; ``None`` when the
    recipe needs nothing. Aggregates only: no text or token ids."""
    recipe = recipe or RoutingRecipe()
    kind = recipe.owner_statistics
    if kind is None:
        return None
    return mlp_input_moments(
        model, spread_rows(rows, recipe.stats_tokens), batch_size=batch_size, covariance=kind == "covariance"
    )


class _OnlyPublic:
    """Within the block, a merged model computes exactly the dense public model: every token
    goes to the public expert alone (a router with zero rows and the owners' biases at -1e30,
    top-1: the public weight is exactly 1). Restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.routers = [(b, b.router) for b in moe_blocks(self.model)]
        s = settings(self.model)
        self.top_k, s.top_k = s.top_k, 1
        hidden = self.model.config.hidden_size
        for block in moe_blocks(self.model):
            rows = next(block.experts[0].parameters())
            plain = Router(hidden, block.num_experts, dtype=rows.dtype, device=rows.device)
            with torch.no_grad():
                plain.bias.fill_(-1e30)
            block.router = plain
        return self.model

    def __exit__(self, *exc):
        for block, router in self.routers:
            block.router = router
        settings(self.model).top_k = self.top_k
        return False


def class_mixture(classes: Sequence[MLPInputStats], within: torch.Tensor) -> MLPInputStats:
    """Moments of the uniform mixture of the classes (public and every owner): mean
    ``mu = avg_c mu_c`` and covariance ``within + avg_c (mu_c - mu)(mu_c - mu)^T``. Folding the
    biases at this mixture rather than at the public data alone keeps the fold near-exact on
    every class's inputs, not only the public one's (docs/routing.md measures both)."""
    means = torch.stack([c.mean.double() for c in classes])  # [C, L, H]
    mu = means.mean(0)
    d = means - mu
    between = torch.einsum("clh,clk->lhk", d, d) / len(classes)
    return MLPInputStats(mean=mu, count=sum(c.count for c in classes), covariance=within.double() + between)


def check_statistics_plausible(
    owner: str, stats: MLPInputStats, public: MLPInputStats, bounds: Plausibility, *, source=None
) -> None:
    """Refuse an owner's MLP-input statistics that no honest run produces, measured against the
    public class's on public data (``public``: mean and covariance per layer). In every layer the
    owner's mean lies within ``bounds.statistics`` public standard deviations of the public mean
    (``||mu_j - mu_pub|| <= k sqrt(tr Sigma_pub)``) and its covariance's trace is at most ``k^2``
    times the public one's. Both keep the discriminant's rows (``Sigma^-1 mu``) and biases within
    float32 and the merged logits finite; a mean at 1e30 would make them NaN. Honest owners
    measured at most 0.67 and 0.93 (docs/trust.md)."""
    k = bounds.statistics
    for L in range(public.mean.shape[0]):
        spread = float(torch.trace(public.covariance[L].double()))
        far = float(torch.linalg.vector_norm(stats.mean[L].double() - public.mean[L].double()))
        if not far <= k * math.sqrt(spread):
            raise ArtifactError(
                owner,
                f"layers.{L}.stats.mean",
                f"within {k:g} public standard deviations of the public mean (distance <= {k * math.sqrt(spread):.4g})",
                f"distance {far:.4g}",
                source=source,
            )
        if stats.covariance is not None:
            trace = float(torch.trace(stats.covariance[L].double()))
            if not trace <= k * k * spread:
                raise ArtifactError(
                    owner,
                    f"layers.{L}.stats.covariance",
                    f"a trace at most {k * k:g} x the public one ({k * k * spread:.4g})",
                    f"{trace:.4g}",
                    source=source,
                )


def route(
    model: nn.Module,
    artifacts: Sequence,
    public_rows: torch.Tensor,
    recipe=None,
    *,
    exportable: bool = False,
    batch_size: int = 8,
    plausibility: Plausibility | None = None,
) -> dict:
    """Set an assembled model's routers by the routing recipe (the coordinator's step after
    :func:`flexmoe.assemble`), in place. Returns a summary for the report.

    Args:
        model: the merged MoE, experts in the order of ``artifacts``.
        artifacts: the owners' :class:`~flexmoe.ExpertArtifact`\\ s, carrying their statistics.
        public_rows: packed public text ``[N, S]`` for the public class's statistics (taken
            with the merged model routed to the public expert alone, i.e. the public model).
        recipe: :class:`~flexmoe.spec.RoutingRecipe` (default: the default recipe's token router,
            LDA with pooled covariance; a ``posterior`` recipe builds its token router).
        exportable: fold the discriminant's biases into the router rows
            (:func:`fold_router_bias` at the moments of the classes' mixture,
            :func:`class_mixture`) so the model exports exactly to a ``transformers``
            FlexOlmo/Mixtral checkpoint, at some cost in routing quality (docs/routing.md);
            otherwise the routers keep their biases (:class:`AffineRouter`, native format only).
        plausibility: how far an owner's statistics may sit from the public class's
            (:func:`check_statistics_plausible`; default :class:`~flexmoe.artifacts.expert.Plausibility`).
    """
    # route() builds token routers: for the posterior recipe, its token router (the LDA a
    # transformers export carries); the posterior itself is set by flexmoe.assembly.merge_experts.
    recipe = (recipe or RoutingRecipe()).token_router()
    summary: dict = {"method": recipe.method}
    if recipe.method == "published":
        return summary
    owners = settings(model).owners[1:]
    by_owner = {a.owner: a for a in artifacts}
    stats = []
    for owner in owners:
        a = by_owner.get(owner)
        s = a.routing_stats if a is not None else None
        if s is None or (recipe.covariance == "pooled" and s.covariance is None):
            need = "mean and covariance" if recipe.covariance == "pooled" else "mean"
            raise ValueError(
                f"owner {owner!r} shipped no routing statistics ({need} of its MLP inputs), which the "
                f"routing recipe {recipe.method!r}/{recipe.covariance!r} needs; have it retrain under this spec, "
                "or set spec.routing.method to 'published'"
            )
        stats.append(s)
    with _OnlyPublic(model) as public:
        pub = mlp_input_moments(
            public, spread_rows(public_rows, recipe.stats_tokens), batch_size=batch_size, covariance=True
        )
    for owner, s in zip(owners, stats):
        check_statistics_plausible(owner, s, pub, plausibility or Plausibility(), source=by_owner[owner].source)
    if recipe.covariance == "pooled":
        # Each class counts for at most the tokens the recipe takes statistics over (what an
        # honest owner ships), so one owner declaring 10**15 tokens cannot silence the others.
        cap = max(pub.count, recipe.stats_tokens)
        weights = [float(min(s.count, cap)) for s in (pub, *stats)]
        cov = sum(s.covariance * w for s, w in zip((pub, *stats), weights)) / sum(weights)
    else:
        cov = pub.covariance
    lda_router(model, pub.mean, [s.mean for s in stats], cov, shrinkage=recipe.shrinkage)
    summary.update(
        covariance=recipe.covariance,
        shrinkage=recipe.shrinkage,
        public_tokens=pub.count,
        owner_tokens={o: s.count for o, s in zip(owners, stats)},
        folded=exportable,
    )
    if exportable:
        summary["fold_q"] = [round(q, 2) for q in fold_router_bias(model, class_mixture([pub, *stats], cov))]
    return summary
