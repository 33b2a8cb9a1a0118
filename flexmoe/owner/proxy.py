"""Proxy-set selection: the public documents that look most like an owner's data
(FlexOlmo, Shi et al. 2025, section 3.4).

The owner trains a small logistic-regression classifier, local (1) vs public (0), on document
features — sentence embeddings (FlexOlmo) or, with ``embedder=None``, hashed word n-gram TF-IDF
— scores every public document with it and names the top-scoring ones as its proxy set
``D̂_i ⊂ D_pub``. The coordinator later tunes the router on the proxy sets.

Only a :class:`ProxySelection` leaves the owner's machine: indices into the public corpus and
their scores, nothing else. It holds numbers only, by construction, so no local text can ride
along in it.
"""

from __future__ import annotations

import json
import math
import operator
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexmoe.owner.embed import as_embedder, embed_documents, sample_indices
from flexmoe.spec import DEFAULT_EMBEDDER, ProxyBudget

PROXY_VERSION = 1


@dataclass(frozen=True)
class ProxySelection:
    """An owner's proxy set: which public documents, best first, and how local each looks.

    Attributes:
        indices: positions in the public corpus, best first.
        scores: the classifier's log-odds "local vs public" (class-balanced) for each.
        budget: how many documents were asked for (``len(indices)`` unless the pool was smaller).
        num_public: size of the public corpus the indices refer to, so the coordinator can
            check it resolves them against the same corpus.

    Every field is an int or a float (enforced on construction); there is no place for text.
    """

    indices: tuple[int, ...]
    scores: tuple[float, ...]
    budget: int
    num_public: int
    version: int = PROXY_VERSION

    def __post_init__(self):
        indices = tuple(_as_int(i, "indices") for i in self.indices)
        scores = tuple(_as_float(s, "scores") for s in self.scores)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "scores", scores)
        for name in ("budget", "num_public", "version"):
            object.__setattr__(self, name, _as_int(getattr(self, name), name))
        if self.version != PROXY_VERSION:
            raise ValueError(
                f"ProxySelection version {self.version} is not supported (this flexmoe reads {PROXY_VERSION})"
            )
        if len(indices) != len(scores):
            raise ValueError(f"ProxySelection has {len(indices)} indices but {len(scores)} scores")
        if len(set(indices)) != len(indices):
            raise ValueError("ProxySelection.indices contains duplicates")
        if any(not 0 <= i < self.num_public for i in indices):
            raise ValueError(f"ProxySelection.indices must lie in [0, {self.num_public}) (the public corpus size)")
        if len(indices) > self.budget:
            raise ValueError(f"ProxySelection names {len(indices)} documents but its budget is {self.budget}")
        if any(not math.isfinite(s) for s in scores):
            raise ValueError("ProxySelection.scores must be finite")

    def __len__(self) -> int:
        return len(self.indices)

    def texts(self, public_docs: Sequence[str]) -> list[str]:
        """The selected public documents, best first (coordinator side)."""
        if len(public_docs) != self.num_public:
            raise ValueError(
                f"this proxy selection indexes a public corpus of {self.num_public} documents, "
                f"got one of {len(public_docs)}; resolve it against the same public corpus"
            )
        return [public_docs[i] for i in self.indices]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "budget": self.budget,
            "num_public": self.num_public,
            "indices": list(self.indices),
            "scores": list(self.scores),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ProxySelection:
        if not isinstance(d, dict):
            raise TypeError("ProxySelection JSON must be an object")
        known = {"version", "budget", "num_public", "indices", "scores"}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d) - {"version"})
        if unknown or missing:
            raise ValueError(f"ProxySelection: unknown field(s) {unknown}, missing field(s) {missing}")
        if not isinstance(d["indices"], list) or not isinstance(d["scores"], list):
            raise TypeError("ProxySelection.indices and .scores must be lists")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ProxySelection:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ProxySelection is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _as_int(v, name: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"ProxySelection.{name} holds integers only, got {type(v).__name__}")
    return operator.index(v)


def _as_float(v, name: str) -> float:
    if isinstance(v, bool) or not hasattr(v, "__float__"):  # str has no __float__
        raise TypeError(f"ProxySelection.{name} holds numbers only, got {type(v).__name__}")
    return float(v)


# -- features ---------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def hashed_tfidf(docs: Sequence[str], *, num_features: int = 2**18, ngrams: int = 2) -> torch.Tensor:
    """Sparse ``[N, num_features]`` TF-IDF of word 1..``ngrams``-grams, hashed (crc32) into buckets.

    Sublinear term frequency ``1 + log tf``, smoothed idf ``log((1 + N) / (1 + df)) + 1`` over
    ``docs``, rows L2-normalised. Deterministic across processes and machines (crc32, not
    Python's salted ``hash``); needs nothing beyond torch.
    """
    rows, cols, tfs = [], [], []
    for r, doc in enumerate(docs):
        words = _WORD.findall(doc.lower())
        grams = Counter()
        for n in range(1, ngrams + 1):
            for i in range(len(words) - n + 1):
                grams[zlib.crc32(" ".join(words[i : i + n]).encode()) % num_features] += 1
        for c, tf in grams.items():
            rows.append(r)
            cols.append(c)
            tfs.append(1.0 + math.log(tf))
    n_docs = len(docs)
    rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    values = torch.tensor(tfs, dtype=torch.float64)
    df = torch.bincount(cols_t, minlength=num_features).double()
    values = values * (torch.log((1 + n_docs) / (1 + df[cols_t])) + 1)
    norms = torch.zeros(n_docs, dtype=torch.float64).index_add_(0, rows_t, values**2).sqrt().clamp_min(1e-12)
    values = values / norms[rows_t]
    indices = torch.stack([rows_t, cols_t])
    return torch.sparse_coo_tensor(indices, values.float(), (n_docs, num_features), check_invariants=True).coalesce()


def _used_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its all-zero columns: they get zero gradient and zero weight, so dropping
    them changes no score and makes the classifier's parameter count the vocabulary seen."""
    used, cols = torch.unique(x.indices()[1], return_inverse=True)
    indices = torch.stack([x.indices()[0], cols])
    return torch.sparse_coo_tensor(indices, x.values(), (x.shape[0], len(used)), check_invariants=True).coalesce()


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, idx).coalesce() if x.is_sparse else x[idx]


# -- the classifier ---------------------------------------------------------------------------
def train_classifier(
    x_local: torch.Tensor, x_public: torch.Tensor, *, l2: float = 1e-2, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression, local (1) vs public (0), with a class-balanced loss and L2 penalty.

    Minimises ``½·mean_local softplus(-z) + ½·mean_public softplus(z) + ½·l2·|w|²`` with
    ``z = x·w + b`` by full-batch L-BFGS from zero (deterministic). Features may be dense or
    sparse. Returns ``(w [d], b [])``.
    """
    d = x_local.shape[1]
    w = torch.zeros(d, 1, dtype=torch.float32, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure():
        opt.zero_grad()
        z_local, z_public = _logits(x_local, w, b), _logits(x_public, w, b)
        loss = 0.5 * F.softplus(-z_local).mean() + 0.5 * F.softplus(z_public).mean() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().reshape(-1), b.detach().reshape(())


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.sparse.mm(x, w) if x.is_sparse else x @ w).reshape(-1) + b


def score_public(
    x_local: torch.Tensor, x_public: torch.Tensor, *, folds: int = 5, seed: int = 0, l2: float = 1e-2, steps: int = 200
) -> torch.Tensor:
    """Log-odds "local vs public" for every public document ``[N_pub]``.

    Cross-fitted: the public documents are split into ``folds`` seeded folds and each fold is
    scored by a classifier trained without it. The public pool contains exactly the documents
    we hope to find (local-looking ones, labelled "public" for training); a classifier scoring
    its own training set could learn those by heart as "public", one scoring held-out documents
    cannot. ``folds=1`` trains once on everything and scores its own training set. Cross-fitting
    costs ``folds`` trainings of a linear model (docs/routing.md has what it bought).
    """
    n = x_public.shape[0]
    if folds <= 1 or n < 2:
        w, b = train_classifier(x_local, x_public, l2=l2, steps=steps)
        return _logits(x_public, w[:, None], b).detach()
    folds = min(folds, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=g)] = torch.arange(n) % folds
    scores = torch.empty(n, dtype=torch.float32)
    for f in range(folds):
        held, train = (fold_of == f).nonzero().reshape(-1), (fold_of != f).nonzero().reshape(-1)
        w, b = train_classifier(x_local, _rows(x_public, train), l2=l2, steps=steps)
        scores[held] = _logits(_rows(x_public, held), w[:, None], b).detach()
    return scores


# -- the selection ----------------------------------------------------------------------------
def select_proxy(
    local_docs: Sequence[str],
    public_docs: Sequence[str],
    budget: int | None = None,
    *,
    fraction: float = 0.005,
    min_docs: int = 8,
    embedder=DEFAULT_EMBEDDER,
    seed: int = 0,
    local_embeddings: torch.Tensor | None = None,
    public_embeddings: torch.Tensor | None = None,
    max_local_docs: int | None = 10_000,
    folds: int = 5,
    l2: float = 1e-2,
    steps: int = 200,
) -> ProxySelection:
    """Choose an owner's proxy set: the ``budget`` public documents most like its local data.

    Args:
        local_docs: the owner's documents (never leave this function; only their count and
            their features' influence on the classifier do).
        public_docs: the public corpus ``D_pub``; the result indexes into it.
        budget: number of documents to name; default ``max(min_docs, int(fraction * len(local_docs)))``
            (:class:`~flexmoe.spec.ProxyBudget`), never more than ``len(public_docs)``.
        embedder: sentence-transformers name, path or model (FlexOlmo); ``None`` for hashed
            word-n-gram TF-IDF features, which need nothing beyond torch.
        local_embeddings, public_embeddings: precomputed features ``[N, d]`` to use instead
            (``public_embeddings`` row ``i`` must be ``public_docs[i]``; local ones are used as given).
        max_local_docs: train on a seeded sample of at most this many local documents.
        folds: cross-fitting folds for scoring (see :func:`score_public`).
        l2: L2 penalty of the classifier; both kinds of features are unit-norm rows, so one
            default serves both.
        seed: for the local sample and the folds; the result is deterministic given it.
    """
    if budget is None:
        budget = ProxyBudget(fraction=fraction, min_docs=min_docs).size(len(local_docs))
    if budget < 0:
        raise ValueError(f"proxy budget must be >= 0, got {budget}")
    n_public = len(public_docs) if public_embeddings is None else int(public_embeddings.shape[0])
    if public_embeddings is not None and len(public_docs) != n_public:
        raise ValueError(f"public_embeddings has {n_public} rows for {len(public_docs)} public documents")
    budget = min(int(budget), n_public)
    if budget == 0:
        return ProxySelection(indices=(), scores=(), budget=0, num_public=n_public)
    if local_embeddings is None and len(local_docs) == 0:
        raise ValueError("select_proxy needs local documents (or local_embeddings) to tell them from public ones")

    sparse = local_embeddings is None and public_embeddings is None and embedder is None
    if sparse:
        local = [local_docs[i] for i in sample_indices(len(local_docs), max_local_docs, seed).tolist()]
        x = _used_columns(hashed_tfidf(local + list(public_docs)))
        x_local = _rows(x, torch.arange(len(local)))
        x_public = _rows(x, torch.arange(len(local), x.shape[0]))
    else:
        if embedder is None and (local_embeddings is None or public_embeddings is None):
            raise ValueError(
                "embedder=None selects TF-IDF features for both sides; pass both local_embeddings "
                "and public_embeddings, or neither"
            )
        model = as_embedder(embedder) if local_embeddings is None or public_embeddings is None else None
        x_local = local_embeddings
        if x_local is None:
            x_local = embed_documents(local_docs, model, max_docs=max_local_docs, seed=seed)
        x_public = public_embeddings if public_embeddings is not None else embed_documents(public_docs, model)
        x_local, x_public = x_local.detach().float().cpu(), x_public.detach().float().cpu()
        if x_local.shape[1] != x_public.shape[1]:
            raise ValueError(f"local features have width {x_local.shape[1]}, public ones {x_public.shape[1]}")
    scores = score_public(x_local, x_public, folds=folds, seed=seed, l2=l2, steps=steps)
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    return ProxySelection(
        indices=tuple(order.tolist()), scores=tuple(scores[order].tolist()), budget=budget, num_public=n_public
    )
