"""Why the posterior router stops short of BTM on a demo run (licences above all), measured.

Starts from a finished ``flexmoe demo`` run (``--demo DIR``) and rebuilds its ``flexolmo`` row (the
posterior router, as the demo built it). Prints three tables (the sweep first: it picks the settings table 2 scores):

1. **Accuracy of the domain choice** on the held-out rows the report scores, per domain and per
   position band of the row (0-3, 4-15, 16-63): the share of positions whose posterior argmax over
   all five domains is the right one (``all``), and for owner text the share whose chosen owner
   (argmax over the owners, the expert that runs) is the right one (``own``). Posteriors: the
   unigrams as shipped (the router's own counts); hashed bigrams and exact bigrams (counted here from
   each domain's packed training rows, as the owners count their unigrams); and BTM's (the prefix
   likelihood under each member model: the public model and each owner's own 2-expert model).
2. **Perplexity** of the posterior-routed model with the per-position posterior replaced
   (the decoder's posterior hook is overridden, every expert and pairwise router untouched): as
   shipped; ``hard`` (one-hot at the shipped posterior's argmax: same choices, no mixing);
   ``swap`` (the shipped posterior with the right owner's and the chosen owner's masses swapped:
   right owner, shipped mixing); ``oracle`` (one-hot at the right domain: the owner's own model);
   and the posteriors from hashed bigrams, exact bigrams, BTM, and the swept unigram settings.
3. **Sweep on the training text** (never the evaluation rows): each domain's training documents
   split 90/10 in order; counts from the first 90%, packed like the owners pack; scored on the
   rows of the last 10%: accuracy and the mean log-loss of the right domain, for unigram smoothing x
   temperature and for bigram interpolation weight x temperature. Temperature does not move the
   argmax (uniform prior), only the mixing; its choice is the lowest log-loss.

    .venv/bin/python benchmarks/posterior_diagnosis.py --demo demo_out
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from flexmoe.core.surgery import moe_blocks
from flexmoe.data.documents import split_documents
from flexmoe.data.packing import tokenize_and_pack
from flexmoe.experiments.demo import OWNERS, PUBLIC, DemoRun

DOMAINS = (PUBLIC, *OWNERS)
BANDS = ((0, 4), (4, 16), (16, 64))
HASH_MULT = 2654435761


# -- statistics -------------------------------------------------------------------------------------


def bucket_of(prev: torch.Tensor, cur: torch.Tensor, vocab: int, bits: int | None) -> torch.Tensor:
    """Bucket of the pair (prev, cur): exact (``prev * V + cur``) when ``bits`` is None, else the top
    ``bits`` bits of a 32-bit multiplicative (Knuth) hash of it."""
    pair = prev.long() * vocab + cur.long()
    if bits is None:
        return pair
    return ((pair * HASH_MULT) % (1 << 32)) >> (32 - bits)


class Stats:
    """Per-domain unigram, context and (hashed) bigram counts of packed rows ``[N, S]``."""

    def __init__(self, rows_by_domain: list[torch.Tensor], vocab: int, bits: int | None):
        self.vocab, self.bits = vocab, bits
        size = vocab * vocab if bits is None else 1 << bits
        E = len(rows_by_domain)
        self.uni = torch.zeros(E, vocab, dtype=torch.float64)
        self.ctx = torch.zeros(E, vocab, dtype=torch.float64)
        self.bi = torch.zeros(E, size, dtype=torch.float32)
        for d, rows in enumerate(rows_by_domain):
            rows = rows.long()
            self.uni[d] = torch.bincount(rows.reshape(-1), minlength=vocab).double()
            prev, cur = rows[:, :-1].reshape(-1), rows[:, 1:].reshape(-1)
            self.ctx[d] = torch.bincount(prev, minlength=vocab).double()
            self.bi[d] = torch.bincount(bucket_of(prev, cur, vocab, bits), minlength=size).float()

    def unigram_ll(self, rows: torch.Tensor, smoothing: float) -> torch.Tensor:
        """``log p(x_t | d)`` for every position: ``[N, S, E]``."""
        c = self.uni + smoothing
        table = (c.log() - c.sum(-1, keepdim=True).log()).T  # [V, E]
        return table[rows.long()]

    def bigram_ll(self, rows: torch.Tensor, smoothing: float, k: float) -> torch.Tensor:
        """``log p(x_t | x_{t-1}, d)`` with the bigram interpolated towards the unigram
        (``(c(prev, cur) + k p(cur)) / (c(prev) + k)``, a Dirichlet prior of weight ``k``); the
        first position of a row (no previous token in the row) takes the unigram."""
        rows = rows.long()
        uni = self.unigram_ll(rows, smoothing)  # [N, S, E]
        prev, cur = rows[:, :-1], rows[:, 1:]
        b = bucket_of(prev, cur, self.vocab, self.bits)
        pair = self.bi[:, b].permute(1, 2, 0).double()  # [N, S-1, E]
        ctx = self.ctx.T[prev]  # [N, S-1, E]
        ll = torch.log((pair + k * uni[:, 1:].exp()) / (ctx + k))
        return torch.cat([uni[:, :1], ll], 1)


def posterior(ll: torch.Tensor, temperature: float) -> torch.Tensor:
    """Causal tempered naive-Bayes posterior ``[N, S, E]`` from per-position log-likelihoods."""
    return torch.softmax(temperature * ll.cumsum(1), -1)


# -- accuracy ---------------------------------------------------------------------------------------


def accuracy(post: torch.Tensor, d: int) -> dict:
    """Shares of positions with the right 5-way argmax (``all``) and, for owner text, the right owner
    among the owners (``own``): overall and per band."""
    right_all = post.argmax(-1) == d
    right_own = (post[..., 1:].argmax(-1) + 1) == d
    out = {}
    for name, (lo, hi) in [("rows", (0, post.shape[1])), *((f"{a}-{b - 1}", (a, b)) for a, b in BANDS)]:
        hi = min(hi, post.shape[1])
        out[name] = {
            "all": float(right_all[:, lo:hi].float().mean()),
            "own": float(right_own[:, lo:hi].float().mean()) if d else float("nan"),
        }
    return out


def log_loss(post: torch.Tensor, d: int) -> float:
    return float(-post[..., d].clamp_min(1e-12).log().mean())


# -- models ---------------------------------------------------------------------------------------------


def member_logprobs(model, rows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """``log p(x_{t+1} | x_<=t)`` ``[N, S-1]`` of one model."""
    out = []
    with torch.inference_mode():
        for s in range(0, rows.shape[0], batch):
            x = rows[s : s + batch].long()
            logp = model(input_ids=x, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            out.append(logp.gather(-1, x[:, 1:, None])[..., 0])
    return torch.cat(out)


def btm_posterior(lps: torch.Tensor) -> torch.Tensor:
    """BTM's posterior over members at each position ``t`` (uniform prior, untempered), from the
    likelihood of ``x_1 .. x_t`` (``lps`` ``[N, S-1, E]``); uniform at ``t = 0``."""
    N, _, E = lps.shape
    return torch.softmax(torch.cat([lps.new_zeros(N, 1, E), lps.cumsum(1)], 1), -1)


class Forced:
    """Score the posterior-routed model with its posterior replaced per batch."""

    def __init__(self, model):
        self.model = model
        self.state = moe_blocks(model)[0].router.posterior
        self.current: torch.Tensor | None = None
        self.shipped = self.state.advance
        self.state.advance = self._advance

    def _advance(self, input_ids, attention_mask=None, past=0):
        if self.current is None:
            self.shipped(input_ids, attention_mask, past)
        else:
            self.state.probs = self.current.float().reshape(-1, self.current.shape[-1])

    def nll(self, rows: torch.Tensor, post: torch.Tensor | None, batch: int = 16) -> torch.Tensor:
        """Per-token NLL ``[N, S-1]``; ``post`` ``[N, S, E]`` or None for the shipped posterior."""
        out = []
        with torch.inference_mode():
            for s in range(0, rows.shape[0], batch):
                x = rows[s : s + batch].long()
                self.current = None if post is None else post[s : s + batch]
                logits = self.model(input_ids=x, use_cache=False).logits[:, :-1].float()
                out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
        self.current = None
        return torch.cat(out)

    def shipped_posterior(self, rows: torch.Tensor) -> torch.Tensor:
        self.state.advance = self.shipped
        try:
            with torch.inference_mode():
                self.shipped(rows.long(), None, 0)
                return self.state.probs.reshape(rows.shape[0], rows.shape[1], -1).double()
        finally:
            self.state.advance = self._advance


def swap_right(post: torch.Tensor, d: int) -> torch.Tensor:
    """The posterior with the right owner's mass and the chosen owner's swapped (public text: as is)."""
    if d == 0:
        return post
    chosen = post[..., 1:].argmax(-1, keepdim=True) + 1
    right = torch.full_like(chosen, d)
    out = post.clone()
    out.scatter_(-1, chosen, post.gather(-1, right))
    out.scatter_(-1, right, post.gather(-1, chosen))
    return out


def one_hot(index: torch.Tensor, E: int) -> torch.Tensor:
    return F.one_hot(index, E).double()


# -- main -------------------------------------------------------------------------------------------


def owner_split(run: DemoRun):
    """Every domain's training documents split as the owners' runs split them (``split_documents``,
    5% by content hash, the run's seed): ``(fit, tune)`` packed rows per domain. An owner trained on,
    and counted, ``fit``; its expert never saw ``tune``. The public domain is split the same way
    (its shipped counts cover all its training documents, and the public model trained on all)."""
    fit, tune = [], []
    for dom in DOMAINS:
        docs = list(run.corpus["domains"][dom].train)
        a, b = split_documents(docs, 0.05, run.cfg.seed)
        fit.append(tokenize_and_pack([docs[i] for i in a], run.tokenizer, run.cfg.seq_len)[0])
        tune.append(tokenize_and_pack([docs[i] for i in b], run.tokenizer, run.cfg.seq_len)[0])
    return fit, tune


def fmt(x: float, pct: bool = True) -> str:
    return "  -  " if math.isnan(x) else (f"{100 * x:5.1f}" if pct else f"{x:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished `flexmoe demo --out DIR` run")
    p.add_argument("--bits", type=int, default=16, help="hashed bigram buckets: 2**bits")
    p.add_argument("--held-out", type=float, default=0.1, help="share of training documents held out for the sweep")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = DemoRun.open(args.demo)
    model = run.flexolmo()
    router = moe_blocks(model)[0].router
    tau0, alpha0 = round(float(router.temperature), 4), round(float(router.smoothing), 4)
    E, V = router.unigram.shape
    rows = {d: run.rows[d].long() for d in DOMAINS}

    # statistics from the owners' training documents (the public domain: all of its), packed as counted
    fit, tune = owner_split(run)
    full_public = tokenize_and_pack(list(run.corpus["domains"][PUBLIC].train), run.tokenizer, run.cfg.seq_len)[0]
    train = [full_public, *fit[1:]]
    hashed, exact = Stats(train, V, args.bits), Stats(train, V, None)
    same = torch.equal(hashed.uni.float(), router.unigram.float().cpu())
    print(f"# posterior diagnosis of {args.demo} (tau {tau0:g}, smoothing {alpha0:g}, V {V}, E {E})")
    print(f"unigram counts recomputed from the owners' training documents equal the router's: {same}")
    for d, dom in enumerate(DOMAINS):
        nz = int((exact.bi[d] > 0).sum())
        print(
            f"  {dom:<14} counted tokens {int(hashed.uni[d].sum()):7d}  distinct pairs {nz:6d}  "
            f"occupied buckets of 2^{args.bits}: {int((hashed.bi[d] > 0).sum())}"
        )
    forced = Forced(model)

    # -- 3: the sweep on the training documents the experts did not train on -----------------------------
    sh, se = Stats(fit, V, args.bits), Stats(fit, V, None)
    print(
        "\n## Sweep on the owners' own validation documents (5% of each training file, never trained on; "
        "counts from the other 95%): " + ", ".join(f"{dom} {t.shape[0]}" for dom, t in zip(DOMAINS, tune)) + " rows"
    )
    print(
        "acc = mean over domains of the right 5-way argmax share; lic = licences' right-owner share; "
        "loss = mean -log post(right domain); ppl = mean over domains of the posterior-routed model's perplexity"
    )
    taus = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    results = {}

    def sweep(kind, value, make_ll):
        lls = [make_ll(t) for t in tune]
        acc = sum(accuracy(posterior(ll, 1.0), d)["rows"]["all"] for d, ll in enumerate(lls)) / E
        lic = accuracy(posterior(lls[-1], 1.0), E - 1)["rows"]["own"]
        cells = []
        for tau in taus:
            posts = [posterior(ll, tau) for ll in lls]
            loss = sum(log_loss(q, d) for d, q in enumerate(posts)) / E
            ppl = sum(math.exp(float(forced.nll(t, q).mean())) for t, q in zip(tune, posts)) / E
            results[(kind, value, tau)] = ppl
            cells.append(f"{loss:.2f} / {ppl:.1f}")
        print(f"| {kind} {value:g} | {fmt(acc)} | {fmt(lic)} | " + " | ".join(cells) + " |")

    print("\n| statistics | acc | lic | " + " | ".join(f"tau {t}: loss / ppl" for t in taus) + " |")
    print("|---|---|---|" + "---|" * len(taus))
    for a in (0.01, 0.1, 1.0):
        sweep("unigram alpha", a, lambda t, a=a: sh.unigram_ll(t, a))
    for k in (3.0, 10.0, 30.0, 100.0):
        sweep(f"hashed 2^{args.bits} bigram k", k, lambda t, k=k: sh.bigram_ll(t, 0.1, k))
    for k in (10.0, 30.0, 100.0):
        sweep("exact bigram k", k, lambda t, k=k: se.bigram_ll(t, 0.1, k))

    def pick(prefix):
        key = min((key for key in results if key[0].startswith(prefix)), key=results.get)
        return key[1], key[2]

    uni_a, uni_tau = pick("unigram")
    hash_k, hash_tau = pick("hashed")
    ex_k, ex_tau = pick("exact")
    print(
        f"\nchosen by the tuning rows' perplexity: unigram alpha {uni_a:g} tau {uni_tau:g} "
        f"(shipped {alpha0:g}, {tau0:g}: {results.get(('unigram alpha', alpha0, tau0), float('nan')):.1f}); "
        f"hashed bigram k {hash_k:g} tau {hash_tau:g}; exact bigram k {ex_k:g} tau {ex_tau:g}"
    )

    # -- posteriors on the evaluation rows -----------------------------------------------------------------
    members = [run.models.public(), *(run.models.merged([o], 2).eval() for o in OWNERS)]
    posts: dict[str, dict[int, torch.Tensor]] = {k: {} for k in ("unigram", "hashed", "exact", "btm", "uni_swept")}
    for d, dom in enumerate(DOMAINS):
        r = rows[dom]
        posts["unigram"][d] = forced.shipped_posterior(r)
        mine = posterior(hashed.unigram_ll(r, alpha0), tau0)
        assert torch.allclose(mine, posts["unigram"][d], atol=1e-4), "recomputed unigram posterior differs"
        posts["hashed"][d] = posterior(hashed.bigram_ll(r, 0.1, hash_k), hash_tau)
        posts["exact"][d] = posterior(exact.bigram_ll(r, 0.1, ex_k), ex_tau)
        posts["uni_swept"][d] = posterior(hashed.unigram_ll(r, uni_a), uni_tau)
        lps = torch.stack([member_logprobs(m, r) for m in members], -1).double()
        posts["btm"][d] = btm_posterior(lps)

    # -- 1: accuracy ---------------------------------------------------------------------------------
    print("\n## Domain choice on the evaluation rows: right share, % (all = 5-way argmax; own = right owner)")
    bands = ["rows", *(f"{a}-{b - 1}" for a, b in BANDS)]
    print(
        "\n| domain | posterior | "
        + " | ".join(f"{b} all | {b} own" for b in bands)
        + " |\n|---|---|"
        + "---|---|" * len(bands)
    )
    labels = {
        "unigram": f"unigram (shipped, a {alpha0})",
        "hashed": f"hashed bigram 2^{args.bits}, k {hash_k}",
        "exact": f"exact bigram, k {ex_k}",
        "btm": "BTM (member likelihoods)",
    }
    for d, dom in enumerate(DOMAINS):
        for key, label in labels.items():
            acc = accuracy(posts[key][d], d)
            print(
                f"| {dom} | {label} | "
                + " | ".join(f"{fmt(acc[b]['all'])} | {fmt(acc[b]['own'])}" for b in bands)
                + " |"
            )

    # -- 2: perplexity with forced posteriors ------------------------------------------------------------
    variants = {
        "shipped": lambda d: None,
        "hard (shipped argmax, one-hot)": lambda d: one_hot(posts["unigram"][d].argmax(-1), E),
        "swap (right owner, shipped mass)": lambda d: swap_right(posts["unigram"][d], d),
        "oracle (right domain, one-hot)": lambda d: one_hot(torch.full(rows[DOMAINS[d]].shape, d), E),
        f"unigram swept (a {uni_a}, tau {uni_tau})": lambda d: posts["uni_swept"][d],
        f"hashed bigram (k {hash_k}, tau {hash_tau})": lambda d: posts["hashed"][d],
        f"exact bigram (k {ex_k}, tau {ex_tau})": lambda d: posts["exact"][d],
        "BTM posterior (tau 1)": lambda d: posts["btm"][d],
        "BTM argmax, one-hot": lambda d: one_hot(posts["btm"][d].argmax(-1), E),
    }
    print("\n## Perplexity of the posterior-routed model with the posterior replaced (evaluation rows)")
    print("\n| posterior | " + " | ".join(DOMAINS) + " | average | licences 0-3 | 4-15 | 16-62 |")
    print("|---|" + "---|" * (len(DOMAINS) + 4))
    for name, make in variants.items():
        ppl, lic = [], None
        for d, dom in enumerate(DOMAINS):
            nll = forced.nll(rows[dom], make(d))
            ppl.append(math.exp(float(nll.mean())))
            if dom == "licenses":
                lic = [math.exp(float(nll[:, a : min(b, nll.shape[1])].mean())) for a, b in BANDS]
        print(
            f"| {name} | "
            + " | ".join(f"{x:.1f}" for x in ppl)
            + f" | {sum(ppl) / len(ppl):.2f} | "
            + " | ".join(f"{x:.1f}" for x in lic)
            + " |"
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
