"""Inference tokens/s of a merged flexmoe model vs the same model exported to transformers' FlexOlmo.

One OLMo-2 public model (float32, CPU); for each expert count E (default 2, 4, 8, 16) a merged
MoE is built with ``flexmoe.core.surgery`` (owner experts = the public MLP plus seeded noise, router
rows random with logits of standard deviation ~1 so every expert gets tokens, biases 0), set to
top-k 2 and exported with ``flexmoe.export(..., format="flexolmo")``. The export is opened twice
with ``AutoModelForCausalLM.from_pretrained``: once with transformers' default experts
implementation (``grouped_mm`` when ``torch._grouped_mm`` exists, CPU included;
``PreTrainedModel.get_correct_experts_implementation``) and once
with ``experts_implementation="eager"`` (its per-expert loop). Each must reproduce flexmoe's
logits (max abs difference printed). The dense public model runs alongside.

Every variant is a full forward pass (all logits) in ``torch.inference_mode()`` on the same
batch, ``use_cache=False``. All ``1 + 3 * len(E)`` models are held at once and timed round robin
(one forward of each in turn, the order rotating each cycle), so a burst of load elsewhere lands
on all of them alike. A ratio ``a/b`` is the median over cycles of the paired ratio t_b / t_a of
the two forwards of one cycle; each target line adds its quartiles over cycles, the size of the
noise. (The fastest forward of each variant is not used: on a shared machine, a variant that
happened to run in a quiet moment can come out above its FLOP bound; docs/performance.md.)
With ``--threads 1`` (the default) the times are process CPU time, the forward's own compute
whatever else runs; with more threads, wall time (waiting OpenMP threads spin).

FLOP bound (matmuls only, 2*m*n*k each; norms, activations, softmax, gathers ignored), per forward
of T = batch*seq tokens, H hidden, I intermediate, V vocab, L layers, k = min(top_k, E)::

    attention projections  q, k, v, o         2*T*H*(2H + 2*H_kv)
    attention scores       Q.K^T and P.V      2 * 2*batch*seq^2*H   (the full square: torch's CPU
                                              flash kernel takes as long with is_causal as without;
                                              docs/performance.md)
    MLP                    gate, up, down     3 * 2*T*H*I          per expert a token is routed to
    router                 [T,H] x [H,E]      2*T*H*E
    LM head                                   2*T*H*V

    dense = L*(proj + scores + mlp) + head;   MoE(E) = L*(proj + scores + k*mlp + router) + head
    FLOP-bound tokens/s ratio MoE(E)/dense = dense / MoE(E);  MoE(16)/MoE(2) = MoE(2) / MoE(16).

The work this leaves out (norms, RoPE, softmax, activations, the attention kernel's lower
FLOP rate) is the same in both models, so a measured MoE/dense ratio sits a little *above* its
bound; below it means the MoE block wastes time.

Targets: flexmoe >= 1.0x the faster transformers implementation at every E;
flexmoe tokens/s at 16 experts >= 0.9x at 2 experts; MoE(2)/dense within 5% of its FLOP bound.

``--posterior`` also times each merged model routed by the domain posterior
(``flexmoe.core.posterior.use_posterior_routers``; random integral unigram counts per domain and
hashed bigram counts in the default recipe's 2^20 buckets, so the chosen owner varies) next to its
token router, timed in the same round robin; target:
posterior >= 0.97x the token router's tokens/s at every E (same top-2 expert work, plus the
posterior's table and bigram look-ups and cumulative sum once per forward and the gates in every
layer).

    .venv/bin/python benchmarks/moe_inference.py                    # defaults
    .venv/bin/python benchmarks/moe_inference.py --cycles 3 --experts 2 16   # quick look
    .venv/bin/python benchmarks/moe_inference.py --profile flexmoe:16  # torch.profiler of one forward
    .venv/bin/python benchmarks/moe_inference.py --posterior         # + the posterior router
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import flexmoe
from flexmoe.core.posterior import use_posterior_routers
from flexmoe.core.surgery import moe_blocks
from flexmoe.routing import mlp_inputs
from flexmoe.spec import RoutingRecipe


@dataclass(frozen=True)
class Shapes:
    batch: int = 8
    seq: int = 256
    hidden: int = 512
    layers: int = 4
    intermediate: int = 1376
    vocab: int = 8192
    heads: int = 8
    kv_heads: int = 8
    top_k: int = 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def forward_flops(s: Shapes, experts: int | None = None) -> int:
    """Analytic matmul FLOPs of one forward pass: the dense model (``experts=None``) or the MoE."""
    T, H, inter, V, L = s.tokens, s.hidden, s.intermediate, s.vocab, s.layers
    kv = H // s.heads * s.kv_heads
    proj = 2 * T * H * (2 * H + 2 * kv)
    scores = 2 * 2 * s.batch * s.seq * s.seq * H
    mlp = 3 * 2 * T * H * inter
    head = 2 * T * H * V
    if experts is None:
        return L * (proj + scores + mlp) + head
    return L * (proj + scores + min(s.top_k, experts) * mlp + 2 * T * H * experts) + head


# --------------------------------------------------------------------------- models


def public_model(s: Shapes, dtype: torch.dtype, seed: int = 0) -> nn.Module:
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
    return Olmo2ForCausalLM(config).to(dtype).eval()


def merged_model(dense: nn.Module, experts: int, top_k: int, ids: torch.Tensor, seed: int = 0) -> nn.Module:
    """A merged MoE as the coordinator would build it: ``[public, e_1 .. e_{E-1}]`` per layer.

    Owner experts are the public MLP moved by seeded noise (a stand-in for training); router
    rows are random, scaled per layer so the logits on ``ids`` have a standard deviation of
    about 1 (spread routing, like a tuned router; a collapsed router would time mostly one expert).
    """
    g = torch.Generator().manual_seed(seed)
    inputs = mlp_inputs(dense, ids, batch_size=ids.shape[0])
    model = flexmoe.upcycle(copy.deepcopy(dense), num_experts=experts - 1, top_k=min(top_k, experts))
    with torch.no_grad():
        for block, x in zip(moe_blocks(model), inputs):
            for e in block.experts[1:]:
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
            rows = torch.randn(block.router.weight.shape, generator=g)
            scale = (x.reshape(-1, x.shape[-1]).float() @ rows.T).std()
            block.router.weight.copy_(rows / scale)
    return model


def posterior_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` routed by the domain posterior as the default recipe routes (unigram and
    hashed bigram counts, its temperature and bigram weight), from random integral counts."""
    g = torch.Generator().manual_seed(seed)
    E, V = moe_blocks(model)[0].num_experts, model.config.vocab_size
    recipe = RoutingRecipe()
    unigram = torch.randint(0, 100, (E, V), generator=g).float()
    bigram = torch.randint(0, 3, (E, recipe.bigram_buckets), generator=g).float()
    return use_posterior_routers(
        copy.deepcopy(model),
        unigram,
        bigram=bigram,
        temperature=recipe.temperature,
        bigram_weight=recipe.bigram_weight,
    )


def expert_load(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest share of routed (token, slot) pairs any expert gets, over all layers."""
    with flexmoe.record_router_logits(model) as logits, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    k = moe_blocks(model)[0].settings.effective_top_k()
    shares = []
    for layer_logits in logits:
        chosen = layer_logits.topk(k, dim=-1).indices.reshape(-1)
        shares.append(torch.bincount(chosen, minlength=layer_logits.shape[-1]).float() / chosen.numel())
    shares = torch.cat(shares)
    return shares.min().item(), shares.max().item()


def exported(model: nn.Module, directory: Path, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The flexolmo export, opened with transformers' default experts implementation and with eager."""
    from transformers import AutoModelForCausalLM

    flexmoe.export(model, directory, format="flexolmo")
    default = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    eager = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, experts_implementation="eager").eval()
    return {default.config._experts_implementation: default, "eager": eager}


@dataclass
class Variant:
    name: str  # "dense", "flexmoe:E", "grouped_mm:E", "eager:E"
    model: nn.Module

    def forward(self, ids: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=False)


def logit_gap(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return (a(input_ids=ids).logits.float() - b(input_ids=ids).logits.float()).abs().max().item()


# --------------------------------------------------------------------------- timing


def time_round_robin(variants: list[Variant], ids: torch.Tensor, cycles: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds of every forward, one forward of each variant per cycle,
    the order rotating so load elsewhere on the machine lands on all variants alike."""
    wall = {v.name: [0.0] * cycles for v in variants}
    cpu = {v.name: [0.0] * cycles for v in variants}
    for i in tqdm(range(cycles), desc="timed cycles", unit="cycle"):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            v.forward(ids)
            wall[v.name][i] = time.perf_counter() - t0
            cpu[v.name][i] = time.process_time() - c0
    return wall, cpu


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def report(s: Shapes, sizes: list[int], hf_default: str, wall: dict, cpu: dict, args) -> None:
    """The table of tokens/s and ratios, then the targets.

    A ratio of tokens/s ``a/b`` is the median over cycles of ``t_b / t_a`` for the two forwards
    of one cycle (run seconds apart, under the same load); its interquartile range over cycles
    is printed with each target, as the size of the noise.
    """
    judged = cpu if args.threads == 1 else wall
    basis = "process CPU time" if args.threads == 1 else "wall time"
    T = s.tokens

    def tps(name: str) -> float:
        return T / statistics.median(judged[name])

    def paired(num: str, den: str) -> list[float]:
        return [b / a for a, b in zip(judged[num], judged[den])]

    def ratio(num: str, den: str) -> float:
        return statistics.median(paired(num, den))

    impls = [hf_default] + (["eager"] if hf_default != "eager" else [])
    # The faster transformers implementation at each size.
    best = {E: max(impls, key=lambda i: ratio(f"{i}:{E}", f"flexmoe:{E}")) for E in sizes}
    base = sizes[0]
    bound_dense = {E: forward_flops(s) / forward_flops(s, E) for E in sizes}
    bound_base = {E: forward_flops(s, base) / forward_flops(s, E) for E in sizes}

    print()
    print(f"tokens/s: median of {args.cycles} forwards of {T} tokens ({basis}); ratios: median paired ratio")
    hf_cols = "".join(f" {'HF ' + i:>13}" for i in impls)
    header = (
        f"{'experts':>7} {'flexmoe':>8}{hf_cols} | {'flexmoe/HF':>10} {'HF best':>10} | "
        f"{'MoE/dense':>9} {'FLOP bound':>10} {'of bound':>8} | {f'vs E={base}':>7} {'HF':>6} {'bound':>6}"
    )
    print(header)
    print("-" * len(header))
    for E in sizes:
        f, h = f"flexmoe:{E}", f"{best[E]}:{E}"
        moe_dense = ratio(f, "dense")
        hf_tps = "".join(f" {tps(f'{i}:{E}'):13.0f}" for i in impls)
        print(
            f"{E:>7} {tps(f):8.0f}{hf_tps} | {ratio(f, h):10.3f} {best[E]:>10} | "
            f"{moe_dense:9.3f} {bound_dense[E]:10.3f} {moe_dense / bound_dense[E]:8.3f} | "
            f"{ratio(f, f'flexmoe:{base}'):7.3f} {ratio(h, f'{best[base]}:{base}'):6.3f} {bound_base[E]:6.3f}"
        )
    print(f"{'dense':>7} {tps('dense'):8.0f}")
    print(
        "flexmoe/HF: over the faster transformers implementation (HF best); MoE/dense: flexmoe over the dense\n"
        f"public model; vs E={base}: tokens/s over the same implementation's at E={base} (HF: the faster one)."
    )
    print()

    def spread(xs: list[float], scale: float = 1.0) -> str:
        lo, mid, hi = (q / scale for q in quartiles(xs))
        return f"{mid:.3f} (quartiles {lo:.3f}..{hi:.3f})"

    last = sizes[-1]
    worst = min(sizes, key=lambda E: ratio(f"flexmoe:{E}", f"{best[E]}:{E}"))
    vs_hf = paired(f"flexmoe:{worst}", f"{best[worst]}:{worst}")
    vs_base = paired(f"flexmoe:{last}", f"flexmoe:{base}")
    vs_dense = paired(f"flexmoe:{base}", "dense")
    of_bound = statistics.median(vs_dense) / bound_dense[base]
    hf_text = f"worst E={worst}, {spread(vs_hf)}"
    bound_text = f"{spread(vs_dense, bound_dense[base])} of it"
    checks = [
        (statistics.median(vs_hf) >= 1.0, f"flexmoe >= 1.0x the faster transformers at every E: {hf_text}"),
        (statistics.median(vs_base) >= 0.9, f"flexmoe tokens/s at E={last} >= 0.9x at E={base}: {spread(vs_base)}"),
        (abs(of_bound - 1) <= 0.05, f"MoE(E={base})/dense within 5% of its FLOP bound: {bound_text}"),
    ]
    if f"posterior:{base}" in judged:
        print(f"{'experts':>7} {'posterior':>9} {'token':>8} {'posterior/token':>16}")
        for E in sizes:
            p, t = f"posterior:{E}", f"flexmoe:{E}"
            print(f"{E:>7} {tps(p):9.0f} {tps(t):8.0f} {ratio(p, t):16.3f}")
        slowest = min(sizes, key=lambda E: ratio(f"posterior:{E}", f"flexmoe:{E}"))
        vs_token = paired(f"posterior:{slowest}", f"flexmoe:{slowest}")
        text = f"posterior router >= 0.97x the token router at every E: worst E={slowest}, {spread(vs_token)}"
        checks.append((statistics.median(vs_token) >= 0.97, text))
        print()
    for ok, text in checks:
        print(f"  {'met   ' if ok else 'MISSED'}  {text}")
    if args.save:
        raw = {"basis": basis, "tokens": T, "shapes": dataclasses.asdict(s), "seconds": judged}
        Path(args.save).write_text(json.dumps(raw, indent=1) + "\n")
        print(f"raw per-forward times: {args.save}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16], help="expert counts (first: base)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=8, help="timed forwards per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: judge on CPU time)")
    parser.add_argument("--save", help="write every forward's time to this JSON file")
    parser.add_argument("--posterior", action="store_true", help="also time the posterior router (posterior:E)")
    parser.add_argument(
        "--profile", help="print a torch.profiler table of one forward of this variant, e.g. flexmoe:16"
    )
    args = parser.parse_args(argv)

    logging.disable(logging.WARNING)  # transformers' load reports
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    s = Shapes(
        args.batch,
        args.seq,
        args.hidden,
        args.layers,
        args.intermediate,
        args.vocab,
        args.heads,
        args.heads,
        args.top_k,
    )
    sizes = sorted(args.experts)
    ids = torch.randint(3, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(1))
    dense = public_model(s, dtype)
    n_params = sum(p.numel() for p in dense.parameters())
    print(
        f"OLMo-2 public model: {n_params / 1e6:.1f}M parameters (hidden {s.hidden}, intermediate {s.intermediate}, "
        f"{s.layers} layers, {s.heads} heads, vocab {s.vocab}); batch {s.batch} x {s.seq} = {s.tokens} tokens; "
        f"top-k {s.top_k}; {args.dtype}; {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs"
    )

    variants = [Variant("dense", dense)]
    hf_default = None
    with tempfile.TemporaryDirectory() as tmp:
        for E in tqdm(sizes, desc="build, export, load", unit="size"):
            model = merged_model(dense, E, s.top_k, ids)
            hf = exported(model, Path(tmp) / f"e{E}", dtype)
            hf_default = next(iter(hf))
            lo, hi = expert_load(model, ids)
            gaps = ", ".join(f"{i} {logit_gap(model, m, ids):.1e}" for i, m in hf.items())
            tqdm.write(f"  E={E}: routed share per expert {lo:.3f}..{hi:.3f}; max |logit diff| vs flexmoe: {gaps}")
            variants.append(Variant(f"flexmoe:{E}", model))
            if args.posterior:
                variants.append(Variant(f"posterior:{E}", posterior_model(model)))
            variants += [Variant(f"{i}:{E}", m) for i, m in hf.items()]
    print(f"transformers' default experts implementation: {hf_default}")

    if args.profile:
        v = next(v for v in variants if v.name == args.profile)
        v.forward(ids)
        with torch.profiler.profile() as prof:
            v.forward(ids)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    for v in variants:
        for _ in range(args.warmup):
            v.forward(ids)
    wall, cpu = time_round_robin(variants, ids, args.cycles)
    report(s, sizes, hf_default, wall, cpu, args)


if __name__ == "__main__":
    main()
