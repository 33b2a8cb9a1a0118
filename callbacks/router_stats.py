"""RouterStats: which expert each layer sends tokens to, and how sure the router is."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from flexmoe.core.moe import MoEBlock
from flexmoe.core.surgery import moe_blocks

from ._common import find_moe_model


class RouterStats(pl.Callback):
    """Log per-layer expert usage and router entropy.

    Watches every MoE block with a forward hook during training batches (the router is
    re-evaluated on the block's input: a ``[T, H] x [H, E]`` product, negligible next to the
    experts) and sends averages to the Trainer's logger every ``every_n_steps`` steps as
    ``router/layer{L}/prob_{owner}`` (mean router probability), ``router/layer{L}/top1_{owner}``
    (share of tokens whose first choice it is) and ``router/layer{L}/entropy``.
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps
        self._handles: list = []
        self._reset()
        self.last: dict[str, float] = {}

    def _reset(self, num_layers: int = 0, num_experts: int = 0):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.probs = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.entropy = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = moe_blocks(find_moe_model(pl_module))
        if self.counts.shape != (len(blocks), blocks[0].num_experts):
            self._reset(len(blocks), blocks[0].num_experts)
        self._owners = list(blocks[0].settings.owners)
        for L, block in enumerate(blocks):
            self._handles.append(block.register_forward_hook(self._hook(L)))

    def _hook(self, layer: int):
        def hook(block: MoEBlock, args, output):
            if not block.training:
                return
            with torch.no_grad():
                probs = torch.softmax(block.router(args[0].reshape(-1, args[0].shape[-1]).detach()), -1)
                top1 = probs.argmax(-1)
                self.counts[layer] += torch.bincount(top1, minlength=block.num_experts).double().cpu()
                self.probs[layer] += probs.sum(0).double().cpu()
                ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
                self.entropy[layer] += ent.sum().double().cpu()
                self.tokens[layer] += probs.shape[0]

        return hook

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every != 0 or self.tokens.sum() == 0:
            return
        metrics = self.compute()
        self.last = metrics
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._reset(*self.counts.shape)

    def compute(self) -> dict[str, float]:
        out = {}
        for L in range(self.counts.shape[0]):
            n = self.tokens[L].clamp_min(1)
            for j, owner in enumerate(self._owners):
                out[f"router/layer{L}/prob_{owner}"] = float(self.probs[L, j] / n)
                out[f"router/layer{L}/top1_{owner}"] = float(self.counts[L, j] / n)
            out[f"router/layer{L}/entropy"] = float(self.entropy[L] / n)
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("counts", "probs", "entropy", "tokens")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in ("counts", "probs", "entropy", "tokens"):
            setattr(self, k, torch.tensor(state_dict[k], dtype=torch.float64))
