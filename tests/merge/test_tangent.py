"""flexmoe.merge.tangent: the linearised model is the first-order Taylor expansion of the model
around θ0 (Ortiz-Jiménez et al., 2023, eq. 4), trains like a model, and its task vectors add
exactly in output space."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flexmoe.merge import TaskVector, disentanglement_error
from flexmoe.merge.tangent import LinearizedModel, linearize
from flexmoe.testing import VOCAB, perturb_, tiny_model


def _direction(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def _moved(model: nn.Module, direction: dict, eps: float) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.add_(eps * direction[n])
    return out


def test_a_model_linear_in_its_weights_is_its_own_linearisation():
    # f(x; W, b) = W x + b is linear in (W, b): the expansion is exact at any distance from θ0.
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.double)
    lin = linearize(copy.deepcopy(model))
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(torch.randn_like(p) * 3.0)
    moved = lin.model  # the wrapper trains the wrapped model's own parameters
    expected = x @ moved.weight.T + moved.bias
    assert torch.allclose(lin(x), expected, atol=1e-12, rtol=0)
    # ... and it is f(θ0) + J (θ − θ0), not f(θ0): θ0 stayed where it was
    assert not torch.allclose(lin(x), model(x))


def test_at_theta0_it_is_the_model_and_the_error_elsewhere_is_second_order():
    model = tiny_model("olmo2").double()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    lin = linearize(copy.deepcopy(model))
    f0 = model(input_ids=ids).logits
    assert torch.equal(lin(input_ids=ids).logits, f0)

    d = _direction(model, seed=2)
    errors = []
    for eps in (2e-4, 1e-4, 5e-5):
        f = _moved(model, d, eps)(input_ids=ids).logits
        flin = _moved_linear(lin, d, eps)(input_ids=ids).logits
        assert (flin - f).abs().max() < 0.1 * (f - f0).abs().max()  # first order: close
        errors.append(float((flin - f).abs().max().detach()))
    # Taylor: the remainder shrinks as eps², so halving eps divides it by about 4 (not 2).
    for big, small in zip(errors, errors[1:]):
        assert 3.5 < big / small < 4.5


def _moved_linear(lin: LinearizedModel, direction: dict, eps: float) -> LinearizedModel:
    out = copy.deepcopy(lin)
    with torch.no_grad():
        for n, p in out.model.named_parameters():
            p.add_(eps * direction[n])
    return out


def test_the_tangent_term_is_the_directional_derivative_by_finite_differences():
    # f_lin(θ0 + δ) − f(θ0) = J δ; checked against a central difference of f itself, on a
    # non-linear model that computes in float64 throughout (transformers' norms round to float32).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Softplus()).double()
    x = torch.randn(5, 6, dtype=torch.double)
    d = _direction(model, seed=4)
    jd = _moved_linear(linearize(copy.deepcopy(model)), d, 1.0)(x) - model(x)
    h = 1e-5
    fd = (_moved(model, d, h)(x) - _moved(model, d, -h)(x)) / (2 * h)
    assert torch.allclose(jd, fd, atol=1e-8, rtol=1e-7)
    assert jd.abs().max() > 0.1


def test_task_vectors_of_the_linearisation_add_exactly_in_output_space():
    # f_lin(θ0 + τ1 + τ2) − f_lin(θ0) = [f_lin(θ0 + τ1) − f_lin(θ0)] + [f_lin(θ0 + τ2) − f_lin(θ0)]
    base = tiny_model("olmo2").double()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    lin0 = linearize(copy.deepcopy(base))
    tuned = []
    for seed in (6, 7):
        m = copy.deepcopy(lin0)
        perturb_(m.model, seed, scale=0.2)
        tuned.append(m)
    tau1, tau2 = (TaskVector.from_models(m, lin0) for m in tuned)
    assert set(tau1.deltas) == {f"model.{n}" for n, _ in base.named_parameters()}

    def out(tau: TaskVector | None):
        model = lin0 if tau is None else tau.apply(lin0)
        return model(input_ids=ids).logits

    f0 = out(None)
    lhs = out(tau1 + tau2) - f0
    rhs = (out(tau1) - f0) + (out(tau2) - f0)
    # exact up to rounding: the models' norms compute in float32 even in a float64 model
    assert (lhs - rhs).abs().max() < 1e-6 * lhs.abs().max()
    # the ordinary model does not add exactly (the property the linearisation buys)
    g0 = base(input_ids=ids).logits
    plain1, plain2 = (m.task_vector() for m in tuned)
    glhs = (plain1 + plain2).apply(base)(input_ids=ids).logits - g0
    grhs = (plain1.apply(base)(input_ids=ids).logits - g0) + (plain2.apply(base)(input_ids=ids).logits - g0)
    assert (glhs - grhs).abs().max() > 1e-2 * glhs.abs().max()


def test_trains_theta_keeps_theta0_and_gives_its_task_vector():
    base = tiny_model("qwen2")
    lin = linearize(copy.deepcopy(base))
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        out = lin(input_ids=ids, labels=ids)
        # the loss is the causal-LM cross-entropy of f_lin's logits
        manual = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert torch.allclose(out.loss, manual)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(lin(input_ids=ids, labels=ids).loss.detach()) < first
    for n, p in base.named_parameters():
        assert torch.equal(lin.theta0[n], p)  # θ0 is a frozen copy
    tau = lin.task_vector()
    expected = TaskVector.from_models(lin.model, base)
    assert set(tau.deltas) == set(expected.deltas)
    for n, d in tau.deltas.items():
        assert torch.equal(d, expected.deltas[n])
    assert tau.norm() > 0


def test_functional_call_and_disentanglement_error_see_the_linearised_model():
    base = tiny_model("olmo2")
    lin0 = linearize(copy.deepcopy(base))
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    tuned = copy.deepcopy(lin0)
    perturb_(tuned.model, 10, scale=0.3)
    swapped = functional_call(lin0, dict(tuned.state_dict()), kwargs={"input_ids": ids}).logits
    assert torch.allclose(swapped, tuned(input_ids=ids).logits, atol=1e-6)

    tau = TaskVector.from_models(tuned, lin0)
    # τ and −τ on the same inputs: adding −τ undoes τ exactly in f_lin, so the predictions of the
    # sum are those of θ0, and ξ counts where θ0 + τ's predictions differ from θ0's (both terms)
    xi = disentanglement_error(lin0, None, tau, -1 * tau, 1.0, 1.0, (ids, ids))
    p0 = lin0(input_ids=ids).logits.argmax(-1)
    p_plus = tuned(input_ids=ids).logits.argmax(-1)
    p_minus = (-1 * tau).apply(lin0)(input_ids=ids).logits.argmax(-1)
    expected = float((p_plus != p0).float().mean() + (p_minus != p0).float().mean())
    assert xi == pytest.approx(expected)
    assert xi > 0


def test_labels_need_a_model_with_logits():
    lin = linearize(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="labels"):
        lin(torch.randn(1, 3), labels=torch.zeros(1, 1, dtype=torch.long))
