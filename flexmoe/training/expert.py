"""The data owner's side: train one FlexOlmo expert against the frozen public model.

FlexOlmo section 3.2 (docs/design.md, step 4): the public model is upcycled into a 2-expert MoE
(expert 0 = the public MLP, expert 1 = a copy); only expert 1, its router row ``r_1`` and
its bias ``beta_1`` train, with LM loss + router z-loss, AdamW(0.9, 0.95), weight decay 0,
cosine schedule with warmup and gradient clipping 1.0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.text import Perplexity

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.callbacks import ExportExpert, FreezePublicModel, RouterEmbeddingInit, RouterStats
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import fingerprint
from flexmoe.core.moe import record_router_logits, router_z_loss
from flexmoe.core.surgery import freeze_public, moe_blocks, upcycle
from flexmoe.formats.load import load_public_model
from flexmoe.owner.embed import init_router
from flexmoe.spec import ExpertRecipe, FederationSpec
from flexmoe.training.optim import adamw_cosine, clip_gradients


class ExpertModule(pl.LightningModule):
    """Trains one owner's expert (FlexOlmo section 3.2) in any Lightning ``Trainer``.

    >>> spec = FederationSpec.load("spec.json")
    >>> module = ExpertModule(spec.public_model, spec, owner="clinic")
    >>> data = TextDataModule(
    ...     "notes/", spec.public_model, seq_len=spec.expert.seq_len, batch_size=spec.expert.batch_size
    ... )
    >>> trainer = pl.Trainer(max_steps=spec.expert.max_steps, callbacks=expert_callbacks(spec, "clinic.safetensors"))
    >>> trainer.fit(module, data)

    Args:
        public_model: local directory or hub id of the public model (or the model itself).
        spec: the coordinator's :class:`FederationSpec` (object or path to its JSON). When
            omitted, one is made from the model with the default recipe.
        owner: this owner's name, written into the artifact.
        check_fingerprint: refuse a public model whose fingerprint differs from the spec's.
    """

    # What :meth:`artifact` builds (LoRA-sized experts use their own, flexmoe.lora).
    artifact_class = ExpertArtifact

    def __init__(
        self,
        public_model: str | nn.Module,
        spec: FederationSpec | str | None = None,
        owner: str = "owner",
        check_fingerprint: bool = True,
    ):
        super().__init__()
        model = load_public_model(public_model)
        if isinstance(spec, (str, Path)):
            spec = FederationSpec.load(spec)
        fp = fingerprint(model)
        if spec is None:
            name = public_model if isinstance(public_model, str) else getattr(model, "name_or_path", "") or "public"
            spec = FederationSpec(public_model=str(name), fingerprint=fp, embedder=None)
        elif check_fingerprint and spec.fingerprint != fp:
            raise InputError(
                f"the public model does not match the spec: fingerprint {fp[:16]}... but the spec "
                f"expects {spec.fingerprint[:16]}...; load the exact public model the coordinator published"
            )
        self.spec = spec
        self.owner = owner
        self.save_hyperparameters({"spec": spec.to_dict(), "owner": owner})
        self.model = upcycle(model, num_experts=1, top_k=self.recipe.top_k, owners=[owner])
        if spec.public_router_embedding is not None:
            init_router(self.model, 0, torch.tensor(spec.public_router_embedding))
        self.freeze_public_model()
        self.model.train()  # from_pretrained returns eval mode; dropout etc. follow the Trainer from here
        self.val_ppl = Perplexity()
        self.tokens_seen = 0
        self._t_last: float | None = None

    @property
    def recipe(self) -> ExpertRecipe:
        return self.spec.expert

    def freeze_public_model(self, trainable: tuple[int, ...] = (1,)) -> None:
        """Freeze everything but what this module trains: the experts ``trainable``, and every
        router row and bias (the frozen rows are detached inside the router).

        :class:`~flexmoe.callbacks.FreezePublicModel` freezes by calling this, so a subclass that
        trains less of its expert (:class:`~flexmoe.lora.LoraExpertModule`) says so here, once,
        whatever order Lightning runs the hooks in."""
        freeze_public(self.model, trainable)

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def _lm_step(self, batch):
        ids = batch["input_ids"]
        with record_router_logits(self.model) as logits:
            out = self.model(input_ids=ids, labels=ids, use_cache=False)
        return out, logits

    def training_step(self, batch, batch_idx):
        out, logits = self._lm_step(batch)
        z = router_z_loss(logits)
        loss = out.loss + self.recipe.z_loss_coef * z
        n = batch["input_ids"].numel() * self.trainer.world_size
        self.tokens_seen += n
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", n / max(now - self._t_last, 1e-9), on_step=True, prog_bar=True)
        self._t_last = now
        with torch.no_grad():
            usage = torch.stack([(layer.argmax(-1) == 1).float().mean() for layer in logits]).mean()
        self.log_dict(
            {
                "train/loss": out.loss.detach(),
                "train/ppl": out.loss.detach().exp(),
                "train/z_loss": z.detach(),
                "router/top1_share_expert": usage,
            },
            on_step=True,
            prog_bar=False,
        )
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_validation_epoch_start(self):
        # States made under trainer.validate()'s inference mode cannot be updated in fit's
        # validation (no_grad); start each validation from fresh states made in this mode.
        self.val_ppl.reset()

    def validation_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        out = self.model(input_ids=ids, use_cache=False)
        self.val_ppl.update(out.logits[:, :-1].float(), ids[:, 1:])
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=ids.shape[0])
        self.log("val/ppl", self.val_ppl, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        r = self.recipe
        routers = {id(p) for b in moe_blocks(self.model) for p in (b.router.weight, b.router.bias)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in routers], "weight_decay": r.weight_decay},
            # No decay on the router: decay would move the frozen rows that share its tensor.
            {"params": [p for p in params if id(p) in routers], "weight_decay": 0.0},
        ]
        return adamw_cosine(
            self,
            groups,
            lr=r.lr,
            betas=r.betas,
            warmup_steps=r.warmup_steps,
            min_lr_ratio=r.min_lr_ratio,
            max_steps=r.max_steps,
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm, self.recipe.grad_clip)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["flexmoe_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = int(checkpoint.get("flexmoe_tokens_seen", 0))

    def artifact(self, stats=None, unigram=None, bigram=None):
        """This owner's artifact as trained so far (:attr:`artifact_class`; with the routing
        statistics ``stats`` when given: :func:`flexmoe.routing.owner_statistics`; and the token
        counts ``unigram`` and ``bigram``: :func:`flexmoe.data.statistics.token_statistics`)."""
        return self.artifact_class.from_model(
            self.model,
            owner=self.owner,
            expert=1,
            spec_sha256=self.spec.sha256,
            training_tokens=self.tokens_seen,
            fingerprint=self.spec.fingerprint,
            stats=stats,
            unigram=unigram,
            bigram=bigram,
        )


def expert_callbacks(spec: FederationSpec, out: str | os.PathLike, public_documents=None) -> list[pl.Callback]:
    """The callbacks that make an owner's run produce a valid expert: freeze and verify the
    public model, initialise the router row, export the artifact (and proxy set), log routing."""
    return [
        FreezePublicModel(spec.fingerprint),
        RouterEmbeddingInit.from_spec(spec),
        ExportExpert(out, public_documents=public_documents),
        RouterStats(),
    ]
