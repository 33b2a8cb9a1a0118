"""Forgetting by negation (Ilharco et al., 2023, "Editing models with task arithmetic", section 3).

A task vector ``τ = θ_ft − θ_pre`` points from the pre-trained weights towards what fine-tuning
on a task learned. Subtracting it, ``θ_pre − λτ``, should make the model *worse* at that task
while leaving other tasks almost where the pre-trained model had them; the paper's control is a
random vector of the same magnitude, which should barely move either.

Here, on text this machine carries (:func:`flexmoe.data.corpus.local_corpus`): a tiny byte-level
OLMo-2 (2 layers, width 64; :func:`analogies.tiny_lm`) is pre-trained on a mixture of domains
(default: standard-library code, docstrings, comments and the language reference), then a copy
is fine-tuned on the **target** domain (default: ``stdlib_code``) to give ``τ``. For each ``λ``
the run measures held-out perplexity per byte on the target and on a **control** domain
(default: ``pydoc_topics``, prose the target's fine-tuning never saw) of

* ``θ_pre − λτ`` (negation), and
* ``θ_pre − λr``, where ``r`` is Gaussian noise scaled tensor by tensor to ``τ``'s norms, so
  ``|r| = |τ|`` overall and in every tensor (the "same magnitude" control).

It prints a table, a one-line verdict on the claim (the target's perplexity rises more than the
control's, and more than the random vector of the same norm raises it), and saves a plot when
matplotlib is installed. The measured numbers are in docs/examples.md.

Run ``python examples/task_negation.py --help``.
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

from flexmoe.data.corpus import local_corpus
from flexmoe.merge import TaskVector

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


def mixture_rows(per_domain: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """The rows of several domains, shuffled together (a pre-training mixture)."""
    rows = torch.cat(list(per_domain))
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]


def random_like(tau: TaskVector, seed: int) -> TaskVector:
    """Gaussian noise with ``tau``'s norm in every tensor (so also overall)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in tau.deltas.items():
        r = torch.randn(d.shape, generator=g, dtype=d.dtype)
        out[name] = r * (d.norm() / r.norm().clamp_min(1e-30))
    return TaskVector(out)


@dataclass
class Negation:
    """Per-byte perplexities: ``rows[label] = (target, control)`` for each edit, and the λ grid."""

    target: str
    control: str
    lambdas: list[float]
    finetuned: tuple[float, float]
    negated: dict[float, tuple[float, float]]  # λ -> perplexities of θ_pre − λτ
    random: dict[float, tuple[float, float]]  # λ -> perplexities of θ_pre − λr, |r| = |τ|

    def table(self) -> str:
        head = (
            f"{'perplexity per byte':24s}{'target: ' + self.target:>22s}{'control: ' + self.control:>24s}"
            f"{'target, random':>18s}{'control, random':>18s}"
        )
        lines = [head, "-" * len(head)]
        ft_t, ft_c = self.finetuned
        lines.append(f"{'fine-tuned θ_pre + τ':24s}{ft_t:22.3f}{ft_c:24.3f}{'':18s}{'':18s}")
        for lam in self.lambdas:
            (t, c), (rt, rc) = self.negated[lam], self.random[lam]
            label = "pre-trained θ_pre" if lam == 0 else f"θ_pre − {lam:g}·(τ | r)"
            lines.append(f"{label:24s}{t:22.3f}{c:24.3f}{rt:18.3f}{rc:18.3f}")
        return "\n".join(lines)

    def rise(self, lam: float) -> dict[str, float]:
        """Relative perplexity change from the pre-trained model at ``λ``: target and control,
        under ``τ`` and under the random vector."""
        t0, c0 = self.negated[0.0]
        (t, c), (rt, rc) = self.negated[lam], self.random[lam]
        return {
            "target": t / t0 - 1,
            "control": c / c0 - 1,
            "target_random": rt / t0 - 1,
            "control_random": rc / c0 - 1,
        }

    def verdict(self, lam: float = 1.0) -> str:
        r = self.rise(lam)
        holds = r["target"] > r["control"] and r["target"] > r["target_random"]
        return (
            f"λ = {lam:g}: −λτ raises the target's perplexity by {r['target']:+.1%} and the control's by "
            f"{r['control']:+.1%}; a random vector of the same norm raises them by {r['target_random']:+.1%} "
            f"and {r['control_random']:+.1%}. Negation forgets the target selectively: " + ("yes" if holds else "NO")
        )

    def plot(self, path: Path) -> Path | None:
        """Perplexity against λ for both domains and both vectors; ``None`` without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # deferred: optional, and slow to import
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        lams = self.lambdas
        ax.plot(lams, [self.negated[x][0] for x in lams], "o-", color="C3", label=f"target ({self.target}), −λτ")
        ax.plot(lams, [self.negated[x][1] for x in lams], "o-", color="C0", label=f"control ({self.control}), −λτ")
        ax.plot(lams, [self.random[x][0] for x in lams], "s--", color="C3", alpha=0.6, label="target, −λr (|r| = |τ|)")
        ax.plot(lams, [self.random[x][1] for x in lams], "s--", color="C0", alpha=0.6, label="control, −λr")
        ax.set_xlabel("λ")
        ax.set_ylabel("held-out perplexity per byte")
        ax.set_yscale("log")
        ax.set_title("task negation: θ_pre − λτ")
        ax.legend(fontsize=8)
        fig.savefig(path, bbox_inches="tight", dpi=120)
        plt.close(fig)
        return path


def perplexities(model, rows: dict[str, torch.Tensor], target: str, control: str) -> tuple[float, float]:
    return tuple(float(torch.tensor(held_out_loss(model, rows[d])).exp()) for d in (target, control))


def main(
    out: str = "task_negation_out",
    target: str = "stdlib_code",
    control: str = "pydoc_topics",
    pretrain_domains: list[str] | None = None,
    lambdas: list[float] | None = None,
    max_docs_per_domain: int | None = None,
    pretrain_steps: int = 300,
    finetune_steps: int = 100,
    seq_len: int = 128,
    batch_size: int = 8,
    max_bytes: int = 300_000,
    eval_bytes: int = 16_384,
    seed: int = 0,
) -> Negation:
    """Pre-train, fine-tune on the target, negate the task vector (module docstring).

    Args:
        out: Output folder (``task_negation.txt``, ``task_negation.png``).
        target: Domain spec fine-tuned on and then negated (a local_corpus domain; in capitals: upper-cased).
        control: Domain spec that should barely move.
        pretrain_domains: Domains of the pre-training mixture (default: stdlib_code, docstrings, comments,
            pydoc_topics).
        lambdas: Scales of the negation; 0 is added (default: 0 0.5 1 1.5 2).
        max_docs_per_domain: Read at most this many documents per domain (default: all).
        pretrain_steps: Steps of pre-training.
        finetune_steps: Steps of fine-tuning on the target.
        seq_len: Bytes per training row.
        batch_size: Rows per step.
        max_bytes: Cap on each domain's training bytes.
        eval_bytes: Held-out bytes per domain (from its validation documents).
        seed: Seed of everything.
    """
    torch.set_num_threads(1)  # tiny models; on a shared machine more threads only contend
    pretrain = list(pretrain_domains or ("stdlib_code", "docstrings", "comments", "pydoc_topics"))
    lambdas = sorted({0.0, *(float(x) for x in (lambdas or (0.5, 1.0, 1.5, 2.0)))})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = local_corpus(
        max_docs_per_domain, domains=list(dict.fromkeys(s.lower() for s in [*pretrain, target, control]))
    )
    texts = {s: domain_texts(s, corpus) for s in dict.fromkeys([*pretrain, target, control])}
    train = {s: byte_rows(tr, seq_len, max_bytes) for s, (tr, _) in texts.items()}
    val = {s: byte_rows(va, seq_len, eval_bytes) for s, (_, va) in texts.items()}

    base = tiny_lm(seed, seq_len)
    loss = train_lm(base, mixture_rows([train[s] for s in pretrain], seed), pretrain_steps, batch_size, 3e-3, seed)
    log(f"pre-trained {pretrain_steps} steps on {', '.join(pretrain)}: training loss {loss:.3f}")
    finetuned = tiny_lm(seed, seq_len)
    finetuned.load_state_dict(base.state_dict())
    loss = train_lm(finetuned, train[target], finetune_steps, batch_size, 1e-3, seed + 1)
    log(f"fine-tuned {finetune_steps} steps on {target}: training loss {loss:.3f}")
    tau = TaskVector.from_models(finetuned, base)
    noise = random_like(tau, seed + 2)
    log(f"|τ| = {tau.norm():.3f}, |r| = {noise.norm():.3f}, cos(τ, r) = {tau.cosine(noise):+.4f}")

    result = Negation(
        target,
        control,
        lambdas,
        finetuned=perplexities(finetuned, val, target, control),
        negated={lam: perplexities((-lam * tau).apply(base), val, target, control) for lam in lambdas},
        random={lam: perplexities((-lam * noise).apply(base), val, target, control) for lam in lambdas},
    )
    print()
    print(result.table())
    print()
    for lam in lambdas[1:]:
        print(result.verdict(lam))
    text = "\n".join([result.table(), "", *(result.verdict(lam) for lam in lambdas[1:]), ""])
    (out_dir / "task_negation.txt").write_text(text, encoding="utf-8")
    png = result.plot(out_dir / "task_negation.png")
    log(f"table: {out_dir / 'task_negation.txt'}" + (f"; plot: {png}" if png else " (no matplotlib: no plot)"))
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from flexmoe.cli import normalize_options

    auto_cli(
        main,
        args=normalize_options(sys.argv[1:], {"pretrain_domains": "list", "lambdas": "list"}),
        as_positional=False,
    )
