"""The routing table on the local corpus: how well each router recipe routes (docs/routing.md).

Setting (defaults): public data = a mixture of ``stdlib_code`` and ``pydoc_topics``; owners =
``docstrings``, ``comments``, ``unicode_names``, ``licenses`` (from
:func:`flexmoe.data.corpus.local_corpus`, a fixed hash-chosen sample of ``--docs`` documents per
domain). Docstrings and comments resemble the public code somewhat; Unicode names and licence
texts do not.

1. ``flexmoe.training.pretrain`` a small OLMo-2 public model (``--hidden``, ``--layers``, ``--vocab``,
   ``--pretrain-steps``) on the public training text.
2. One expert per owner: :class:`~flexmoe.ExpertModule` + ``expert_callbacks(spec, out)`` on a
   Lightning ``Trainer`` (``--expert-steps``); router init by the spec's embedder (default
   ``None``: the hidden-state fallback, no sentence embedder).
3. Held-out perplexity (:func:`flexmoe.evaluate.perplexity`) of every domain's validation
   documents for:

   public              the dense public model
   single:<owner>      public + that owner's expert (its own 2-expert model, top-2)
   soup                dense: every layer's MLP = uniform average of the owners' expert MLPs
   merged/top-N        FlexOlmo merge as published (assemble, no router tuning), top-N
   calibrated/...      merged + :func:`flexmoe.routing.calibrate_router` on public tokens
   posterior/top-2     the library's default: :func:`flexmoe.assembly.merge_experts` with
                       ``RoutingRecipe(method="posterior")`` (the causal domain posterior over the prefix
                       from unigram counts picks the owner; its own router mixes it with the public
                       expert); "(published merge)": ``use_posterior_routers`` on merged/top-N (no r_pub)
   lda/...             merged + :func:`flexmoe.routing.lda_router` (owner means + public covariance)
   lda-folded/...      the same with its biases folded into the rows at the classes' mixture moments
                       (what flexmoe.routing.route(exportable=True) does: exports to transformers)
   lda-mix/top-N       merged + :func:`lda_mixture_router` below (LDA posterior x owners' own routers)
   prefix-lda/top-2    merged + :func:`prefix_lda_router` below (sequence-level, causal)
   layer0-lda token    the same router, each token classed by its own layer-0 score (no prefix)
   btm                 BTMEnsemble([public, single:<owner> ...]) (every member on every token)
   oracle              each domain through its own model (public -> public, owner -> single)

``--public-mix F`` trains the experts on the owner's text plus public
training documents making up a share F of the characters, into ``WORK/experts-mixF`` (the corpus,
public model and spec are shared with the plain run; the mixing is done on the owner's data side
and is not recorded in the spec).

Routing shares: for MoE rows, the top-1 expert share per domain averaged over layers.
Everything trained is cached under ``--work``; a rerun only evaluates.

    .venv/bin/python benchmarks/routing_table.py --work WORK      # docs/routing.md has the runs and their options
    .venv/bin/python benchmarks/routing_table.py --work WORK2 --docs 120 --pretrain-steps 600 \
        --expert-steps 200 --eval-tokens 8192 --lda-shrinkage 0.5          # the larger run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flexmoe.core.moe import PerExpertRouter, RouterFormatError, register_router
from flexmoe.core.surgery import moe_blocks
from flexmoe.routing import layer_lda
from flexmoe.testing.harness import PUBLIC_DOMAINS, build_corpus, fit_expert, log, pretrain_public, read_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OWNERS = ("docstrings", "comments", "unicode_names", "licenses")
# The harsh setting (--harsh): public data is one technical-documentation domain, the owners'
# domains are far from it and from each other.
HARSH_PUBLIC = ("pydoc_topics",)
HARSH_OWNERS = ("stdlib_code", "unicode_names", "licenses")
SEED = 0


# -- research routers ----------------------------------------------------------------------------
# Routers no ``transformers`` checkpoint can express, measured against the library's recipes
# (docs/routing.md). Both implement flexmoe's router protocol (flexmoe.core.moe.ExpertRouter):
# their logits, freezing and opt-out work like the library's routers; what a format or an
# artifact cannot carry raises an error that says what is missing.
#
# * lda_mixture_router -- token-level: the LDA posterior over ``public, owner_1..n``
#   (flexmoe.routing.lda_weights) weights each owner's own 2-expert router (a hierarchical
#   mixture; not a linear router). Exports natively (importing this module registers it).
# * prefix_lda_router -- sequence-level, causal: the running mean over the prefix of layer 0's
#   LDA scores picks one class per token (layer 0's MLP input depends on no expert, so the owners'
#   layer-0 means are public-model statistics); that owner's own 2-expert router (r_0, r_d, b_d,
#   exactly as trained) then mixes the public expert and expert d in every layer, and a token
#   classed public uses the public expert alone. With a perfect domain posterior this is oracle
#   routing. No checkpoint format holds it.

# The state of an expert these routers need beyond an artifact's row and bias: its LDA class row.
_LDA_STATE = {"lda_weight": "lda.weight", "lda_bias": "lda.bias"}


@register_router
class PosteriorMixRouter(PerExpertRouter):
    """Router of :func:`lda_mixture_router`: gates are the hierarchical mixture
    ``g_d = p(d|x) p(e_d|x, d)`` for owners and ``g_0 = p(0|x) + sum_d p(d|x) p(e_0|x, d)`` for
    the public expert, returned as log-gates (their softmax is the gates themselves).

    Per expert it holds the row ``r_d`` and effective bias ``b_d`` of the owner's own router and
    the LDA class row ``(lda_weight_d, lda_bias_d)``; opting an owner out drops all four.
    """

    kind = "posterior-mix"
    per_expert = {"weight": "router.embedding", "bias": "router.bias", **_LDA_STATE}
    opt_in_hint = (
        "An artifact carries no LDA class row (it comes from the owner's statistics and the shared "
        "covariance): add the expert to a model with linear routers, then run lda_mixture_router again."
    )

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, lda_weight: torch.Tensor, lda_bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("bias", bias.detach().float().clone())
        self.register_buffer("lda_weight", lda_weight.detach().float().clone())
        self.register_buffer("lda_bias", lda_bias.detach().float().clone())

    @classmethod
    def from_native_state(cls, state, *, dtype=None):
        weight = state["weight"] if dtype is None else state["weight"].to(dtype)
        return cls(weight, state["bias"], state["lda_weight"], state["lda_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        post = torch.log_softmax(x @ self.lda_weight.T + self.lda_bias, dim=-1)  # [T, E]: public, owners
        own = x @ self.frozen(self.weight.float()).T + self.frozen(self.bias)  # owners' 2-expert logits share column 0
        pair = torch.stack([own[:, :1].expand_as(own[:, 1:]), own[:, 1:]], dim=-1)  # [T, n, 2]
        pair = torch.log_softmax(pair, dim=-1)
        owners = post[:, 1:] + pair[..., 1]
        public = torch.logsumexp(torch.cat([post[:, :1], post[:, 1:] + pair[..., 0]], dim=-1), dim=-1, keepdim=True)
        return torch.cat([public, owners], dim=-1)

    def linear_gate(self):
        raise RouterFormatError(
            "PosteriorMixRouter's public gate is log(p(0|x) + sum_d p(d|x) p(e_0|x, d)), a log-sum-exp over "
            "the LDA posterior and every owner's pair, not r_0 . x + b_0: no FlexOlmo or Mixtral gate "
            "([E, H] rows, no bias) computes it. Export with format='native'."
        )


def lda_mixture_router(
    model,
    public_mean: torch.Tensor,
    owner_means: Sequence[torch.Tensor],
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    temperature: float = 1.0,
):
    """Token-level hierarchical routing, in place: at every layer the LDA posterior over
    ``public, owner_1..n`` (as in :func:`flexmoe.routing.lda_router`) weights each owner's own
    2-expert router (``r_0, r_d, b_d`` as the model's linear routers hold them), so a token the
    owner's data explains is mixed between public and owner expert exactly as the owner's model
    would. With a one-hot posterior it is the owner's model. Not a linear router (the public gate
    is a sum), so it exports natively only."""
    blocks = moe_blocks(model)
    scores = layer_lda(blocks, public_mean, owner_means, covariance, prior, shrinkage, temperature)
    for block, (W, b) in zip(blocks, scores):
        block.router = PosteriorMixRouter(*block.router.linear_gate(), W, b)
    return model


class _PrefixClass:
    """Shared per-forward state: the class chosen for every token, ``[B * S]``."""

    classes: torch.Tensor | None = None


class PrefixGatedRouter(PerExpertRouter):
    """Router of :func:`prefix_lda_router`: the original rows and effective biases, with every
    expert other than the public one and the token's chosen owner masked to ``-inf``.

    Every layer's router holds the layer-0 LDA class rows too (so opting an owner out drops its
    class everywhere); the forward hook :func:`prefix_lda_router` puts on layer 0 reads layer 0's.
    """

    kind = "prefix-lda"
    per_expert = {"weight": "router.embedding", "bias": "router.bias", **_LDA_STATE}
    opt_in_hint = (
        "An artifact carries no LDA class row (it comes from the owner's statistics and the shared "
        "covariance): add the expert to a model with linear routers, then run prefix_lda_router again."
    )
    _SEQUENCE_LEVEL = (
        "PrefixGatedRouter is sequence-level: which owner a token may use follows the running mean of its "
        "prefix's layer-0 LDA scores, chosen by a forward hook on layer 0 and shared by every layer"
    )

    def __init__(self, weight, bias, lda_weight, lda_bias, state: _PrefixClass):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("bias", bias.detach().float().clone())
        self.register_buffer("lda_weight", lda_weight.detach().float().clone())
        self.register_buffer("lda_bias", lda_bias.detach().float().clone())
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.float() @ self.frozen(self.weight.float()).T + self.frozen(self.bias)
        cls = self.state.classes
        if cls is None or cls.shape[0] != x.shape[0]:
            raise RuntimeError("PrefixGatedRouter runs inside a model prepared by prefix_lda_router only")
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[:, 0] = True
        keep[torch.arange(x.shape[0], device=x.device), cls.to(x.device)] = True
        return logits.masked_fill(~keep, float("-inf"))

    def linear_gate(self):
        raise RouterFormatError(
            f"{self._SEQUENCE_LEVEL}; a FlexOlmo or Mixtral gate is a function of one token's hidden state. "
            "It has no checkpoint format: rebuild it with prefix_lda_router after loading the merged model."
        )

    def native_state(self):
        raise RouterFormatError(
            f"{self._SEQUENCE_LEVEL}: per-layer router tensors cannot restore the hook, so the native format "
            "cannot hold it either. Export the merged model before prefix_lda_router, and rerun it after loading."
        )

    @classmethod
    def from_native_state(cls, state, *, dtype=None):
        raise RouterFormatError(f"{cls._SEQUENCE_LEVEL}: it has no native form")


def prefix_lda_router(
    model,
    public_mean: torch.Tensor,
    owner_means: Sequence[torch.Tensor],
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    prefix: bool = True,
):
    """Sequence-level causal routing (see the section comment above), in place.

    Token ``t`` of a sequence is classed ``argmax_c mean_{s<=t} logit_c(x_s)`` with ``logit_c``
    layer 0's LDA score (:func:`flexmoe.routing.lda_weights` on the layer-0 rows of the means and
    ``covariance``); only the public expert and that owner's expert can be chosen, weighted by the
    owner's own router row and bias. Use ``top_k=2``. ``prefix=False`` classes each token by its
    own layer-0 score alone (the token-level ablation of the same router). No checkpoint format
    holds it: the choice depends on the prefix, not on the token alone.
    """
    blocks = moe_blocks(model)
    W, b = layer_lda(blocks[:1], public_mean, owner_means, covariance, prior, shrinkage, 1.0)[0]
    state = _PrefixClass()
    for block in blocks:
        block.router = PrefixGatedRouter(*block.router.linear_gate(), W, b, state)
    first = blocks[0].router  # its class rows, read at every call, follow opt-outs

    def classify(module, args):
        x = args[0]  # [B, S, H]: layer 0's MLP input
        scores = x.float() @ first.lda_weight.T + first.lda_bias  # [B, S, C]
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[None, :, None]
        if prefix:
            scores = scores.cumsum(1) / steps
        state.classes = scores.argmax(-1).reshape(-1)

    blocks[0].register_forward_pre_hook(classify)
    return model


def make_spec(work: Path, public: Path, paths, args):
    from transformers import AutoTokenizer

    from flexmoe.core.hashing import fingerprint
    from flexmoe.formats.load import load_public_model
    from flexmoe.owner.embed import router_embedding
    from flexmoe.spec import ExpertRecipe, FederationSpec

    path = work / "spec.json"
    if path.is_file():
        return FederationSpec.load(path)
    model = load_public_model(str(public))
    docs = [d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "train.jsonl")]
    embedder = args.embedder or None
    r_pub = router_embedding(
        docs, model, embedder=embedder, tokenizer=AutoTokenizer.from_pretrained(public), seq_len=args.seq_len
    )
    recipe = ExpertRecipe(
        max_steps=args.expert_steps,
        batch_size=args.expert_batch,
        seq_len=args.seq_len,
        lr=args.expert_lr,
        warmup_steps=max(1, args.expert_steps // 10),
    )
    rows = r_pub[0].tolist() if embedder else r_pub.tolist()
    spec = FederationSpec(
        public_model=str(public),
        fingerprint=fingerprint(model),
        embedder=embedder,
        public_router_embedding=rows,
        expert=recipe,
    )
    spec.save(path)
    return spec


def mixed_source(work: Path, paths, owner: str, fraction: float) -> Path:
    """The owner's training text plus public training documents making up about ``fraction``
    of the characters (public data is public: any owner may train on it), as one JSONL."""
    import random

    own = read_jsonl(paths[owner] / "train.jsonl")
    public = [d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "train.jsonl")]
    random.Random(0).shuffle(public)
    want = fraction / (1 - fraction) * sum(len(d) for d in own)
    picked, chars = [], 0
    for d in public:
        if chars >= want:
            break
        picked.append(d)
        chars += len(d)
    out = work / "mix" / f"{owner}-{fraction:g}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in own + picked))
    return out


def train_experts(work: Path, spec, paths, owners, public_mix: float = 0.0) -> dict[str, Path]:
    import lightning.pytorch as pl

    from flexmoe.training.expert import ExpertModule

    out = {}
    for owner in owners:
        art = work / ("experts" if not public_mix else f"experts-mix{public_mix:g}") / f"{owner}.safetensors"
        out[owner] = art
        if art.is_file():
            continue
        log(f"training the expert of {owner} ({spec.expert.max_steps} steps)")
        t = time.perf_counter()
        pl.seed_everything(SEED, verbose=False)
        module = ExpertModule(spec.public_model, spec, owner=owner)
        source = mixed_source(work, paths, owner, public_mix) if public_mix else paths[owner] / "train.jsonl"
        e = spec.expert
        fit_expert(module, spec, source, art, work=work, steps=e.max_steps, seq_len=e.seq_len, batch_size=e.batch_size)
        TIMINGS[f"expert_{owner}_s"] = round(time.perf_counter() - t, 1)
    return out


# -- models ------------------------------------------------------------------------------------


def public_model(public: Path):
    from flexmoe.formats.load import load_public_model

    return load_public_model(str(public)).eval()


def assembled(public: Path, arts, top_k):
    from flexmoe.assembly import assemble

    return assemble(public_model(public), [str(a) for a in arts], top_k=top_k).eval()


def soup_model(public: Path, arts):
    """Dense public model whose MLPs are the uniform average of the owners' expert MLPs."""
    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.core.surgery import decoder_layers
    from flexmoe.merge import average

    model = public_model(public)
    loaded = [ExpertArtifact.load(a) for a in arts]
    for L, layer in enumerate(decoder_layers(model)):
        mlps = []
        for a in loaded:
            m = copy.deepcopy(layer.mlp)
            m.load_state_dict(a.layer(L)[0])
            mlps.append(m)
        layer.mlp = average(mlps)
    return model.eval()


# -- evaluation --------------------------------------------------------------------------------


def evaluate(name, model, domains, args, results, right_expert=None):
    from flexmoe.evaluate import perplexity

    t = time.perf_counter()
    r = perplexity(model, domains, batch_size=args.eval_batch, name=name)
    r["eval_s"] = round(time.perf_counter() - t, 1)
    if "routing" in r:
        r["routing_mean"] = {
            d: {o: sum(layers[L][o] for L in layers) / len(layers) for o in next(iter(layers.values()))}
            for d, layers in r["routing"].items()
        }
    results[name] = r
    shares = ""
    if "routing_mean" in r:
        shares = "  top1: " + ", ".join(
            f"{d[:6]}->{max(s, key=s.get)[:6]} {max(s.values()):.2f}" for d, s in r["routing_mean"].items()
        )
    log(f"{name:<24} avg {r['average']:8.1f}  geo {r['geometric_average']:8.1f}  ({r['eval_s']} s){shares}")
    return r


def print_table(results, domain_names):
    short = {d: d[:10] for d in domain_names}
    head = f"{'model':<26}" + "".join(f"{short[d]:>11}" for d in domain_names) + f"{'average':>10}{'geo avg':>10}"
    print("\n" + head)
    print("-" * len(head))
    for name, r in results.items():
        cells = "".join(f"{r['per_domain'][d]:>11.1f}" for d in domain_names)
        print(f"{name:<26}{cells}{r['average']:>10.1f}{r['geometric_average']:>10.1f}")
    print("\nrouting: top-1 share per domain (mean over layers), expert order = owners of the model")
    for name, r in results.items():
        if "routing_mean" not in r:
            continue
        parts = []
        for d in domain_names:
            s = r["routing_mean"][d]
            parts.append(f"{short[d]}: " + "/".join(f"{v:.2f}" for v in s.values()))
        print(f"  {name:<24} " + "  ".join(parts))


def markdown_table(results, domain_names) -> str:
    """The table as Markdown: per-domain perplexity, averages, and each MoE row's top-1 share
    of the expert that owns the domain (public for the public domain), mean over layers."""
    lines = [
        "| model | " + " | ".join(domain_names) + " | average | geo. avg | right-expert top-1 share |",
        "|---" * (len(domain_names) + 4) + "|",
    ]
    for name, r in results.items():
        cells = " | ".join(f"{r['per_domain'][d]:.1f}" for d in domain_names)
        share = ""
        if "routing_mean" in r:
            share = " / ".join(
                f"{r['routing_mean'][d][d]:.2f}" if d in r["routing_mean"][d] else "-" for d in domain_names
            )
        lines.append(f"| {name} | {cells} | {r['average']:.1f} | {r['geometric_average']:.1f} | {share} |")
    return "\n".join(lines)


TIMINGS: dict[str, float] = {}


def main(argv=None):
    global PUBLIC_DOMAINS, SEED
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="/tmp/flexmoe-routing", help="cache of corpus, public model, spec, experts")
    p.add_argument("--owners", nargs="+", default=None, help=f"default {' '.join(OWNERS)}")
    p.add_argument("--public-domains", nargs="+", default=None, help=f"default {' '.join(PUBLIC_DOMAINS)}")
    p.add_argument(
        "--harsh",
        action="store_true",
        help=f"public = {' '.join(HARSH_PUBLIC)}, owners = {' '.join(HARSH_OWNERS)} (unless given)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and expert training")
    p.add_argument(
        "--router-tuning",
        action="store_true",
        help="add FlexOlmo's router tuning on proxy sets, alone and after the folded LDA router",
    )
    p.add_argument("--tuning-steps", type=int, default=100)
    p.add_argument("--docs", type=int, default=60, help="documents per domain (hash-chosen sample)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="pretraining batch")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--expert-steps", type=int, default=120)
    p.add_argument("--expert-batch", type=int, default=8)
    p.add_argument("--expert-lr", type=float, default=1e-3)
    p.add_argument(
        "--embedder", default="", help="sentence embedder for router init (default: none, hidden-state fallback)"
    )
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (whole rows)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument(
        "--stat-tokens",
        type=int,
        default=16384,
        help="tokens for router statistics (per owner / public), rows spread over the training text",
    )
    p.add_argument("--lda-shrinkage", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--lda-covariance", nargs="+", choices=["public", "pooled"], default=["public", "pooled"])
    p.add_argument("--lda-temperature", type=float, nargs="+", default=[1.0])
    p.add_argument(
        "--public-mix",
        type=float,
        default=0.0,
        help="train the experts on owner text + this share of public text (own cache folder)",
    )
    p.add_argument("--skip-btm", action="store_true")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is faster on a shared machine)")
    p.add_argument("--json", default=None, help="results JSON (default: WORK/results.json)")
    args = p.parse_args(argv)
    PUBLIC_DOMAINS = tuple(args.public_domains or (HARSH_PUBLIC if args.harsh else PUBLIC_DOMAINS))
    args.owners = list(args.owners or (HARSH_OWNERS if args.harsh else OWNERS))
    SEED = args.seed

    from transformers import AutoTokenizer

    from flexmoe.data.packing import pack_domain, spread_rows
    from flexmoe.routing import calibrate_router, class_mixture, fold_router_bias, lda_router, mlp_input_moments

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    owners = list(args.owners)
    paths = build_corpus(work, owners, args.docs, PUBLIC_DOMAINS)
    t = time.perf_counter()
    public = pretrain_public(work, paths, args, seed=SEED, public_domains=PUBLIC_DOMAINS)
    TIMINGS["pretrain_s"] = round(time.perf_counter() - t, 1)
    spec = make_spec(work, public, paths, args)
    arts = train_experts(work, spec, paths, owners, args.public_mix)
    tok = AutoTokenizer.from_pretrained(public)

    def rows(docs, limit):
        return pack_domain(docs, tok, args.seq_len, limit)

    def spread(docs, limit):
        # Rows spread over the whole text: the first few documents alone are unrepresentative.
        return spread_rows(pack_domain(docs, tok, args.seq_len), limit)

    domains = {
        "public": rows([d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "val.jsonl")], args.eval_tokens)
    }
    for o in owners:
        domains[o] = rows(read_jsonl(paths[o] / "val.jsonl"), args.eval_tokens)
    public_train = spread([d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "train.jsonl")], args.stat_tokens)
    owner_train = {o: spread(read_jsonl(paths[o] / "train.jsonl"), args.stat_tokens) for o in owners}
    log("eval rows per domain: " + ", ".join(f"{d} {r.shape[0]}x{r.shape[1]}" for d, r in domains.items()))

    results: dict[str, dict] = {}
    n = len(owners)
    ks = sorted({n + 1, min(4, n + 1)}, reverse=True)
    t_eval = time.perf_counter()

    evaluate("public", public_model(public), domains, args, results)
    singles = {}
    for o in owners:
        singles[o] = assembled(public, [arts[o]], top_k=2)
        evaluate(f"single:{o}", singles[o], domains, args, results)
    evaluate("soup (owners' MLPs)", soup_model(public, [arts[o] for o in owners]), domains, args, results)
    for k in ks:
        evaluate(f"merged/top-{k}", assembled(public, [arts[o] for o in owners], k), domains, args, results)

    # (p) the library's default recipe: the posterior router (flexmoe.core.posterior), built by
    # merge_experts from the artifacts' token counts (stats.unigram) and the public training text's,
    # with the spec's r_pub; and the same router on this harness's published merge (no r_pub), with
    # counts from each domain's training text (packed as the owners pack it).
    from flexmoe.assembly import merge_experts
    from flexmoe.core.posterior import use_posterior_routers
    from flexmoe.data.statistics import packed_token_statistics
    from flexmoe.spec import RoutingRecipe

    t = time.perf_counter()
    pub_docs_train = [d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "train.jsonl")]
    merged = merge_experts(
        public_model(public),
        [str(arts[o]) for o in owners],
        spec=spec,
        routing=RoutingRecipe(method="posterior"),
        public_documents=pub_docs_train,
        tokenizer=tok,
        format="native",
    )
    evaluate("posterior/top-2 (merge_experts)", merged.model.eval(), domains, args, results)
    vocab = merged.model.get_input_embeddings().num_embeddings
    counts = torch.stack(
        [packed_token_statistics(pub_docs_train, tok, args.seq_len, vocab).unigram]
        + [
            packed_token_statistics(read_jsonl(paths[o] / "train.jsonl"), tok, args.seq_len, vocab).unigram
            for o in owners
        ]
    )
    m = use_posterior_routers(assembled(public, [arts[o] for o in owners], ks[0]), counts)
    evaluate("posterior/top-2 (published merge)", m, domains, args, results)
    TIMINGS["posterior_s"] = round(time.perf_counter() - t, 1)

    # (a) calibration on public tokens
    t = time.perf_counter()
    for k in ks if not args.skip_calibration else []:
        m = calibrate_router(assembled(public, [arts[o] for o in owners], k), public_train)
        evaluate(f"calibrated/top-{k}", m, domains, args, results)
    if not args.skip_calibration:
        m = calibrate_router(assembled(public, [arts[o] for o in owners], ks[-1]), public_train, scale_only=True)
        evaluate(f"calib-scale/top-{ks[-1]}", m, domains, args, results)
    TIMINGS["calibration_s"] = round(time.perf_counter() - t, 1)

    # (b) LDA router: owner means in their own 2-expert models, public mean + covariance in the public model.
    # "pooled": the owners also share their within-domain covariance (an aggregate, H x H per layer),
    # and the covariance is the token-weighted average over public + owners (textbook LDA).
    t = time.perf_counter()
    pub_stats = mlp_input_moments(public_model(public), public_train, covariance=True)
    owner_stats = [mlp_input_moments(singles[o], owner_train[o], covariance=True) for o in owners]
    owner_means = [s.mean for s in owner_stats]
    every = [pub_stats, *owner_stats]
    covariances = {
        "public": pub_stats.covariance,
        "pooled": sum(s.covariance * s.count for s in every) / sum(s.count for s in every),
    }
    TIMINGS["lda_statistics_s"] = round(time.perf_counter() - t, 1)
    folded = {}
    for cov_name in args.lda_covariance:
        cov = covariances[cov_name]
        for shrink in args.lda_shrinkage:
            tag = f"{cov_name} cov, shrink {shrink:g}"
            for T in args.lda_temperature:
                for k in ks[-1:]:
                    m = lda_router(
                        assembled(public, [arts[o] for o in owners], k),
                        pub_stats.mean,
                        owner_means,
                        cov,
                        shrinkage=shrink,
                        temperature=T,
                    )
                    evaluate(f"lda/top-{k} ({tag}{'' if T == 1 else f', T {T:g}'})", m, domains, args, results)
                    if T == 1:  # the exportable form: biases folded into the rows
                        m = lda_router(
                            assembled(public, [arts[o] for o in owners], k),
                            pub_stats.mean,
                            owner_means,
                            cov,
                            shrinkage=shrink,
                        )
                        q = fold_router_bias(m, class_mixture([pub_stats, *owner_stats], cov))
                        log("folded LDA biases, q per layer " + " ".join(f"{v:.1f}" for v in q))
                        evaluate(f"lda-folded/top-{k} ({tag})", m, domains, args, results)
                        folded[tag] = m
                m = lda_mixture_router(
                    assembled(public, [arts[o] for o in owners], k),
                    pub_stats.mean,
                    owner_means,
                    cov,
                    shrinkage=shrink,
                    temperature=T,
                )
                evaluate(f"lda-mix/top-{k} ({tag}{'' if T == 1 else f', T {T:g}'})", m, domains, args, results)
            # (d) sequence-level: causal prefix mean of layer-0 LDA scores picks the owner
            for prefix in (True, False):
                m = prefix_lda_router(
                    assembled(public, [arts[o] for o in owners], 2),
                    pub_stats.mean,
                    owner_means,
                    cov,
                    shrinkage=shrink,
                    prefix=prefix,
                )
                kind = "prefix-lda" if prefix else "layer0-lda token"
                evaluate(f"{kind}/top-2 ({tag})", m, domains, args, results)

    if args.router_tuning:
        # (e) FlexOlmo's router tuning on proxy sets drawn from the public data (TF-IDF proxy
        # selection, the spec's default budget), alone and after the folded LDA router.
        from flexmoe.owner.proxy import select_proxy
        from flexmoe.spec import RouterTuningRecipe
        from flexmoe.training.router_tuning import tune_router

        pub_docs = [d for n in PUBLIC_DOMAINS for d in read_jsonl(paths[n] / "train.jsonl")]
        proxies = {}
        for o in owners:
            picked = select_proxy(read_jsonl(paths[o] / "train.jsonl"), pub_docs, embedder=None).indices
            proxies[o] = [pub_docs[i] for i in picked]
        recipe = RouterTuningRecipe(max_steps=args.tuning_steps, batch_size=8, seq_len=args.seq_len)
        k = ks[-1]
        start = {"merged": assembled(public, [arts[o] for o in owners], k)}
        start.update({f"lda-folded ({tag})": m for tag, m in folded.items()})
        for name, m in start.items():
            t = time.perf_counter()
            r = tune_router(
                m,
                proxy_documents=proxies,
                public_documents=pub_docs,
                tokenizer=tok,
                recipe=recipe,
                trainer_kwargs={"enable_progress_bar": False},
            )
            log(
                f"router tuning of {name}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                f"({time.perf_counter() - t:.0f} s)"
            )
            evaluate(f"{name} + router tuning/top-{k}", m, domains, args, results)

    if not args.skip_btm:
        from flexmoe.merge import BTMEnsemble

        btm = BTMEnsemble([public_model(public)] + [singles[o] for o in owners], prior=None, top_k=None).eval()
        evaluate("btm (public+singles)", btm, domains, args, results)

    from flexmoe.evaluate import oracle_perplexity

    t = time.perf_counter()
    oracle = oracle_perplexity({"public": public_model(public), **singles}, domains, batch_size=args.eval_batch)
    oracle["eval_s"] = round(time.perf_counter() - t, 1)
    results["oracle"] = oracle
    TIMINGS["eval_s"] = round(time.perf_counter() - t_eval, 1)
    TIMINGS["total_s"] = round(time.perf_counter() - started, 1)

    print_table(results, list(domains))
    print("\ntimings (s):", json.dumps(TIMINGS))
    print("\n" + markdown_table(results, list(domains)))
    out = Path(args.json) if args.json else work / "results.json"
    payload = {
        "settings": vars(args) | {"public_domains": list(PUBLIC_DOMAINS)},
        "timings_s": TIMINGS,
        "models": {
            k: {kk: vv for kk, vv in v.items() if kk != "routing"}
            | ({"routing": v["routing"]} if "routing" in v else {})
            for k, v in results.items()
        },
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
