"""The data owner's side: train one FlexOlmo expert against the frozen public model.

FlexOlmo section 3.2 (docs/design.md, step 4): the public model is upcycled into a 2-expert MoE
(expert 0 = the public MLP, expert 1 = a copy); only expert 1, its router row ``r_1`` and
its bias ``beta_1`` train, with LM loss + router z-loss, AdamW(0.9, 0.95), weight decay 0,
cosine schedule with warmup and gradient clipping 1.0.

Memory at 1B-7B (docs/scale.md; ``flexmoe plan`` prices each setting), set by the recipe
(``precision``, ``activation_checkpointing``) or by the owner, whose hardware it is:

* ``precision="bf16-mixed"``: the public model is loaded in bfloat16 and stays there (no float32
  copy of the frozen part); what trains (expert 1, the router tensors) is held in float32, so
  AdamW's master weights, moments and gradients are float32 for it alone. Lightning's
  ``MixedPrecision`` plugin (``Trainer(precision="bf16-mixed")``) runs the step under
  ``torch.autocast(dtype=bfloat16)`` and leaves parameter dtypes alone, which is exactly that
  split; ``bf16-true`` would cast the trainable weights to bfloat16 too, so it is refused.
* ``activation_checkpointing``: transformers' ``activation_checkpointing_enable`` with
  ``use_reentrant=False`` on every decoder layer (the non-reentrant form needs no input that
  requires grad, so the frozen embeddings below the first layer are fine; same gradients).
* several devices: :meth:`ExpertModule.fsdp_strategy`, torch's FSDP2 through Lightning's
  ``ModelParallelStrategy``, with the frozen public model sharded too, in units of one dtype and
  one ``requires_grad`` (:meth:`ExpertModule.configure_model`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torchmetrics.text import Perplexity

from flexmoe.artifacts.expert import ExpertArtifact, privacy_fields
from flexmoe.artifacts.unigram import TOKEN_STATISTICS
from flexmoe.callbacks import ExportExpert, FreezePublicModel, RouterEmbeddingInit, RouterStats
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import fingerprint, hash_tensor, public_state
from flexmoe.core.moe import record_router_logits, router_z_loss
from flexmoe.core.parsing import shorten
from flexmoe.core.sharding import gathered_layers, is_sharded, reshard
from flexmoe.core.surgery import decoder_layers, freeze_public, moe_blocks, upcycle
from flexmoe.formats.load import load_public_model
from flexmoe.owner.embed import init_router
from flexmoe.spec import PRECISIONS, ExpertRecipe, FederationSpec, PrivacyRecipe
from flexmoe.training.checkpoint_io import use_streaming_checkpoints
from flexmoe.training.optim import adamw_cosine, clip_gradients
from flexmoe.training.privacy import PrivateTraining, privacy_metadata


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
        privacy: differential privacy for this owner's expert and statistics
            (:class:`~flexmoe.spec.PrivacyRecipe`; docs/privacy.md) when the spec sets none;
            default: the spec's ``expert.privacy``. A spec that sets one fixes it. With DP-SGD
            the module optimises manually (:mod:`flexmoe.training.privacy`: Poisson-sampled rows,
            per-row clipping, noise) and trains on one process.
        precision: ``"32-true"`` or ``"bf16-mixed"`` (module docstring); default the recipe's.
            The ``Trainer`` must run the same precision (``bf16-mixed``: checked in ``setup``).
        activation_checkpointing: recompute each decoder layer in the backward pass; default
            the recipe's.
    """

    # What :meth:`artifact` builds (LoRA-sized experts use their own, flexmoe.lora).
    artifact_class = ExpertArtifact

    def __init__(
        self,
        public_model: str | nn.Module,
        spec: FederationSpec | str | None = None,
        owner: str = "owner",
        check_fingerprint: bool = True,
        privacy: PrivacyRecipe | None = None,
        precision: str | None = None,
        activation_checkpointing: bool | None = None,
    ):
        super().__init__()
        if isinstance(spec, (str, Path)):
            spec = FederationSpec.load(spec)
        recipe = spec.expert if spec is not None else ExpertRecipe()
        self.precision = precision or recipe.precision
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.activation_checkpointing = (
            recipe.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
        )
        # The dtype the frozen public model is held in; what trains is always float32.
        self.public_dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32
        model = load_public_model(public_model, dtype=self.public_dtype)
        fp = float32_fingerprint(model)
        if spec is None:
            name = public_model if isinstance(public_model, str) else getattr(model, "name_or_path", "") or "public"
            spec = FederationSpec(public_model=str(name), fingerprint=fp, embedder=None)
        elif check_fingerprint and fp != spec.fingerprint != files_fingerprint(model, public_model):
            raise InputError(
                f"the public model does not match the spec: fingerprint {fp[:16]}... but the spec "
                f"expects {spec.fingerprint[:16]}...; load the exact public model the coordinator published"
            )
        self.spec = spec
        self.owner = owner
        if privacy is not None and spec.expert.privacy is not None and privacy != spec.expert.privacy:
            raise InputError(
                f"privacy={privacy} contradicts the spec's expert.privacy={spec.expert.privacy}; "
                "the spec fixes the recipe"
            )
        self.privacy: PrivacyRecipe | None = spec.expert.privacy or privacy
        # DP-SGD's state (accountant, noise); None trains as FlexOlmo does.
        self.private = PrivateTraining(self.privacy) if self.privacy and self.privacy.trains_privately else None
        if self.private is not None:
            self.automatic_optimization = False  # one clipped gradient per row: training_step steps itself
        hparams = {"spec": spec.to_dict(), "owner": owner}
        if privacy is not None:
            hparams["privacy"] = dataclasses.asdict(privacy)
        if precision is not None or activation_checkpointing is not None:
            hparams.update(precision=self.precision, activation_checkpointing=self.activation_checkpointing)
        self.save_hyperparameters(hparams)
        self.model = upcycle(model, num_experts=1, top_k=self.recipe.top_k, owners=[owner])
        if spec.public_router_embedding is not None:
            init_router(self.model, 0, torch.tensor(spec.public_router_embedding))
        self.freeze_public_model()
        self.hold_weights()
        # The spec's fingerprint is over float32 tensors; a public model held in bfloat16 is checked
        # against its own fingerprint as loaded (FreezePublicModel at fit end). None: the spec's.
        self.held_fingerprint = fingerprint(self.model) if self.public_dtype != torch.float32 else None
        if self.activation_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
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

    def hold_weights(self) -> None:
        """Hold what trains in float32 and the frozen rest in :attr:`public_dtype` (a no-op under
        ``32-true``). Called after freezing, so a subclass that trains less (LoRA: the copy of the
        MLP stays frozen) gets float32 for its trainable part alone."""
        for p in self.model.parameters():
            want = torch.float32 if p.requires_grad else self.public_dtype
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def _lm_step(self, batch):
        ids = batch["input_ids"]
        with record_router_logits(self.model) as logits:
            out = self.model(input_ids=ids, labels=ids, use_cache=False)
        return out, logits

    def training_step(self, batch, batch_idx):
        if self.private is not None:
            return self._private_step(batch)
        out, logits = self._lm_step(batch)
        z = router_z_loss(logits)
        loss = out.loss + self.recipe.z_loss_coef * z
        self._count_tokens(batch["input_ids"].numel() * self.trainer.world_size)
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

    def _count_tokens(self, n: int) -> None:
        self.tokens_seen += n
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", n / max(now - self._t_last, 1e-9), on_step=True, prog_bar=True)
        self._t_last = now

    def _private_step(self, batch):
        """One DP-SGD step (:mod:`flexmoe.training.privacy`) on a Poisson-sampled batch: each
        row's gradient on its own, clipped, summed, noised; then AdamW and the schedule."""
        opt = self.optimizers()
        ids = batch["input_ids"]

        precision = self.trainer.precision_plugin

        def loss_of(row):
            with precision.forward_context():
                out, logits = self._lm_step({"input_ids": row})
                return out.loss + self.recipe.z_loss_coef * router_z_loss(logits)

        # Only the forward passes run under bf16-mixed's autocast: Opacus's clipping sums and the
        # noise stay float32, as the float32 gradients they add up to.
        with torch.autocast(self.device.type, enabled=False):
            losses = self.private.clip_rows(opt.optimizer, ids, loss_of)
            opt.step()
        opt.zero_grad()
        self.lr_schedulers().step()
        self._count_tokens(ids.numel())
        if losses:
            loss = sum(losses) / len(losses)  # with the z-loss: no second forward for the logs
            self.log_dict({"train/loss_with_z": loss, "train/rows": float(len(losses))}, on_step=True)
            self.log("loss", loss, prog_bar=True, logger=False)
        self.log("dp/epsilon_steps", float(self.private.steps), on_step=True)

    def setup(self, stage: str) -> None:
        """Refuse a ``Trainer`` whose precision cannot run the weights as held; save checkpoints
        without a copy of them in memory (:func:`use_streaming_checkpoints`, unless the Trainer was
        given its own checkpoint IO); with DP-SGD, refuse what it cannot do and draw the training
        rows by Poisson sampling (the datamodule's train loader, replaced by
        :meth:`PrivateTraining.poisson_loader`)."""
        trainer = self.trainer
        use_streaming_checkpoints(trainer)
        if self.public_dtype != torch.float32 and trainer.precision != "bf16-mixed":
            raise InputError(
                f"this ExpertModule holds the public model in bfloat16 (precision={self.precision!r}) but the "
                f"Trainer runs precision={trainer.precision!r}: give the Trainer precision='bf16-mixed' (autocast; "
                "bf16-true would cast the float32 expert to bfloat16), or the module precision='32-true'"
            )
        if self.private is None or stage != "fit":
            return
        if _is_fsdp(getattr(trainer, "strategy", None)):
            raise InputError(
                "DP-SGD training does not run under FSDP (ModelParallelStrategy): its per-row clipping and noise "
                "need every trainable tensor whole on one process; train with one device and the default strategy"
            )
        if trainer.world_size > 1:
            raise InputError(
                f"DP-SGD training runs on one process, but this Trainer has {trainer.world_size}: the per-row "
                "clipping and noise are not implemented across processes (DDP); train with devices=1, num_nodes=1"
            )
        if trainer.accumulate_grad_batches != 1:
            raise InputError(
                "DP-SGD takes one noisy step per Poisson-sampled batch; accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} is not supported (raise the spec's batch_size instead)"
            )
        datamodule = trainer.datamodule
        if datamodule is None:
            raise InputError(
                "DP-SGD training needs its data as a LightningDataModule (a TextDataModule), so that its rows can "
                "be drawn by Poisson sampling: trainer.fit(module, datamodule=...)"
            )
        if getattr(datamodule, "_flexmoe_poisson", False):
            return
        loader = datamodule.train_dataloader
        rows = len(loader().dataset)
        self.private.calibrate(rows, self.recipe.batch_size, self._max_steps())
        datamodule.train_dataloader = lambda: self.private.poisson_loader(loader())
        datamodule._flexmoe_poisson = True

    def fsdp_strategy(self, **kwargs) -> ShardedExpertStrategy:
        """The strategy for several devices: ``Trainer(strategy=module.fsdp_strategy(), devices=8,
        precision=module.precision)`` (:class:`ShardedExpertStrategy`: Lightning's
        ``ModelParallelStrategy``, torch's FSDP2, data parallel over every device). The frozen
        public model is sharded like the rest, not replicated: each rank holds one slice of every
        tensor, in units :meth:`configure_model` applies. Runs on GPUs (NCCL) and on the CPU (gloo,
        ``accelerator="cpu"``); DP-SGD refuses it (``setup``). ``kwargs`` go to the strategy."""
        return ShardedExpertStrategy(**kwargs)

    def configure_model(self) -> None:
        """Under :class:`ShardedExpertStrategy`, shard the model with FSDP2 (``fully_shard``) on
        the strategy's data-parallel mesh; under any other strategy, nothing.

        FSDP2 gathers and reduces each unit's parameters as one group, which must have one original
        dtype. So the units are :func:`fsdp_units`: inside every decoder layer each largest frozen
        submodule (attention, norms, expert 0; sharded first: FSDP2 takes inner units before outer),
        then the layer itself, whose own group is exactly its trainable, float32 tensors (expert 1
        and the router), then the root (embeddings, final norm, LM head). Parameters stay
        ``nn.Parameter``s (``DTensor`` shards between steps, whole tensors inside a unit's forward),
        so the optimizer's groups, ``requires_grad`` and the router tensor whose frozen row is
        masked inside its forward (``trainable_rows``, a buffer, replicated) work as on one device:
        the frozen row's gradient is zero on the rank that holds it, and AdamW without decay leaves
        it unchanged. ``MixedPrecisionPolicy()`` casts nothing: the weights stay as
        :meth:`hold_weights` holds them and the precision plugin's autocast does the casting, as on
        one device (under ``ModelParallelStrategy`` Lightning's ``bf16-mixed`` is its plain
        ``MixedPrecision`` plugin, ``torch.autocast``). Called again by a later ``fit`` or
        ``validate``, it finds the model sharded and does nothing."""
        trainer = self._trainer
        if trainer is None or not _is_fsdp(trainer.strategy) or is_sharded(self.model):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy()
        units = fsdp_units(self.model)
        layers = set(decoder_layers(self.model))
        for unit in [u for u in units if u not in layers] + [u for u in units if u in layers]:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, mp_policy=policy)

    def _max_steps(self) -> int:
        trainer = self._trainer
        return trainer.max_steps if trainer is not None and trainer.max_steps > 0 else self.recipe.max_steps

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
        config = adamw_cosine(
            self,
            groups,
            lr=r.lr,
            betas=r.betas,
            warmup_steps=r.warmup_steps,
            min_lr_ratio=r.min_lr_ratio,
            max_steps=r.max_steps,
        )
        return self._private_optimizer(config) if self.private is not None else config

    def _private_optimizer(self, config: dict) -> dict:
        """``config``'s AdamW behind Opacus's ``DPOptimizer`` (its schedule rebuilt on it), with the
        frozen router rows masked out of the noise."""
        if self.private.sample_rate is None:  # no Trainer datamodule set it up (a bare call)
            raise InputError("DP-SGD's sampling rate is set in setup('fit'): train the module with a Trainer")
        frozen = {}
        for block in moe_blocks(self.model):
            router, rows = block.router, block.router.trainable_rows
            for attr in router.per_expert:
                p = getattr(router, attr)
                if isinstance(p, nn.Parameter) and p.requires_grad and rows is not None:
                    frozen[p] = rows.reshape(-1, *([1] * (p.dim() - 1))).float()
        dp = self.private.wrap(config["optimizer"], self.recipe.batch_size, frozen)
        schedule = config["lr_scheduler"]["scheduler"]
        config["optimizer"] = dp
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(dp, schedule.lr_lambdas[0])
        return config

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm, self.recipe.grad_clip)

    def on_save_checkpoint(self, checkpoint):
        """Keep what trains, not the frozen public model: the public model is reloaded from the
        spec's directory and checked against its fingerprint on resume, so saving it again would
        only cost disk and time (in bfloat16, by the parameter counts: 2.97 GB of a 1B owner's
        checkpoint, 14.6 GB of a 7B one's).
        The fingerprint is recorded so a resume against another public model is refused."""
        state = checkpoint.get("state_dict")
        if state is not None:
            for key in self._frozen_state_keys():
                state.pop(key, None)
        checkpoint["flexmoe_public_fingerprint"] = self.spec.fingerprint
        checkpoint["flexmoe_tokens_seen"] = self.tokens_seen
        if self.private is not None:
            checkpoint["flexmoe_privacy"] = self.private.state_dict()

    def on_load_checkpoint(self, checkpoint):
        recorded = checkpoint.get("flexmoe_public_fingerprint")
        if recorded is not None and recorded != self.spec.fingerprint:
            raise InputError(
                f"this checkpoint was trained against the public model {shorten(recorded)}, not this spec's "
                f"{shorten(self.spec.fingerprint)}: resume it with the spec it was trained under"
            )
        state = checkpoint.get("state_dict")
        if state is not None:
            # The frozen weights are this module's own, checked at load; a checkpoint from before
            # they were left out carries copies, which are never loaded over them.
            held = self.state_dict(keep_vars=True)
            for key in self._frozen_state_keys():
                state[key] = held[key].detach()
        self.tokens_seen = int(checkpoint.get("flexmoe_tokens_seen", 0))
        if self.private is not None:
            if "flexmoe_privacy" not in checkpoint and self.tokens_seen:
                raise InputError(
                    "this checkpoint was trained without DP-SGD; a private run cannot resume it (its steps were "
                    "never accounted): start the private run from the public model"
                )
            self.private.load_state_dict(checkpoint.get("flexmoe_privacy", {}))

    def _frozen_state_keys(self) -> list[str]:
        """The keys of :meth:`state_dict` that are frozen parameters (the public model and expert 0)."""
        named = self.model.named_parameters(remove_duplicate=False)  # a tied head has its own key
        return [f"model.{n}" for n, p in named if not p.requires_grad]

    def artifact(self, stats=None, unigram=None, bigram=None, statistics_noise: float | None = None):
        """This owner's artifact as trained so far (:attr:`artifact_class`; with the routing
        statistics ``stats`` when given: :func:`flexmoe.routing.owner_statistics`; and the token
        counts ``unigram`` and ``bigram``: :func:`flexmoe.data.statistics.token_statistics`).

        With a privacy recipe, the metadata records its guarantee (:func:`privacy_metadata`):
        the expert's epsilon so far and, when the counts were released with noise of
        ``statistics_noise`` (:func:`flexmoe.data.private_statistics.private_token_statistics`),
        the two composed.

        Under FSDP (:meth:`fsdp_strategy`) this is a collective: every rank calls it, the decoder
        layers' trainable tensors are gathered whole for it (:func:`gathered_layers`) and every
        rank gets the whole artifact (``ExportExpert`` gathers on every rank and builds it on rank
        0 alone)."""
        with gathered_layers(self.model):
            art = self.artifact_class.from_model(
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
        covers = ["expert"] if self.private is not None else []
        if statistics_noise is not None:
            covers += [name for name in TOKEN_STATISTICS if name in art.tensors]
        if covers:
            art.metadata.update(privacy_metadata(self.privacy, self.private, statistics_noise, covers))
            privacy_fields(art.metadata, self.owner)
        return art


def float32_fingerprint(model: nn.Module) -> str:
    """:func:`~flexmoe.core.hashing.fingerprint` of ``model`` as the coordinator loads it, in
    float32: each tensor upcast while hashed, 64 MB at a time (:func:`hash_tensor`), so a
    public model held in bfloat16 that was published in bfloat16 hashes to the spec's."""
    if all(t.dtype == torch.float32 for _, t in public_state(model) if t.is_floating_point()):
        return fingerprint(model)
    h = hashlib.sha256()
    for name, t in public_state(model):
        hash_tensor(h, name, t, torch.float32 if t.is_floating_point() else None)
    return h.hexdigest()


def files_fingerprint(model: nn.Module, source) -> str | None:
    """The float32 fingerprint of the public model's files in the directory ``source``, read one
    tensor at a time (safetensors, memory-mapped), under the names ``model`` gives them; ``None``
    when ``model`` is held in float32 (its own fingerprint is the one) or the files do not name
    every tensor (a tied LM head is found under the embedding it shares storage with).

    A public model published in float32 and held in bfloat16 loses bits, so its held copy cannot
    hash to the spec's fingerprint; its files still can, without a float32 copy of the model."""
    if isinstance(source, nn.Module) or not Path(source).is_dir():
        return None
    state = list(public_state(model))
    if all(t.dtype == torch.float32 for _, t in state if t.is_floating_point()):
        return None
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(Path(source).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    by_storage = {t.data_ptr(): name for name, t in state if name in where}
    h = hashlib.sha256()
    for name, t in state:
        key = name if name in where else by_storage.get(t.data_ptr())
        if key is None:
            return None
        with safe_open(where[key], "pt") as f:
            x = f.get_tensor(key)
        if x.shape != t.shape:
            return None
        hash_tensor(h, name, x, torch.float32 if x.is_floating_point() else None)
        del x
    return h.hexdigest()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :meth:`ExpertModule.configure_model` shards as FSDP2 units (besides the root):
    each decoder layer and, after it, every largest submodule inside it whose parameters are all
    frozen; the layer's own group then holds only what trains. Call it after freezing
    (``requires_grad`` decides)."""
    units = []

    def frozen_subtrees(module: nn.Module) -> None:
        for child in module.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                units.append(child)
            elif params:
                frozen_subtrees(child)

    for layer in decoder_layers(model):
        units.append(layer)
        frozen_subtrees(layer)
    return units


def _is_fsdp(strategy) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


class ShardedExpertStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (torch's FSDP2) as an owner's run uses it
    (:meth:`ExpertModule.fsdp_strategy`): data parallel over every device of every node, tensor
    parallel 1 (``"auto"`` in Lightning would make every device of a node tensor parallel, which
    this module does not implement); ``ExpertModule.configure_model`` applies the sharding. Runs
    on CUDA (NCCL) and on the CPU (gloo).

    Checkpoints are one file, written by rank 0 (``save_distributed_checkpoint=False``), holding
    what trains and not the frozen public model, as on one device (``ExpertModule.on_save_checkpoint``:
    it is reloaded from the spec's directory and checked against its fingerprint). A distributed
    (DCP) checkpoint is refused: its loader asks the files for every key of the model, the frozen
    ones too, and they are not there. To write the file, the state dict gathers only the
    trainable tensors (a collective, one tensor at a time; rank 0 keeps them on the CPU), never
    the public model; on resume every rank reads the file (memory-mapped) and keeps its own
    shards, and the frozen weights stay those the module loaded and checked.

    Args:
        data_parallel_size: ``"auto"`` (every device) or the number of devices.
        kwargs: the rest of ``ModelParallelStrategy``'s arguments (``process_group_backend``,
            ``timeout``).
    """

    def __init__(self, data_parallel_size: int | str = "auto", save_distributed_checkpoint: bool = False, **kwargs):
        if save_distributed_checkpoint:
            raise InputError(
                "an owner's checkpoint leaves the frozen public weights out, and a distributed (DCP) checkpoint "
                "cannot be loaded without them: use save_distributed_checkpoint=False (one file from rank 0)"
            )
        tensor_parallel = kwargs.pop("tensor_parallel_size", 1)
        if tensor_parallel not in (1, "auto"):
            raise InputError(f"tensor parallelism is not implemented for an owner's expert (got {tensor_parallel})")
        super().__init__(data_parallel_size, 1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        """Lightning's setup, with validation, test and prediction under ``no_grad`` rather than
        ``inference_mode``: a forward pass in inference mode would leave FSDP2 with gather buffers
        that training cannot use afterwards ("Inplace update to inference tensor outside
        InferenceMode", seen on the CPU when the first forward ran in inference mode). Lightning
        makes the same switch itself for its FSDP1 strategy and under gloo, not under
        ``ModelParallelStrategy`` with NCCL, where the sanity check's validation would otherwise be
        the first forward."""
        loops = (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
        for loop in loops:
            loop.inference_mode = False
        super().setup(trainer)

    def lightning_module_state_dict(self) -> dict:
        """What trains, whole, on rank 0 (empty elsewhere); the frozen keys are left out here,
        before they are gathered, rather than by ``on_save_checkpoint`` after."""
        module = self.lightning_module
        reshard(module)  # a gathered root would read whole, not as DTensor shards
        frozen = set(module._frozen_state_keys())
        out = {}
        for key, t in module.state_dict().items():
            if key in frozen:
                continue
            whole = t.full_tensor() if hasattr(t, "full_tensor") else t  # an all-gather: same keys, same order
            if self.global_rank == 0:
                out[key] = whole.detach().cpu()
        return out

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Lightning's loading of a single-file checkpoint into the shards, with the frozen
        public keys allowed to be missing (they are the module's own) and every other key still
        required when ``strict_loading`` is on. Always ``weights_only``: an owner's checkpoint holds
        tensors and plain values, and nothing in it is unpickled as code, whatever the caller asked.
        The key check reads the file memory-mapped, so it reads the pickled structure, not the
        tensors' bytes, before Lightning loads it."""
        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise InputError(f"{path} is a distributed checkpoint directory; an owner's run resumes from one file")
        strict = module.strict_loading
        if strict:
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True).get("state_dict", {})
            frozen = set(module._frozen_state_keys())
            missing = sorted(k for k in module.state_dict() if k not in frozen and k not in saved)
            if missing:
                raise InputError(f"the checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
        module.strict_loading = False
        try:
            return super().load_checkpoint(path, weights_only=True)
        finally:
            module.strict_loading = strict


def expert_callbacks(spec: FederationSpec, out: str | os.PathLike, public_documents=None) -> list[pl.Callback]:
    """The callbacks that make an owner's run produce a valid expert: freeze and verify the
    public model, initialise the router row, export the artifact (and proxy set), log routing."""
    return [
        FreezePublicModel(spec.fingerprint),
        RouterEmbeddingInit.from_spec(spec),
        ExportExpert(out, public_documents=public_documents),
        RouterStats(),
    ]
