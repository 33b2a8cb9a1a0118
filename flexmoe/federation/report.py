"""The coordinator's report: ``report.json`` (everything, for programs) and ``report.md`` (for people)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    paths = out / "report.json", out / "report.md"
    for path, text in zip(paths, (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", render(report))):
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else (f"{v:{fmt}}" if isinstance(v, float) else str(v))


def render(report: dict) -> str:
    """The human-readable summary of :func:`write_report`'s ``report``."""
    lines = [f"# Federation report: {report['status']}", ""]
    spec = report["spec"]
    lines += [
        f"- run: {report.get('run_id')}",
        (
            f"- spec: `{spec['path']}` (sha256 {spec['sha256'][:16]}...), public model `{spec['public_model']}` "
            f"(fingerprint {spec['fingerprint'][:16]}...)"
        ),
        (
            f"- accepted {len(report['accepted'])} of {len(report['owners'])} expected owner(s); "
            f"quorum {report['settings']['quorum'] or len(report['owners'])}"
        ),
        f"- took {report['seconds']:.0f} s",
    ]
    if report.get("error"):
        lines += [f"- **error**: {report['error']}"]
    lines += [
        "",
        "## Owners",
        "",
        "| owner | status | why | tokens | train loss | val loss | sent (bytes) | proxy docs | reply (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, o in report["owners"].items():
        m = o.get("metrics") or {}
        status = o["status"] + (" (kept from an earlier run)" if o.get("resumed") else "")
        why = (o.get("reason") or "").replace("|", "\\|").replace("\n", " ")
        proxy = len(o["proxy"]["indices"]) if o.get("proxy") else "-"
        lines.append(
            f"| {name} | {status} | {why} | {_num(o.get('training_tokens'))} | {_num(m.get('train-loss'))} | "
            f"{_num(m.get('val-loss'))} | {_num(o.get('upload_bytes'))} | {proxy} | {_num(o.get('seconds_to_reply'), '.1f')} |"
        )
    own = {n: o["metrics"].get("router-top1-own") for n, o in report["owners"].items() if o.get("metrics")}
    if any(own.values()):
        lines += ["", "Share of each owner's training tokens routed (top-1) to its own expert, per layer:", ""]
        lines += [f"- {n}: {', '.join(f'{x:.2f}' for x in v)}" for n, v in own.items() if v]
    if report.get("experts"):
        lines += ["", "## Merged model", "", f"- experts, in order: {', '.join(report['experts'])}"]
        recipe = report.get("routing_recipe") or {}
        if recipe.get("method") == "lda":
            lines.append(
                f"- routing: discriminant router (lda, {recipe.get('covariance')} covariance, shrinkage "
                f"{recipe.get('shrinkage')}) from the owners' statistics and {recipe.get('public_tokens')} "
                f"public tokens{'; biases folded into the rows' if recipe.get('folded') else ''}"
            )
        elif recipe:
            lines.append("- routing: FlexOlmo's published merge (the owners' router rows stacked)")
        rt = report.get("router_tuning") or {}
        if "skipped" in rt:
            lines.append(f"- router tuning: skipped ({rt['skipped']})")
        elif rt.get("data") == "owners":
            rounds = rt.get("rounds") or []
            last = rounds[-1]["owners"] if rounds else []
            lines.append(
                f"- router tuning: federated, on the owners' own text and the public data: {len(rounds)} "
                f"round(s) of {rt.get('local_steps')} local steps; owners in the last round: "
                f"{', '.join(last) or 'none'}"
            )
        elif rt:
            lines.append(
                f"- router tuning: {rt.get('steps')} steps, loss {_num(rt.get('loss_first'))} -> "
                f"{_num(rt.get('loss_last'))}, proxy sets from {', '.join(rt.get('proxy_owners') or []) or 'no owner'}"
            )
        if report.get("export"):
            e = report["export"]
            lines.append(
                f"- export: `{e['dir']}` ({e['format']}; requested {e['requested']}, "
                f"allow_approximate={e['allow_approximate']})"
            )
    if report.get("routing"):
        experts = report.get("experts") or []
        lines += [
            "",
            "## Routing usage (top-1 share of tokens, mean over layers)",
            "",
            "| text | perplexity | " + " | ".join(experts) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in experts) + " |",
        ]
        for name, r in report["routing"].items():
            layers = list(r["top1_share"].values())
            mean = [sum(layer.get(e, 0.0) for layer in layers) / len(layers) for e in experts]
            lines.append(f"| {name} | {r['perplexity']:.2f} | " + " | ".join(f"{x:.2f}" for x in mean) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
