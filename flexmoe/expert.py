"""The data owner's side: train one FlexOlmo expert against the frozen public model.

FlexOlmo section 3.2 / DESIGN.md step 2: the public model is upcycled into a 2-expert MoE
(expert 0 = the public MLP, expert 1 = a copy); only expert 1, its router row ``r_1`` and
its bias ``beta_1`` train, with LM loss + router z-loss, AdamW(0.9, 0.95), weight decay 0,
cosine schedule with warmup and gradient clipping 1.0.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.text import Perplexity

from flexmoe.artifact import ExpertArtifact
from flexmoe.moe import record_router_logits, router_z_loss
from flexmoe.spec import ExpertRecipe, FederationSpec
from flexmoe.upcycle import fingerprint, moe_blocks, upcycle


def load_public_model(public_model: str | Path | nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A local ``transformers`` directory or a hub id (loaded with ``from_pretrained``), or a model object."""
    if isinstance(public_model, nn.Module):
        return public_model
    from transformers import AutoModelForCausalLM

    path = Path(public_model)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(public_model), dtype=dtype)


def freeze_public(model: nn.Module, trainable: tuple[int, ...] = (1,)) -> list[nn.Parameter]:
    """Freeze everything of the public model; leave the experts in ``trainable`` and their
    router rows and biases trainable. Returns the trainable parameters.

    Router rows of frozen experts share one tensor with the trainable rows; the router
    detaches them (:meth:`~flexmoe.moe.Router.freeze_rows`) and gets no weight decay (see
    :meth:`ExpertModule.configure_optimizers`), so ``r_0`` stays bit-for-bit unchanged.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable_params: list[nn.Parameter] = []
    for block in moe_blocks(model):
        for j in trainable:
            for p in block.experts[j].parameters():
                p.requires_grad_(True)
                trainable_params.append(p)
        block.router.freeze_rows(trainable)
        for p in (block.router.weight, block.router.bias):
            p.requires_grad_(True)
            trainable_params.append(p)
    return trainable_params


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_cosine(
    module: pl.LightningModule, groups, *, lr, betas, warmup_steps, min_lr_ratio, max_steps, offset: int = 0,
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


class ExpertModule(pl.LightningModule):
    """Trains one owner's expert (FlexOlmo section 3.2) in any Lightning ``Trainer``.

    >>> spec = FederationSpec.load("spec.json")
    >>> module = ExpertModule(spec.public_model, spec, owner="clinic")
    >>> data = TextDataModule("notes/", spec.public_model, seq_len=spec.expert.seq_len, batch_size=spec.expert.batch_size)
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
            raise ValueError(
                f"the public model does not match the spec: fingerprint {fp[:16]}... but the spec "
                f"expects {spec.fingerprint[:16]}...; load the exact public model the coordinator published"
            )
        self.spec = spec
        self.owner = owner
        self.save_hyperparameters({"spec": spec.to_dict(), "owner": owner})
        self.model = upcycle(model, num_experts=1, top_k=self.recipe.top_k, owners=[owner])
        if spec.public_router_embedding is not None:
            from flexmoe.embed import init_router

            init_router(self.model, 0, torch.tensor(spec.public_router_embedding))
        freeze_public(self.model)
        self.model.train()  # from_pretrained returns eval mode; dropout etc. follow the Trainer from here
        self.val_ppl = Perplexity()
        self.tokens_seen = 0
        self._t_last: float | None = None

    @property
    def recipe(self) -> ExpertRecipe:
        return self.spec.expert

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
            usage = torch.stack([(l.argmax(-1) == 1).float().mean() for l in logits]).mean()
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
        return adamw_cosine(self, groups, lr=r.lr, betas=r.betas, warmup_steps=r.warmup_steps,
                            min_lr_ratio=r.min_lr_ratio, max_steps=r.max_steps)  # fmt: skip

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # The recipe's clipping applies even when the Trainer was built without gradient_clip_val.
        clip = gradient_clip_val if gradient_clip_val is not None else self.recipe.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["flexmoe_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = int(checkpoint.get("flexmoe_tokens_seen", 0))

    def artifact(self, stats=None):
        """This owner's artifact as trained so far (:attr:`artifact_class`; with the routing
        statistics ``stats`` when given: :func:`flexmoe.routing.owner_statistics`)."""
        return self.artifact_class.from_model(
            self.model,
            owner=self.owner,
            expert=1,
            spec_sha256=self.spec.sha256,
            training_tokens=self.tokens_seen,
            fingerprint=self.spec.fingerprint,
            stats=stats,
        )


def expert_callbacks(spec: FederationSpec, out: str | os.PathLike, public_documents=None) -> list[pl.Callback]:
    """The callbacks that make an owner's run produce a valid expert: freeze and verify the
    public model, initialise the router row, export the artifact (and proxy set), log routing."""
    from flexmoe.callbacks import ExportExpert, FreezePublicModel, RouterEmbeddingInit, RouterStats

    return [
        FreezePublicModel(spec.fingerprint),
        RouterEmbeddingInit.from_spec(spec),
        ExportExpert(out, public_documents=public_documents),
        RouterStats(),
    ]


def train_expert_cli(args: list[str] | None = None) -> None:
    """``flexmoe train-expert``: one owner's training run from the command line.

    Built on :class:`~lightning.pytorch.cli.LightningCLI`, so every ``Trainer`` and
    ``TextDataModule`` option is available as ``--trainer.*`` / ``--data.*`` or from
    ``--config cfg.yaml``. The spec fixes the public model, the sequence length and batch size
    (``--data.*`` options other than those stay free), and the callbacks that make an expert
    valid are always attached.
    """
    from lightning.pytorch.cli import LightningCLI

    from flexmoe.data import TextDataModule

    class ExpertCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_argument("--spec", type=str, required=True, help="FederationSpec JSON from the coordinator")
            parser.add_argument("--owner", type=str, required=True, help="this owner's name")
            parser.add_argument("--out", type=str, required=True, help="where to write the expert artifact")
            parser.add_argument("--max_steps", type=int | None, default=None, help="default: the spec's recipe")
            parser.add_argument("--public_data", type=list[str] | None, default=None,
                                help="public corpus to select the proxy set from")  # fmt: skip
            parser.link_arguments("spec", "model.spec")
            parser.link_arguments("owner", "model.owner")
            parser.link_arguments("spec", "model.public_model", compute_fn=_spec_public_model)
            parser.link_arguments("spec", "data.tokenizer", compute_fn=_spec_public_model)
            parser.link_arguments("spec", "data.seq_len", compute_fn=lambda s: FederationSpec.load(s).expert.seq_len)
            parser.link_arguments("spec", "data.batch_size", compute_fn=lambda s: FederationSpec.load(s).expert.batch_size)

        def before_instantiate_classes(self):
            cfg = self.config
            spec = FederationSpec.load(cfg.spec)
            out = Path(cfg.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
                raise PermissionError(f"cannot write the expert artifact to {out}")
            cfg.trainer.max_steps = cfg.max_steps or (
                cfg.trainer.max_steps if cfg.trainer.max_steps not in (None, -1) else spec.expert.max_steps
            )
            self._spec = spec

        def after_instantiate_classes(self):
            cfg = self.config
            public_docs = None
            if cfg.public_data:
                from flexmoe.data import read_documents

                public_docs = read_documents(cfg.public_data)
            self.trainer.callbacks.extend(expert_callbacks(self._spec, cfg.out, public_docs))

    argv = _expert_argv(sys.argv[1:] if args is None else list(args))
    cli = ExpertCLI(
        _module_class(argv),
        TextDataModule,
        args=argv,
        run=False,
        save_config_callback=None,
        trainer_defaults={"gradient_clip_val": None, "log_every_n_steps": 10},
        seed_everything_default=0,
        parser_kwargs={"prog": "flexmoe train-expert", "description": train_expert_cli.__doc__.split("\n\n")[0]},
    )
    cli.trainer.fit(cli.model, cli.datamodule)


def _expert_argv(argv: list[str]) -> list[str]:
    """Accept ``--data A B`` (the owner's text), several ``--public-data`` paths and dashed
    option names (``--max-steps``). LightningCLI's own ``--data`` is the datamodule group, so
    ``--data PATH...`` is shorthand for ``--data.sources '[PATH, ...]'``."""
    from flexmoe.cli import normalize_options

    argv = normalize_options(argv, {"data": "list", "public_data": "list"})
    return ["--data.sources" if a == "--data" else a for a in argv]


def _module_class(argv: list[str]) -> type[ExpertModule]:
    """:class:`ExpertModule`, or :class:`flexmoe.lora.LoraExpertModule` when the spec named by
    ``--spec`` sets ``expert.lora_rank`` (a LoRA-sized expert)."""
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--spec"), None)
    spec = spec or next((a.split("=", 1)[1] for a in argv if a.startswith("--spec=")), None)
    if spec and Path(spec).is_file() and FederationSpec.load(spec).expert.lora_rank:
        from flexmoe.lora.expert import LoraExpertModule

        return LoraExpertModule
    return ExpertModule


def _spec_public_model(path: str) -> str:
    return FederationSpec.load(path).public_model
