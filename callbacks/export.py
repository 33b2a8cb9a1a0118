"""ExportExpert: write the owner's ExpertArtifact (and proxy selection) as training goes."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.core.io import atomic_write_text
from flexmoe.core.sharding import gathered_layers, is_sharded, reshard
from flexmoe.data.private_statistics import private_token_statistics, statistics_noise
from flexmoe.data.statistics import token_statistics
from flexmoe.owner.proxy import select_proxy
from flexmoe.routing import owner_statistics

from ._common import find_moe_model


class ExportExpert(pl.Callback):
    """Write ``path`` (one safetensors file) at fit end and with every checkpoint, so a
    crashed run still leaves the latest expert behind.

    At fit end the artifact also carries the aggregate statistics the spec's routing recipe
    needs (``spec.routing``: the mean, and covariance, of the MLP inputs over the owner's training
    sequences; :func:`flexmoe.routing.owner_statistics`), taken from the Trainer's
    :class:`~flexmoe.TextDataModule`.

    Every export also carries the token unigram counts of the packed rows the owner trains on
    (``stats.unigram``; :func:`flexmoe.data.statistics.token_statistics`): exactly the tokens the
    expert saw, EOS separators included, the same kind of stream the coordinator counts on its
    public data and the merged model routes; and, unless the spec's routing recipe sets
    ``bigram_buckets`` to 0, the hashed counts of adjacent token pairs (``stats.bigram``, that many
    buckets), so the coordinator can build the posterior router whatever recipe the spec names. They
    do not depend on the training step, so a checkpoint's artifact carries them too.

    With a privacy recipe that releases the statistics privately (``statistics_epsilon`` of the
    module's :class:`~flexmoe.spec.PrivacyRecipe`), the token counts are released by the Gaussian
    mechanism (:func:`flexmoe.data.private_statistics.private_token_statistics`, drawn once per run
    from a seed kept in the checkpoint, so a resumed run ships the same counts) and the MLP-input
    moments are not shipped; the artifact's metadata records the epsilon (docs/privacy.md).

    With ``public_documents``, also select the proxy set (FlexOlmo section 3.4) at fit end and
    write it beside the artifact as ``<path stem>.proxy.json``: public document ids and
    scores only, never local text.

    Under FSDP (``ExpertModule.fsdp_strategy``: FSDP2, the model's units hold ``DTensor`` shards)
    every rank takes part, since gathering is a collective: the statistics' forward passes run on
    every rank (each unit gathers as in training), the decoder layers' trainable tensors are then
    gathered whole onto rank 0's CPU, one at a time (:func:`~flexmoe.core.sharding.gathered_layers`),
    and rank 0 builds the artifact and writes it.
    The artifact is the same as on one device: the expert's tensors are float32 whatever the
    precision (the module holds what trains in float32), the dtype the coordinator's float32
    public model validates it against.

    Args:
        path: where the artifact goes (written atomically).
        owner, spec: used when the LightningModule is not an :class:`~flexmoe.ExpertModule`.
        public_documents: the public corpus the proxy set is drawn from.
    """

    def __init__(self, path: str | os.PathLike, owner: str | None = None, spec=None, public_documents=None):
        self.path = Path(path)
        self.owner, self.spec, self.public_documents = owner, spec, public_documents
        self.exports = 0
        self.proxy_path: Path | None = None
        self._tokens = None
        self._statistics_noise: float | None = None
        # Seeds the noise of privately released counts; from the OS, kept in the (local) checkpoint.
        self._noise_seed = secrets.randbits(63)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            # Fail before training, not after hours of it.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path.parent, os.W_OK):
                raise PermissionError(f"cannot write the expert artifact to {self.path.parent}")

    def artifact(self, pl_module: pl.LightningModule, stats=None, tokens=None) -> ExpertArtifact:
        unigram, bigram = tokens if tokens is not None else (None, None)
        if hasattr(pl_module, "artifact"):
            kwargs = {"statistics_noise": self._statistics_noise} if self._statistics_noise is not None else {}
            return pl_module.artifact(stats=stats, unigram=unigram, bigram=bigram, **kwargs)
        spec = self.spec
        return ExpertArtifact.from_model(
            find_moe_model(pl_module),
            owner=self.owner or "owner",
            spec_sha256=spec.sha256 if spec is not None else "",
            fingerprint=spec.fingerprint if spec is not None else None,
            stats=stats,
            unigram=unigram,
            bigram=bigram,
        )

    def token_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """The token counts of the owner's packed training rows over the public model's vocabulary
        (:class:`~flexmoe.artifacts.unigram.TokenStatistics`, counted once; bigrams in the spec's
        recipe's bucket count), or ``None`` when the Trainer has no TextDataModule to count."""
        if self._tokens is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "train_rows"):
                return None
            spec = getattr(pl_module, "spec", None) or self.spec
            buckets = spec.routing.bigram_buckets if spec is not None else 0
            vocab_size = find_moe_model(pl_module).config.vocab_size
            recipe = getattr(pl_module, "privacy", None)
            noise = statistics_noise(recipe)
            if noise is None:
                self._tokens = token_statistics(datamodule.train_rows, vocab_size, buckets)
            else:
                generator = torch.Generator().manual_seed(self._noise_seed)
                self._tokens = private_token_statistics(
                    datamodule.train_rows,
                    vocab_size,
                    buckets,
                    noise_multiplier=noise,
                    clip=recipe.statistics_clip,
                    generator=generator,
                )
                self._statistics_noise = noise
        return self._tokens

    def routing_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """The owner's statistics for ``spec.routing`` (None when the recipe needs none)."""
        spec = getattr(pl_module, "spec", None) or self.spec
        if spec is None or spec.routing.owner_statistics is None:
            return None
        recipe = getattr(pl_module, "privacy", None)
        if recipe is not None and recipe.private_statistics:
            rank_zero_warn(
                "the privacy recipe releases the statistics privately: the MLP-input moments are not shipped, so "
                f"the coordinator cannot build the {spec.routing.token_router().method} token router from this "
                "expert (the posterior router needs only the token counts)"
            )
            return None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_rows"):
            rank_zero_warn(
                f"the spec's routing recipe ({spec.routing.method}) needs statistics of the owner's data, but the "
                "Trainer has no TextDataModule to take them from; the artifact ships without them"
            )
            return None
        return owner_statistics(find_moe_model(pl_module), datamodule.train_rows, spec.routing)

    def export(self, pl_module: pl.LightningModule, stats=None, tokens=None) -> Path:
        self.artifact(pl_module, stats=stats, tokens=tokens).save(self.path)
        self.exports += 1
        return self.path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        model = find_moe_model(pl_module)
        sharded = is_sharded(model)
        if not sharded and not trainer.is_global_zero:
            return
        with gathered_layers(model, keep=trainer.is_global_zero):  # under FSDP: every rank takes part
            if trainer.is_global_zero:
                self.export(pl_module, tokens=self.token_statistics(trainer, pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_moe_model(pl_module)
        sharded = is_sharded(model)
        if not sharded and not trainer.is_global_zero:
            return
        # The statistics' forward passes run as training's do, under the precision plugin's
        # context: bf16-mixed's autocast, without which the bfloat16 activations would meet the
        # float32 expert; without an autograd graph (nothing steps here). Under FSDP every rank runs
        # them over the same rows, so each unit's gathers match across ranks as in training.
        with trainer.precision_plugin.forward_context(), torch.no_grad():
            stats = self.routing_statistics(trainer, pl_module)
        reshard(model)  # FSDP2 leaves the root unit gathered after a forward pass without backward
        with gathered_layers(model, keep=trainer.is_global_zero):
            if trainer.is_global_zero:
                self.export(pl_module, stats=stats, tokens=self.token_statistics(trainer, pl_module))
        if not trainer.is_global_zero:
            return
        if self.public_documents is not None:
            self.proxy_path = self.write_proxy(trainer, pl_module)

    def write_proxy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        spec = getattr(pl_module, "spec", None) or self.spec
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "documents"):
            raise ValueError("proxy selection needs the owner's documents: use a TextDataModule")
        local = datamodule.documents()
        kwargs = {}
        if spec is not None:
            kwargs = dict(budget=spec.proxy.size(len(local)), embedder=spec.embedder)
        selection = select_proxy(local, list(self.public_documents), **kwargs)
        path = self.path.with_name(self.path.name.removesuffix(".safetensors") + ".proxy.json")
        return atomic_write_text(path, selection.to_json(indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"exports": self.exports, "noise_seed": self._noise_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.exports = int(state_dict.get("exports", 0))
        self._noise_seed = int(state_dict.get("noise_seed", self._noise_seed))
