"""The small routing harness the benchmarks share: a local corpus and a public model pretrained on
its public domains, each built once under a work directory and reused by later runs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from flexmoe.data.corpus import local_corpus, write_corpus
from flexmoe.training.pretrain import pretrain

PUBLIC_DOMAINS = ("stdlib_code", "pydoc_topics")


def log(msg: str) -> None:
    """One timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every record of a JSONL file."""
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def build_corpus(
    work: Path, owners: Sequence[str], docs: int, public_domains: Sequence[str] = PUBLIC_DOMAINS
) -> dict[str, Path]:
    """The public and owner domains of :func:`~flexmoe.data.corpus.local_corpus`, written once under
    ``work/corpus``; returns domain -> its folder (``train.jsonl``, ``val.jsonl``)."""
    names = list(public_domains) + list(owners)
    root = Path(work) / "corpus"
    if all((root / n / "val.jsonl").is_file() for n in names):
        return {n: root / n for n in names}
    log(f"building the local corpus ({docs} docs per domain)")
    return write_corpus(local_corpus(max_docs_per_domain=docs, domains=names), root)


def pretrain_public(
    work: Path, paths: dict[str, Path], args, *, seed: int = 0, public_domains: Sequence[str] = PUBLIC_DOMAINS
) -> Path:
    """The public model, pretrained once on ``public_domains`` under ``work/public``; ``args``
    carries the sizes (``vocab``, ``hidden``, ``layers``, ``heads``, ``seq_len``, ``batch_size``,
    ``pretrain_steps``) as the benchmarks' command lines name them."""
    out = Path(work) / "public"
    if (out / "config.json").is_file():
        return out
    log("pretraining the public model")
    pretrain(
        [str(paths[d] / "train.jsonl") for d in public_domains],
        str(out),
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.pretrain_steps,
        seed=seed,
        warmup_steps=max(1, args.pretrain_steps // 10),
        val_every=args.pretrain_steps,
        val_batches=4,
        cache_dir=str(Path(work) / "cache"),
        progress_bar=False,
    )
    return out


def fit_expert(
    module, spec, source: str | Path, artifact: Path, *, work: Path, steps: int, seq_len: int, batch_size: int
) -> tuple[float, int]:
    """Train an owner's expert ``module`` on the documents at ``source`` the way an owner does
    (:func:`~flexmoe.training.expert.expert_callbacks` on a CPU Lightning ``Trainer`` with a
    :class:`~flexmoe.data.datamodule.TextDataModule`, its cache under ``work/cache``), writing
    ``artifact``; returns the seconds ``fit`` took and the packed rows it trained on. The one
    owner-training loop of the benchmarks."""
    import lightning.pytorch as pl  # deferred: Lightning, only for the benchmarks that train

    from flexmoe.data.datamodule import TextDataModule
    from flexmoe.training.expert import expert_callbacks

    data = TextDataModule(
        str(source),
        spec.public_model,
        seq_len=seq_len,
        batch_size=batch_size,
        val_fraction=0.0,
        cache_dir=str(Path(work) / "cache"),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=expert_callbacks(spec, artifact),
    )
    t = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - t, data.num_train_sequences
