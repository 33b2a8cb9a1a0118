"""One owner's expert training step, side by side with the alternatives, on one model and batch.

Variants (same OLMo-2 public model, same token batch, float32 on CPU):

(a) ``flexmoe``: ``ExpertModule(public, owner="x")``: the public model upcycled into a
    2-expert MoE with only expert 1 and router row 1 trainable (FlexOlmo section 3.2). A step is
    the module's own ``_lm_step`` + router z-loss (coef from the recipe), backward,
    ``clip_grad_norm_(1.0)`` over the trainable parameters, the optimizer and LR scheduler from
    ``module.configure_optimizers()``, and ``zero_grad``. Logging is left out (it needs a Trainer).
(b) ``dense``: plain full fine-tuning of the public model: every parameter trains,
    AdamW(0.9, 0.95), weight decay 0, clip 1.0.
(c) ``transformers``: the same expert step through ``FlexOlmoForCausalLM``, the way FlexOlmo's
    own code trains an expert: the fused ``mlp.experts.gate_up_proj`` / ``down_proj`` tensors and
    the router ``mlp.gate.weight`` require grad, a tensor hook zeroes the public half (expert 0,
    router row 0) of their gradients, AdamW with weight decay 0 (with weight decay != 0 the
    "frozen" public expert would decay, since it lives in the same tensor as the trained one).
    Router z-loss from ``output_router_logits=True`` (the load-balancing term is computed too but
    weighted 0).

Timing: every variant is warmed up, then ``rounds x steps`` steps of each are timed round robin
(one step of each variant in turn, the order rotating). Reported: the median step (ms, tokens/s),
the median process CPU time, and as "vs (b)" the median over cycles of the
paired ratio t_b / t_variant: steps of one cycle run seconds apart under the same load, so this
ratio survives other work on a shared machine far better than a ratio of medians. The same is
reported over the "quiet" cycles alone (each variant's step within 1.2x of its fastest), and for
process CPU time. The targets are judged on CPU time with ``--threads 1`` (a single thread's CPU
time is its own compute, whatever else runs), else on the quiet cycles when there are at least 3:
on a machine that other jobs share, a multi-threaded step slows several-fold whenever another
process holds a core (OpenMP threads wait for each other at every kernel; docs/performance.md).

FLOP accounting (matmuls only, 2*m*n*k each; norms, activations, softmax, loss, optimizer
ignored). T = batch*seq tokens, H hidden, I intermediate, V vocab, L layers, E = 2 experts:

    attention projections  q,k,v,o             2*T*H*(2H + 2*H_kv)      (= 8*T*H^2, MHA)
    attention scores       Q.K^T and P.V       2 * 2*batch*seq^2*H      (full seq x seq, as torch's
                                               SDPA formula; a causal kernel may skip about half)
    MLP                    gate, up, down      3 * 2*T*H*I
    router                 [T,H] x [H,E]       2*T*H*E
    LM head                                    2*T*H*V

    forward F        = L*(proj + scores + mlp) + head
    dense step (b)   = 3F: backward = grad w.r.t. the input of every matmul (~F; both operands for
                       the score matmuls) + grad w.r.t. every weight (~F). (A flash-attention
                       backward also recomputes Q.K^T; that is not counted.)
    expert step (a)  = forward with both experts and the router: F + L*(mlp + router), plus the
                       backward autograd actually needs:
                       - LM head: input grad only (frozen weight);
                       - layers 1..L-1 (their input depends on layer 0's trainable expert):
                         input grads of the attention projections, both operands of the score
                         matmuls, input grads through BOTH experts' MLPs and the router, weight
                         grads of expert 1's MLP and of the router;
                       - layer 0: nothing below it trains and the embedding output needs no
                         grad, so its attention has no backward at all; expert 1 needs its
                         weight grads plus the input grad of down_proj (to reach gate/up's
                         weight grads); expert 0 needs nothing; the router needs its weight grad.
                       No LM-head, embedding, attention or norm weight grads.
    transformers (c) = (a) + expert 0's weight grads in every layer and expert 0's down_proj input
                       grad in layer 0: the fused tensors require grad as a whole and the hook
                       only zeroes expert 0's gradient after it is computed.

    FLOP-bound tokens/s ratio a/b = FLOPs(b) / FLOPs(a).

For a 4-layer, 512-wide OLMo-2 (8 heads, vocab 8192, 4 x 256 tokens) this gives a/b = 0.940 with
I = 1376 (OLMo's ~8/3*H), 0.919 with I = 1536 and 0.869 with I = 2048, so a ratio of about 0.93
is what the ~1376 shape allows. (Counting input grads through layer 0 too, a coarser count, would give 0.863
at 1376 and 0.797 at 2048.) The FLOP bound for a/c is 1.160 at 1376. ``--check-flops`` runs
each step once under ``torch.utils.flop_counter.FlopCounterMode`` and compares its count with
the analytic one, leaving out the score matmuls (it has no formula for the CPU flash-attention
kernels) and supplying a formula for ``aten._grouped_mm``: the three agree exactly.

    .venv/bin/python benchmarks/expert_step.py                 # defaults: 21M-parameter model
    .venv/bin/python benchmarks/expert_step.py --threads 1 --check-flops   # busy machine
    .venv/bin/python benchmarks/expert_step.py --intermediate 2048 --profile a
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flexmoe.core.moe import router_z_loss
from flexmoe.core.surgery import decoder_layers, moe_blocks
from flexmoe.training.expert import ExpertModule


@dataclass(frozen=True)
class Shapes:
    batch: int = 4
    seq: int = 256
    hidden: int = 512
    layers: int = 4
    intermediate: int = 1376
    vocab: int = 8192
    heads: int = 8
    kv_heads: int = 8
    experts: int = 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def step_flops(s: Shapes) -> dict[str, int]:
    """Analytic matmul FLOPs of one training step (forward + backward) of each variant."""
    T, H, inter, V, L, E = s.tokens, s.hidden, s.intermediate, s.vocab, s.layers, s.experts
    kv = H // s.heads * s.kv_heads
    proj = 2 * T * H * (2 * H + 2 * kv)
    scores = 2 * (2 * s.batch * s.seq * s.seq * H)
    mlp = 3 * 2 * T * H * inter
    down = mlp // 3
    router = 2 * T * H * E
    head = 2 * T * H * V

    forward = L * (proj + scores + mlp) + head
    dense = 3 * forward

    expert_fwd = L * (proj + scores + E * mlp + router) + head
    upper = L - 1  # layers whose input depends on a trainable parameter
    expert_bwd = (
        head  # LM head input grad
        + upper * (proj + 2 * scores + E * mlp + router)  # input grads above layer 0
        + L * (mlp + router)  # expert 1 and router weight grads, every layer
        + down  # layer 0: expert 1's down_proj input grad, to reach gate/up weight grads
    )
    expert = expert_fwd + expert_bwd
    fused = expert + L * mlp + down  # expert 0's weight grads (and layer 0's down input grad) too
    return {
        "expert": expert,
        "dense": dense,
        "transformers": fused,
        # The attention-score part of each (FlopCounterMode has no formula for CPU SDPA kernels).
        "expert_scores": L * scores + upper * 2 * scores,
        "dense_scores": 3 * L * scores,
    }


# --------------------------------------------------------------------------- models


def public_model(s: Shapes, seed: int = 0) -> nn.Module:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(2048, s.seq),
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(config).float().train()


def flexolmo_copy(dense: nn.Module, experts: int = 2) -> nn.Module:
    """``FlexOlmoForCausalLM`` whose every expert equals the dense MLP and whose router is zero.

    Every Olmo2 config field is copied: the classes' defaults differ (rms_norm_eps, RoPE theta,
    token ids), and a default left in place silently changes the model.
    """
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    fields = {
        k: v
        for k, v in dense.config.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version")
    }
    config = FlexOlmoConfig(**fields, num_experts=experts, num_experts_per_tok=experts, norm_topk_prob=False)
    config.router_aux_loss_coef = 0.0  # FlexOlmo's expert training has no load balancing
    model = FlexOlmoForCausalLM(config).float()
    state = {}
    for name, t in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = t
    for i, layer in enumerate(decoder_layers(dense)):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # gate rows first
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.expand(experts, -1, -1).clone()
        state[f"model.layers.{i}.mlp.experts.down_proj"] = mlp.down_proj.weight.expand(experts, -1, -1).clone()
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.zeros(experts, dense.config.hidden_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"FlexOlmo weight copy: missing {missing}, unexpected {unexpected}")
    return model.train()


def _zero_public(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0] = 0
    return grad


# --------------------------------------------------------------------------- steps


@dataclass
class Variant:
    name: str
    label: str
    model: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object | None = None
    module: ExpertModule | None = None

    def step(self, ids: torch.Tensor) -> float:
        loss = self.loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def flexmoe_variant(dense: nn.Module) -> Variant:
    module = ExpertModule(copy.deepcopy(dense), owner="x")
    opt_config = module.configure_optimizers()
    coef = module.recipe.z_loss_coef

    def loss(ids):
        out, logits = module._lm_step({"input_ids": ids})
        return out.loss + coef * router_z_loss(logits)

    params = [p for p in module.model.parameters() if p.requires_grad]
    return Variant(
        "a",
        "flexmoe ExpertModule",
        module.model,
        loss,
        params,
        opt_config["optimizer"],
        opt_config["lr_scheduler"]["scheduler"],
        module,
    )


def dense_variant(dense: nn.Module, lr: float) -> Variant:
    model = copy.deepcopy(dense)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def loss(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return Variant("b", "dense full fine-tune", model, loss, params, opt)


def transformers_variant(
    dense: nn.Module, lr: float, coef: float, experts_implementation: str | None = None
) -> Variant:
    model = flexolmo_copy(dense)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    params = []
    for name, p in model.named_parameters():
        trainable = name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"))
        p.requires_grad_(trainable)
        if trainable:
            p.register_hook(_zero_public)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def loss(ids):
        out = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True)
        return out.loss + coef * router_z_loss(list(out.router_logits))

    return Variant("c", f"transformers FlexOlmo ({model.config._experts_implementation})", model, loss, params, opt)


# --------------------------------------------------------------------------- checks


def check_same_start(variants: list[Variant], ids: torch.Tensor) -> dict[str, float]:
    """All three start from the same function: identical LM loss before any step."""
    losses = {}
    with torch.no_grad():
        for v in variants:
            losses[v.name] = v.model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-4:
        raise RuntimeError(f"the variants do not start from the same model: initial losses {losses}")
    return losses


def public_half(v: Variant) -> list[torch.Tensor]:
    if v.name == "a":
        return [
            t.detach().clone() for b in moe_blocks(v.model) for t in [*b.experts[0].parameters(), b.router.weight[0]]
        ]
    return [p.detach()[0].clone() for p in v.params]


def check_public_frozen(v: Variant, before: list[torch.Tensor]) -> None:
    after = public_half(v)
    if not all(torch.equal(x, y) for x, y in zip(before, after)):
        raise RuntimeError(f"variant ({v.name}) moved the public expert")


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm``: each row of ``a`` meets one group's matrix; [S,K] x [E,K,N] (forward,
    input grads) or [M,S] x [S,N] -> [E,M,N] (weight grads, groups split S)."""
    if len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted_flops(v: Variant, ids: torch.Tensor) -> int:
    """Forward + backward FLOPs as ``FlopCounterMode`` sees them (it has no formula for
    ``_grouped_mm``, so one is supplied, nor for the CPU flash-attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter:
        v.loss(ids).backward()
    v.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# --------------------------------------------------------------------------- timing

# A cycle is "quiet" when every variant's step is within this factor of its fastest step.
QUIET = 1.2


def time_round_robin(variants: list[Variant], ids: torch.Tensor, cycles: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds of every step, one step of each variant per cycle.

    The order rotates every cycle, so a burst of load elsewhere on the machine lands on all
    variants alike, and the steps of one cycle (a few seconds apart) can be compared pairwise.
    """
    wall: dict[str, list[float]] = {v.name: [0.0] * cycles for v in variants}
    cpu: dict[str, list[float]] = {v.name: [0.0] * cycles for v in variants}
    for i in range(cycles):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            v.step(ids)
            wall[v.name][i] = time.perf_counter() - t0
            cpu[v.name][i] = time.process_time() - c0
    return wall, cpu


def report(variants: list[Variant], wall: dict, cpu: dict, flops: dict, tokens: int, args) -> None:
    names = [v.name for v in variants]
    cycles = range(len(wall["a"]))
    best = {n: min(wall[n]) for n in names}
    quiet = [i for i in cycles if all(wall[n][i] <= QUIET * best[n] for n in names)]
    groups = {"all": list(cycles), "quiet": quiet if len(quiet) >= 3 else []}

    def med(n: str, group: str, t: dict = wall) -> float:
        return statistics.median(t[n][i] for i in groups[group])

    def paired(num: str, den: str, group: str, t: dict = wall) -> float:
        # Median over cycles of t_num / t_den: the two steps ran seconds apart, under the same load.
        return statistics.median(t[num][i] / t[den][i] for i in groups[group])

    bound = {"a": flops["dense"] / flops["expert"], "b": 1.0, "c": flops["dense"] / flops["transformers"]}
    print()
    print(
        f"{len(cycles)} steps per variant ({args.rounds} rounds x {args.steps}), interleaved step by step, "
        f"{len(quiet)} quiet; public expert unchanged in (a) and (c)"
    )
    header = (
        f"{'variant':<40} {'ms/step':>8} {'tokens/s':>9} {'vs (b)':>7} | "
        f"{'quiet ms':>8} {'tokens/s':>9} {'vs (b)':>7} | "
        f"{'cpu ms':>7} {'vs (b)':>7} | {'FLOP bound vs (b)':>17}"
    )
    print(header)
    print("-" * len(header))
    for v in variants:
        n = v.name
        q = (
            f"{med(n, 'quiet') * 1e3:8.0f} {tokens / med(n, 'quiet'):9.0f} {paired('b', n, 'quiet'):7.3f}"
            if groups["quiet"]
            else f"{'-':>8} {'-':>9} {'-':>7}"
        )
        print(
            f"({n}) {v.label:<36} {med(n, 'all') * 1e3:8.0f} {tokens / med(n, 'all'):9.0f} "
            f"{paired('b', n, 'all'):7.3f} | "
            f"{q} | {med(n, 'all', cpu) * 1e3:7.0f} {paired('b', n, 'all', cpu):7.3f} | {bound[n]:17.3f}"
        )
    print(
        "Wall-clock medians over all cycles, then over the quiet ones (every variant's step within "
        f"{QUIET}x of its fastest),\nthen process CPU time; "
        "vs (b): median of the paired ratio t_b / t_variant within a cycle."
    )
    # Which estimate to trust: with one thread, process CPU time is the step's own compute,
    # immune to time-sharing; with more, waiting threads spin, so prefer undisturbed cycles.
    judge = "cpu" if args.threads == 1 else "quiet" if groups["quiet"] else "all"
    print()
    print(f"{'':<4} {'all cycles':>10} {'quiet':>7} {'cpu time':>9}   target")
    targets = {"a/b": ("b", bound["a"], "FLOP bound"), "a/c": ("c", 1.2, "issue")}
    for label, (other, target, why) in targets.items():
        q = f"{paired(other, 'a', 'quiet'):7.3f}" if groups["quiet"] else f"{'-':>7}"
        got = paired(other, "a", "quiet" if judge == "quiet" else "all", cpu if judge == "cpu" else wall)
        print(
            f"{label:<4} {paired(other, 'a', 'all'):10.3f} {q} {paired(other, 'a', 'all', cpu):9.3f}   "
            f">= {target:.3f} ({why}): "
            f"{'met' if got >= target else 'MISSED'} (judged on {judge})"
        )
    print(f"(a/c FLOP bound: {flops['transformers'] / flops['expert']:.3f})")
    if judge == "all":
        print("fewer than 3 quiet cycles: the machine was busy throughout; rerun with more --steps, or --threads 1")
    print("(c) trains with weight decay 0: with weight decay != 0 AdamW would decay the 'frozen' public expert,")
    print("    which shares its fused tensors with the trained one (the gradient hook cannot stop decay).")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--hf-experts",
        choices=["eager", "grouped_mm", "batched_mm"],
        help="experts implementation of (c) (default: transformers' own choice)",
    )
    parser.add_argument(
        "--check-flops", action="store_true", help="cross-check the analytic FLOPs with FlopCounterMode"
    )
    parser.add_argument(
        "--profile", choices=["a", "b", "c"], help="print a torch.profiler table of one step of a variant"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = Shapes(args.batch, args.seq, args.hidden, args.layers, args.intermediate, args.vocab, args.heads, args.heads)
    dense = public_model(s)
    n_params = sum(p.numel() for p in dense.parameters())
    ids = torch.randint(3, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(1))

    a = flexmoe_variant(dense)
    recipe = a.module.recipe
    variants = [
        a,
        dense_variant(dense, recipe.lr),
        transformers_variant(dense, recipe.lr, recipe.z_loss_coef, args.hf_experts),
    ]
    print(
        f"OLMo-2 public model: {n_params / 1e6:.1f}M parameters (hidden {s.hidden}, intermediate {s.intermediate}, "
        f"{s.layers} layers, {s.heads} heads, vocab {s.vocab}); batch {s.batch} x {s.seq} = {s.tokens} tokens; "
        f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for v in variants:
        n = sum(p.numel() for p in v.params)
        print(f"  ({v.name}) {v.label}: {n / 1e6:.2f}M trainable parameters")
    start = check_same_start(variants, ids)
    print(
        f"initial LM loss, all variants: {start['a']:.6f} (max spread {max(start.values()) - min(start.values()):.1e})"
    )
    frozen = {v.name: public_half(v) for v in variants if v.name != "b"}

    flops = step_flops(s)
    if args.check_flops:
        # FlopCounterMode counts no CPU SDPA kernel: compare the rest, like with like.
        print("matmul FLOPs per step (forward + backward) without attention scores: analytic vs FlopCounterMode")
        for v, key in zip(variants, ("expert", "dense", "transformers")):
            got = counted_flops(v, ids)
            want = flops[key] - flops["dense_scores" if key == "dense" else "expert_scores"]
            print(
                f"  ({v.name}) analytic {want / 1e9:8.3f} GFLOP   counted {got / 1e9:8.3f} GFLOP   ({got / want:.4f}x)"
            )

    if args.profile:
        v = next(v for v in variants if v.name == args.profile)
        for _ in range(2):
            v.step(ids)
        with torch.profiler.profile() as prof:
            v.step(ids)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    print(
        f"analytic matmul FLOPs per step: (a) {flops['expert'] / 1e9:.1f} G, (b) {flops['dense'] / 1e9:.1f} G, "
        f"(c) {flops['transformers'] / 1e9:.1f} G; "
        f"FLOP-bound tokens/s ratios a/b {flops['dense'] / flops['expert']:.3f}, "
        f"a/c {flops['transformers'] / flops['expert']:.3f}"
    )
    for v in variants:
        for _ in range(args.warmup):
            v.step(ids)
    wall, cpu = time_round_robin(variants, ids, args.rounds * args.steps)
    for v in variants:
        if v.name in frozen:
            check_public_frozen(v, frozen[v.name])
    report(variants, wall, cpu, flops, s.tokens, args)


if __name__ == "__main__":
    main()
