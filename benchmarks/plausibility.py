"""Honest experts against the plausibility bounds, and what one accepted owner can take of another's tokens.

Starts from a finished ``flexmoe demo`` run (``--demo DIR``: its spec, public model, public text,
the coordinator's accepted experts and the owners' held-out text) and prints the two tables of
docs/trust.md:

1. **Honest values vs the bounds.** Every expert is first validated as the coordinator does
   (:meth:`flexmoe.ExpertArtifact.validate` and :func:`flexmoe.routing.check_statistics_plausible`);
   then, over all experts and layers, the values :class:`flexmoe.artifacts.expert.Plausibility`
   bounds: router row norms (``r_j`` and ``r_0``), ``|beta_j|``, each expert tensor's RMS and
   largest entry over the public MLP tensor's, the mean MLP input's distance from the public mean
   in public standard deviations, the covariance's trace over the public one and its smallest
   eigenvalue over ``tr/H``, and the token count each owner's statistics declare. The public
   statistics are taken as :func:`flexmoe.routing.route` takes them (the spec's ``stats_tokens``
   spread over the public text, packed at the spec's ``seq_len``). The bounds are read from
   ``Plausibility()``, so the table shows the margin the library actually keeps.
2. **The attacker's share of the victim's tokens.** ``comments`` attacks ``docstrings``: it ships
   its own router rows x10, the victim's rows x10, the victim's rows scaled to just inside the
   row bound, or the victim's exact statistics (means, covariances, token counts). Each set of
   experts is merged under ``published``, ``lda`` and ``posterior`` (unigrams only: the demo's
   owners shipped no bigrams) into the native format, and the table gives the mean gate the
   attacker's expert gets on the victim's held-out tokens, over layers (softmax gate, or the
   posterior router's own gate; read by a forward hook on every router).

Why: the bounds are set as a margin over honest values, and they limit magnitudes, not intent;
the second table shows which routing recipe an accepted owner can exploit, and how far.

    .venv/bin/python benchmarks/plausibility.py --demo demo_out
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flexmoe.artifacts.expert import ExpertArtifact, MLPInputStats, Plausibility
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.assembly import merge_experts
from flexmoe.core.posterior import PosteriorRouter
from flexmoe.core.surgery import decoder_layers, moe_blocks
from flexmoe.data.documents import read_documents
from flexmoe.data.packing import pack_domain, spread_rows
from flexmoe.formats.load import load_public_model
from flexmoe.routing import check_statistics_plausible, mlp_input_moments
from flexmoe.spec import FederationSpec

ATTACKER, VICTIM = "comments", "docstrings"
VICTIM_ROWS = 48  # held-out rows of the victim's text the gates are read on
JUST_INSIDE = 0.99  # of the router-row bound, for the attack "the victim's row at the bound"
ATTACKS = {
    "none (honest)": "honest",
    "its own row x10": "own row x10",
    "the victim's row x10": "victim row x10",
    "the victim's row scaled to just inside the bound": "victim row at bound",
    "the victim's exact statistics (means, covariances, counts)": "victim statistics",
}


@dataclasses.dataclass
class Demo:
    """What both tables read from a finished demo run."""

    root: Path
    spec: FederationSpec
    public: torch.nn.Module
    tokenizer: object
    public_documents: list[str]
    experts: dict[str, ExpertArtifact]  # by owner, in expert order

    @classmethod
    def load(cls, root: Path) -> Demo:
        paths = sorted((root / "federation" / "coordinator" / "artifacts").glob("*.safetensors"))
        if not paths:
            raise SystemExit(f"{root}: no accepted experts under federation/coordinator/artifacts; is it a demo run?")
        experts = {a.owner: a for a in map(ExpertArtifact.load, paths)}
        if not {ATTACKER, VICTIM} <= set(experts):
            raise SystemExit(f"{root}: the demo's owners {sorted(experts)} lack {ATTACKER!r} or {VICTIM!r}")
        return cls(
            root=root,
            spec=FederationSpec.load(root / "spec.json"),
            public=load_public_model(root / "public").eval(),
            tokenizer=AutoTokenizer.from_pretrained(root / "public"),
            public_documents=read_documents(root / "data" / "public" / "train.jsonl"),
            experts=experts,
        )

    def rows(self, domain: str, split: str) -> torch.Tensor:
        """The domain's text packed as owners pack theirs (rows of the spec's ``seq_len``)."""
        docs = read_documents(self.root / "data" / domain / f"{split}.jsonl")
        return pack_domain(docs, self.tokenizer, self.spec.expert.seq_len)


# -- 1. honest values vs the bounds ------------------------------------------------------------


def public_statistics(demo: Demo) -> MLPInputStats:
    """The public class's MLP-input mean and covariance, taken as :func:`flexmoe.routing.route` does."""
    rows = pack_domain(demo.public_documents, demo.tokenizer, demo.spec.expert.seq_len)
    return mlp_input_moments(demo.public, spread_rows(rows, demo.spec.routing.stats_tokens), covariance=True)


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t``, in float64."""
    return float(t.double().pow(2).mean().sqrt())


def honest_values(demo: Demo, public: MLPInputStats) -> dict[str, list[float]]:
    """Every value a :class:`Plausibility` bound applies to, over all experts and layers, after
    checking each expert passes the coordinator's checks with the default bounds."""
    mlps = [layer.mlp for layer in decoder_layers(demo.public)]
    hidden = demo.public.config.hidden_size
    got: dict[str, list[float]] = {
        k: [] for k in ("row", "bias", "rms", "peak", "distance", "trace", "eigenvalue", "tokens")
    }
    for owner, expert in demo.experts.items():
        try:
            expert.validate(demo.public, demo.spec.fingerprint, demo.spec.sha256)
            check_statistics_plausible(owner, expert.routing_stats, public, Plausibility())
        except ArtifactError as e:
            raise SystemExit(f"the library refuses {owner}'s expert: {e}") from e
        stats = expert.routing_stats
        got["tokens"].append(stats.count)
        for L, mlp in enumerate(mlps):
            state, row, bias = expert.layer(L)
            public_row = expert.tensors.get(f"layers.{L}.router.public_embedding")  # absent in older files
            got["row"] += [float(r.norm()) for r in (row, public_row) if r is not None]
            got["bias"].append(float(bias.abs().max()))
            public_state = mlp.state_dict()
            # As ExpertArtifact.check_plausible: the layer's MLP RMS stands in for an all-zero tensor.
            floor = rms(torch.cat([v.flatten() for v in public_state.values()]))
            for name, ref in public_state.items():
                ref_rms = rms(ref) or floor
                got["rms"].append(rms(state[name]) / ref_rms)
                got["peak"].append(float(state[name].abs().max()) / max(float(ref.abs().max()), ref_rms))
            spread = float(torch.trace(public.covariance[L]))
            cov = stats.covariance[L]
            got["distance"].append(float((stats.mean[L] - public.mean[L]).norm()) / math.sqrt(spread))
            got["trace"].append(float(torch.trace(cov)) / spread)
            got["eigenvalue"].append(float(torch.linalg.eigvalsh(cov)[0]) / (float(torch.trace(cov)) / hidden))
    return got


def bounds_table(demo: Demo, public: MLPInputStats, got: dict[str, list[float]]) -> str:
    """Markdown: each bound of ``Plausibility()`` next to the range honest experts measured, and
    the margin between them (the bound over the largest honest value)."""
    b = Plausibility()
    cap = max(public.count, demo.spec.routing.stats_tokens)

    def upper(value: str, key: str, bound: float) -> str:
        low, high = min(got[key]), max(got[key])
        return f"| {value} | <= {bound:.4g} | {low:.3g}-{high:.3g} | {bound / high:.0f}x |"

    return "\n".join(
        [
            "| value | bound | honest (measured) | margin |",
            "|---|---|---|---|",
            upper("router row norm (`r_j` and `r_0`)", "row", b.router_row_bound(demo.public.config.hidden_size)),
            upper("router bias `abs(beta_j)`", "bias", b.router_bias),
            upper("expert tensor RMS / the public tensor's", "rms", b.weight_scale),
            upper("expert tensor largest entry / the public tensor's", "peak", b.weight_scale),
            upper("`norm(mu_j - mu_pub) / sqrt(tr Sigma_pub)`", "distance", b.statistics),
            upper("covariance trace / the public one", "trace", b.statistics**2),
            f"| covariance smallest eigenvalue / (tr/H) | PSD up to {b.covariance_tolerance:g} (Cholesky with that "
            f"jitter) | {min(got['eigenvalue']):.1e}-{max(got['eigenvalue']):.1e} | - |",
            f"| statistics token count | weight in the pooled covariance capped at {cap:,} "
            f"| {min(got['tokens']):,.0f}-{max(got['tokens']):,.0f} | - |",
        ]
    )


# -- 2. the attacker's share of the victim's tokens --------------------------------------------


def attacked(demo: Demo, attack: str) -> ExpertArtifact:
    """The attacker's expert after ``attack`` (a value of :data:`ATTACKS`); every one passes the bounds."""
    mine, victim = demo.experts[ATTACKER], demo.experts[VICTIM]
    if attack == "honest":
        return mine
    bound = JUST_INSIDE * Plausibility().router_row_bound(demo.public.config.hidden_size)
    tensors, metadata = dict(mine.tensors), dict(mine.metadata)
    for L in range(mine.num_layers):
        key = f"layers.{L}.router.embedding"
        if attack == "own row x10":
            tensors[key] = mine.tensors[key] * 10
        elif attack == "victim row x10":
            tensors[key] = victim.tensors[key] * 10
        elif attack == "victim row at bound":
            tensors[key] = victim.tensors[key] * (bound / float(victim.tensors[key].norm()))
    if attack == "victim statistics":
        tensors.update({k: v for k, v in victim.tensors.items() if ".stats." in k or k.startswith("stats.")})
        counts = ("stats_tokens", "unigram_tokens", "bigram_pairs")
        metadata.update({k: victim.metadata[k] for k in counts if k in victim.metadata})
    return dataclasses.replace(mine, tensors=tensors, metadata=metadata)


def gate_mass(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean gate ``[experts]`` of each expert over every token of ``rows`` and every layer: the
    softmax of a token router's logits, or a :class:`PosteriorRouter`'s gate as it is."""
    seen = []

    def hook(module, args, out):
        gate = out.float() if isinstance(module, PosteriorRouter) else torch.softmax(out.float(), -1)
        seen.append(gate.reshape(-1, gate.shape[-1]).mean(0))

    handles = [block.router.register_forward_hook(hook) for block in moe_blocks(model)]
    try:
        with torch.inference_mode():
            logits = model(input_ids=rows, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    if not torch.isfinite(logits).all():
        raise SystemExit("the merged model's logits are not finite: an accepted expert broke it")
    return torch.stack(seen).mean(0)


def share_table(demo: Demo) -> str:
    """Markdown: the attacker's mean gate on the victim's held-out tokens per attack and recipe
    (the victim's own gate next to it where the attacker reaches a third of the tokens)."""
    rows = demo.rows(VICTIM, "val")[:VICTIM_ROWS]
    owners = list(demo.experts)
    # Each recipe as the spec's, so the posterior's public counts come from the spec's file as the
    # coordinator's do; unigrams only, as the demo's owners shipped (and its spec file holds).
    specs = {
        method: dataclasses.replace(demo.spec, routing=dataclasses.replace(demo.spec.routing, **fields))
        for method, fields in {
            "published": dict(method="published"),
            "lda": dict(method="lda"),
            "posterior": dict(method="posterior", bigram_buckets=0),
        }.items()
    }
    lines = [
        f"| attack (by `{ATTACKER}`, all accepted) | `published` | `lda` | `posterior` (unigrams) |",
        "|---|---|---|---|",
    ]
    for label, attack in ATTACKS.items():
        experts = [attacked(demo, attack) if o == ATTACKER else demo.experts[o] for o in owners]
        cells = []
        for spec in specs.values():
            merged = merge_experts(
                demo.root / "public",
                experts,
                spec=spec,
                spec_path=demo.root / "spec.json",
                spec_sha256=demo.spec.sha256,
                public_documents=demo.public_documents,
                format="native",
            )
            gate = gate_mass(merged.model, rows)
            took, kept = float(gate[1 + owners.index(ATTACKER)]), float(gate[1 + owners.index(VICTIM)])
            cells.append(f"{took:.2f}" + (f" (the victim {kept:.2f})" if took > 0.25 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `flexmoe demo` output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = Demo.load(args.demo)
    public = public_statistics(demo)
    print(
        f"Honest experts ({', '.join(demo.experts)}) against Plausibility(), public statistics over "
        f"{public.count:,} tokens:\n"
    )
    print(bounds_table(demo, public, honest_values(demo, public)))
    print(
        f"\nMean gate of the attacker's expert ({ATTACKER}) on the victim's held-out tokens ({VICTIM}, "
        f"{VICTIM_ROWS} rows of {demo.spec.expert.seq_len}), over layers:\n"
    )
    print(share_table(demo))


if __name__ == "__main__":
    main()
