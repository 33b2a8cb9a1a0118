"""The optimiser every flexmoe training module uses: AdamW, linear warmup, cosine decay.

One schedule in one place, so the owner's expert, router tuning, pretraining and BTX's
fine-tuning step the learning rate the same way, and a run split into pieces (the rounds of
federated router tuning) continues one schedule instead of restarting it.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch


def decay_groups(params, weight_decay: float) -> list[dict]:
    """AdamW parameter groups that decay weight matrices and not norms or biases (the GPT-2 / OLMo
    convention); an empty group is left out."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def clip_gradients(module: pl.LightningModule, optimizer, clip_val, algorithm, default) -> None:
    """Gradient clipping for ``configure_gradient_clipping``: the Trainer's ``gradient_clip_val``
    when it sets one, else the module's own recipe value ``default``, so a recipe's clipping holds
    even in a Trainer built without it."""
    clip = clip_val if clip_val is not None else default
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=algorithm or "norm")


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_cosine(
    module: pl.LightningModule,
    groups,
    *,
    lr,
    betas,
    warmup_steps,
    min_lr_ratio,
    max_steps,
    offset: int = 0,
    total: int | None = None,
) -> dict:
    """AdamW over ``groups`` with linear warmup and cosine decay, stepped every optimizer step,
    over the Trainer's ``max_steps`` (``max_steps`` when there is no Trainer or it sets none).

    A run that is one piece of a longer schedule (a round of federated router tuning) passes
    ``total`` (the whole schedule's steps) and ``offset`` (the steps before this piece)."""
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if total is None:
        trainer = module._trainer
        total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s + offset, warmup=warmup_steps, total=total, min_ratio=min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
