"""The coordinator's record of a run: each owner's state (:class:`OwnerState`), the report
(``report.json``, everything, for programs; ``report.md``, for people) and the progress lines it
prints while it runs."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexmoe.core.io import atomic_write_json, atomic_write_text

# Owner statuses. Unresolved: waiting (not connected yet), training (spec sent, no reply yet).
WAITING, TRAINING = "waiting", "training"
ACCEPTED, REJECTED, FAILED, MISSING = "accepted", "rejected", "failed", "missing"


@dataclass
class OwnerState:
    """What the coordinator knows about one expected owner."""

    name: str
    status: str = WAITING
    reason: str | None = None
    node_id: int | None = None
    resumed: bool = False
    seconds_to_reply: float | None = None
    upload_bytes: int | None = None
    training_tokens: int | None = None
    privacy: str | None = None  # the artifact's differential privacy, in words (ExpertFile.privacy_summary)
    metrics: dict = field(default_factory=dict)
    proxy: dict | None = None
    artifact: str | None = None
    artifact_sha256: str | None = None
    sent_at: float | None = field(default=None, repr=False)


def run_report(
    status: str,
    *,
    run_id: int,
    spec: dict,
    settings: dict,
    owners: dict[str, OwnerState],
    notes: list[str],
    seconds: float,
    summary: dict,
) -> dict:
    """The report of a run that ended as ``status``: who was accepted, rejected or missing and
    why, every owner's state, the notes, and ``summary`` (what the merge, routing, router
    tuning and export recorded)."""
    return {
        "status": status,
        "run_id": run_id,
        "spec": spec,
        "settings": settings,
        "owners": {n: {k: v for k, v in asdict(o).items() if k not in ("name", "sent_at")} for n, o in owners.items()},
        "accepted": [n for n, o in owners.items() if o.status == ACCEPTED],
        "rejected": {n: o.reason for n, o in owners.items() if o.status == REJECTED},
        "missing": {n: o.reason for n, o in owners.items() if o.status in (FAILED, MISSING, WAITING, TRAINING)},
        "notes": notes,
        "seconds": seconds,
        **summary,
    }


_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line for ``flwr log`` (the ServerApp's output is the run's log)."""
    print(f"flexmoe coordinator [{time.monotonic() - _T0:7.1f} s]: {msg}", flush=True)


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``, each atomically."""
    out = Path(out_dir)
    return (
        atomic_write_json(out / "report.json", report, sort_keys=True, default=str),
        atomic_write_text(out / "report.md", render(report)),
    )


# Characters of one reason or note in the report: a node's error text is the node's to choose.
MAX_REASON = 1000


def clip(text, limit: int = MAX_REASON) -> str:
    """``text`` as one line of at most ``limit`` characters (the rest counted, not shown)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _num(v, fmt: str = ".3f") -> str:
    """A number for the table; anything else (a value an owner chose) as a short escaped cell."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:{fmt}}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**18:
        return str(v)
    return _cell(v, 40)


def _cell(v, limit: int = MAX_REASON) -> str:
    return clip(v if isinstance(v, str) else repr(v), limit).replace("|", "\\|")


def _shares(v) -> str | None:
    """A per-layer share list as ``0.12, 0.34``; ``None`` unless it is a list of numbers."""
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return None
    return ", ".join(f"{float(x):.2f}" for x in v[:64])


def render(report: dict) -> str:
    """The human-readable summary of :func:`write_report`'s ``report``. Values an owner sent
    (metrics, proxy sets) are shown only in the form expected of them, escaped and cut short; a
    value of another form shows as itself in short, never as an error."""
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
        "| owner | status | why | tokens | privacy | train loss | val loss | sent (bytes) | proxy docs | reply (s) |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, o in report["owners"].items():
        m = o.get("metrics") if isinstance(o.get("metrics"), dict) else {}
        status = o["status"] + (" (kept from an earlier run)" if o.get("resumed") else "")
        why = _cell(o.get("reason") or "")
        indices = o["proxy"].get("indices") if isinstance(o.get("proxy"), dict) else None
        proxy = len(indices) if isinstance(indices, list) else "-"
        lines.append(
            f"| {name} | {status} | {why} | {_num(o.get('training_tokens'))} | {_cell(o.get('privacy') or '-')} | "
            f"{_num(m.get('train-loss'))} | "
            f"{_num(m.get('val-loss'))} | {_num(o.get('upload_bytes'))} | {proxy} | "
            f"{_num(o.get('seconds_to_reply'), '.1f')} |"
        )
    own = {
        n: _shares(o["metrics"].get("router-top1-own"))
        for n, o in report["owners"].items()
        if isinstance(o.get("metrics"), dict)
    }
    if any(own.values()):
        lines += ["", "Share of each owner's training tokens routed (top-1) to its own expert, per layer:", ""]
        lines += [f"- {n}: {v}" for n, v in own.items() if v]
    if report.get("experts"):
        lines += ["", "## Merged model", "", f"- experts, in order: {', '.join(report['experts'])}"]
        recipe = report.get("routing_recipe") or {}
        if recipe.get("method") == "posterior":
            lines.append(
                f"- routing: posterior router (temperature {recipe.get('temperature')}, smoothing "
                f"{recipe.get('smoothing')}, reset at document ends: {recipe.get('reset_at_eos')}) from the owners' "
                f"token counts and {recipe.get('public_tokens')} public tokens ({recipe.get('public_statistics')})"
            )
        elif recipe.get("method") == "lda":
            lines.append(
                f"- routing: discriminant router (lda, {recipe.get('covariance')} covariance, shrinkage "
                f"{recipe.get('shrinkage')}) from the owners' statistics and {recipe.get('public_tokens')} "
                f"public tokens{'; biases folded into the rows' if recipe.get('folded') else ''}"
            )
            if recipe.get("recipe") == "posterior":
                lines.append(f"- the spec's recipe is the posterior router: {recipe.get('note')}")
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
        lines += ["", "## Notes", ""] + [f"- {clip(n)}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
