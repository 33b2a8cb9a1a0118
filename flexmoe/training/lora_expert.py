"""The owner's side of a LoRA-sized FlexOlmo expert.

Everything is FlexOlmo's owner recipe (:class:`~flexmoe.ExpertModule`: 2-expert MoE, public
expert, attention, embeddings and ``r_0`` frozen; LM loss + router z-loss; AdamW, cosine, clip)
except that expert 1 is not trained in full: its linear layers (a copy of the public MLP) stay
frozen and a rank-``r`` LoRA (Hu et al., 2021) on each of them trains instead, through ``peft``.
The upload is then the factors alone (:class:`~flexmoe.lora.LoraExpertArtifact`):
``r * (in + out)`` numbers per linear instead of ``in * out``.
"""

from __future__ import annotations

from torch import nn

from flexmoe.artifacts.lora import LoraExpertArtifact
from flexmoe.core.surgery import moe_blocks
from flexmoe.spec import FederationSpec, PrivacyRecipe
from flexmoe.training.expert import ExpertModule
from flexmoe.training.optim import adamw_cosine


class LoraExpertModule(ExpertModule):
    """Trains one owner's expert as a LoRA on the copy of the public MLP, in any Lightning ``Trainer``.

    >>> spec = FederationSpec.load("spec.json")            # spec.expert.lora_rank = 8
    >>> module = LoraExpertModule(spec.public_model, spec, owner="clinic")
    >>> trainer = pl.Trainer(max_steps=spec.expert.max_steps, callbacks=expert_callbacks(spec, "clinic.safetensors"))
    >>> trainer.fit(module, data)                           # writes a LoraExpertArtifact

    Args:
        public_model, spec, owner, check_fingerprint, privacy, precision, activation_checkpointing:
            as for :class:`~flexmoe.ExpertModule` (with DP-SGD, only the LoRA factors and the router
            get per-row gradients and noise; under ``bf16-mixed`` the copy of the MLP is held in
            bfloat16 like the rest of the frozen model, the factors in float32).
        rank: LoRA rank; default ``spec.expert.lora_rank`` (one of the two must be set; if both
            are, they must agree, since the spec fixes the recipe).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. Default ``2 * rank``.
        target_modules: names of the MLP's linear layers to adapt; default all of them.
    """

    artifact_class = LoraExpertArtifact  # only the LoRA factors travel

    def __init__(
        self,
        public_model: str | nn.Module,
        spec: FederationSpec | str | None = None,
        owner: str = "owner",
        check_fingerprint: bool = True,
        rank: int | None = None,
        alpha: float | None = None,
        target_modules: list[str] | None = None,
        privacy: PrivacyRecipe | None = None,
        precision: str | None = None,
        activation_checkpointing: bool | None = None,
    ):
        super().__init__(public_model, spec, owner, check_fingerprint, privacy, precision, activation_checkpointing)
        from peft import LoraConfig, inject_adapter_in_model  # deferred: peft is an optional extra (flexmoe[lora])

        spec_rank = self.recipe.lora_rank
        if rank is None and spec_rank is None:
            raise ValueError("a LoRA expert needs a rank: set the spec's expert.lora_rank (or pass rank=...)")
        if rank is not None and spec_rank is not None and rank != spec_rank:
            raise ValueError(
                f"rank={rank} contradicts the spec's expert.lora_rank={spec_rank}; the spec fixes the recipe"
            )
        rank = rank if rank is not None else spec_rank
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        alpha = float(2 * rank if alpha is None else alpha)
        mlp = moe_blocks(self.model)[0].experts[1]
        linears = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
        targets = list(target_modules) if target_modules is not None else linears
        unknown = [t for t in targets if t not in linears]
        if not targets or unknown:
            raise ValueError(f"target_modules must name linear layers of the MLP {linears}; got {targets}")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
        for block in moe_blocks(self.model):
            # Only expert 1's MLP gets LoRA layers; the public expert and the rest stay untouched.
            inject_adapter_in_model(config, block.experts[1])
        self.lora_rank, self.lora_alpha, self.lora_targets = rank, alpha, targets
        self.hparams.update(rank=rank, alpha=alpha, target_modules=targets)
        self.freeze_public_model()  # again: the LoRA layers did not exist when ExpertModule froze
        self.hold_weights()  # the factors in float32, whatever dtype peft made them in

    def freeze_public_model(self, trainable: tuple[int, ...] = (1,)) -> None:
        """As :meth:`ExpertModule.freeze_public_model`, except that of each trainable expert only
        the LoRA factors train; its own weights (the public MLP's copy) stay frozen."""
        super().freeze_public_model(trainable)
        for block in moe_blocks(self.model):
            for j in trainable:
                for name, p in block.experts[j].named_parameters():
                    p.requires_grad_(".lora_" in f".{name}")

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for b in moe_blocks(self.model) for n, p in b.experts[1].named_parameters() if ".lora_" in f".{n}"]

    def configure_optimizers(self):
        r = self.recipe
        routers = [p for b in moe_blocks(self.model) for p in (b.router.weight, b.router.bias)]
        groups = [
            {"params": self.lora_parameters(), "weight_decay": r.weight_decay},
            # No decay on the router: decay would move the frozen rows that share its tensor.
            {"params": routers, "weight_decay": 0.0},
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
