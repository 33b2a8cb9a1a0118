"""Adding many task vectors (Ilharco et al., 2023, "Editing models with task arithmetic", section 4,
figure 3), against TIES-merging (Yadav et al., 2023) and the individual fine-tuned models.

One multi-task model from ``n`` fine-tuned ones: ``θ_pre + λ Σ_t τ_t`` (task arithmetic,
:func:`flexmoe.merge.task_arithmetic`) or TIES (:func:`flexmoe.merge.ties`, density 0.2, global
trim, sign by mass). The paper plots the *normalised* multi-task score as tasks are added: each
task's score divided by what that task's own fine-tuned model gets. Here the tasks are language
modelling on text domains this machine carries, so the score of a model ``M`` on task ``t`` is
the fraction of the fine-tuning gain it keeps::

    score_t(M) = (L_t(θ_pre) − L_t(M)) / (L_t(θ_pre) − L_t(θ_t))

with ``L_t`` the held-out loss (nats per byte) on domain ``t``: 1 is as good as the task's own
model, 0 no better than the pre-trained one. The multi-task score is its mean over the ``n``
tasks. ``λ`` is chosen per ``n`` and per method on a *selection* half of each domain's held-out
rows and the scores are reported on the other half, as the paper chooses ``λ`` on validation data.
"Best single model" is the best of the ``n`` fine-tuned models used alone on all ``n`` tasks.

The models: a tiny byte-level OLMo-2 (:func:`analogies.tiny_lm`) pre-trained on a mixture of
domains (the language reference and the lower-cased task domains), fine-tuned from there on each
task domain. Pre-trained on the language reference alone, the task vectors are far larger and
interfere: the best single model then beats both merges (docs/examples.md has both runs). The run prints the table
and the claim it checks (merged models keep more of the tasks than any single model does; which
of task arithmetic and TIES keeps more). The measured numbers are in docs/examples.md.

Run ``python examples/task_addition.py --help``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is a folder of scripts, not a package
from analogies import byte_rows, domain_texts, held_out_loss, tiny_lm, train_lm
from task_negation import mixture_rows

from flexmoe.data.corpus import local_corpus
from flexmoe.merge import TaskVector, task_arithmetic, ties

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


def scores(losses: dict[str, float], base: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    """Normalised score per task (module docstring): the fraction of the fine-tuning gain kept."""
    return {t: (base[t] - losses[t]) / max(base[t] - own[t], 1e-9) for t in losses}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


@dataclass
class Addition:
    """``rows[n] = {method: (normalised multi-task score, λ chosen)}`` for the first ``n`` tasks."""

    tasks: list[str]
    rows: dict[int, dict[str, tuple[float, float | None]]]

    METHODS = ("task arithmetic", "TIES", "best single model")

    def table(self) -> str:
        head = f"{'tasks n':>8s}  {'added':22s}" + "".join(f"{m:>22s}" for m in self.METHODS)
        lines = [head, "-" * len(head)]
        for n, row in self.rows.items():
            cells = ""
            for m in self.METHODS:
                score, lam = row[m]
                cells += f"{score:>12.3f}" + (f"  (λ={lam:<4g})" if lam is not None else " " * 10)
            lines.append(f"{n:>8d}  {self.tasks[n - 1]:22s}{cells}")
        return "\n".join(lines)

    def claims(self) -> dict[str, bool]:
        """What the run checks, for every ``n ≥ 2``: a merge keeps more than the best single
        model (``merge_beats_single``), and task arithmetic ≥ TIES (``ta_at_least_ties``)."""
        many = [row for n, row in self.rows.items() if n >= 2]
        best_merge = [max(r["task arithmetic"][0], r["TIES"][0]) for r in many]
        return {
            "merge_beats_single": all(b > r["best single model"][0] for b, r in zip(best_merge, many)),
            "ta_beats_single": all(r["task arithmetic"][0] > r["best single model"][0] for r in many),
            "ties_beats_single": all(r["TIES"][0] > r["best single model"][0] for r in many),
            "ta_at_least_ties": all(r["task arithmetic"][0] >= r["TIES"][0] for r in many),
        }

    def summary(self) -> str:
        c = self.claims()
        n = max(self.rows)
        last = self.rows[n]
        ta, ti, single = (last[m][0] for m in self.METHODS)
        return (
            f"with all {n} tasks: task arithmetic keeps {ta:.1%} of the fine-tuning gains, TIES {ti:.1%}, "
            f"the best single model {single:.1%}. For every n ≥ 2, task arithmetic beats the best single model: "
            f"{'yes' if c['ta_beats_single'] else 'NO'}; TIES does: {'yes' if c['ties_beats_single'] else 'NO'}; "
            f"task arithmetic ≥ TIES: {'yes' if c['ta_at_least_ties'] else 'NO'}"
        )


def main(
    out: str = "task_addition_out",
    tasks: list[str] | None = None,
    base_domains: list[str] | None = None,
    ta_lambdas: list[float] | None = None,
    ties_lambdas: list[float] | None = None,
    density: float = 0.2,
    max_docs_per_domain: int | None = None,
    base_steps: int = 600,
    finetune_steps: int = 100,
    finetune_lr: float = 1e-3,
    seq_len: int = 128,
    batch_size: int = 8,
    max_bytes: int = 300_000,
    eval_bytes: int = 16_384,
    seed: int = 0,
) -> Addition:
    """Fine-tune one model per task, then merge the first n of them for every n (module docstring).

    Args:
        out: Output folder (``task_addition.txt``, ``task_addition.png``).
        tasks: Task domain specs in the order they are added (local_corpus domains; capitals: upper-cased
            text; default: stdlib_code docstrings comments unicode_names COMMENTS).
        base_domains: Domains of the pre-training mixture (default: pydoc_topics stdlib_code docstrings
            comments unicode_names).
        ta_lambdas: Grid of λ for θ_pre + λ Σ τ (default: 0.1 0.2 ... 1.0).
        ties_lambdas: Grid of λ for TIES (default: 0.3 0.5 0.7 1.0 1.3 1.6 2.0).
        density: TIES's trimming density (the paper's k = 20%).
        max_docs_per_domain: Read at most this many documents per domain (default: all).
        base_steps: Pre-training steps.
        finetune_steps: Fine-tuning steps per task.
        finetune_lr: Fine-tuning learning rate (AdamW; pre-training uses 3e-3).
        seq_len: Bytes per training row.
        batch_size: Rows per step.
        max_bytes: Cap on each domain's training bytes.
        eval_bytes: Held-out bytes per domain, split into a λ-selection half and a test half.
        seed: Seed of everything.
    """
    torch.set_num_threads(1)  # tiny models; on a shared machine more threads only contend
    tasks = list(tasks or ("stdlib_code", "docstrings", "comments", "unicode_names", "COMMENTS"))
    ta_grid = [float(x) for x in (ta_lambdas or (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0))]
    ties_grid = [float(x) for x in (ties_lambdas or (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0))]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_domains = list(base_domains or ("pydoc_topics", "stdlib_code", "docstrings", "comments", "unicode_names"))
    corpus = local_corpus(max_docs_per_domain, domains=list(dict.fromkeys(s.lower() for s in [*tasks, *base_domains])))
    texts = {s: domain_texts(s, corpus) for s in dict.fromkeys([*tasks, *base_domains])}
    train = {s: byte_rows(tr, seq_len, max_bytes) for s, (tr, _) in texts.items()}
    held = {s: byte_rows(va, seq_len, eval_bytes) for s, (_, va) in texts.items()}
    select = {s: r[0::2] for s, r in held.items()}  # λ is chosen on these rows ...
    test = {s: r[1::2] for s, r in held.items()}  # ... and the scores are measured on these

    base = tiny_lm(seed, seq_len)
    loss = train_lm(base, mixture_rows([train[s] for s in base_domains], seed), base_steps, batch_size, 3e-3, seed)
    log(f"pre-trained {base_steps} steps on {', '.join(base_domains)}: training loss {loss:.3f}")
    models = []
    for k, task in enumerate(tasks):
        model = tiny_lm(seed, seq_len)
        model.load_state_dict(base.state_dict())
        loss = train_lm(model, train[task], finetune_steps, batch_size, finetune_lr, seed + 1 + k)
        models.append(model.eval())
        log(f"fine-tuned {finetune_steps} steps on {task}: training loss {loss:.3f}")

    def losses(model, rows, n) -> dict[str, float]:
        return {t: held_out_loss(model, rows[t]) for t in tasks[:n]}

    base_sel, base_test = losses(base, select, len(tasks)), losses(base, test, len(tasks))
    own_sel = {t: held_out_loss(m, select[t]) for t, m in zip(tasks, models)}
    own_test = {t: held_out_loss(m, test[t]) for t, m in zip(tasks, models)}
    singles_test = [losses(m, test, len(tasks)) for m in models]

    def pick(candidates: dict[float, torch.nn.Module], n: int) -> tuple[float, float]:
        """The λ whose merge scores best on the selection rows, and its score on the test rows."""
        sel = {lam: mean(scores(losses(m, select, n), base_sel, own_sel).values()) for lam, m in candidates.items()}
        lam = max(sel, key=sel.get)
        return mean(scores(losses(candidates[lam], test, n), base_test, own_test).values()), lam

    rows = {}
    for n in range(1, len(tasks) + 1):
        tau_sum = TaskVector.from_models(task_arithmetic(base, models[:n]), base)  # Σ_t τ_t, streamed
        tau_ties = TaskVector.from_models(ties(base, models[:n], density=density), base)  # λ = 1
        single = max(mean(scores({t: s[t] for t in tasks[:n]}, base_test, own_test).values()) for s in singles_test[:n])
        rows[n] = {
            "task arithmetic": pick({lam: tau_sum.apply(base, lam) for lam in ta_grid}, n),
            "TIES": pick({lam: tau_ties.apply(base, lam) for lam in ties_grid}, n),
            "best single model": (single, None),
        }
        log(f"n = {n}: " + ", ".join(f"{m} {s:.3f}" for m, (s, _) in rows[n].items()))
    result = Addition(tasks, rows)
    print()
    print("normalised multi-task score (1 = each task's own fine-tuned model, 0 = the pre-trained model)")
    print(result.table())
    print()
    print(result.summary())
    (out_dir / "task_addition.txt").write_text(result.table() + "\n\n" + result.summary() + "\n", encoding="utf-8")
    png = plot(result, out_dir / "task_addition.png")
    log(f"table: {out_dir / 'task_addition.txt'}" + (f"; plot: {png}" if png else " (no matplotlib: no plot)"))
    return result


def plot(result: Addition, path: Path) -> Path | None:
    """Normalised score against the number of tasks; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: optional, and slow to import
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ns = list(result.rows)
    for m, style in zip(Addition.METHODS, ("o-", "s-", "^--")):
        ax.plot(ns, [result.rows[n][m][0] for n in ns], style, label=m)
    ax.set_xlabel("number of tasks added")
    ax.set_ylabel("normalised multi-task score")
    ax.set_xticks(ns)
    ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return path


def _cli(argv: Sequence[str]) -> None:
    from jsonargparse import auto_cli

    from flexmoe.cli import normalize_options

    auto_cli(
        main,
        args=normalize_options(
            list(argv), {"tasks": "list", "base_domains": "list", "ta_lambdas": "list", "ties_lambdas": "list"}
        ),
        as_positional=False,
    )


if __name__ == "__main__":
    _cli(sys.argv[1:])
