"""Pretrain a small public model from scratch: the dense model every owner's expert starts from.

FlexOlmo (section 3) starts from a public OLMo-2 model trained on public data D_pub. Where no
such model is at hand (offline demos, tests, a new domain), :func:`pretrain` trains one: a
byte-level BPE tokenizer and an OLMo-2 decoder (``transformers.Olmo2Config``) learned from
scratch on local text with a Lightning ``Trainer``, saved as an ordinary ``transformers``
directory::

    from flexmoe.data.corpus import local_corpus, write_corpus
    paths = write_corpus(local_corpus(), "corpus/")
    pretrain([f"{paths['pydoc_topics']}/train.jsonl", f"{paths['docstrings']}/train.jsonl"], "public/")
    AutoModelForCausalLM.from_pretrained("public/"); AutoTokenizer.from_pretrained("public/")

The defaults give a 5.3M-parameter model (4 layers, width 256, vocabulary 4,096; 300 steps of
16 x 256 tokens, 1.2M tokens); docs/performance.md has their measured time and perplexity. On a
busy machine ``OMP_NUM_THREADS=1`` is faster than threads that wait on each other.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.aggregation import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, Olmo2Config, PretrainedConfig

from flexmoe.core.io import atomic_write_json
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.documents import read_documents, split_documents
from flexmoe.data.tokenizer import train_tokenizer
from flexmoe.training.optim import adamw_cosine, clip_gradients, decay_groups

REPORT = "flexmoe_pretrain.json"


class PretrainModule(pl.LightningModule):
    """Causal-LM pretraining of a ``transformers`` model built from its config (random init).

    AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay to
    ``min_lr_ratio * lr`` (:func:`flexmoe.training.optim.cosine_with_warmup`), gradient clipping 1.0.
    Logs ``train/loss``, ``train/ppl`` per step and the token-weighted ``val/loss``, ``val/ppl``.

    Args:
        config: the model's config (e.g. ``Olmo2Config``) or its ``to_dict()``.
        lr, weight_decay, warmup_steps, min_lr_ratio, betas: the optimiser and schedule.
        max_steps: the schedule's length when the Trainer gives none.
        grad_clip: clip the gradient norm to this (``0``: no clipping).
    """

    def __init__(
        self,
        config,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        grad_clip: float = 1.0,
    ):
        super().__init__()
        if not isinstance(config, PretrainedConfig):
            config = dict(config)
            config = AutoConfig.for_model(config.pop("model_type"), **config)
        self.save_hyperparameters(
            {"config": config.to_dict()}
            | {
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "max_steps": max_steps,
                "min_lr_ratio": min_lr_ratio,
                "betas": betas,
                "grad_clip": grad_clip,
            }
        )
        self.model = AutoModelForCausalLM.from_config(config)
        self.val_loss = MeanMetric()
        self.tokens_seen = 0

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.tokens_seen += ids.numel() * self.trainer.world_size
        self.log_dict({"train/loss": loss.detach(), "train/ppl": loss.detach().exp()}, on_step=True)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_validation_epoch_start(self):
        self.val_loss.reset()

    def validation_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        self.val_loss.update(loss, weight=ids[:, 1:].numel())

    def on_validation_epoch_end(self):
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        return adamw_cosine(
            self,
            decay_groups(params, h.weight_decay),
            lr=h.lr,
            betas=h.betas,
            warmup_steps=h.warmup_steps,
            min_lr_ratio=h.min_lr_ratio,
            max_steps=h.max_steps,
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm, self.hparams.grad_clip)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["flexmoe_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = int(checkpoint.get("flexmoe_tokens_seen", 0))


class PretrainData(TextDataModule):
    """:class:`~flexmoe.data.datamodule.TextDataModule` whose validation uses at most ``val_batches``
    batches spread evenly over all held-out sequences, so that a limited validation still
    covers every source (the first batches alone come from the first source only)."""

    def __init__(self, *args, val_batches: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_batches = val_batches

    def val_dataloader(self) -> DataLoader:
        loader = super().val_dataloader()
        rows = len(loader.dataset)
        keep = self.val_batches * self.batch_size
        if not self.val_batches or rows <= keep:
            return loader
        picked = sorted({round(i * (rows - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [0]
        return DataLoader(
            Subset(loader.dataset, picked),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
        )


def olmo2_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
):
    """A small ``Olmo2Config``; ``intermediate_size`` defaults to 8/3 of the width, rounded up to 16
    (the SwiGLU sizing of Llama and OLMo)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"the head width hidden_size/num_heads = {hidden_size // num_heads} must be even (RoPE)")
    if intermediate_size is None:
        intermediate_size = -(-8 * hidden_size // 3 // 16) * 16
    return Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def pretrain(
    data: list[str],
    out: str,
    vocab_size: int = 4096,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    max_steps: int = 300,
    lr: float = 3e-3,
    warmup_steps: int = 30,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    seed: int = 0,
    val_fraction: float = 0.05,
    val_every: int = 100,
    val_batches: int = 16,
    precision: str = "32-true",
    accelerator: str = "auto",
    text_field: str = "text",
    cache_dir: str | None = None,
    progress_bar: bool = True,
) -> Path:
    """Train a small OLMo-2 public model and its tokenizer from scratch on local text.

    A byte-level BPE tokenizer (:func:`flexmoe.data.tokenizer.train_tokenizer`; pad, bos, eos = 0, 1, 2)
    is learned on the training documents, then the model on the packed sequences of a
    :class:`~flexmoe.data.datamodule.TextDataModule` (validation documents are held out of both). The
    result is a ``transformers`` directory (``config.json``, ``model.safetensors``,
    ``generation_config.json``, tokenizer files) plus ``flexmoe_pretrain.json`` (settings,
    held-out loss and perplexity at initialisation and at the end, tokens, time) and the
    Lightning CSV log under ``logs/``.

    Args:
        data: Training text: files, folders, glob patterns, JSONL files or ``datasets``
            directories, as :class:`~flexmoe.data.datamodule.TextDataModule` reads them.
        out: Output directory; must be empty or not exist yet.
        vocab_size: Tokenizer vocabulary (at least 259: 256 bytes and three special tokens).
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads (no grouped-query attention at this size).
        intermediate_size: MLP width; default 8/3 of ``hidden_size`` rounded up to 16.
        seq_len: Tokens per training sequence; also the model's ``max_position_embeddings``.
        batch_size: Sequences per optimiser step.
        max_steps: Optimiser steps.
        lr: Peak learning rate (AdamW, betas 0.9/0.95).
        warmup_steps: Linear warmup steps before the cosine decay.
        min_lr_ratio: The learning rate at the end, as a share of ``lr``.
        weight_decay: AdamW weight decay on weight matrices (not on norms).
        seed: Seeds the model's initialisation, the validation split and the data order.
        val_fraction: Share of documents held out for validation (``0``: none).
        val_every: Validate every this many steps (and always before and after training).
        val_batches: Validation batches per validation, spread evenly over the held-out
            sequences (``0``: all of them).
        precision: Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed``, ...
        accelerator: Lightning accelerator: ``auto``, ``cpu``, ``gpu``, ...
        text_field: JSONL field or dataset column holding the text.
        cache_dir: Where the tokenised data is cached (default ``~/.cache/flexmoe/data``).
        progress_bar: Show Lightning's progress bar.

    Returns the output directory. Loads with ``AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)``.
    """
    started = time.perf_counter()
    sources = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    _check_settings(
        sources,
        vocab_size=vocab_size,
        seq_len=seq_len,
        batch_size=batch_size,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        lr=lr,
        val_fraction=val_fraction,
        val_every=val_every,
        val_batches=val_batches,
    )
    olmo2_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size)  # shape errors, before any work
    out_dir = _check_out_dir(out)
    docs = read_documents(sources, text_field=text_field)  # a missing source fails here
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)

    # The tokenizer learns from the training documents only: validation text stays unseen.
    train_idx, val_idx = split_documents(docs, val_fraction, seed)
    tokenizer = train_tokenizer((docs[i] for i in train_idx), vocab_size=vocab_size)
    del docs
    datamodule = PretrainData(
        sources,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        val_fraction=val_fraction,
        seed=seed,
        text_field=text_field,
        cache_dir=cache_dir,
        val_batches=val_batches,
    )

    config = olmo2_config(
        len(tokenizer),
        hidden_size,
        num_layers,
        num_heads,
        intermediate_size,
        max_position_embeddings=seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    module = PretrainModule(
        config,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=min_lr_ratio,
    )
    validate = val_fraction > 0
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        val_check_interval=min(val_every, max_steps) if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if validate else 0,  # PretrainData spreads val_batches over the held-out set
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(out_dir, name="logs", version=""),
        enable_progress_bar=progress_bar,
        enable_model_summary=progress_bar,
        log_every_n_steps=10,
        default_root_dir=out_dir,
    )
    before = _validate(trainer, module, datamodule) if validate else {}
    trainer.fit(module, datamodule)
    after = _validate(trainer, module, datamodule) if validate else {}

    model = module.model.float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.model_max_length = seq_len
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "data": [os.fspath(s) for s in sources],
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "intermediate_size": config.intermediate_size,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "min_lr_ratio": min_lr_ratio,
            "weight_decay": weight_decay,
            "seed": seed,
            "val_fraction": val_fraction,
            "precision": precision,
        },
        "train_tokens": module.tokens_seen,
        "train_documents": len(train_idx),
        "val_documents": len(val_idx),
        "val_batches": val_batches,
        "val_loss_init": _metric(before, "val/loss"),
        "val_ppl_init": _metric(before, "val/ppl"),
        "val_loss": _metric(after, "val/loss"),
        "val_ppl": _metric(after, "val/ppl"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out_dir / REPORT, report)
    shown = ""
    if report["val_ppl"] is not None and report["val_ppl_init"] is not None:
        shown = f", held-out ppl {report['val_ppl_init']:.1f} -> {report['val_ppl']:.1f}"
    print(
        f"flexmoe: pretrained a {report['parameters'] / 1e6:.1f}M-parameter OLMo-2 model on "
        f"{report['train_tokens'] / 1e6:.1f}M tokens in {report['seconds']:.0f} s{shown} -> {out_dir}"
    )
    return out_dir


def _validate(trainer: pl.Trainer, module: PretrainModule, datamodule: TextDataModule) -> dict:
    """Held-out loss and perplexity of the model as it is now (empty if nothing to validate)."""
    results = trainer.validate(module, datamodule, verbose=False)
    return results[0] if results else {}


def _metric(metrics: dict, name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


def _check_out_dir(out: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(os.fspath(out)))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is a file; give a directory to write the model to")
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"--out {path} is not empty; choose a new directory or remove that one")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: cannot write to {parent}")
    return path


def _check_settings(sources, **s) -> None:
    if not sources:
        raise ValueError("no training data given: pass files, folders, globs, JSONL or datasets directories as data")
    problems = []
    if s["vocab_size"] < 259:
        problems.append(f"vocab_size {s['vocab_size']} must be at least 259 (256 bytes + pad, bos, eos)")
    if s["seq_len"] < 2:
        problems.append(f"seq_len must be at least 2, got {s['seq_len']}")
    if s["batch_size"] < 1:
        problems.append(f"batch_size must be at least 1, got {s['batch_size']}")
    if s["max_steps"] < 1:
        problems.append(f"max_steps must be at least 1, got {s['max_steps']}")
    if not 0 <= s["warmup_steps"] < max(s["max_steps"], 1):
        problems.append(f"warmup_steps must be in [0, max_steps={s['max_steps']}), got {s['warmup_steps']}")
    if s["lr"] <= 0:
        problems.append(f"lr must be positive, got {s['lr']}")
    if not 0 <= s["val_fraction"] < 1:
        problems.append(f"val_fraction must be in [0, 1), got {s['val_fraction']}")
    if s["val_every"] < 1:
        problems.append(f"val_every must be at least 1, got {s['val_every']}")
    if s["val_batches"] < 0:
        problems.append(f"val_batches must be >= 0, got {s['val_batches']}")
    if problems:
        raise ValueError("; ".join(problems))
