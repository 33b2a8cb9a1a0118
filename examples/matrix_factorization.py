"""Distributed SGD for matrix factorization (Gemulla et al., KDD 2011) on a real sparse matrix.

Why this example is here: parameter mixing -- train copies apart, then average their weights -- is
the oldest form of the model merging flexmoe does (McDonald et al. 2010, Zinkevich et al. 2010).
Matrix factorization is the classic case where one-shot averaging fails and where Gemulla et al.'s
*stratified* SGD (DSGD) parallelises SGD without averaging anything.

**The matrix.** Words of the prose domains of :func:`flexmoe.data.corpus.local_corpus` (docstrings,
comments and the language reference, all read from this Python installation), lower-cased
``[a-z]+`` tokens. Rows are the ``vocab_size`` most frequent words, columns the same words as
contexts within ``window`` tokens either side; entries are positive pointwise mutual information,
``PPMI(w, c) = max(0, log P(w, c) / (P(w) P_α(c)))`` with context-distribution smoothing
``P_α(c) ∝ #(c)^0.75`` (Levy, Goldberg and Dagan, TACL 2015). Only the positive entries are
*observed*, Ω (3000 x 3000 words, about 318 K entries with the defaults).

**The loss** (Gemulla et al., eq. 1 with L2): ``L(W, H) = Σ_{(i,j)∈Ω} (M_ij − w_i·h_j)² + λ (‖W‖² + ‖H‖²)``.
It is written as a sum of per-entry losses ``L_ij = (M_ij − w_i·h_j)² + λ (‖w_i‖²/N_i + ‖h_j‖²/N_j)``
(``N_i``, ``N_j``: observed entries in row ``i`` and column ``j``), so an SGD step on entry ``(i, j)``
touches only ``w_i`` and ``h_j``. Reported: ``L / |Ω|``. One *pass* is one visit to every entry.

**Methods** (all start from the same random factors, all SGD-based ones use the same steps
``ε_t = lr / sqrt(1 + t)`` in pass ``t`` and mini-batches of ``batch_size`` entries in random order):

(a) ``sgd``: plain SGD, one process.
(b) ``one-shot mixing`` (PSGD; Zinkevich et al. 2010, McDonald et al. 2010): Ω is split at random
    into ``p`` parts; ``p`` factorizations train apart, one per part, and are averaged once;
    the curve shows the average the run would return if it stopped after that pass.
(c) ``iterative mixing`` (ISGD; McDonald et al. 2010): the same, averaged after every pass and the
    average sent back to every worker.
(d) ``DSGD`` (Gemulla et al., Algorithm 2): rows and columns are permuted at random and cut into
    ``p`` ranges, giving ``p x p`` blocks. Stratum ``s`` is the blocks ``(b, (b + s) mod p)``: they
    share no row and no column, so SGD on them in parallel updates disjoint parts of ``W`` and
    ``H`` and equals SGD on them one after the other, in any order. A pass processes the ``p``
    strata in a random order (``p`` sub-epochs). With ``workers > 1`` the blocks of a stratum run
    in a process pool (``fork``) on factors held in shared memory, each worker writing its own
    rows of ``W`` and ``H`` with no lock; with ``workers=1`` they run one after the other in this
    process. The run checks both claims: every stratum is asserted to be row- and
    column-disjoint, and before training it processes one stratum in the pool and again
    sequentially in reversed block order and prints the largest difference (0.0: bit-identical).
    On 2 shared CPU cores the pool buys little speed for a matrix this small; the point shown is
    the independence, and that DSGD needs no averaging.
(e) ``ALS``: alternating least squares, each half-step solving ``(H_iᵀH_i + λI) w_i = H_iᵀ m_i``
    for every row exactly (then the same for ``H``). One ALS iteration reads every entry twice
    and is plotted as one pass.

The parameter-mixing steps use :func:`flexmoe.merge.average` on ``{"W": ..., "H": ...}`` state dicts
-- the same averaging the project uses for model soups.

Run ``python examples/matrix_factorization.py --help``; the plot goes to ``--out/mf_loss.png``.

Measured with the defaults (``python examples/matrix_factorization.py``; 2 CPU cores shared with
other jobs, load average about 10: 3 min 33 s wall, 59 s of CPU; the losses are deterministic)::

    3000 x 3000 word-context PPMI matrix, 318,335 observed entries (3.5%), from 540,866 tokens
    training loss / |Ω| (rank 32, λ 0.05, p 4; ALS: one pass = one iteration)
    method                pass 1    pass 5     final  seconds
    sgd                   0.4477    0.1862    0.1340     16.6
    one-shot mixing       0.4410    0.3552    0.3414     23.6
    iterative mixing      0.4410    0.3224    0.2247     24.1
    DSGD                  0.4577    0.1934    0.1382     41.6
    ALS                   0.2826    0.1408    0.1102     28.8

As in Gemulla et al.'s figure: DSGD follows plain SGD pass for pass (it is SGD in another order),
ALS converges fastest per pass, iterative mixing lags, and one-shot mixing stalls at 2.5x DSGD's
loss -- averaging two factorizations is not a factorization (``W̄ H̄ᵀ ≠ mean(W_k H_kᵀ)``), and each
worker fitted only its own part of Ω. The seconds are wall time on the loaded machine; DSGD's
4 processes on 2 shared cores buy no speed here.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from flexmoe.data.corpus import local_corpus
from flexmoe.merge import average

PROSE_DOMAINS = ("docstrings", "comments", "pydoc_topics")
WORD = re.compile(r"[a-z]+")
METHODS = ("sgd", "one-shot mixing", "iterative mixing", "DSGD", "ALS")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


# -- the matrix ----------------------------------------------------------------------------------


def corpus_tokens(
    domains: Sequence[str] = PROSE_DOMAINS, max_docs_per_domain: int | None = None, corpus: dict | None = None
) -> list[str]:
    """Lower-cased ``[a-z]+`` words of every document (train and validation) of ``domains``, read
    from ``corpus`` (a :func:`~flexmoe.data.corpus.local_corpus` result) or a new local corpus."""
    if corpus is None:
        corpus = local_corpus(max_docs_per_domain, domains=list(domains))
    tokens = []
    for name in domains:
        for doc in corpus[name].documents:
            tokens.extend(WORD.findall(doc.lower()))
    return tokens


@dataclass(frozen=True)
class WordContextMatrix:
    """``ppmi[i, j]``: PPMI of word ``words[i]`` with context word ``words[j]`` (CSR, float32)."""

    ppmi: sp.csr_matrix
    words: list[str]
    tokens: int  # corpus size in tokens

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def __str__(self) -> str:
        n = self.ppmi.shape[0]
        return (
            f"{n} x {n} word-context PPMI matrix, {self.ppmi.nnz:,d} observed entries "
            f"({self.ppmi.nnz / n / n:.1%}), from {self.tokens:,d} tokens"
        )


def ppmi_matrix(tokens: Sequence[str], vocab_size: int = 3000, window: int = 2, alpha: float = 0.75):
    """The PPMI matrix of the ``vocab_size`` most frequent words (module docstring)."""
    if vocab_size < 2 or window < 1 or not 0 < alpha <= 1:
        raise ValueError(
            f"ppmi_matrix needs vocab_size >= 2, window >= 1, 0 < alpha <= 1; got {vocab_size}, {window}, {alpha}"
        )
    counts = Counter(tokens)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]]
    if len(words) < 2:
        raise ValueError(f"the corpus has {len(words)} distinct word(s); a word-context matrix needs more text")
    index = {w: i for i, w in enumerate(words)}
    ids = np.array([index.get(t, -1) for t in tokens], dtype=np.int64)
    n = len(words)
    pairs = []
    for d in range(1, window + 1):  # symmetric window: (w, c) and (c, w) at every distance d
        a, b = ids[:-d], ids[d:]
        keep = (a >= 0) & (b >= 0)
        pairs += [a[keep] * n + b[keep], b[keep] * n + a[keep]]
    cells, cooc = np.unique(np.concatenate(pairs), return_counts=True)
    rows, cols = cells // n, cells % n
    word_count = np.bincount(rows, weights=cooc, minlength=n)
    context_count = np.bincount(cols, weights=cooc, minlength=n) ** alpha
    pmi = np.log(cooc * context_count.sum() / (word_count[rows] * context_count[cols]))
    pos = pmi > 0
    ppmi = sp.csr_matrix((pmi[pos].astype(np.float32), (rows[pos], cols[pos])), shape=(n, n))
    return WordContextMatrix(ppmi=ppmi, words=words, tokens=len(tokens))


# -- factorizations -------------------------------------------------------------------------------


@dataclass
class MFConfig:
    """Settings shared by the five methods (module docstring)."""

    rank: int = 32
    lam: float = 0.05  # λ of the L2 term
    lr: float = 0.05  # ε_0; pass t uses lr / sqrt(1 + t)
    batch_size: int = 512  # entries per SGD step (the p workers of (b)-(d) take batch_size // p each)
    epochs: int = 15  # passes over Ω
    p: int = 4  # workers of the mixing methods; DSGD uses p x p blocks
    workers: int = 4  # DSGD processes (1: the blocks of a stratum run one after the other here)
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "batch_size", "epochs", "p", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lam < 0 or self.lr <= 0:
            raise ValueError(f"MFConfig needs lam >= 0 and lr > 0, got lam={self.lam}, lr={self.lr}")
        if self.batch_size < self.p:
            raise ValueError(
                f"MFConfig.batch_size ({self.batch_size}) must be >= p ({self.p}): "
                "each of the p workers takes batch_size // p entries per step"
            )

    @property
    def worker_batch(self) -> int:
        """Entries per step of one of ``p`` workers: the ``p`` together take ``batch_size``, so a
        pass is as many steps as plain SGD's, and a frequent row (say, "the") appears as often
        per step as in plain SGD -- DSGD's blocks hold ``p`` times its share of the entries, and
        summed duplicate-row gradients of full-size batches diverge at the same ``lr``."""
        return self.batch_size // self.p


class Observed:
    """The observed entries Ω as tensors, with each entry's share of the L2 term (``λ/N_i``, ``λ/N_j``)."""

    def __init__(self, matrix: sp.spmatrix, lam: float):
        self.csr = sp.csr_matrix(matrix, dtype=np.float32)
        self.csc_t = self.csr.T.tocsr()  # rows = columns of the matrix, for ALS's half-step on H
        coo = self.csr.tocoo()
        self.shape = coo.shape
        self.rows = torch.from_numpy(coo.row.astype(np.int64))
        self.cols = torch.from_numpy(coo.col.astype(np.int64))
        self.vals = torch.from_numpy(coo.data.astype(np.float32))
        self.lam = lam
        n_row = torch.bincount(self.rows, minlength=self.shape[0]).clamp(min=1).float()
        n_col = torch.bincount(self.cols, minlength=self.shape[1]).clamp(min=1).float()
        self.reg_row, self.reg_col = (lam / n_row)[self.rows], (lam / n_col)[self.cols]

    def __len__(self) -> int:
        return len(self.vals)

    def loss(self, f: dict[str, torch.Tensor]) -> float:
        """``L(W, H) / |Ω|``."""
        W, H = f["W"], f["H"]
        err = self.vals - (W.index_select(0, self.rows) * H.index_select(0, self.cols)).sum(1)
        total = err.double().square().sum() + self.lam * (W.double().square().sum() + H.double().square().sum())
        return float(total) / len(self)


def init_factors(shape: tuple[int, int], cfg: MFConfig, mean: float) -> dict[str, torch.Tensor]:
    """Uniform random factors whose products average ``mean`` (every method starts here)."""
    g = torch.Generator().manual_seed(cfg.seed)
    scale = 2 * math.sqrt(mean / cfg.rank)
    return {
        "W": torch.rand(shape[0], cfg.rank, generator=g) * scale,
        "H": torch.rand(shape[1], cfg.rank, generator=g) * scale,
    }


def sgd_pass(
    f: dict[str, torch.Tensor], obs: Observed, idx: torch.Tensor, lr: float, batch_size: int, seed: int
) -> None:
    """One pass of mini-batch SGD over the entries ``idx`` of ``obs``, in an order drawn from ``seed``,
    updating ``f`` in place. The gradient of ``L_ij`` is ``-2 e_ij h_j + 2 λ w_i / N_i`` for ``w_i``
    (and symmetrically for ``h_j``), with ``e_ij = M_ij − w_i·h_j``."""
    W, H = f["W"], f["H"]
    order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    R, C = obs.rows[order], obs.cols[order]
    X, ar, ac = obs.vals[order, None], obs.reg_row[order, None], obs.reg_col[order, None]
    for s in range(0, len(order), batch_size):
        r, c = R[s : s + batch_size], C[s : s + batch_size]
        w, h = W.index_select(0, r), H.index_select(0, c)
        err = X[s : s + batch_size] - (w * h).sum(1, keepdim=True)
        gw = torch.addcmul(-err * h, ar[s : s + batch_size], w)
        gh = torch.addcmul(-err * w, ac[s : s + batch_size], h)
        W.index_add_(0, r, gw, alpha=-2 * lr)
        H.index_add_(0, c, gh, alpha=-2 * lr)


def _step(cfg: MFConfig, t: int) -> float:
    return cfg.lr / math.sqrt(1 + t)


def _seed(*parts: int) -> int:
    """A seed per (run, pass, worker, ...) so that every order is reproducible and independent."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _copy(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in f.items()}


def _random_parts(n: int, p: int, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(perm.chunk(p))


Curve = list[tuple[float, float]]  # (passes, loss / |Ω|)


def train_sgd(obs: Observed, f0: dict, cfg: MFConfig) -> tuple[Curve, dict]:
    """(a) Plain SGD."""
    f, idx = _copy(f0), torch.arange(len(obs))
    curve = [(0.0, obs.loss(f))]
    for t in range(cfg.epochs):
        sgd_pass(f, obs, idx, _step(cfg, t), cfg.batch_size, _seed(cfg.seed, t))
        curve.append((t + 1.0, obs.loss(f)))
    return curve, f


def train_one_shot_mixing(obs: Observed, f0: dict, cfg: MFConfig) -> tuple[Curve, dict]:
    """(b) ``p`` factorizations, each on its own random ``1/p`` of Ω, averaged once at the end
    (PSGD). A pass = every worker once over its part."""
    parts = _random_parts(len(obs), cfg.p, _seed(cfg.seed, 1))
    workers = [_copy(f0) for _ in parts]
    curve = [(0.0, obs.loss(f0))]
    for t in range(cfg.epochs):
        for k, (f, idx) in enumerate(zip(workers, parts)):
            sgd_pass(f, obs, idx, _step(cfg, t), cfg.worker_batch, _seed(cfg.seed, t, k))
        curve.append((t + 1.0, obs.loss(average(workers))))
    return curve, average(workers)


def train_iterative_mixing(obs: Observed, f0: dict, cfg: MFConfig) -> tuple[Curve, dict]:
    """(c) As (b), but the workers' factors are averaged after every pass and every worker
    continues from the average (iterative parameter mixing)."""
    parts = _random_parts(len(obs), cfg.p, _seed(cfg.seed, 1))
    mixed = _copy(f0)
    curve = [(0.0, obs.loss(mixed))]
    for t in range(cfg.epochs):
        workers = [_copy(mixed) for _ in parts]
        for k, (f, idx) in enumerate(zip(workers, parts)):
            sgd_pass(f, obs, idx, _step(cfg, t), cfg.worker_batch, _seed(cfg.seed, t, k))
        mixed = average(workers)
        curve.append((t + 1.0, obs.loss(mixed)))
    return curve, mixed


# -- DSGD -------------------------------------------------------------------------------------------

# What a DSGD worker reads: the factors (shared memory) and the entries of every block. Set in
# this process before the pool forks, so the workers inherit it; nothing large is sent per task.
_DSGD: dict = {}


def _dsgd_block(task: tuple[int, int, float, int]) -> None:
    """SGD over block ``(row range b, column range c)``, writing its rows of ``W`` and ``H`` in place."""
    b, c, lr, seed = task
    state = _DSGD
    sgd_pass(state["f"], state["obs"], state["blocks"][b][c], lr, state["batch_size"], seed)


def _dsgd_init(state: dict) -> None:
    torch.set_num_threads(1)
    _DSGD.clear()
    _DSGD.update(state)


def dsgd_blocks(obs: Observed, p: int, seed: int) -> list[list[torch.Tensor]]:
    """``blocks[b][c]``: indices of the entries in row range ``b`` and column range ``c`` after a
    random permutation of the rows and of the columns (which balances the blocks)."""
    g = torch.Generator().manual_seed(seed)
    row_part = torch.empty(obs.shape[0], dtype=torch.long)
    row_part[torch.randperm(obs.shape[0], generator=g)] = torch.arange(obs.shape[0]) * p // obs.shape[0]
    col_part = torch.empty(obs.shape[1], dtype=torch.long)
    col_part[torch.randperm(obs.shape[1], generator=g)] = torch.arange(obs.shape[1]) * p // obs.shape[1]
    block_of = row_part[obs.rows] * p + col_part[obs.cols]
    order = torch.argsort(block_of, stable=True)
    sizes = torch.bincount(block_of, minlength=p * p).tolist()
    flat = list(order.split(sizes))
    return [flat[b * p : (b + 1) * p] for b in range(p)]


def stratum(p: int, shift: int) -> list[tuple[int, int]]:
    """The blocks ``(b, (b + shift) mod p)``: every row range and every column range once."""
    return [(b, (b + shift) % p) for b in range(p)]


def check_stratum(obs: Observed, blocks: list[list[torch.Tensor]], cells: list[tuple[int, int]]) -> None:
    """Fail unless no two blocks of the stratum share a row or a column (Gemulla et al., def. 1:
    interchangeable blocks), checked on the entries themselves."""
    rows, cols = set(), set()
    for b, c in cells:
        r, k = set(obs.rows[blocks[b][c]].tolist()), set(obs.cols[blocks[b][c]].tolist())
        if rows & r or cols & k:
            raise AssertionError(f"stratum {cells}: block {(b, c)} shares rows or columns with another block")
        rows |= r
        cols |= k


class DSGD:
    """(d) Stratified SGD on ``p x p`` blocks (module docstring), run by ``workers`` processes."""

    def __init__(self, obs: Observed, f0: dict, cfg: MFConfig):
        self.obs, self.cfg = obs, cfg
        self.f = {k: v.clone().share_memory_() for k, v in f0.items()}
        self.blocks = dsgd_blocks(obs, cfg.p, _seed(cfg.seed, 2))
        for shift in range(cfg.p):
            check_stratum(obs, self.blocks, stratum(cfg.p, shift))
        state = {"f": self.f, "obs": obs, "blocks": self.blocks, "batch_size": cfg.worker_batch}
        _dsgd_init(state)
        self.pool = None
        if cfg.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            self.pool = ProcessPoolExecutor(
                cfg.workers, mp_context=multiprocessing.get_context("fork"), initializer=_dsgd_init, initargs=(state,)
            )

    def run_stratum(self, cells: list[tuple[int, int]], lr: float, seeds: list[int]) -> None:
        tasks = [(b, c, lr, s) for (b, c), s in zip(cells, seeds)]
        if self.pool is None:
            for task in tasks:
                _dsgd_block(task)
        else:  # each block by one worker; all must finish before the next stratum (a barrier)
            list(self.pool.map(_dsgd_block, tasks))

    def independence_check(self) -> float:
        """Process one stratum as configured, and again from the same start one block after the
        other in reversed order; return the largest difference between the results."""
        start = _copy(self.f)
        cells, seeds = stratum(self.cfg.p, 1), [_seed(self.cfg.seed, 99, b) for b in range(self.cfg.p)]
        self.run_stratum(cells, _step(self.cfg, 0), seeds)
        configured = _copy(self.f)
        for k in self.f:
            self.f[k].copy_(start[k])
        for (b, c), s in reversed(list(zip(cells, seeds))):
            _dsgd_block((b, c, _step(self.cfg, 0), s))
        diff = max(float((configured[k] - self.f[k]).abs().max()) for k in self.f)
        for k in self.f:
            self.f[k].copy_(start[k])
        return diff

    def train(self) -> tuple[Curve, dict]:
        cfg = self.cfg
        curve = [(0.0, self.obs.loss(self.f))]
        for t in range(cfg.epochs):
            order = torch.randperm(cfg.p, generator=torch.Generator().manual_seed(_seed(cfg.seed, 3, t))).tolist()
            for j, shift in enumerate(order):  # p sub-epochs: every block once = one pass
                seeds = [_seed(cfg.seed, t, shift, b) for b in range(cfg.p)]
                self.run_stratum(stratum(cfg.p, shift), _step(cfg, t), seeds)
                curve.append((t + (j + 1) / cfg.p, self.obs.loss(self.f)))
        return curve, _copy(self.f)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# -- ALS --------------------------------------------------------------------------------------------


def _als_half(matrix: sp.csr_matrix, other: torch.Tensor, lam: float) -> torch.Tensor:
    """Solve ``(Σ_{j∈Ω_i} h_j h_jᵀ + λI) w_i = Σ_{j∈Ω_i} M_ij h_j`` for every row ``i`` of ``matrix``
    (``h_j = other[j]``). The Gram matrices of all rows are one sparse-dense product: the 0/1
    pattern of Ω times the ``[columns, k(k+1)/2]`` upper triangles of the outer products ``h_j h_jᵀ``."""
    k = other.shape[1]
    h = other.double()
    iu = torch.triu_indices(k, k)
    outer = (h[:, iu[0]] * h[:, iu[1]]).numpy()
    pattern = sp.csr_matrix((np.ones(matrix.nnz), matrix.indices, matrix.indptr), shape=matrix.shape)
    upper = torch.from_numpy(pattern @ outer)
    gram = torch.zeros(matrix.shape[0], k, k, dtype=torch.float64)
    gram[:, iu[0], iu[1]] = upper
    gram[:, iu[1], iu[0]] = upper
    # λ > 0 keeps every system positive definite; without it a row with fewer entries than the
    # rank would be singular, and a tiny ridge stands in.
    gram += max(lam, 1e-9) * torch.eye(k, dtype=torch.float64)
    rhs = torch.from_numpy(matrix.astype(np.float64) @ h.numpy())
    return torch.cholesky_solve(rhs.unsqueeze(-1), torch.linalg.cholesky(gram)).squeeze(-1).float()


def train_als(obs: Observed, f0: dict, cfg: MFConfig) -> tuple[Curve, dict]:
    """(e) Alternating least squares: ``W`` given ``H`` exactly, then ``H`` given ``W``."""
    f = _copy(f0)
    curve = [(0.0, obs.loss(f))]
    for t in range(cfg.epochs):
        f["W"] = _als_half(obs.csr, f["H"], obs.lam)
        f["H"] = _als_half(obs.csc_t, f["W"], obs.lam)
        curve.append((t + 1.0, obs.loss(f)))
    return curve, f


# -- all five -------------------------------------------------------------------------------------


@dataclass
class Result:
    curve: Curve
    factors: dict[str, torch.Tensor]
    seconds: float

    @property
    def final(self) -> float:
        return self.curve[-1][1]


def factorize(matrix: sp.spmatrix, cfg: MFConfig, methods: Sequence[str] = METHODS) -> dict[str, Result]:
    """Run ``methods`` (of :data:`METHODS`) from the same start; ``{method: Result}``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    obs = Observed(matrix, cfg.lam)
    f0 = init_factors(obs.shape, cfg, float(obs.vals.mean()))
    out = {}
    for method in methods:
        t = time.perf_counter()
        if method == "DSGD":
            dsgd = DSGD(obs, f0, cfg)
            try:
                how = f"{cfg.workers} worker processes" if dsgd.pool else "one process, blocks in turn"
                diff = dsgd.independence_check()
                log(
                    f"DSGD ({how}): one stratum as run vs. its blocks one by one in reverse order: "
                    f"max |difference| = {diff:.1e}"
                )
                curve, f = dsgd.train()
            finally:
                dsgd.close()
        else:
            train = {
                "sgd": train_sgd,
                "one-shot mixing": train_one_shot_mixing,
                "iterative mixing": train_iterative_mixing,
                "ALS": train_als,
            }[method]
            curve, f = train(obs, f0, cfg)
        out[method] = Result(curve, f, time.perf_counter() - t)
        log(f"{method}: loss/|Ω| {curve[0][1]:.4f} -> {curve[-1][1]:.4f} in {out[method].seconds:.1f}s")
    return out


def loss_at(curve: Curve, passes: float) -> float:
    """The loss after the last point at or before ``passes``."""
    return [loss for x, loss in curve if x <= passes + 1e-9][-1]


def table(results: dict[str, Result], checkpoints: Sequence[int] = (1, 5)) -> str:
    cols = [c for c in checkpoints if c < results[next(iter(results))].curve[-1][0]]
    head = f"{'method':18s}" + "".join(f"{f'pass {c}':>10s}" for c in cols) + f"{'final':>10s}{'seconds':>9s}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = "".join(f"{loss_at(r.curve, c):10.4f}" for c in cols)
        lines.append(f"{name:18s}{cells}{r.final:10.4f}{r.seconds:9.1f}")
    return "\n".join(lines)


def plot(results: dict[str, Result], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results.items():
        x, y = zip(*r.curve)
        ax.plot(x, y, label=name, marker="o" if name == "ALS" else None, markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("passes over the observed entries")
    ax.set_ylabel("training loss / |Ω|  (squared error + L2)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return Path(path)


def main(
    out: str = "mf_out",
    domains: list[str] | None = None,
    max_docs_per_domain: int | None = None,
    vocab_size: int = 3000,
    window: int = 2,
    rank: int = 32,
    lam: float = 0.05,
    lr: float = 0.05,
    batch_size: int = 512,
    epochs: int = 15,
    p: int = 4,
    workers: int = 4,
    seed: int = 0,
) -> dict[str, Result]:
    """Factorise the word-context PPMI matrix with the five methods; print a table, write a plot.

    Args:
        out: Output folder (``mf_loss.png``).
        domains: local_corpus domains whose words build the matrix, their union (default: docstrings,
            comments, pydoc_topics).
        max_docs_per_domain: Read at most this many documents per domain (default: all).
        vocab_size: Words (rows) and context words (columns).
        window: Context window, tokens either side.
        rank: Rank of the factorization.
        lam: L2 coefficient λ.
        lr: SGD step in the first pass (pass t: lr / sqrt(1 + t)).
        batch_size: Entries per SGD step.
        epochs: Passes over the observed entries (ALS: iterations).
        p: Workers of the parameter-mixing methods; DSGD's p x p blocks.
        workers: DSGD processes; 1 runs the blocks of a stratum one after the other.
        seed: Seed of the initial factors, the partitions and every order.
    """
    torch.set_num_threads(1)  # small matrices; on a shared machine more threads only contend
    cfg = MFConfig(rank=rank, lam=lam, lr=lr, batch_size=batch_size, epochs=epochs, p=p, workers=workers, seed=seed)
    domains = list(PROSE_DOMAINS if domains is None else domains)
    tokens = corpus_tokens(domains, max_docs_per_domain)
    matrix = ppmi_matrix(tokens, vocab_size, window)
    log(f"{matrix} (domains: {', '.join(domains)}; window {window})")
    results = factorize(matrix.ppmi, cfg)
    print()
    print(f"training loss / |Ω| (rank {rank}, λ {lam}, p {p}; ALS: one pass = one iteration)")
    print(table(results))
    print()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = plot(
        results,
        out_dir / "mf_loss.png",
        f"{matrix.ppmi.shape[0]}x{matrix.ppmi.shape[1]} PPMI, {matrix.ppmi.nnz:,d} entries, rank {rank}",
    )
    log(f"plot: {path}")
    return results


if __name__ == "__main__":
    from jsonargparse import auto_cli

    # The flexmoe command's spellings too: `--domains a b` for a list, `--max-docs-per-domain`.
    from flexmoe.cli import normalize_options

    auto_cli(main, args=normalize_options(sys.argv[1:], {"domains": "list"}), as_positional=False)
