"""Branch-Train-MiX (Sukhbaatar et al., 2024, "Branch-Train-MiX: Mixing Expert LLMs into a
Mixture-of-Experts LLM", section 2).

1. **Branch**: copies of one seed LM. 2. **Train**: each copy fully fine-tuned on its own domain
(e.g. with :class:`flexmoe.training.pretrain.PretrainModule`), giving dense "expert LMs".
3. **MiX** (:func:`btx`): one MoE in which every decoder layer's feed-forward block becomes a
mixture of the experts' feed-forward blocks, and every other parameter (embeddings,
attention, norms, output head) is the experts' average; then **MoE-finetune**
(:class:`MoEFinetune`) the whole model with a learned router on the combined data::

    y = sum_{i in top-k} g_i(x) FF_i(x)      g(x) = softmax(top-k(W x))    (BTX eq. 1)

``softmax(top-k(W x))`` is the softmax over the kept logits, i.e. flexmoe's router with the
top-k weights renormalised (``normalize=True``, as Mixtral) and without router biases (they stay
0 and are never trained, so the model exports exactly to FlexOlmo or Mixtral). BTX routes the
top 2 experts and adds the Switch-Transformer load-balancing loss with coefficient 0.01. When a
``seed_model`` is given it joins as an expert too (BTX keeps the seed LM as a fourth, generalist
expert next to its math, code and Wikipedia experts) and enters the average of the other
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from flexmoe.core.moe import load_balancing_loss, record_router_logits
from flexmoe.core.surgery import decoder_layers, is_moe, moe_blocks, set_top_k, settings, upcycle
from flexmoe.merge.soup import average
from flexmoe.owner.embed import init_router
from flexmoe.training.optim import adamw_cosine, clip_gradients, decay_groups

RouterInit = Literal["random", "embedding"]
BTX_TOP_K = 2
BTX_BALANCE_COEF = 0.01


def btx(
    dense_experts: Sequence[nn.Module],
    seed_model: nn.Module | None = None,
    *,
    router_init: RouterInit = "random",
    top_k: int = BTX_TOP_K,
    seed: int = 0,
    embeddings: Sequence[torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> nn.Module:
    """Mix dense expert LMs into one flexmoe MoE (BTX's "MiX" step); the inputs are not modified.

    Experts, in order: ``seed_model`` (if given), then ``dense_experts``. Expert ``j``'s MLP in
    every layer is exactly expert LM ``j``'s MLP; every other parameter is the uniform average of
    all of them (:func:`flexmoe.merge.average`). So if every expert LM is the same model, the
    result computes that model, whatever the router does.

    Args:
        dense_experts: ``transformers`` causal LMs of one architecture, branched from one seed
            (dense, not flexmoe MoEs).
        seed_model: the seed LM they were branched from, kept as expert 0 (``None``: leave it out).
        router_init: ``"random"``: router rows drawn from ``N(0, initializer_range²)`` with a
            generator seeded by ``seed`` (BTX); ``"embedding"``: row ``j`` of every layer is
            ``embeddings[j]`` (FlexOlmo's domain-embedding initialisation, e.g. from
            :func:`flexmoe.owner.embed.router_embedding` on expert ``j``'s training text).
        top_k: experts per token (BTX: 2).
        embeddings: one ``[H]`` or ``[layers, H]`` tensor per expert, for ``router_init="embedding"``.
        names: owner names of experts ``1 ..`` (default ``expert_1 ...``); flexmoe's MoE format
            names expert 0 ``public`` (with a seed model, that is the seed).

    Returns the MoE (a ``transformers`` model whose MLPs are :class:`~flexmoe.MoEBlock`), with
    ``normalize=True`` (BTX's softmax over the top-k logits) and router biases at 0 and frozen.
    """
    experts = list(dense_experts)
    if not experts:
        raise ValueError("btx needs at least one dense expert LM")
    members = ([seed_model] if seed_model is not None else []) + experts
    for i, m in enumerate(members):
        if is_moe(m):
            raise ValueError(
                f"btx mixes dense LMs, but {'the seed model' if seed_model is not None and i == 0 else f'expert {i}'} "
                "is already a flexmoe MoE"
            )
    kinds = {getattr(m.config, "model_type", type(m).__name__) for m in members}
    if len(kinds) != 1:
        raise ValueError(f"btx needs expert LMs of one architecture, got {sorted(kinds)}")
    n = len(members)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be between 1 and the number of experts ({n}), got {top_k!r}")
    if router_init not in ("random", "embedding"):
        raise ValueError(f"router_init must be 'random' or 'embedding', got {router_init!r}")
    if router_init == "embedding":
        if embeddings is None or len(embeddings) != n:
            got = "none" if embeddings is None else len(embeddings)
            raise ValueError(
                f"router_init='embedding' needs one embedding per expert ({n}, the seed model first "
                f"if given), got {got}; e.g. flexmoe.owner.embed.router_embedding(texts_j, model)"
            )
    elif embeddings is not None:
        raise ValueError("embeddings are only used with router_init='embedding'")
    if names is not None and len(names) != n - 1:
        raise ValueError(f"names gives the owners of experts 1..{n - 1}: {n - 1} names, got {len(names)}")

    # A deep copy of members[0] holding the average of every parameter (average() raises, naming
    # the tensor, if the architectures differ); its MLPs are replaced by the experts' below.
    model = average(members)
    upcycle(model, num_experts=n - 1, owners=list(names) if names is not None else None, normalize=True)
    blocks = moe_blocks(model)
    with torch.no_grad():
        for j, member in enumerate(members):
            for block, layer in zip(blocks, decoder_layers(member)):
                block.experts[j].load_state_dict(layer.mlp.state_dict())
        _init_router(model, blocks, router_init, seed, embeddings)
    set_top_k(model, top_k)
    return model


def _init_router(model, blocks, router_init, seed, embeddings) -> None:
    for block in blocks:
        block.router.bias.zero_()
        block.router.bias.requires_grad_(False)  # BTX's router has no bias
    if router_init == "embedding":
        for j, rows in enumerate(embeddings):
            init_router(model, j, rows)
        return
    std = float(getattr(model.config, "initializer_range", 0.02))
    g = torch.Generator().manual_seed(seed)
    for block in blocks:
        w = block.router.weight
        w.copy_((torch.randn(w.shape, generator=g, dtype=torch.float32) * std).to(w.dtype))


class MoEFinetune(pl.LightningModule):
    """BTX's MoE-finetuning stage (Sukhbaatar et al., 2024, section 2.3) in any Lightning ``Trainer``.

    Loss: LM cross-entropy + ``balance_coef`` x the load-balancing loss
    (:func:`flexmoe.load_balancing_loss` over every layer's router logits, top-k as the model
    routes; BTX: 0.01). AdamW with linear warmup and cosine decay
    (:func:`flexmoe.training.optim.adamw_cosine`), weight decay on matrices only, gradient clipping.

    Args:
        model: a flexmoe MoE, e.g. from :func:`btx`.
        train: ``"all"`` (BTX's choice and the default: every parameter is finetuned, the
            averaged attention and embeddings included) or ``"moe"`` (experts and router only;
            everything else frozen). Router biases stay frozen at 0 either way.

    Logs ``train/loss`` (the total), ``train/lm_loss``, ``train/balance_loss``, ``train/ppl`` and,
    when validating, ``val/loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train: Literal["all", "moe"] = "all",
        balance_coef: float = BTX_BALANCE_COEF,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        max_steps: int = 1000,
        grad_clip: float = 1.0,
    ):
        super().__init__()
        if not is_moe(model):
            raise TypeError(f"{type(model).__name__} is a dense model; MoEFinetune trains a flexmoe MoE (see btx())")
        if train not in ("all", "moe"):
            raise ValueError(f"train must be 'all' (BTX: every parameter) or 'moe' (experts and router), got {train!r}")
        if balance_coef < 0:
            raise ValueError(f"balance_coef must be >= 0, got {balance_coef}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        for p in model.parameters():
            p.requires_grad_(train == "all")
        for block in moe_blocks(model):
            block.router.freeze_rows(None)
            for p in [*block.experts.parameters(), block.router.weight]:
                p.requires_grad_(True)
            block.router.bias.requires_grad_(False)
        self.model.train()

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        with record_router_logits(self.model) as logits:
            lm = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        balance = load_balancing_loss(logits, settings(self.model).effective_top_k())
        loss = lm + self.hparams.balance_coef * balance
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/lm_loss": lm.detach(),
                "train/balance_loss": balance.detach(),
                "train/ppl": lm.detach().exp(),
            },
            on_step=True,
        )
        self.log("loss", lm.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=ids.shape[0])

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
