"""The coordinator's router tuning (FlexOlmo section 3.4; docs/design.md, step 8).

After the merge, every expert and every other parameter stays frozen; only the router rows
(and, optionally, the owners' biases) of every layer train, on a uniform mixture of the
owners' proxy sets and the public data, with all experts active (top-k = all). The recipe
(lr 2e-3, warmup, weight decay 0.1) comes from :class:`~flexmoe.spec.RouterTuningRecipe`.

>>> merged = flexmoe.assemble(public, ["a.safetensors", "b.safetensors"], top_k=2)
>>> report = tune_router(merged, proxy_documents={"a": a_proxy, "b": b_proxy},
...                      public_documents=public_docs, tokenizer=tokenizer, recipe=spec.router_tuning)

:class:`RouterTuning` is the ``LightningModule`` behind it, for users who bring their own
``Trainer`` and data: it refuses to finish if any parameter but the routers' moved.

Federated router tuning (``RouterTuningRecipe.data="owners"``) runs the same module in rounds:
each participant takes :func:`local_router_round` on its own text, the coordinator combines the
rows (:func:`aggregate_router_rows`); :mod:`flexmoe.federation` carries the rows over Flower, and
:func:`router_rounds_in_process` computes the same rounds in one process, for studies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
from transformers import AutoTokenizer

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import hash_tensor
from flexmoe.core.surgery import is_moe, moe_blocks, settings
from flexmoe.data.packing import pack_documents
from flexmoe.spec import RouterTuningRecipe
from flexmoe.training.optim import adamw_cosine

# The schedule decays to this fraction of the peak lr (the recipe fixes lr, warmup and decay).
MIN_LR_RATIO = 0.1


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every layer's router weight ``[E, H]`` and raw bias ``[E]``."""
    return [p for b in moe_blocks(model) for p in (b.router.weight, b.router.bias)]


def frozen_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer except the routers', by sorted name.

    Router tuning must leave this unchanged: the experts and the public model are not its to move.
    """
    routers = {id(p) for p in router_parameters(model)}
    h = hashlib.sha256()
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    for name in sorted(named):
        t = named[name]
        if t is None or id(t) in routers:
            continue
        hash_tensor(h, name, t)  # no copy of each tensor's bytes (a merged 7B's experts are GBs)
    return h.hexdigest()


class RouterTuning(pl.LightningModule):
    """Tunes only the routers of a merged flexmoe MoE (FlexOlmo section 3.4).

    Args:
        model: a merged flexmoe MoE (``flexmoe.assemble`` / ``flexmoe.load``).
        recipe: lr, warmup, weight decay, steps, whether biases train; FlexOlmo's defaults.
            ``recipe.train_bias`` is off by default: the ``transformers`` FlexOlmo and Mixtral
            routers have no bias, so a biased router would keep the merged model from exporting
            exactly (the public expert's bias is 0 whatever happens).

    During fit every expert is active (``top_k`` = all); the model's own ``top_k`` is restored
    at the end. The batches are ``{"input_ids": [B, T]}`` like :class:`~flexmoe.TextDataModule`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: RouterTuningRecipe | None = None,
        *,
        step_offset: int = 0,
        total_steps: int | None = None,
    ):
        super().__init__()
        # One round of federated tuning is a slice of one schedule: steps [offset, offset + max_steps)
        # of ``total_steps``.
        self.step_offset, self.total_steps = step_offset, total_steps
        if not is_moe(model):
            raise ValueError(
                "RouterTuning needs a merged flexmoe MoE (flexmoe.assemble or flexmoe.load), got a dense model"
            )
        self.model = model
        self.recipe = recipe or RouterTuningRecipe()
        self.save_hyperparameters({"recipe": vars(self.recipe)})
        for p in model.parameters():
            p.requires_grad_(False)
        for block in moe_blocks(model):
            block.router.freeze_rows(None)  # every row, the public one included, may move
            block.router.weight.requires_grad_(True)
            block.router.bias.requires_grad_(self.recipe.train_bias)
        self._top_k: int | None = None
        self._digest: str | None = None

    def on_fit_start(self) -> None:
        s = settings(self.model)
        self._top_k = s.top_k
        s.top_k = None  # all experts during tuning (FlexOlmo 3.4)
        self._digest = frozen_digest(self.model)
        self.model.train()

    def on_fit_end(self) -> None:
        settings(self.model).top_k = self._top_k
        self.model.eval()
        if frozen_digest(self.model) != self._digest:
            raise RuntimeError("router tuning moved a parameter other than the routers; the merged model is not valid")

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("router_tuning/loss", loss.detach(), on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        r = self.recipe
        params = [p for p in router_parameters(self.model) if p.requires_grad]
        groups = [{"params": params, "weight_decay": r.weight_decay}]
        return adamw_cosine(
            self,
            groups,
            lr=r.lr,
            betas=(0.9, 0.95),
            warmup_steps=r.warmup_steps,
            min_lr_ratio=MIN_LR_RATIO,
            max_steps=r.max_steps,
            offset=self.step_offset,
            total=self.total_steps,
        )


def mixture_loader(
    sources: Mapping[str, torch.Tensor], *, batch_size: int, num_samples: int, seed: int = 0
) -> DataLoader:
    """Batches drawn from a uniform mixture of ``sources`` (name -> packed rows ``[N_i, T]``):
    each row is sampled with probability ``1 / (len(sources) * N_i)``, whatever the sizes."""
    names = [n for n, rows in sources.items() if len(rows)]
    if not names:
        raise ValueError("router tuning has no data: every proxy set and the public data are empty")
    rows = torch.cat([sources[n] for n in names])
    weights = torch.cat([torch.full((len(sources[n]),), 1.0 / (len(names) * len(sources[n]))) for n in names])
    g = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(weights.double(), num_samples=num_samples, replacement=True, generator=g)
    return DataLoader(TensorDataset(rows), batch_size=batch_size, sampler=sampler, collate_fn=_ids_batch)


def _ids_batch(items) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([row for (row,) in items])}


def _trainer_kwargs(model: nn.Module, steps: int, callbacks: list, extra: dict | None) -> dict:
    kwargs = {
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "cpu" if next(model.parameters()).device.type == "cpu" else "auto",
        "devices": 1,
        "callbacks": callbacks,
    }
    kwargs.update(extra or {})
    return kwargs


def tune_router(
    model: nn.Module,
    *,
    proxy_documents: Mapping[str, Sequence[str]],
    public_documents: Sequence[str],
    tokenizer,
    recipe: RouterTuningRecipe | None = None,
    max_documents_per_source: int = 2000,
    seed: int = 0,
    trainer_kwargs: dict | None = None,
) -> dict:
    """Tune ``model``'s routers in place on the owners' proxy sets and the public data.

    Args:
        model: merged flexmoe MoE.
        proxy_documents: owner name -> that owner's proxy documents (texts of public documents).
        public_documents: the public data.
        tokenizer: the public model's tokenizer (object, or a directory/hub id).
        recipe: steps, batch size, sequence length, lr, warmup, weight decay, whether biases
            train (FlexOlmo's defaults; see :class:`RouterTuning`).
        max_documents_per_source: cap on documents tokenised per source (the mixture is uniform
            over sources, so a larger public corpus only costs time).
        trainer_kwargs: extra ``lightning.Trainer`` arguments.

    Returns:
        a summary: steps, the mixture's rows per source, and the loss at the first and last step.
    """
    recipe = recipe or RouterTuningRecipe()
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    sources = {f"proxy:{owner}": docs for owner, docs in proxy_documents.items()}
    sources["public"] = public_documents
    packed = {
        name: pack_documents(docs, tokenizer, recipe.seq_len, max_documents_per_source)
        for name, docs in sources.items()
    }
    loader = mixture_loader(
        packed, batch_size=recipe.batch_size, num_samples=recipe.max_steps * recipe.batch_size, seed=seed
    )
    module = RouterTuning(model, recipe)
    losses = _LossLog()
    trainer = pl.Trainer(**_trainer_kwargs(model, recipe.max_steps, [losses], trainer_kwargs))
    trainer.fit(module, train_dataloaders=loader)
    return {
        "steps": len(losses.values),
        "rows": {name: len(rows) for name, rows in packed.items()},
        "loss_first": losses.values[0] if losses.values else None,
        "loss_last": losses.values[-1] if losses.values else None,
    }


class _LossLog(pl.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self.values.append(float(loss))


# -- federated router tuning (RouterTuningRecipe.data == "owners") ---------------------------------


def router_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's router, as it travels in a round of federated router tuning: float32 copies
    of the rows ``layers.{L}.router.weight`` ``[E, H]`` and raw biases ``layers.{L}.router.bias`` ``[E]``."""
    out = {}
    for L, b in enumerate(moe_blocks(model)):
        out[f"layers.{L}.router.weight"] = b.router.weight.detach().float().clone()
        out[f"layers.{L}.router.bias"] = b.router.bias.detach().float().clone()
    return out


def check_router_rows(rows: Mapping[str, torch.Tensor], model: nn.Module, who: str) -> None:
    """Refuse routers from another party unless they fit ``model`` exactly: the same names and
    shapes, float32, finite. ``who`` names the sender in the error (an :class:`ArtifactError`)."""
    expected = router_rows(model)
    if set(rows) != set(expected):
        missing, extra = sorted(set(expected) - set(rows)), sorted(set(rows) - set(expected))
        raise ArtifactError(
            who,
            "router tensors",
            f"the {len(expected)} of layers.L.router.{{weight,bias}}",
            f"missing {missing}, extra {extra}",
        )
    for name, ref in expected.items():
        t = rows[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ArtifactError(who, f"shape of {name}", list(ref.shape), list(t.shape))
        if t.dtype != torch.float32:
            raise ArtifactError(who, f"dtype of {name}", "float32", str(t.dtype).removeprefix("torch."))
        if not torch.isfinite(t).all():
            raise ArtifactError(who, f"values of {name}", "finite numbers", "NaN or Inf")


def set_router_rows(model: nn.Module, rows: Mapping[str, torch.Tensor]) -> None:
    """Load routers from :func:`router_rows` (check them with :func:`check_router_rows` first)."""
    with torch.no_grad():
        for L, block in enumerate(moe_blocks(model)):
            block.router.weight.copy_(rows[f"layers.{L}.router.weight"].to(block.router.weight.dtype))
            block.router.bias.copy_(rows[f"layers.{L}.router.bias"].to(block.router.bias.dtype))


def aggregate_router_rows(
    start: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    *,
    server_lr: float | None = None,
) -> dict[str, torch.Tensor]:
    """One round's aggregate: ``start + server_lr * mean_i(update_i - start)``, every participant
    weighted equally (each source counts once, as in FlexOlmo's uniform mixture of sources).
    ``server_lr=1`` is plain FedAvg (the mean of the updates); ``None`` is the number of
    participants (the sum of their changes)."""
    if not updates:
        raise ValueError("no router rows to aggregate")
    server_lr = len(updates) if server_lr is None else server_lr
    out = {}
    for name, s0 in start.items():
        s0 = s0.float()
        out[name] = s0 + server_lr * (torch.stack([u[name].float() for u in updates]).mean(dim=0) - s0)
    return out


def local_router_round(
    model: nn.Module,
    rows: torch.Tensor,
    recipe: RouterTuningRecipe,
    round_index: int,
    *,
    seed: int = 0,
    trainer_kwargs: dict | None = None,
) -> dict:
    """One participant's share of one round of federated router tuning: ``recipe.local_steps``
    steps of :class:`RouterTuning` on ``rows`` (its own packed text, ``[N, T]``), continuing the
    one cosine schedule of all rounds. Changes ``model``'s routers in place; returns the steps and
    the first and last loss. The caller sends :func:`router_rows` back."""
    steps = recipe.local_steps
    loader = mixture_loader(
        {"data": rows},
        batch_size=recipe.batch_size,
        num_samples=steps * recipe.batch_size,
        seed=seed * 1_000_003 + round_index,
    )
    module = RouterTuning(model, recipe, step_offset=round_index * steps, total_steps=recipe.rounds * steps)
    losses = _LossLog()
    quiet = {"enable_progress_bar": False, **(trainer_kwargs or {})}  # many short fits: the caller logs rounds
    pl.Trainer(**_trainer_kwargs(model, steps, [losses], quiet)).fit(module, train_dataloaders=loader)
    return {"steps": len(losses.values), "loss_first": losses.values[0], "loss_last": losses.values[-1]}


def router_rounds_in_process(
    model: nn.Module, sources: Mapping[str, torch.Tensor], recipe: RouterTuningRecipe, *, seed: int = 0
) -> list[dict[str, dict]]:
    """What ``recipe.rounds`` rounds of federated router tuning compute, without the messaging:
    in each round every source (``name -> packed rows [N, T]``, in sorted order as the coordinator
    takes the replies) takes :func:`local_router_round` from the same routers, then
    :func:`aggregate_router_rows` combines them. Changes ``model``'s routers in place; returns each
    round's ``{source: local_router_round result}``."""
    log = []
    for r in range(recipe.rounds):
        start, updates, results = router_rows(model), [], {}
        for name in sorted(sources):
            set_router_rows(model, start)
            results[name] = local_router_round(model, sources[name], recipe, r, seed=seed)
            updates.append(router_rows(model))
        set_router_rows(model, aggregate_router_rows(start, updates, server_lr=recipe.server_lr))
        log.append(results)
    return log
