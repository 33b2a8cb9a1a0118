"""FreezePublicModel: freeze the public model for an owner's run, and prove it stayed frozen."""

from __future__ import annotations

import hashlib
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning

from flexmoe.core.hashing import fingerprint, hash_tensor
from flexmoe.core.sharding import is_sharded, local_shard, reshard
from flexmoe.core.surgery import freeze_public

from ._common import find_moe_model


class PublicModelChanged(RuntimeError):
    """The frozen public tensors no longer hash to the spec's fingerprint."""


class FreezePublicModel(BaseFinetuning):
    """Freeze everything but the owner's expert, router row and bias (FlexOlmo section 3.2).

    Freezing happens in ``setup``, before the optimizer is built, so the optimizer never
    sees a frozen tensor. A LightningModule with a ``freeze_public_model(trainable)`` method
    (:class:`~flexmoe.ExpertModule` and its subclasses) is asked to freeze itself, so what it
    trains is stated once, by the module, and hook order does not matter. At fit end the
    public tensors are hashed again and must equal ``fingerprint`` (the spec's): any drift — a
    stray weight decay, a bug, a hook that wrote into a frozen weight — fails the run loudly
    instead of shipping a bad expert.

    A module that holds the public model in another dtype than the spec's float32
    (``precision="bf16-mixed"``) checked it against the spec when it loaded it and gives the
    fingerprint of the tensors as it holds them (``held_fingerprint``), which is then the one
    expected. Under FSDP (FSDP2: ``ExpertModule.fsdp_strategy``) each rank holds a shard of each
    tensor, so each rank checks that its own frozen shards kept their bytes from fit start (the
    whole fingerprint would gather the whole model; the module checked it at load, before
    sharding), and the ranks share their verdicts (an all-gather of one flag each), so every rank
    fails together, naming the ranks whose shards changed, rather than one rank failing while
    the others wait in the export's gathers.

    Args:
        fingerprint: expected fingerprint; by default the one measured at fit start.
        trainable: indices of the experts that train (the owner's expert is 1).
    """

    def __init__(self, fingerprint: str | None = None, trainable: tuple[int, ...] = (1,)):
        super().__init__()
        self.expected = fingerprint
        self.trainable = tuple(trainable)
        self.verified: str | None = None
        self._shards: str | None = None  # under FSDP: this rank's frozen shards at fit start

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        # A module that declares what of itself trains (ExpertModule.freeze_public_model: a LoRA expert
        # trains only its factors) freezes itself; any other module gets the plain FlexOlmo freeze.
        freeze = getattr(pl_module, "freeze_public_model", None)
        if callable(freeze):
            freeze(self.trainable)
        else:
            freeze_public(find_moe_model(pl_module), self.trainable)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        """Nothing is ever unfrozen: the public model stays frozen for the whole run."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if is_sharded(find_moe_model(pl_module)):
            self._shards = frozen_shards_digest(pl_module)
        elif self.expected is None:
            self.expected = fingerprint(find_moe_model(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_sharded(find_moe_model(pl_module)):
            got = frozen_shards_digest(pl_module)
            flags = trainer.strategy.all_gather(torch.tensor([int(got != self._shards)]))
            changed = [rank for rank, flag in enumerate(flags.reshape(-1).tolist()) if flag]
            if changed:
                raise PublicModelChanged(
                    f"the frozen public model changed during training: the frozen shards of rank(s) {changed} no "
                    "longer hash as at fit start. Something updated a frozen tensor; the expert is not compatible "
                    "with the federation."
                )
            self.verified = got
            return
        got = fingerprint(find_moe_model(pl_module))
        expected = getattr(pl_module, "held_fingerprint", None) or self.expected
        if got != expected:
            raise PublicModelChanged(
                f"the frozen public model changed during training: fingerprint {got} != expected {expected}. "
                "Something updated a frozen tensor; the expert is not compatible with the federation."
            )
        self.verified = got

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "expected": self.expected, "trainable": list(self.trainable)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.expected = state_dict.pop("expected", self.expected)
        self.trainable = tuple(state_dict.pop("trainable", self.trainable))
        super().load_state_dict(state_dict)


def frozen_shards_digest(pl_module: pl.LightningModule) -> str:
    """sha256 over the frozen parameters as this process holds them: under FSDP2, its shard of
    each (every unit resharded first: a root left gathered by a forward pass would read whole)."""
    model = find_moe_model(pl_module)
    reshard(model)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            hash_tensor(h, name, local_shard(p))
    return h.hexdigest()
