"""The MoE block and router follow DESIGN.md's math exactly."""

import pytest
import torch
from torch import nn

from flexmoe.moe import MoEBlock, MoESettings, Router, load_balancing_loss, record_router_logits, router_z_loss


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return x * self.s


def block(num_experts=3, top_k=None, normalize=False, hidden=4):
    settings = MoESettings(owners=["public"] + [f"o{i}" for i in range(1, num_experts)], top_k=top_k, normalize=normalize)
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


def test_negative_bias_gets_gradient_positive_does_not():
    r = Router(4, 3)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    r(torch.randn(6, 4))[:, 1:].sum().backward()
    assert r.bias.grad[1] == 0 and r.bias.grad[2] != 0 and r.bias.grad[0] == 0


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
