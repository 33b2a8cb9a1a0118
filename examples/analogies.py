"""Analogies in sparse and dense word vectors (Levy & Goldberg, CoNLL 2014), then the same on models.

Why this example is here: task arithmetic (Ilharco et al., 2023; :mod:`flexmoe.merge.task_arithmetic`)
edits a model by adding and subtracting weight differences, "A is to B as C is to D" for tasks.
The idea comes from word vectors, where ``king - man + woman ≈ queen``. This example measures the
word version on text found on this machine, then runs the model version.

**Words.** The word-context PPMI matrix of ``examples/matrix_factorization.py`` (its functions are
imported): sparse vectors are its rows; dense vectors are the word factors ``W`` of its
factorizations (rank 32; default ALS and DSGD), ``U√S`` of the truncated SVD of the same matrix,
and skip-gram vectors with negative sampling (SGNS: gensim's ``Word2Vec``, dimension 100, trained
on the same word stream with the same window; one worker thread and a seed, so the vectors are the
same on every run). An analogy question ``a : a* :: b : ?`` comes from two word pairs of one
relation (:data:`RELATIONS`, written out below: plural, third person, past tense, gerund, -er,
-est, -ly, un-, agent -er); the answer is ``b*``. Questions are kept only when all four words are
in the vocabulary (the run prints how many), and the answer is searched over the whole
vocabulary except ``a``, ``a*`` and ``b``. The standard Google analogy questions (Mikolov et al.
2013, gensim's ``questions-words.txt``) are scored the same way, on the questions whose four
words are in the vocabulary (on this programming prose: only grammatical sections survive).

* 3CosAdd: ``argmax_x cos(x, b) − cos(x, a) + cos(x, a*)``.
* 3CosMul: ``argmax_x cos'(x, b) · cos'(x, a*) / (cos'(x, a) + ε)`` with ``ε = 0.001`` and every cosine
  shifted to ``[0, 1]``, ``cos' = (cos + 1) / 2``. PPMI rows are non-negative, so their cosines are
  in ``[0, 1]`` even unshifted; the table also shows 3CosMul on them without the shift, where
  the many cosines that are exactly 0 in a sparse space make ``1 / ε`` dominate the score.

Levy & Goldberg found 3CosMul at least as accurate as 3CosAdd on both kinds of vectors. The run
prints, for each representation, whether that holds here, whichever way it comes out.

The factorizations of ``matrix_factorization.py`` fit the *observed* entries only (the loss the
distributed-SGD comparison is about), so nothing ties a word's vector to the contexts it never
occurs with; as word vectors they answer almost no analogies. The SVD, which counts every
unobserved entry as a zero, is the dense reference that shows it is the loss and not the
rank (the measured tables are at the end of this docstring).

**Models.** The same arithmetic on task vectors ``τ = θ_ft − θ_base``
(:class:`flexmoe.merge.TaskVector`, :func:`flexmoe.merge.analogy`). By default four text domains
form a square: two local_corpus domains (``docstrings``, ``stdlib_code``), each as written and
upper-cased (a domain spec in capitals, ``STDLIB_CODE``, means that domain's text upper-cased).
A tiny byte-level OLMo-2 base model (2 layers, width 64) is trained on ``pydoc_topics``; copies
are fine-tuned on A = ``DOCSTRINGS``, B = ``stdlib_code`` and C = ``docstrings``. The analogy
"docstrings : DOCSTRINGS :: stdlib_code : STDLIB_CODE", ``τ_D ≈ τ_A + τ_B − τ_C``, predicts a
model for upper-cased code that nobody trained: ``θ_base + λ (τ_A + τ_B − τ_C)``. The table gives
the held-out loss (nats per byte) on all four domains of the base, each expert alone,
``τ_A + τ_B`` without the subtraction, the analogy at several ``λ``, and an oracle fine-tuned on D
itself (which the analogy does not use). ``--experts A B C --base DIR`` evaluates saved
``transformers`` models instead (e.g. ``OUT/models/*`` of an earlier run) and trains nothing.

Run ``python examples/analogies.py --help``.

Measured with the defaults (``python examples/analogies.py``; 2 CPU cores shared with other jobs,
load average 5-10: 3 min 30 s wall, 72 s of CPU, before the skip-gram vectors, which add about
20 s; every number is deterministic)::

    7740 questions (plural 3782, 3rd person 930, past 1122, gerund 756, -er 90, -est 20, -ly 552,
    un- 182, agent -er 306) over a 3000-word vocabulary; accuracy over all of them:
                          3CosAdd  3CosMul  3CosMul, unshifted cosines
    PPMI rows (sparse)      28.2%    28.3%    7.5%
    ALS W, rank 32           0.9%     0.3%
    DSGD W, rank 32          1.1%     0.7%
    SVD U√S, rank 32        21.9%    16.8%
    SGNS, dim 100           22.6%    20.9%

    282 Google questions (all grammatical sections) over the same vocabulary:
                          3CosAdd  3CosMul
    PPMI rows (sparse)       7.4%     6.4%
    SVD U√S, rank 32         3.9%     2.1%
    SGNS, dim 100           11.7%     9.9%

    held-out loss, nats/byte        A=DOCSTRINGS  B=stdlib_code  C=docstrings  D=STDLIB_CODE
    base                                   6.776          2.605         2.540          4.684
    base + τ_A                             2.572          4.314         5.912          2.518
    base + τ_B                             4.324          2.056         2.881          3.192
    base + τ_C                             5.006          2.457         2.345          3.846
    base + τ_A + τ_B                       2.828          4.284         6.501          2.420
    base + λ(τ_A + τ_B − τ_C), λ=0.5       3.105          2.679         3.437          2.620
    base + λ(τ_A + τ_B − τ_C), λ=0.75      2.857          3.231         4.636          2.443
    base + λ(τ_A + τ_B − τ_C), λ=1         2.843          3.924         5.900          2.427
    oracle (fine-tuned on D)               3.013          4.199         6.100          2.165

Words: on the sparse PPMI vectors 3CosMul matches 3CosAdd (28.3% vs 28.2%, far from the paper's
margin), and only with the shift -- on raw cosines it collapses to 7.5%. On every dense
representation here, skip-gram vectors included, 3CosMul is *less* accurate than 3CosAdd, unlike
the paper, and on the Google questions it loses on all three, PPMI too. The factorizations
of the observed entries answer about 1%, the SVD of the same matrix 22%: the loss, not the
rank, is what the vectors lack.

Models: the analogy predicts a far better model for upper-cased code than the base (2.43 vs 4.68
nats/byte) and than any single expert (best: τ_A, 2.52), but no better than plain addition
``τ_A + τ_B`` (2.42): subtracting ``τ_C`` buys nothing measurable at this scale, and the oracle
is 0.26 nats/byte better still. A shorter run (base 60 steps, experts 40, batch 16) put the
analogy behind ``τ_A`` alone (2.83 vs 2.68 on D). Models this small and this briefly trained are
far from the regime where task vectors add linearly (Ortiz-Jiménez et al., 2023), so read the
model half as a demonstration of the API, not as evidence for or against task analogies.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is a folder of scripts, not a package
from matrix_factorization import MFConfig, corpus_tokens, factorize, ppmi_matrix

from flexmoe.data.corpus import local_corpus
from flexmoe.merge import TaskVector, analogy

T0 = time.perf_counter()
EPS = 1e-3  # Levy & Goldberg's ε
VOCAB = 257  # the models' tokens: 256 byte values (+1) and 0, the end of a document


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


# -- questions ----------------------------------------------------------------------------------

# (base form, derived form) pairs, written as "base derived base derived ...". Words of
# programming prose, so that the corpus (docstrings, comments, the language reference) holds them.
RELATIONS = {
    "noun: plural": "function functions argument arguments file files object objects value values method methods "
    "class classes string strings module modules name names type types element elements item items key keys "
    "line lines character characters byte bytes list lists attribute attributes parameter parameters "
    "error errors option options directory directories entry entries instance instances number numbers "
    "operation operations variable variables statement statements expression expressions thread threads "
    "node nodes field fields word words event events handler handlers header headers message messages "
    "path paths command commands result results block blocks buffer buffers socket sockets tuple tuples "
    "dictionary dictionaries exception exceptions warning warnings format formats mode modes flag flags "
    "digit digits column columns row rows test tests example examples version versions program programs "
    "user users child children process processes address addresses year years",
    "verb: 3rd person": "return returns raise raises read reads write writes create creates contain contains "
    "use uses open opens close closes add adds remove removes get gets check checks convert converts "
    "parse parses accept accepts define defines call calls take takes make makes need needs allow allows "
    "support supports include includes provide provides require requires handle handles generate generates "
    "match matches find finds start starts run runs work works",
    "verb: past tense": "return returned raise raised call called create created use used open opened "
    "close closed add added remove removed pass passed define defined ignore ignored convert converted "
    "parse parsed print printed accept accepted change changed process processed require required "
    "support supported handle handled allow allowed import imported load loaded store stored "
    "generate generated replace replaced update updated delete deleted compute computed execute executed "
    "provide provided include included expect expected",
    "verb: gerund": "return returning read reading write writing call calling create creating use using "
    "open opening close closing add adding remove removing pass passing parse parsing print printing "
    "process processing handle handling load loading search searching match matching build building "
    "check checking convert converting encode encoding decode decoding compare comparing run running "
    "get getting set setting keep keeping",
    "adjective: -er": "small smaller large larger long longer short shorter high higher low lower "
    "fast faster big bigger great greater few fewer late later early earlier old older new newer "
    "near nearer simple simpler easy easier",
    "adjective: -est": "small smallest large largest long longest short shortest high highest "
    "low lowest fast fastest big biggest great greatest few fewest late latest early earliest old oldest "
    "new newest near nearest simple simplest easy easiest",
    "adjective: -ly": "exact exactly direct directly explicit explicitly automatic automatically "
    "usual usually correct correctly normal normally current currently optional optionally "
    "internal internally final finally previous previously recursive recursively actual actually "
    "strict strictly general generally implicit implicitly proper properly typical typically "
    "separate separately partial partially complete completely safe safely similar similarly",
    "negation: un-": "known unknown supported unsupported defined undefined specified unspecified "
    "available unavailable changed unchanged expected unexpected signed unsigned used unused "
    "safe unsafe necessary unnecessary locked unlocked documented undocumented register unregister "
    "pack unpack",
    "noun: agent -er": "read reader write writer load loader build builder check checker work worker "
    "help helper count counter parse parser handle handler compile compiler format formatter "
    "open opener find finder call caller track tracker encode encoder decode decoder listen listener "
    "import importer",
}


def relation_pairs() -> dict[str, list[tuple[str, str]]]:
    out = {}
    for name, text in RELATIONS.items():
        words = text.split()
        if len(words) % 2:
            raise ValueError(f"RELATIONS[{name!r}] has an odd number of words; it lists (base, derived) pairs")
        out[name] = list(zip(words[::2], words[1::2]))
    return out


@dataclass(frozen=True)
class Question:
    """``a : a_star :: b : b_star`` (indices into the vocabulary)."""

    relation: str
    a: int
    a_star: int
    b: int
    b_star: int


def analogy_questions(words: Sequence[str], max_per_relation: int | None = None, seed: int = 0) -> list[Question]:
    """Every ordered pair of distinct pairs of a relation whose four words are all in ``words``;
    at most ``max_per_relation`` per relation (a seeded sample)."""
    index = {w: i for i, w in enumerate(words)}
    out = []
    for relation, pairs in relation_pairs().items():
        kept = [(index[x], index[y]) for x, y in pairs if x in index and y in index]
        qs = [Question(relation, a, a2, b, b2) for a, a2 in kept for b, b2 in kept if (a, a2) != (b, b2)]
        if max_per_relation is not None and len(qs) > max_per_relation:
            qs = random.Random(f"{seed}/{relation}").sample(qs, max_per_relation)
        out.extend(qs)
    return out


# -- 3CosAdd and 3CosMul ---------------------------------------------------------------------------


def cosines(vectors: torch.Tensor | sp.spmatrix) -> torch.Tensor:
    """``[V, V]`` cosine similarities between the rows (dense tensor or scipy sparse matrix)."""
    if sp.issparse(vectors):
        x = sp.csr_matrix(vectors, dtype=np.float64)
        norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        x = sp.diags(1 / np.maximum(norm, 1e-12)) @ x
        return torch.from_numpy((x @ x.T).toarray()).float()
    x = F.normalize(vectors.double(), dim=1)
    return (x @ x.T).float()


VARIANTS = {"3CosAdd": ("3CosAdd", False), "3CosMul": ("3CosMul", True), "3CosMul, no shift": ("3CosMul", False)}
VARIANTS_DENSE = ("3CosAdd", "3CosMul")  # unshifted 3CosMul is for non-negative (sparse PPMI) vectors only


def answer(
    sims: torch.Tensor, questions: Sequence[Question], method: str, shift: bool, chunk: int = 512
) -> torch.Tensor:
    """The predicted ``b*`` of every question by ``method`` (``"3CosAdd"`` or ``"3CosMul"``).
    ``shift``: map cosines to ``[0, 1]`` by ``(cos + 1) / 2`` for 3CosMul."""
    if method not in ("3CosAdd", "3CosMul"):
        raise ValueError(f"method must be '3CosAdd' or '3CosMul', got {method!r}")
    preds = []
    for s in range(0, len(questions), chunk):
        qs = questions[s : s + chunk]
        a, a2, b = (torch.tensor([getattr(q, f) for q in qs]) for f in ("a", "a_star", "b"))
        ca, ca2, cb = sims[a], sims[a2], sims[b]  # [Q, V]: cos(x, a) for every word x
        if method == "3CosAdd":
            score = cb - ca + ca2
        else:
            if shift:
                ca, ca2, cb = (ca + 1) / 2, (ca2 + 1) / 2, (cb + 1) / 2
            score = cb * ca2 / (ca + EPS)
        rows = torch.arange(len(qs))
        for banned in (a, a2, b):  # the question's own words are never the answer
            score[rows, banned] = -float("inf")
        preds.append(score.argmax(1))
    return torch.cat(preds)


def accuracies(
    sims: torch.Tensor, questions: Sequence[Question], variants: Sequence[str] = ("3CosAdd", "3CosMul")
) -> dict[str, dict[str, float]]:
    """``{variant: {relation: accuracy, ..., "all": over all questions}}`` for variants of :data:`VARIANTS`."""
    gold = torch.tensor([q.b_star for q in questions])
    out = {}
    for variant in variants:
        right = answer(sims, questions, *VARIANTS[variant]) == gold
        acc = {}
        for relation in dict.fromkeys(q.relation for q in questions):
            mask = torch.tensor([q.relation == relation for q in questions])
            acc[relation] = float(right[mask].float().mean())
        acc["all"] = float(right.float().mean())
        out[variant] = acc
    return out


SHORT = {"3CosAdd": "add", "3CosMul": "mul", "3CosMul, no shift": "mul raw"}
LEGEND = "add: 3CosAdd; mul: 3CosMul (cosines shifted to [0, 1], ε = 0.001); mul raw: 3CosMul on unshifted cosines"


def accuracy_table(results: dict[str, dict[str, dict[str, float]]], counts: dict[str, int]) -> str:
    """Rows: relations (with question counts); columns: representation x variant (:data:`LEGEND`)."""
    w, gap = 9, "  "
    head1 = f"{'':30s}" + "".join(f"{gap}{rep[: w * len(results[rep])]:>{w * len(results[rep])}s}" for rep in results)
    head2 = f"{'relation':24s}{'n':>6s}" + "".join(
        gap + "".join(f"{SHORT[v]:>{w}s}" for v in results[rep]) for rep in results
    )
    lines = [head1, head2, "-" * len(head2)]
    for relation, n in {**counts, "all": sum(counts.values())}.items():
        cells = "".join(gap + "".join(f"{acc[relation]:>{w}.1%}" for acc in results[rep].values()) for rep in results)
        lines.append(f"{relation:24s}{n:6d}{cells}")
    return "\n".join([*lines, LEGEND])


def svd_factor(matrix: sp.spmatrix, rank: int, seed: int = 0) -> torch.Tensor:
    """``U √S`` of the rank-``rank`` truncated SVD: the ``W`` of the ``W Hᵀ`` that minimises the
    squared error over *all* entries, unobserved ones counted as zeros (the reference for dense
    vectors; Levy, Goldberg and Dagan 2015)."""
    from scipy.sparse.linalg import svds

    u, s, _ = svds(sp.csr_matrix(matrix, dtype=np.float64), k=rank, random_state=seed)
    return torch.from_numpy(u * np.sqrt(s)).float()


def sgns_vectors(
    tokens: Sequence[str], words: Sequence[str], dim: int, window: int, epochs: int, seed: int = 0
) -> torch.Tensor:
    """Skip-gram with negative sampling (Mikolov et al. 2013; gensim's ``Word2Vec``, ``sg=1``,
    5 negatives) trained on ``tokens``, the same word stream as the PPMI matrix, with the same
    context ``window``; returns the vectors of ``words`` (rows in that order). One worker thread
    and a fixed seed make the vectors deterministic (gensim seeds each word's initial vector from
    the seed, not from Python's salted ``hash``)."""
    from gensim.models import Word2Vec  # deferred: optional (the dev extra); only this part needs it

    sentences = [list(tokens[i : i + 1000]) for i in range(0, len(tokens), 1000)]  # gensim's limit is 10,000
    model = Word2Vec(
        sentences, vector_size=dim, window=window, min_count=1, sg=1, negative=5, workers=1, seed=seed, epochs=epochs
    )
    return torch.from_numpy(np.stack([model.wv[w] for w in words])).float()


def google_questions(words: Sequence[str], path: str | os.PathLike | None = None) -> list[Question]:
    """The Google analogy test set (Mikolov et al. 2013: 19,544 questions in 14 sections, the
    file gensim ships as ``questions-words.txt``), lower-cased, keeping only the questions whose
    four words are all in ``words``. Relations are the file's section names."""
    if path is None:
        from gensim.test.utils import datapath  # deferred: as in sgns_vectors

        path = datapath("questions-words.txt")
    index = {w: i for i, w in enumerate(words)}
    out, relation = [], None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            relation = line[1:].strip()
            continue
        quad = line.lower().split()
        if len(quad) == 4 and all(w in index for w in quad):
            out.append(Question(relation, *(index[w] for w in quad)))
    return out


@dataclass
class WordResults:
    """Accuracies (:func:`accuracies`) of every representation on both question sets."""

    own: dict[str, dict[str, dict[str, float]]]  # the RELATIONS questions
    own_counts: dict[str, int]
    google: dict[str, dict[str, dict[str, float]]]  # the Google questions on the covered vocabulary
    google_counts: dict[str, int]
    vocabulary: int


def word_analogies(
    corpus: dict,
    domains: Sequence[str],
    vocab_size: int = 3000,
    window: int = 2,
    rank: int = 32,
    epochs: int = 15,
    factorizations: Sequence[str] = ("ALS", "DSGD"),
    max_questions_per_relation: int | None = None,
    sgns_dim: int = 100,
    sgns_epochs: int = 15,
    seed: int = 0,
) -> WordResults:
    """3CosAdd and 3CosMul on PPMI rows, the factorizations' ``W``, the SVD and SGNS (``sgns_dim``
    0: no SGNS), scored on :data:`RELATIONS` and on the Google questions."""
    tokens = corpus_tokens(domains, corpus=corpus)
    matrix = ppmi_matrix(tokens, vocab_size, window)
    log(f"{matrix} (domains: {', '.join(domains)})")
    questions = analogy_questions(matrix.words, max_questions_per_relation, seed)
    counts = {r: n for r in RELATIONS if (n := sum(q.relation == r for q in questions))}
    if not questions:
        raise SystemExit("analogies: no question has all four words in the vocabulary; raise vocab_size")
    log(
        f"{len(questions)} analogy questions with all four words in the vocabulary: "
        + ", ".join(f"{r} {n}" for r, n in counts.items())
    )
    sims = {"PPMI rows (sparse)": cosines(matrix.ppmi)}
    cfg = MFConfig(rank=rank, epochs=epochs, seed=seed, workers=1)
    if factorizations:
        for method, r in factorize(matrix.ppmi, cfg, list(factorizations)).items():
            sims[f"{method} W, rank {rank}"] = cosines(r.factors["W"])
    sims[f"SVD U√S, rank {rank}"] = cosines(svd_factor(matrix.ppmi, rank, seed))
    if sgns_dim:
        t = time.perf_counter()
        sims[f"SGNS, dim {sgns_dim}"] = cosines(sgns_vectors(tokens, matrix.words, sgns_dim, window, sgns_epochs, seed))
        log(f"SGNS: {sgns_epochs} epochs, window {window}, {time.perf_counter() - t:.1f}s")
    own = {
        label: accuracies(s, questions, tuple(VARIANTS) if label.startswith("PPMI") else VARIANTS_DENSE)
        for label, s in sims.items()
    }
    google = google_questions(matrix.words)
    g_counts = {}
    for q in google:
        g_counts[q.relation] = g_counts.get(q.relation, 0) + 1
    log(f"{len(google)} Google analogy questions with all four words in the vocabulary")
    g_acc = {label: accuracies(s, google) for label, s in sims.items() if "W, rank" not in label} if google else {}
    return WordResults(own, counts, g_acc, g_counts, len(matrix.words))


def verdict(acc: dict[str, dict[str, float]], label: str) -> str:
    """One honest sentence on 3CosMul vs 3CosAdd (overall accuracy)."""
    add, mul = acc["3CosAdd"]["all"], acc["3CosMul"]["all"]
    if mul >= add:
        return f"{label}: 3CosMul is at least as accurate as 3CosAdd ({mul:.1%} vs {add:.1%}), as Levy & Goldberg found"
    return f"{label}: 3CosMul is NOT at least as accurate as 3CosAdd ({mul:.1%} vs {add:.1%}), unlike Levy & Goldberg"


# -- task analogies on models -------------------------------------------------------------------


def domain_texts(spec: str, corpus: dict) -> tuple[list[str], list[str]]:
    """``(train, val)`` documents of a domain spec: a local_corpus name, upper-cased when written in capitals."""
    name = spec.lower()
    if name not in corpus:
        raise ValueError(
            f"unknown domain {spec!r}; use a local_corpus domain ({', '.join(corpus)}), "
            "in capitals for its upper-cased text"
        )
    d = corpus[name]
    if spec.isupper():
        return [t.upper() for t in d.train], [t.upper() for t in d.val]
    return list(d.train), list(d.val)


def byte_rows(docs: Sequence[str], seq_len: int, max_bytes: int) -> torch.Tensor:
    """Documents as UTF-8 bytes (token = byte + 1; 0 separates documents), cut into rows."""
    from flexmoe.data.packing import pack

    ids, total = [], 0
    for doc in docs:
        b = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 1
        ids.append(b[: max_bytes - total])
        total += len(ids[-1]) + 1
        if total >= max_bytes:
            break
    rows, _ = pack(ids, eos_token_id=0, seq_len=seq_len)
    return rows.long()


def tiny_lm(seed: int, seq_len: int):
    from transformers import AutoModelForCausalLM, Olmo2Config

    torch.manual_seed(seed)
    config = Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(256, seq_len),
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def train_lm(model, rows: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """AdamW on random batches of ``rows``; returns the mean loss of the last 10 steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def held_out_loss(model, rows: torch.Tensor) -> float:
    """Mean next-token NLL (nats per byte) over ``rows``."""
    from flexmoe.evaluate import domain_nll

    r = domain_nll(model, rows)
    return r["nll_sum"] / r["predicted_tokens"]


def _and(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + (items[-1] if items else "")


@dataclass
class ModelAnalogy:
    """The model half's outcome: ``losses[label][domain]`` and the domain roles."""

    losses: dict[str, dict[str, float]]
    roles: dict[str, str]  # "A", "B", "C", "D" -> domain spec

    def table(self) -> str:
        doms = [self.roles[r] for r in "ABCD"]
        head = f"{'held-out loss (nats/byte)':34s}" + "".join(f"{f'{r}={d}':>18s}" for r, d in zip("ABCD", doms))
        lines = [head, "-" * len(head)]
        for label, row in self.losses.items():
            lines.append(f"{label:34s}" + "".join(f"{row[d]:18.3f}" for d in doms))
        return "\n".join(lines)

    def summary(self) -> str:
        d = self.roles["D"]
        base = self.losses["base"][d]
        singles = {k: v[d] for k, v in self.losses.items() if k.startswith(tuple(f"base + τ_{r} (" for r in "ABC"))}
        best_single = min(singles, key=singles.get)
        ana = {k: v[d] for k, v in self.losses.items() if k.startswith("base + λ(τ_A + τ_B − τ_C)")}
        best = min(ana, key=ana.get)
        plain = self.losses["base + τ_A + τ_B"][d]
        parts = [f"on D = {d}: base {base:.3f}; best analogy ({best.split(', ')[-1].rstrip(')')}) {ana[best]:.3f}"]
        parts.append(f"best single expert ({best_single[len('base + ') :]}) {singles[best_single]:.3f}")
        parts.append(f"τ_A + τ_B without − τ_C {plain:.3f}")
        if "oracle" in self.losses:
            parts.append(f"oracle fine-tuned on D {self.losses['oracle'][d]:.3f}")
        better = [
            name
            for name, v in (("the base", base), ("the best single expert", singles[best_single]), ("τ_A + τ_B", plain))
            if ana[best] < v
        ]
        worse = [n for n in ("the base", "the best single expert", "τ_A + τ_B") if n not in better]
        verdict_ = f"The analogy beats {_and(better) or 'none of them'}"
        if worse and better:
            verdict_ += f", but not {_and(worse)}"
        return "; ".join(parts) + ". " + verdict_ + "."


def model_analogy(
    corpus: dict,
    roles: dict[str, str],
    base_domain: str,
    lambdas: Sequence[float],
    base_steps: int,
    finetune_steps: int,
    seq_len: int,
    batch_size: int,
    max_bytes: int,
    eval_bytes: int,
    seed: int,
    out: Path,
    base_dir: str | None = None,
    expert_dirs: Sequence[str] | None = None,
) -> ModelAnalogy:
    """Train (or load) base and experts A, B, C, then evaluate task-vector combinations (module docstring)."""
    from transformers import AutoModelForCausalLM

    data = {spec: domain_texts(spec, corpus) for spec in {*roles.values(), base_domain}}
    train_rows = {s: byte_rows(tr, seq_len, max_bytes) for s, (tr, _) in data.items()}
    val_rows = {s: byte_rows(va, seq_len, eval_bytes) for s, (_, va) in data.items()}
    for s, rows in {**train_rows, **val_rows}.items():
        if len(rows) == 0:
            raise SystemExit(f"analogies: domain {s!r} has too little text for one row of {seq_len} bytes")

    experts: dict[str, torch.nn.Module] = {}
    if expert_dirs:
        if base_dir is None or len(expert_dirs) != 3:
            raise SystemExit("analogies: --experts takes three model folders (A B C) and needs --base")
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        for role, path in zip("ABC", expert_dirs):
            experts[role] = AutoModelForCausalLM.from_pretrained(path).eval()
        for label, m in [("--base", base), *(("--experts " + r, experts[r]) for r in "ABC")]:
            if m.config.vocab_size != VOCAB:
                raise SystemExit(
                    f"analogies: {label} has a vocabulary of {m.config.vocab_size}; this example "
                    f"evaluates byte-level models (vocabulary {VOCAB}), as it saves under OUT/models/"
                )
        log(f"loaded base {base_dir} and experts A, B, C from {', '.join(map(str, expert_dirs))}")
    else:
        base = tiny_lm(seed, seq_len)
        loss = train_lm(base, train_rows[base_domain], base_steps, batch_size, 3e-3, seed)
        log(f"base model: {base_steps} steps on {base_domain}, training loss {loss:.3f}")
        base.save_pretrained(out / "models" / "base")
        for k, role in enumerate("ABCD"):
            model = AutoModelForCausalLM.from_pretrained(out / "models" / "base").eval()
            loss = train_lm(model, train_rows[roles[role]], finetune_steps, batch_size, 1e-3, seed + 1 + k)
            name = "oracle" if role == "D" else role
            model.save_pretrained(out / "models" / name)
            experts[name] = model
            log(
                f"{'oracle (not used by the analogy)' if role == 'D' else 'expert ' + role}: "
                f"{finetune_steps} steps on {roles[role]}, training loss {loss:.3f}"
            )

    tau = {role: TaskVector.from_models(experts[role], base) for role in "ABC"}
    cos = tau["A"].cosine(tau["C"])
    log(
        f"task vectors: |τ_A| {tau['A'].norm():.3f}, |τ_B| {tau['B'].norm():.3f}, |τ_C| {tau['C'].norm():.3f}; "
        f"cos(τ_A, τ_C) {cos:.3f}"
    )
    candidates = {"base": base}
    for role in "ABC":
        candidates[f"base + τ_{role} ({roles[role]})"] = tau[role].apply(base)
    candidates["base + τ_A + τ_B"] = (tau["A"] + tau["B"]).apply(base)
    for lam in lambdas:  # θ_base + λ (τ_A + τ_B − τ_C): flexmoe.merge.analogy with λ1 = λ2 = λ3 = λ
        tau_d = analogy(tau["A"], tau["B"], tau["C"], (lam,) * 3)
        candidates[f"base + λ(τ_A + τ_B − τ_C), λ={lam:g}"] = tau_d.apply(base)
    if "oracle" in experts:
        candidates["oracle"] = experts["oracle"]
    losses = {}
    for label, model in candidates.items():
        losses[label] = {roles[r]: held_out_loss(model, val_rows[roles[r]]) for r in "ABCD"}
    return ModelAnalogy(losses, dict(roles))


# -- the run ---------------------------------------------------------------------------------------


def main(
    out: str = "analogies_out",
    domains: list[str] | None = None,
    max_docs_per_domain: int | None = None,
    vocab_size: int = 3000,
    window: int = 2,
    rank: int = 32,
    epochs: int = 15,
    factorizations: list[str] | None = None,
    max_questions_per_relation: int | None = None,
    sgns_dim: int = 100,
    sgns_epochs: int = 15,
    analogy_domains: list[str] | None = None,
    base_domain: str = "pydoc_topics",
    lambdas: list[float] | None = None,
    base_steps: int = 200,
    finetune_steps: int = 80,
    seq_len: int = 128,
    batch_size: int = 8,
    max_bytes: int = 300_000,
    eval_bytes: int = 16_384,
    base: str | None = None,
    experts: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """Word analogies on sparse and dense vectors, then task analogies on models.

    Args:
        out: Output folder (``analogies.txt``; ``models/`` with the trained base, experts and oracle).
        domains: local_corpus domains whose words build the PPMI matrix (default: docstrings, comments,
            pydoc_topics).
        max_docs_per_domain: Read at most this many documents per domain (default: all).
        vocab_size: Words in the matrix (rows and context columns).
        window: Context window, tokens either side.
        rank: Rank of the dense factorizations.
        epochs: Passes (ALS: iterations) of each factorization.
        factorizations: Which methods of matrix_factorization.py give dense vectors (default: ALS, DSGD).
        max_questions_per_relation: Cap on questions per relation (a seeded sample; default: all).
        sgns_dim: Dimension of the skip-gram vectors (gensim's Word2Vec; 0: none).
        sgns_epochs: Training epochs of the skip-gram vectors.
        analogy_domains: Domain specs A B C D of the model analogy (capitals: upper-cased text;
            default: DOCSTRINGS stdlib_code docstrings STDLIB_CODE).
        base_domain: Domain the tiny base model is trained on.
        lambdas: Scales λ of θ_base + λ(τ_A + τ_B − τ_C) (default: 0.5 0.75 1.0).
        base_steps: Training steps of the base model.
        finetune_steps: Fine-tuning steps of each expert (and of the oracle).
        seq_len: Bytes per training row.
        batch_size: Rows per step.
        max_bytes: Cap on each domain's training bytes.
        eval_bytes: Held-out bytes per domain (from its validation documents) for the loss table.
        base: With --experts: the base model folder (``save_pretrained``; byte-level, as this example saves).
        experts: Three model folders A B C fine-tuned from --base; no models are trained then.
        seed: Seed of everything.
    """
    torch.set_num_threads(1)  # tiny matrices and models; on a shared machine more threads only contend
    domains = list(domains or ("docstrings", "comments", "pydoc_topics"))
    factorizations = list(factorizations or ("ALS", "DSGD"))
    roles = dict(zip("ABCD", analogy_domains or ("DOCSTRINGS", "stdlib_code", "docstrings", "STDLIB_CODE")))
    if len(roles) != 4:
        raise SystemExit(f"analogies: --analogy_domains takes four domain specs A B C D, got {analogy_domains}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # One local corpus for both halves: the words' domains and the models' (lower-cased names).
    needed = dict.fromkeys([*domains, *(s.lower() for s in roles.values()), base_domain.lower()])
    corpus = local_corpus(max_docs_per_domain, domains=list(needed))

    # 1. Words: sparse PPMI rows, dense factors of the same matrix, and skip-gram vectors.
    words = word_analogies(
        corpus,
        domains,
        vocab_size,
        window,
        rank,
        epochs,
        factorizations,
        max_questions_per_relation,
        sgns_dim,
        sgns_epochs,
        seed,
    )
    results, counts = words.own, words.own_counts
    words_table = accuracy_table(results, counts)
    verdicts = [verdict(acc, label) for label, acc in results.items()]
    print()
    print(f"analogy accuracy (answer searched over all {words.vocabulary} words except the three given)")
    print(words_table)
    print()
    for v in verdicts:
        print(v)
    google_table, google_verdicts = "", []
    if words.google:
        google_table = accuracy_table(words.google, words.google_counts)
        google_verdicts = [verdict(acc, f"Google questions, {label}") for label, acc in words.google.items()]
        print()
        print(
            f"the Google analogy questions whose four words are in the vocabulary ({sum(words.google_counts.values())})"
        )
        print(google_table)
        print()
        for v in google_verdicts:
            print(v)
    print()

    # 2. Models: task vectors and their analogy.
    ma = model_analogy(
        corpus,
        roles,
        base_domain,
        lambdas or (0.5, 0.75, 1.0),
        base_steps,
        finetune_steps,
        seq_len,
        batch_size,
        max_bytes,
        eval_bytes,
        seed,
        out_dir,
        base,
        experts,
    )
    print()
    print(
        f"task analogy: {roles['C']} : {roles['A']} :: {roles['B']} : {roles['D']}   "
        "(θ_base + λ(τ_A + τ_B − τ_C) predicts a model for D)"
    )
    print(ma.table())
    print()
    print(ma.summary())
    report = out_dir / "analogies.txt"
    report.write_text(
        "\n".join(
            [words_table, "", *verdicts, "", google_table, "", *google_verdicts, "", ma.table(), "", ma.summary(), ""]
        ),
        encoding="utf-8",
    )
    log(f"tables written to {report}")
    return {
        "words": results,
        "counts": counts,
        "verdicts": verdicts,
        "google": words.google,
        "google_counts": words.google_counts,
        "google_verdicts": google_verdicts,
        "models": ma,
    }


if __name__ == "__main__":
    from jsonargparse import auto_cli

    # The flexmoe command's spellings too: `--domains a b` for a list, `--max-docs-per-domain`.
    from flexmoe.cli import normalize_options

    auto_cli(
        main,
        args=normalize_options(
            sys.argv[1:],
            {
                "domains": "list",
                "factorizations": "list",
                "analogy_domains": "list",
                "lambdas": "list",
                "experts": "list",
            },
        ),
        as_positional=False,
    )
