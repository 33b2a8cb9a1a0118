"""Task arithmetic in the tangent space (Ortiz-Jiménez et al., 2023, NeurIPS), reproduced small.

The paper's explanation of task arithmetic is *weight disentanglement*: adding ``α1 τ1 + α2 τ2``
to the pre-trained weights should act, on task 1's inputs, like ``α1 τ1`` alone, and on task 2's
like ``α2 τ2`` alone. Its error over a grid of ``(α1, α2)``::

    ξ(α1, α2) = Σ_t E_{x ~ D_t} [ f(x; θ0 + α_t τ_t) ≠ f(x; θ0 + α1 τ1 + α2 τ2) ]

(:func:`flexmoe.merge.disentanglement_grid`; ``f`` is the next-token prediction). Its headline
(figures 1 and 4, table 2): fine-tuning the model's *linearisation* ``f_lin(x; θ) = f(x; θ0) +
J f(x; θ0)(θ − θ0)`` instead of the model (:func:`flexmoe.merge.tangent.linearize`) gives task
vectors with lower disentanglement error, which add with less interference.

Here: a tiny byte-level OLMo-2 (:func:`analogies.tiny_lm`) is pre-trained on a mixture of text
domains this machine carries; from it, for two task domains (default ``stdlib_code`` and
``docstrings``), one copy is fine-tuned as usual (non-linear, ``τ_t``) and one in the tangent
space with the same steps, data and learning rate (linearised, ``τ_t^lin``, always evaluated with
``f_lin``, as in the paper). The run prints:

* each model's held-out loss (nats per byte) on both tasks, and the normalised score of the sum
  ``θ0 + α(τ1 + τ2)`` (the fraction of each task's fine-tuning gain the sum keeps, averaged; 1 =
  each task's own fine-tuned model, in its own regime) at ``α = 1`` and at the best ``α`` of a
  grid chosen on a separate half of the held-out rows;
* ``ξ`` over the ``(α1, α2)`` grid for both kinds of task vector, its mean and its value at
  ``(1, 1)``, and heat maps side by side (``tangent.png``, with matplotlib).

The measured numbers are in docs/examples.md. Run ``python examples/tangent_task_arithmetic.py --help``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is a folder of scripts, not a package
from analogies import byte_rows, domain_texts, held_out_loss, tiny_lm, train_lm
from task_negation import mixture_rows

from flexmoe.data.corpus import local_corpus
from flexmoe.merge import TaskVector, disentanglement_grid, plot_disentanglement
from flexmoe.merge.tangent import linearize

T0 = time.perf_counter()
REGIMES = ("non-linear", "linearised")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


@dataclass
class Regime:
    """One fine-tuning regime's outcome (losses in nats per byte on the test rows)."""

    own: dict[str, float]  # task -> loss of that task's fine-tuned model
    summed: dict[float, dict[str, float]]  # α -> task -> loss of θ0 + α(τ1 + τ2)
    score_at_1: float  # normalised score of θ0 + τ1 + τ2
    best: tuple[float, float]  # (normalised score, α) at the α chosen on the selection rows
    grid: torch.Tensor  # ξ(α1, α2)
    cosine: float  # cos(τ1, τ2)


@dataclass
class Tangent:
    tasks: list[str]
    base: dict[str, float]
    alphas: list[float]
    regimes: dict[str, Regime]

    def xi(self, regime: str) -> dict[str, float]:
        g = self.regimes[regime].grid
        one = self.alphas.index(1.0) if 1.0 in self.alphas else None
        return {"mean": float(g.mean()), "at (1, 1)": float(g[one, one]) if one is not None else float("nan")}

    def table(self) -> str:
        t1, t2 = self.tasks
        head = f"{'':30s}{t1:>16s}{t2:>16s}"
        lines = ["held-out loss (nats/byte)", head, "-" * len(head)]
        lines.append(f"{'pre-trained θ0':30s}{self.base[t1]:16.3f}{self.base[t2]:16.3f}")
        for name, r in self.regimes.items():
            lines.append(f"{name + ': own fine-tuned model':30s}{r.own[t1]:16.3f}{r.own[t2]:16.3f}")
            s = r.summed[1.0]
            lines.append(f"{name + ': θ0 + τ1 + τ2':30s}{s[t1]:16.3f}{s[t2]:16.3f}")
        lines.append("")
        head = f"{'':14s}{'score of τ1+τ2':>16s}{'best α':>8s}{'score at it':>13s}"
        head += f"{'mean ξ':>9s}{'ξ(1, 1)':>9s}{'cos(τ1,τ2)':>12s}"
        lines += [head, "-" * len(head)]
        for name, r in self.regimes.items():
            xi = self.xi(name)
            lines.append(
                f"{name:14s}{r.score_at_1:16.3f}{r.best[1]:8g}{r.best[0]:13.3f}{xi['mean']:9.3f}"
                f"{xi['at (1, 1)']:9.3f}{r.cosine:12.3f}"
            )
        return "\n".join(lines)

    def claims(self) -> dict[str, bool]:
        nl, lin = (self.regimes[r] for r in REGIMES)
        return {
            "lower_mean_xi": self.xi("linearised")["mean"] < self.xi("non-linear")["mean"],
            "lower_xi_at_1_1": self.xi("linearised")["at (1, 1)"] < self.xi("non-linear")["at (1, 1)"],
            "sum_keeps_more": lin.score_at_1 > nl.score_at_1,
            "best_sum_keeps_more": lin.best[0] > nl.best[0],
        }

    def summary(self) -> str:
        c = self.claims()
        yes = {True: "yes", False: "NO"}
        return (
            f"linearised task vectors have lower disentanglement error (mean over the grid): {yes[c['lower_mean_xi']]}"
            f"; at (1, 1): {yes[c['lower_xi_at_1_1']]}. Their sum keeps more of both tasks' gains at α = 1: "
            f"{yes[c['sum_keeps_more']]}; at the best α: {yes[c['best_sum_keeps_more']]}"
        )


def normalised(losses: dict[str, float], base: dict[str, float], own: dict[str, float]) -> float:
    """Mean over tasks of the fraction of the fine-tuning gain kept (see examples/task_addition.py)."""
    return sum((base[t] - losses[t]) / max(base[t] - own[t], 1e-9) for t in losses) / len(losses)


def plot(result: Tangent, path: Path) -> Path | None:
    """The two ξ heat maps on one colour scale; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: optional, and slow to import
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, name in zip(axes, REGIMES):
        plot_disentanglement(
            result.regimes[name].grid, result.alphas, ax=ax, title=f"{name}: mean ξ {result.xi(name)['mean']:.3f}"
        )
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return path


def main(
    out: str = "tangent_out",
    tasks: list[str] | None = None,
    pretrain_domains: list[str] | None = None,
    alphas: list[float] | None = None,
    sum_alphas: list[float] | None = None,
    max_docs_per_domain: int | None = None,
    pretrain_steps: int = 300,
    finetune_steps: int = 100,
    finetune_lr: float = 1e-3,
    seq_len: int = 128,
    batch_size: int = 8,
    max_bytes: int = 300_000,
    eval_bytes: int = 16_384,
    xi_rows: int = 16,
    seed: int = 0,
) -> Tangent:
    """Fine-tune two tasks both ways, then compare their task vectors (module docstring).

    Args:
        out: Output folder (``tangent.txt``, ``tangent.png``).
        tasks: The two task domain specs (local_corpus domains; capitals: upper-cased text;
            default: stdlib_code docstrings).
        pretrain_domains: Domains of the pre-training mixture (default: pydoc_topics, comments,
            stdlib_code, docstrings).
        alphas: The α of the disentanglement grid (default: -2 -1.5 ... 2).
        sum_alphas: The α of θ0 + α(τ1 + τ2) to choose from (default: 0.25 0.5 0.75 1).
        max_docs_per_domain: Read at most this many documents per domain (default: all).
        pretrain_steps: Pre-training steps.
        finetune_steps: Fine-tuning steps per task and regime.
        finetune_lr: Fine-tuning learning rate, the same for both regimes (AdamW).
        seq_len: Bytes per row.
        batch_size: Rows per step.
        max_bytes: Cap on each domain's training bytes.
        eval_bytes: Held-out bytes per domain, split into an α-selection half and a test half.
        xi_rows: Held-out rows per task on which ξ is measured.
        seed: Seed of everything.
    """
    torch.set_num_threads(1)  # tiny models; on a shared machine more threads only contend
    tasks = list(tasks or ("stdlib_code", "docstrings"))
    if len(tasks) != 2:
        raise SystemExit(f"tangent_task_arithmetic: --tasks takes two domain specs, got {tasks}")
    pretrain = list(pretrain_domains or ("pydoc_topics", "comments", "stdlib_code", "docstrings"))
    alphas = [float(a) for a in (alphas or (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0))]
    sum_alphas = sorted({1.0, *(float(a) for a in (sum_alphas or (0.25, 0.5, 0.75)))})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = local_corpus(max_docs_per_domain, domains=list(dict.fromkeys(s.lower() for s in [*pretrain, *tasks])))
    texts = {s: domain_texts(s, corpus) for s in dict.fromkeys([*pretrain, *tasks])}
    train = {s: byte_rows(tr, seq_len, max_bytes) for s, (tr, _) in texts.items()}
    held = {s: byte_rows(va, seq_len, eval_bytes) for s, (_, va) in texts.items()}
    select = {s: r[0::2] for s, r in held.items()}
    test = {s: r[1::2] for s, r in held.items()}

    base = tiny_lm(seed, seq_len)
    loss = train_lm(base, mixture_rows([train[s] for s in pretrain], seed), pretrain_steps, batch_size, 3e-3, seed)
    log(f"pre-trained {pretrain_steps} steps on {', '.join(pretrain)}: training loss {loss:.3f}")
    base.eval()

    def losses(model, rows) -> dict[str, float]:
        return {t: held_out_loss(model, rows[t]) for t in tasks}

    base_sel, base_test = losses(base, select), losses(base, test)
    regimes = {}
    for regime in REGIMES:
        # Both regimes evaluate their task vectors with their own function: f, or f_lin around θ0.
        reference = base if regime == "non-linear" else linearize(copy.deepcopy(base))
        taus, own_sel, own_test = [], {}, {}
        for k, task in enumerate(tasks):
            model = copy.deepcopy(reference)
            t = time.perf_counter()
            loss = train_lm(model, train[task], finetune_steps, batch_size, finetune_lr, seed + 1 + k)
            log(
                f"{regime} fine-tuning on {task}: {finetune_steps} steps, loss {loss:.3f}, "
                f"{time.perf_counter() - t:.1f}s"
            )
            taus.append(TaskVector.from_models(model, reference))
            own_sel[task], own_test[task] = held_out_loss(model, select[task]), held_out_loss(model, test[task])
        total = taus[0] + taus[1]
        summed_sel = {a: losses(total.apply(reference, a), select) for a in sum_alphas}
        summed_test = {a: losses(total.apply(reference, a), test) for a in sum_alphas}
        best_alpha = max(sum_alphas, key=lambda a: normalised(summed_sel[a], base_sel, own_sel))
        xi_data = tuple(test[t][:xi_rows] for t in tasks)
        t = time.perf_counter()
        grid = disentanglement_grid(reference, None, taus[0], taus[1], xi_data, alphas)
        log(f"{regime}: ξ over {len(alphas)}² (α1, α2), {time.perf_counter() - t:.1f}s")
        regimes[regime] = Regime(
            own=own_test,
            summed=summed_test,
            score_at_1=normalised(summed_test[1.0], base_test, own_test),
            best=(normalised(summed_test[best_alpha], base_test, own_test), best_alpha),
            grid=grid,
            cosine=taus[0].cosine(taus[1]),
        )
    result = Tangent(tasks, base_test, alphas, regimes)
    print()
    print(result.table())
    print()
    print(result.summary())
    (out_dir / "tangent.txt").write_text(result.table() + "\n\n" + result.summary() + "\n", encoding="utf-8")
    png = plot(result, out_dir / "tangent.png")
    log(f"table: {out_dir / 'tangent.txt'}" + (f"; plot: {png}" if png else " (no matplotlib: no plot)"))
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from flexmoe.cli import normalize_options

    auto_cli(
        main,
        args=normalize_options(
            sys.argv[1:], {"tasks": "list", "pretrain_domains": "list", "alphas": "list", "sum_alphas": "list"}
        ),
        as_positional=False,
    )
