"""The MoE block and router follow FlexOlmo's math (eq. 1, Shi et al., 2025) exactly."""

import copy

import pytest
import torch
from torch import nn

from flexmoe.core.moe import MoEBlock, MoESettings, Router, load_balancing_loss, record_router_logits, router_z_loss


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return x * self.s


def block(num_experts=3, top_k=None, normalize=False, hidden=4):
    settings = MoESettings(
        owners=["public"] + [f"o{i}" for i in range(1, num_experts)], top_k=top_k, normalize=normalize
    )
    router = Router(hidden, num_experts)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
    return MoEBlock([Scale(i + 1) for i in range(num_experts)], router, settings)


def reference(b: MoEBlock, x):
    """Dense, loop-free restatement of the routing formula."""
    h = x.reshape(-1, x.shape[-1])
    bias = torch.minimum(b.router.bias.detach().float(), torch.tensor(0.0))
    bias[0] = 0.0
    p = torch.softmax(h.float() @ b.router.weight.detach().float().T + bias, -1)
    k = b.settings.effective_top_k()
    w, i = p.topk(k, -1)
    if b.settings.normalize:
        w = w / w.sum(-1, keepdim=True)
    outs = torch.stack([e(h) for e in b.experts], 1)  # [T, E, H]
    return (outs.gather(1, i[..., None].expand(-1, -1, h.shape[-1])) * w[..., None]).sum(1).reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2, None])
@pytest.mark.parametrize("normalize", [False, True])
def test_block_matches_formula(top_k, normalize):
    b = block(top_k=top_k, normalize=normalize)
    with torch.no_grad():
        b.router.bias.copy_(torch.tensor([5.0, -1.0, 0.7]))  # public bias is ignored, positive betas clamp to 0
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(b(x), reference(b, x), atol=1e-6, rtol=1e-6)


def test_effective_bias_clamps_owners_and_pins_public():
    r = Router(4, 3)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([3.0, 2.0, -4.0]))
    assert r.effective_bias().tolist() == [0.0, 0.0, -4.0]


def test_a_bias_above_the_clamp_gets_gradient_only_towards_it():
    """A negative bias always learns; one above the clamp only when descent lowers it."""
    r = Router(4, 3)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(6, 4)
    r(x)[:, 1:].sum().backward()  # descent lowers every owner bias
    assert r.bias.grad[1] == 6 and r.bias.grad[2] == 6 and r.bias.grad[0] == 0
    r.zero_grad()
    (-r(x)[:, 1:].sum()).backward()  # descent raises them: the clamped one stays put
    assert r.bias.grad[1] == 0 and r.bias.grad[2] == -6 and r.bias.grad[0] == 0


def test_router_logits_are_float32_for_half_models():
    r = Router(4, 2, dtype=torch.bfloat16)
    assert r(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_only_routed_tokens_run_through_an_expert():
    x = torch.randn(4, 8, 4)
    for num_experts in (2, 4, 8):
        b = block(num_experts=num_experts, top_k=2)
        with torch.no_grad():
            b(x)
        seen = [e.seen for e in b.experts]
        assert sum(seen) == 4 * 8 * 2  # T * k, whatever the number of experts
        assert max(seen) <= 4 * 8


def test_unused_experts_do_not_run():
    b = block(num_experts=3, top_k=1)
    with torch.no_grad():
        b.router.weight.zero_()
        b.router.bias.copy_(torch.tensor([0.0, -50.0, -50.0]))  # everything to the public expert
        b(torch.randn(2, 3, 4))
    assert [e.seen for e in b.experts] == [6, 0, 0]


def test_top_k_is_a_runtime_setting_shared_by_blocks():
    b = block(num_experts=3, top_k=1)
    x = torch.randn(1, 4, 4)
    with torch.no_grad():
        one = b(x)
        b.settings.top_k = 3
        three = b(x)
    assert not torch.allclose(one, three)


def test_record_router_logits_and_losses():
    b = block(num_experts=3, top_k=2)
    model = nn.Sequential(b)
    with record_router_logits(model) as logits:
        model(torch.randn(2, 5, 4))
    assert len(logits) == 1 and logits[0].shape == (10, 3) and logits[0].dtype == torch.float32
    assert b.settings.recorded is None  # recording stops with the block
    z = router_z_loss(logits)
    assert torch.isclose(z, torch.logsumexp(logits[0], -1).pow(2).mean())
    z.backward()
    assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_collapsed():
    balanced = torch.zeros(12, 4)
    balanced[torch.arange(12), torch.arange(12) % 4] = 5.0
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 5.0
    lb, lc = load_balancing_loss(balanced, top_k=1), load_balancing_loss(collapsed, top_k=1)
    assert lc > 2 * lb
    uniform = torch.zeros(8, 4)  # equal probabilities: f_e * P_e sums to 1/E, loss 1
    assert torch.isclose(load_balancing_loss(uniform, top_k=4), torch.tensor(1.0))


def test_losses_reject_empty_recordings():
    with pytest.raises(ValueError, match="record_router_logits"):
        router_z_loss([])


def test_frozen_router_rows_get_no_gradient():
    r = Router(4, 3)
    with torch.no_grad():
        r.weight.normal_()
        r.bias.copy_(torch.tensor([0.0, -1.0, -1.0]))
    r.freeze_rows([1])
    r(torch.randn(6, 4)).pow(2).sum().backward()
    assert r.weight.grad[0].abs().sum() == 0 and r.weight.grad[2].abs().sum() == 0
    assert r.weight.grad[1].abs().sum() > 0
    assert r.bias.grad[2] == 0 and r.bias.grad[1] != 0


# -- both execution paths against a per-token restatement, with real gated MLP experts ---------


def gated_block(num_experts, top_k, normalize, dtype, hidden=16, seed=0):
    """An MoE of OLMo-2 MLPs (gate/up/down, SiLU) with a random router and random clamped biases."""
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2MLP

    torch.manual_seed(seed)
    config = Olmo2Config(hidden_size=hidden, intermediate_size=24)
    experts = [Olmo2MLP(config).to(dtype) for _ in range(num_experts)]
    router = Router(hidden, num_experts, dtype=dtype)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.uniform_(-1.0, 1.0)  # positive betas clamp to 0; bias[0] is ignored
    owners = ["public"] + [f"o{i}" for i in range(1, num_experts)]
    return MoEBlock(experts, router, MoESettings(owners=owners, top_k=top_k, normalize=normalize))


def per_token_reference(b: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """FlexOlmo's router formula one token at a time, in float64 from the block's own parameters."""
    h = x.reshape(-1, x.shape[-1])
    weight = b.router.weight.detach().double()
    bias = [0.0] + [min(float(beta), 0.0) for beta in b.router.bias[1:]]
    k = b.settings.effective_top_k()
    experts = [copy.deepcopy(e).double() for e in b.experts]
    rows = []
    for t in range(h.shape[0]):
        xt = h[t].double()
        p = torch.softmax(weight @ xt + torch.tensor(bias, dtype=torch.float64), dim=0)
        w, chosen = p.topk(k)
        if b.settings.normalize:
            w = w / w.sum()
        rows.append(sum(w[j] * experts[int(i)](xt[None])[0] for j, i in enumerate(chosen)))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("num_experts", "top_k"), [(2, 1), (2, 2), (5, 1), (5, 2), (5, 5), (8, 2), (8, 8)])
def test_gated_experts_match_the_per_token_formula(num_experts, top_k, normalize, dtype):
    b = gated_block(num_experts, top_k, normalize, dtype)
    x = torch.randn(3, 7, 16).to(dtype)
    with torch.no_grad():
        want = per_token_reference(b, x)
        seen = [0] * num_experts
        for e, expert in enumerate(b.experts):
            expert.register_forward_hook(lambda m, args, out, e=e: seen.__setitem__(e, seen[e] + args[0].shape[0]))
        got = b(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    else:  # bfloat16 keeps 8 bits of mantissa; a wrong expert or weight would be off by O(1)
        torch.testing.assert_close(got.double(), want, atol=0.03 * float(want.abs().max()), rtol=0.03)
    # Each expert ran on exactly the tokens routed to it (every token when top_k is all experts).
    routed = b.route(x.reshape(-1, 16))[2]
    assert seen == torch.bincount(routed.reshape(-1), minlength=num_experts).tolist()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_experts", [2, 3, 6])
def test_all_experts_path_equals_routed_path(num_experts, normalize):
    """With top-k = all, the fast path (every expert on the whole batch) and the sorted
    per-expert path compute the same output and the same gradients."""
    results = []
    for path in ("_all_experts", "_routed_experts"):
        b = gated_block(num_experts, None, normalize, torch.float32, seed=3)
        x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4))
        h = x.reshape(-1, 16)
        _, weights, indices = b.route(h)
        out = getattr(b, path)(h, weights, indices)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in b.parameters()]
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_gradients_match_the_per_token_formula(top_k):
    """Training sees the formula's gradients: router rows, clamped biases and routed experts."""
    b = gated_block(4, top_k, False, torch.float32, seed=5)
    ref = copy.deepcopy(b).double()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(6))
    b(x).pow(2).sum().backward()

    def formula(h):  # per_token_reference, differentiable
        p = torch.softmax(h @ ref.router.weight.T + ref.router.effective_bias().double(), -1)
        w, chosen = p.topk(ref.settings.effective_top_k(), -1)
        return torch.stack(
            [sum(w[t, j] * ref.experts[int(i)](h[t][None])[0] for j, i in enumerate(chosen[t])) for t in range(len(h))]
        )

    formula(x.reshape(-1, 16).double()).pow(2).sum().backward()
    for (name, p), q in zip(b.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_inference_fast_path_gives_the_modules_numbers_exactly(public_dir):
    """Without autograd a gated SiLU expert runs with SiLU and the product in place; its output,
    and the whole block's, are bit for bit the module's own (which the training path still uses)."""
    from transformers import AutoModelForCausalLM

    import flexmoe
    from flexmoe.core.moe import _gated_inplace, _silu_gated
    from flexmoe.core.surgery import moe_blocks, set_top_k

    model = AutoModelForCausalLM.from_pretrained(public_dir)
    flexmoe.upcycle(model, num_experts=3, top_k=2, owners=["a", "b", "c"])
    block = moe_blocks(model)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for j in range(1, 4):
            for p in block.experts[j].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g))
    x = torch.randn(2, 7, block.router.weight.shape[1], generator=g)
    assert _silu_gated(block.experts[1])
    with torch.no_grad():
        assert torch.equal(_gated_inplace(block.experts[1], x), block.experts[1](x))
        fast = block(x)
    slow = block(x)  # grad enabled: the modules' own forwards
    assert slow.requires_grad and torch.equal(fast, slow.detach())
    # A forward hook (a profiler's, peft's, a user's) on an expert or its linears sends it the module way.
    handle = block.experts[1].up_proj.register_forward_hook(lambda *a: None)
    assert not _silu_gated(block.experts[1]) and _silu_gated(block.experts[2])
    handle.remove()
    assert _silu_gated(block.experts[1])
    # Only the fast path's own fresh output is scaled in place: an expert that hands back its input
    # (here an identity, at top-k = all, where the experts see the caller's tensor itself) leaves
    # that tensor as it was.
    block.experts[3] = torch.nn.Identity()
    set_top_k(model, 4)
    before = x.clone()
    with torch.no_grad():
        block(x)
    assert torch.equal(x, before)


def test_an_owner_bias_pushed_above_the_clamp_can_still_learn():
    """beta starts at 0, on min(beta, 0)'s boundary; one AdamW step up leaves it above the clamp.
    The effective bias there is 0 as before, but a loss that wants the bias lower still moves it
    back (a plain clamp's gradient would be 0 for good); a loss that wants it higher does not
    move it further."""

    router = Router(hidden_size=4, num_experts=2)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(router.parameters(), lr=0.1, weight_decay=0.0)
    # one step that wants owner 1 more often pushes beta_1 up, past the clamp
    (-router(x).log_softmax(-1)[:, 1].mean()).backward()
    opt.step()
    assert router.bias[1] > 0 and router.effective_bias()[1] == 0
    opt.zero_grad()
    # now owner 1 should be used less: the bias must come back down
    (-router(x).log_softmax(-1)[:, 0].mean()).backward()
    assert router.bias.grad[1] > 0
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        (-router(x).log_softmax(-1)[:, 0].mean()).backward()
    assert router.bias[1] < 0 and router.effective_bias()[1] < 0
    # above the clamp, a gradient that wants it higher is not passed (the clamp's own behaviour)
    with torch.no_grad():
        router.bias[1] = 0.5
    router.zero_grad()
    (-router(x).log_softmax(-1)[:, 1].mean()).backward()
    assert router.bias.grad[1] == 0
    assert router.bias.grad[0] == 0  # the public expert's bias is 0 whatever it holds
