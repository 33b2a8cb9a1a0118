"""Router recipes (flexmoe.routing) do the math they promise, on tiny models and synthetic data."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexmoe.core.moe import AffineRouter, Router, record_router_logits
from flexmoe.core.surgery import decoder_layers, moe_blocks, set_top_k, upcycle, use_affine_routers
from flexmoe.routing import calibrate_router, lda_router, lda_weights, mlp_input_moments, mlp_inputs
from flexmoe.testing import VOCAB, perturb_, tiny_model


def _benchmark(name: str):
    """A script of benchmarks/ (scripts run by path, not a package), loaded by its path once per
    session, so every test file sees the same classes (the router registry holds one of each)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


# The research routers live with the only benchmark that measures them.
research = _benchmark("routing_table")


def merged(arch="olmo2", owners=3, seed=0):
    """A tiny MoE with perturbed owner experts and random, badly scaled router rows."""
    model = upcycle(tiny_model(arch, seed=seed), num_experts=owners)
    g = torch.Generator().manual_seed(seed + 1)
    for block in moe_blocks(model):
        for j in range(1, owners + 1):
            perturb_(block.experts[j], seed=seed + j)
        with torch.no_grad():
            block.router.weight.copy_(
                torch.randn(block.router.weight.shape, generator=g)
                * torch.tensor([1.0, 5.0, 0.2, 3.0])[: owners + 1, None]
            )
            block.router.bias.copy_(-torch.rand(owners + 1, generator=g))
    return model.eval()


def rows(n=6, seq=16, seed=3):
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def logits_on(model, ids):
    with torch.no_grad(), record_router_logits(model) as logits:
        model(input_ids=ids, use_cache=False)
    return [layer_logits.double() for layer_logits in logits]


def test_affine_router_keeps_logits_and_frees_bias():
    model = merged()
    ids = rows()
    before = logits_on(model, ids)
    use_affine_routers(model)
    assert all(isinstance(b.router, AffineRouter) for b in moe_blocks(model))
    for a, b in zip(before, logits_on(model, ids)):
        torch.testing.assert_close(a, b)
    r = moe_blocks(model)[0].router
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.7, 1.5, -2.0, 0.3]))
    assert torch.equal(r.effective_bias(), torch.tensor([0.7, 1.5, -2.0, 0.3]))  # no clamp, public bias free


@pytest.mark.parametrize("arch", ["olmo2", "llama"])
def test_calibration_standardises_every_experts_logits_on_calibration_data(arch):
    model = merged(arch)
    ids = rows()
    calibrate_router(model, ids, batch_size=4)
    for layer_logits in logits_on(model, ids):
        torch.testing.assert_close(layer_logits.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            layer_logits.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0
        )


def test_scale_only_calibration_stays_a_plain_router():
    model = merged()
    ids = rows()
    before = logits_on(model, ids)
    calibrate_router(model, ids, scale_only=True)
    after = logits_on(model, ids)
    assert all(type(b.router) is Router for b in moe_blocks(model))
    # Layer 0's inputs do not depend on routing: its logits are exactly rescaled.
    std0 = before[0].std(0, unbiased=False)
    torch.testing.assert_close(after[0], before[0] / std0, atol=1e-4, rtol=1e-4)
    for layer_logits in after:
        torch.testing.assert_close(
            layer_logits.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0
        )


def test_mlp_input_moments_and_mlp_inputs_match_a_direct_capture():
    model = tiny_model("olmo2")
    ids = rows(4, 8)
    seen = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    stats = mlp_input_moments(model, ids, batch_size=3, covariance=True)
    assert stats.count == ids.numel()
    model.train()
    whole = mlp_inputs(model, ids, batch_size=3)  # batches of 3, 1: the same rows as one batch of 4
    assert model.training  # restored after its eval-mode passes
    for L, x in enumerate(seen):
        assert whole[L].shape == (*ids.shape, x.shape[-1])
        torch.testing.assert_close(whole[L].reshape(-1, x.shape[-1]), x, atol=1e-6, rtol=1e-6)
        x = x.double()
        torch.testing.assert_close(stats.mean[L], x.mean(0))
        torch.testing.assert_close(stats.covariance[L], torch.cov(x.T, correction=0), atol=1e-8, rtol=1e-6)


def clusters(centres, n=200, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [c + noise * torch.randn(n, c.numel(), generator=g, dtype=torch.float64) for c in centres]
    return xs


def test_lda_routes_each_synthetic_cluster_to_its_expert():
    H = 16
    g = torch.Generator().manual_seed(0)
    centres = [torch.randn(H, generator=g, dtype=torch.float64) * 2 for _ in range(3)]  # public, owner 1, owner 2
    xs = clusters(centres)
    pooled = torch.cat([x - x.mean(0) for x in xs])
    cov = pooled.T @ pooled / pooled.shape[0]
    W, b = lda_weights(torch.stack([x.mean(0) for x in xs]), cov, shrinkage=0.0)
    router = AffineRouter(H, 3)
    with torch.no_grad():
        router.weight.copy_(W.float())
        router.bias.copy_(b.float())
    for c, x in enumerate(xs):
        assert (router(x.float()).argmax(-1) == c).float().mean() > 0.99


def test_lda_is_the_gaussian_posterior():
    """With a shared covariance, softmax of the LDA logits is Bayes' posterior exactly."""
    H = 4
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, H, generator=g, dtype=torch.float64)
    A = torch.randn(H, H, generator=g, dtype=torch.float64)
    cov = A @ A.T + torch.eye(H, dtype=torch.float64)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    W, b = lda_weights(means, cov, prior=prior, shrinkage=0.0)
    x = torch.randn(50, H, generator=g, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(means[:, None, :], covariance_matrix=cov)
    log_joint = dist.log_prob(x[None]).T + prior.log()
    torch.testing.assert_close(torch.softmax(x @ W.T + b, -1), torch.softmax(log_joint, -1))
    W2, b2 = lda_weights(means, cov, prior=prior, shrinkage=0.0, temperature=2.0)
    torch.testing.assert_close(x @ W2.T + b2, (x @ W.T + b) / 2)


def lda_by_formula(means, covariance, shrinkage, prior, temperature):
    """The discriminant written out in numpy (Hastie et al., ESL eq. 4.10), independently of
    flexmoe.routing: ``Σ_s = (1 − s) Σ + s · tr(Σ)/H · I``,
    ``logit_c(x) = (μ_c^T Σ_s^-1 x − ½ μ_c^T Σ_s^-1 μ_c + log π_c) / T``."""
    mu = np.asarray(means, dtype=np.float64)
    cov = np.asarray(covariance, dtype=np.float64)
    H = cov.shape[0]
    shrunk = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / H * np.eye(H)
    inv = np.linalg.inv(shrunk)
    pi = np.asarray(prior, dtype=np.float64) / np.sum(prior)
    W = np.stack([inv @ m for m in mu])
    b = np.array([-0.5 * m @ inv @ m + np.log(p) for m, p in zip(mu, pi)])
    return W / temperature, b / temperature


def test_lda_router_writes_every_layer_and_checks_owner_count():
    model = merged(owners=2)
    ids = rows()
    stats = mlp_input_moments(model, ids, covariance=True)
    means = [stats.mean + 1.0, stats.mean - 1.0]
    with pytest.raises(ValueError, match="owner means"):
        lda_router(merged(owners=2), stats.mean, means[:1], stats.covariance)
    prior = [0.5, 0.3, 0.2]
    lda_router(model, stats.mean, means, stats.covariance, prior=prior, shrinkage=0.3, temperature=1.5)
    for L, block in enumerate(moe_blocks(model)):
        assert isinstance(block.router, AffineRouter)
        class_means = [stats.mean[L].numpy(), *(m[L].numpy() for m in means)]
        W, b = lda_by_formula(class_means, stats.covariance[L].numpy(), 0.3, prior, 1.5)
        np.testing.assert_allclose(block.router.weight.detach().double().numpy(), W, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(block.router.bias.detach().double().numpy(), b, rtol=1e-5, atol=1e-5)
    # the defaults: shrinkage 0.1, a uniform prior, temperature 1
    lda_router(model, stats.mean, means, stats.covariance)
    class_means = [stats.mean[0].numpy(), *(m[0].numpy() for m in means)]
    W, b = lda_by_formula(class_means, stats.covariance[0].numpy(), 0.1, [1, 1, 1], 1.0)
    np.testing.assert_allclose(moe_blocks(model)[0].router.weight.detach().double().numpy(), W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moe_blocks(model)[0].router.bias.detach().double().numpy(), b, rtol=1e-5, atol=1e-5)


def test_lda_weights_reject_bad_settings():
    means, cov = torch.zeros(2, 3), torch.eye(3)
    with pytest.raises(ValueError, match="shrinkage"):
        lda_weights(means, cov, shrinkage=1.5)
    with pytest.raises(ValueError, match="temperature"):
        lda_weights(means, cov, temperature=0)
    with pytest.raises(ValueError, match="prior"):
        lda_weights(means, cov, prior=[1.0, 0.0])


def test_prefix_lda_router_is_the_owners_own_model_when_the_posterior_picks_it():
    """A sequence classed as owner 1 goes through exactly owner 1's 2-expert model."""
    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.assembly import assemble

    model = merged(owners=3)
    ids = rows()
    art = ExpertArtifact.from_model(model, owner="expert_1", expert=1)
    single = assemble(upcycle(tiny_model("olmo2"), num_experts=0), [art], top_k=2).eval()
    with torch.no_grad():  # r_pub is the spec's, the same in every owner's model and the merge
        for a, b in zip(moe_blocks(single), moe_blocks(model)):
            a.router.weight[0].copy_(b.router.weight[0])
    stats = mlp_input_moments(model, ids, covariance=True)
    far = [stats.mean + 50.0, stats.mean, stats.mean - 50.0, stats.mean + 80.0]  # public, owners 1..3
    research.prefix_lda_router(model, far[0], far[1:], stats.covariance, shrinkage=0.5)
    set_top_k(model, 2)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        want = single(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lda_mixture_router_gates_sum_to_one_and_equal_the_owners_model_when_certain():
    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.assembly import assemble

    model = merged(owners=3)
    ids = rows()
    art = ExpertArtifact.from_model(model, owner="expert_1", expert=1)
    single = assemble(upcycle(tiny_model("olmo2"), num_experts=0), [art], top_k=2).eval()
    with torch.no_grad():
        for a, b in zip(moe_blocks(single), moe_blocks(model)):
            a.router.weight[0].copy_(b.router.weight[0])
    stats = mlp_input_moments(model, ids, covariance=True)
    # Class 1 sits on the data, the others 1000 units away: the posterior is one-hot on owner 1.
    far = [stats.mean + 1000.0, stats.mean, stats.mean - 1000.0, stats.mean + 2000.0]
    research.lda_mixture_router(model, far[0], far[1:], stats.covariance, shrinkage=0.5)
    for gates in logits_on(model, ids):
        torch.testing.assert_close(gates.exp().sum(-1), torch.ones(gates.shape[0], dtype=torch.float64))
    set_top_k(model, 2)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        want = single(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
