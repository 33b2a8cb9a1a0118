"""The demo's report: findings computed from the numbers, the Markdown table, and the plots.

Split from :mod:`flexmoe.experiments.demo`, which runs the flow and calls these on its results.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def mean_routing(routing: dict) -> dict[str, dict[str, float]]:
    """``{domain: {expert: top-1 share}}`` averaged over layers."""
    out = {}
    for domain, layers in routing.items():
        experts = list(next(iter(layers.values())))
        out[domain] = {e: sum(layer[e] for layer in layers.values()) / len(layers) for e in experts}
    return out


def expert_rows(methods: dict) -> list[str]:
    return [m for m in methods if m.startswith("expert:")]


# The rows the default merged model should be below, in the table's order: FlexOlmo's comparison
# (the paper's Table 1) and the other ways to route the same merge.
RIVALS = ("public", "expert:*", "soup", "weighted_soup", "btx", "flexolmo_token", "flexolmo_published")
# How close to `btm` (every expert on every token) the default merged model aims to be.
BTM_TARGET = 1.05


def findings(methods: dict, routing: dict | None = None, flexolmo: dict | None = None) -> list[str]:
    """What the table shows, computed from it (nothing here is written in advance). ``routing``:
    ``{row: routing shares}`` (``routing.json``); ``flexolmo``: ``settings["flexolmo"]`` (the
    posterior, routing and router-tuning summaries and the diagnostics). Rows a report lacks (one
    written before they existed) are left out of the comparisons."""
    routing = routing or {}
    avg = {m: r["average"] for m, r in methods.items()}
    fo = avg["flexolmo"]
    lines = []
    rivals = [r for name in RIVALS for r in (expert_rows(methods) if name == "expert:*" else [name]) if r in avg]
    beaten = [m for m in rivals if fo < avg[m]]
    missed = [m for m in rivals if m not in beaten]
    ratio = fo / avg["btm"]
    close = ratio <= BTM_TARGET
    verdict = "met" if not missed and close else "not met"
    lines.append(
        f"**The expected outcome is {verdict}** on this run: `flexolmo` (the default recipe) averages {fo:.1f}; "
        f"it should be below {_names(rivals)}, and within {BTM_TARGET:.2f}x `btm`."
    )
    lines.append(
        f"`flexolmo` is lower than {_names(beaten) or 'none of them'}"
        + (f"; not lower than {_names(missed, avg)}." if missed else ".")
    )
    lines.append(
        f"Against `btm` (every expert runs on every token, {avg['btm']:.1f}): `flexolmo` is {ratio:.2f}x "
        f"({'within' if close else 'outside'} the {BTM_TARGET:.2f}x aimed for, docs/routing.md)."
        + (
            f" BTM as its paper prefers (`btm_top3_ema`: top-3 domains, cached prior) averages "
            f"{avg['btm_top3_ema']:.1f}; `flexolmo` is {fo / avg['btm_top3_ema']:.2f}x that."
            if "btm_top3_ema" in avg
            else ""
        )
    )
    token = "flexolmo_token" if "flexolmo_token" in avg else "flexolmo"
    if "flexolmo_no_rt" in avg:
        tuned = avg[token]
        rt = tuned - avg["flexolmo_no_rt"]
        tuning = (flexolmo or {}).get("router_tuning") or {}
        how = (
            f"federated router tuning ({len(tuning.get('rounds') or [])} Flower rounds on each owner's own text and "
            "the public data; only router rows left the owners)"
        )
        lines.append(
            f"The token router: the {how} moved the average from {avg['flexolmo_no_rt']:.1f} (`flexolmo_no_rt`) "
            f"to {tuned:.1f} (`{token}`; {'better' if rt < 0 else 'worse' if rt > 0 else 'unchanged'} by "
            f"{abs(rt):.1f})."
        )
    if "flexolmo_published" in avg:
        lines.append(
            f"FlexOlmo as published (the owners' own router rows beside `r_pub`, tuned by the coordinator on the "
            f"owners' proxy sets) averages {avg['flexolmo_published']:.1f} (`flexolmo_published`)."
        )
    lines += tuning_findings(routing, token)
    lines += diagnostic_findings(avg, (flexolmo or {}).get("diagnostics") or {})
    lines.append(
        f"Bounds: `oracle` (each domain through its own expert, perfect routing of the same experts) averages "
        f"{avg['oracle']:.1f}; `unrestricted` (the same MoE shape trained jointly on all the data, no privacy) "
        f"{avg['unrestricted']:.1f}. `flexolmo` is {fo / avg['oracle']:.2f}x the oracle: what routing leaves on "
        "the table."
    )
    if flexolmo:
        lines += fold_findings(methods, flexolmo)
    if routing.get(token):
        lines += routing_findings(methods, routing[token], token)
    return lines


def tuning_findings(routing: dict, tuned: str = "flexolmo_token") -> list[str]:
    """How the token router's tuning (``flexolmo_no_rt`` -> ``tuned``) moved each domain's tokens."""
    if not routing.get("flexolmo_no_rt") or not routing.get(tuned):
        return []
    before, after = mean_routing(routing["flexolmo_no_rt"]), mean_routing(routing[tuned])
    moves = ", ".join(f"{d} {before[d].get(d, 0.0):.2f} -> {after[d].get(d, 0.0):.2f}" for d in after)
    return [f"Router tuning moved each domain's own-expert top-1 share (mean over layers): {moves}."]


def diagnostic_findings(avg: dict, diagnostics: dict) -> list[str]:
    """The variants measured beside the table's rows: FlexOlmo's proxy-set router tuning, and BTX
    with every owner's text pooled."""
    lines = []
    proxy = diagnostics.get("proxy_router_tuning")
    if proxy:
        lines.append(
            f"FlexOlmo's published router tuning (by the coordinator alone, on the owners' proxy sets: public "
            f"documents that resemble their text, and the public data) averages {proxy['average']:.1f} against "
            f"`flexolmo_no_rt`'s {avg['flexolmo_no_rt']:.1f}: public text cannot teach the router to tell the owners "
            "apart when the public data holds little like their text."
        )
    pooled = diagnostics.get("btx_pooled_data")
    if pooled:
        lines.append(
            f"`btx` MoE-finetunes on the data the coordinator holds (the public data), as FlexOlmo's comparison "
            f"does; fine-tuned on every owner's text pooled (the original BTX, which ignores privacy) the same mix "
            f"averages {pooled['average']:.1f}."
        )
    return lines


def fold_findings(methods: dict, flexolmo: dict) -> list[str]:
    """What folding the discriminant's biases into the router rows (for the FlexOlmo export) costs."""
    q = (flexolmo.get("routing") or {}).get("fold_q")
    native = (flexolmo.get("diagnostics") or {}).get("lda_with_biases")
    if not q or not native:
        return []
    no_rt = methods["flexolmo_no_rt"]["average"]
    text = (
        f"The exported routers carry the LDA router's biases folded into their rows (FlexOlmo checkpoints have no "
        f"router bias). Per layer the fold's signal-to-noise q is {', '.join(f'{v:.1f}' for v in q)}: a folded "
        f"logit is off by about |b|/sqrt(q), so layers with q near 1 route only roughly as the LDA router would. "
        f"With its biases (flexmoe-native, not exportable) the same router averages {native['average']:.1f} "
        f"against `flexolmo_no_rt`'s {no_rt:.1f}."
    )
    return [text]


def routing_findings(methods: dict, routing: dict, row: str = "flexolmo") -> list[str]:
    """Where the token-routed ``row`` loses most against the oracle, and where that domain's
    tokens are routed."""
    shares = mean_routing(routing)
    fo, oracle = methods[row]["per_domain"], methods["oracle"]["per_domain"]
    gaps = sorted(fo, key=lambda d: fo[d] / oracle[d], reverse=True)
    own = {d: shares[d].get(d, 0.0) for d in shares}
    lines = [
        f"In `{row}`, the top-1 routing share of each domain's own expert (the public expert for public text), "
        "mean over layers: " + ", ".join(f"{d} {own[d]:.2f}" for d in fo) + "."
    ]
    for d in gaps[:2]:
        if fo[d] / oracle[d] < 1.05:
            continue
        top = max((e for e in shares[d] if e != d), key=lambda e: shares[d][e])
        lines.append(
            f"`{d}`: {fo[d]:.1f} against {oracle[d]:.1f} with its own expert ({fo[d] / oracle[d]:.2f}x); only "
            f"{own[d]:.0%} of its tokens reach that expert first, {shares[d][top]:.0%} go to `{top}`."
        )
    return lines


def _names(names: list[str], avg: dict | None = None) -> str:
    return ", ".join(f"`{n}`" + (f" ({avg[n]:.1f})" if avg else "") for n in names)


def markdown_table(methods: dict, domains: list[str]) -> str:
    """Methods x (domains, average); the best (lowest) value of each column in bold, ``oracle``
    (a bound, not a method) left out of that contest and set in italics."""
    columns = [*domains, "average"]

    def value(m, c):
        r = methods[m]
        return r["average"] if c == "average" else r["per_domain"][c]

    contenders = [m for m in methods if m != "oracle"]
    best = {c: min(value(m, c) for m in contenders) for c in columns}
    lines = ["| method | " + " | ".join(columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for m in methods:
        cells = []
        for c in columns:
            v = f"{value(m, c):.1f}"
            cells.append(f"*{v}*" if m == "oracle" else f"**{v}**" if value(m, c) == best[c] else v)
        lines.append(f"| {'*oracle*' if m == 'oracle' else f'`{m}`'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(routing: dict) -> str:
    shares = mean_routing(routing)
    experts = list(next(iter(shares.values())))
    lines = ["| domain \\ expert | " + " | ".join(experts) + " |", "|---" + "|---:" * len(experts) + "|"]
    for d, s in shares.items():
        lines.append(f"| {d} | " + " | ".join(f"**{s[e]:.2f}**" if e == d else f"{s[e]:.2f}" for e in experts) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, report: dict, routing: dict, *, owners, public_domains) -> None:
    """``report.md``; ``routing``: every MoE row's routing shares (``routing.json``); ``owners`` and
    ``public_domains``: the corpus domains of the owners and of the public data."""
    methods, s, times = report["methods"], report["settings"], report["wall_times"]
    c = s["config"]
    setting = (
        f"Public data: {' + '.join(public_domains)}; owners: {', '.join(owners)} (`flexmoe.data.corpus.local_corpus`, "
        f"{c['docs_per_domain']} documents per domain). Public model: OLMo-2, "
        f"{s['public_model']['parameters'] / 1e6:.1f}M parameters, {c['pretrain_steps']} steps; experts "
        f"{c['expert_steps']} steps each, trained by the owners' Flower ClientApps; merged models run {c['top_k']} "
        f"experts per token. {s['threads']} torch thread(s), {times['total'] / 60:.1f} minutes in all. "
        "docs/demo.md explains every row."
    )
    caption = (
        f"Held-out perplexity per domain ({c['eval_tokens']} tokens per domain, rows of {c['seq_len']}); lower is "
        "better, the best of each column in bold; *oracle* is a bound on routing, not a method."
    )
    caveat = (
        "One seed, a small under-trained public model and a few thousand held-out tokens per domain: read the "
        "numbers as relative, and differences of a few percent as noise."
    )
    parts = [
        "# flexmoe demo: FlexOlmo's comparison table on this machine's text",
        setting,
        caption,
        markdown_table(methods, list(next(iter(methods.values()))["per_domain"])),
        "## What the numbers mean",
        "\n".join(f"- {line}" for line in findings(methods, routing, s.get("flexolmo"))) + "\n\n" + caveat,
    ]
    for row in ("flexolmo", "flexolmo_token"):
        if not routing.get(row):
            continue
        parts += [
            f"## Routing of the `{row}` model",
            (
                "Share of each domain's tokens whose top-1 expert is each expert, mean over layers (per layer: "
                "`routing.json`"
                + (
                    ", `routing.png`)."
                    if row == ("flexolmo" if routing.get("flexolmo") else "flexolmo_token")
                    else ")."
                )
            ),
            routing_table(routing[row]),
        ]
    m = s.get("machine", {})
    cpu = m.get("main_process_cpu_s", {})
    parts += [
        "## Wall times (seconds)",
        ", ".join(f"{k} {v:g}" + (f" (CPU {cpu[k]:g})" if k in cpu else "") for k, v in times.items()),
        (
            f"{m.get('cpu_count')} cores, load average {m.get('load_average_at_start')} at the start and "
            f"{m.get('load_average_at_end')} at the end. CPU: this process's CPU seconds, about what a stage takes "
            "on an idle core (the simulated owners' worker processes are not included)."
        ),
        (
            "Files: `report.json` (these numbers), `perplexity.png`, `routing.png`, `routing.json`, `model/` (the "
            "`flexolmo_token` model as a transformers FlexOlmo checkpoint: it holds a token router only), "
            "`federation/coordinator/report.md` (who trained what, and what was accepted)."
        ),
    ]
    path.write_text("\n\n".join(parts) + "\n")


def plot_perplexity(methods: dict, path: Path) -> None:
    import matplotlib  # deferred: matplotlib is slow; `flexmoe --help` imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow, and must follow matplotlib.use("Agg")
    from matplotlib.colors import LogNorm  # deferred: matplotlib is slow; `flexmoe --help` imports this module

    names = list(methods)
    columns = [*next(iter(methods.values()))["per_domain"], "average"]
    values = np.array([[methods[m]["per_domain"].get(c, methods[m]["average"]) for c in columns] for m in names])
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 3, 0.45 * len(names) + 1.5))
    im = ax.imshow(values, cmap="viridis_r", norm=LogNorm(vmin=values.min(), vmax=values.max()), aspect="auto")
    contenders = [k for k, n in enumerate(names) if n != "oracle"]
    for i in range(len(names)):
        for j in range(len(columns)):
            bold = names[i] != "oracle" and values[i, j] == values[contenders, j].min()
            ax.text(
                j,
                i,
                f"{values[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                fontweight="bold" if bold else "normal",
                color="white" if values[i, j] > math.sqrt(values.min() * values.max()) else "black",
            )
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("held-out perplexity (lower is better; bold: best method per column)")
    fig.colorbar(im, ax=ax, label="perplexity (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_routing(routing: dict, path: Path, title: str) -> None:
    import matplotlib  # deferred: matplotlib is slow; `flexmoe --help` imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow, and must follow matplotlib.use("Agg")

    domains = list(routing)
    layers = list(routing[domains[0]])
    experts = list(routing[domains[0]][layers[0]])
    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(2.2 + 0.9 * len(experts) * len(layers), 0.5 * len(domains) + 2),
        squeeze=False,
        sharey=True,
    )
    for ax, layer in zip(axes[0], layers):
        share = np.array([[routing[d][layer][e] for e in experts] for d in domains])
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i in range(len(domains)):
            for j in range(len(experts)):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(layer)
        ax.set_xlabel("expert (top-1)")
    axes[0][0].set_ylabel("held-out domain")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
