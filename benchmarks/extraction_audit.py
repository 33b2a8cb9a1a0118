"""Extraction audit: what a trained expert memorised of its owner's text, with and without DP.

The secret-sharer test (Carlini et al., 2019, "The Secret Sharer", USENIX Security): random canaries
(``the access code for record K is d d d d d d``, six random digits) are planted in one owner's
training text, each repeated 1, 4 or 16 times (``--reps``; each copy is its own document, so it
lands in its own packed row, the unit DP protects), the owner trains its expert, and then

    exposure    log2 |R| - log2 rank: the rank of the canary's digits (by the model's loss given the
                prefix) among ``--candidates`` random digit strings with the same prefix, estimated by
                sampling (|R| = candidates + 1, so at most log2 |R| bits); 1 bit is chance, the
                maximum means the canary beat every candidate
    extracted   the share of canaries whose six digits greedy decoding after the prefix reproduces
                exactly (verbatim extraction from a prefix)

for the owner's own model (public + its expert, top-2: what it would ship) and inside the merged
model (both owners' experts, the default posterior router), next to held-out perplexity and training
time. Settings (``--settings``):

    no-dp       FlexOlmo's recipe
    dp-epsN     DP-SGD at target epsilon N (delta 1e-5, clip 1.0; the owner sets it, the spec is shared)
    dp-stats    the expert without DP, its token counts released at epsilon 3 (the routing cost alone)
    lora        a rank-4 LoRA expert without DP

Sizes (defaults): the harness's public OLMo-2 (hidden 64, 2 layers, vocab 1024, 300 pretraining steps on
stdlib_code + pydoc_topics); owners ``docstrings`` (audited) and ``unicode_names``, ``--docs`` documents
each; experts ``--expert-steps`` x ``--expert-batch`` rows x ``--seq-len`` tokens. Trained experts are
cached under ``--work``; a rerun only evaluates.

    .venv/bin/python benchmarks/extraction_audit.py --work WORK     # docs/privacy.md has the results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.testing.harness import PUBLIC_DOMAINS, build_corpus, fit_expert, log, pretrain_public, read_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0
DIGITS = 6


@dataclass(frozen=True)
class Canary:
    """One planted secret: ``prefix``, a space, then ``secret`` (digits separated by spaces), ``reps``
    copies. The space starts the secret, so the prefix tokenises alike alone and in the canary
    (a byte-level BPE joins a space to the word after it)."""

    prefix: str
    secret: str
    reps: int

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"


def random_secret(rng: random.Random, digits: int = DIGITS) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(digits))


def make_canaries(reps: list[int], per_rep: int, seed: int = SEED) -> list[Canary]:
    """``per_rep`` canaries for every repetition count in ``reps``, each with its own record number
    (so no two share a prefix) and random digits."""
    rng = random.Random(seed)
    out = []
    for r in reps:
        for _ in range(per_rep):
            out.append(Canary(f"the access code for record {len(out) + 101} is", random_secret(rng), r))
    return out


def plant(documents: list[str], canaries: list[Canary], seed: int = SEED) -> list[str]:
    """``documents`` with every canary inserted ``reps`` times as a document of its own, at
    seeded random places."""
    rng = random.Random(seed + 1)
    docs = list(documents)
    for c in canaries:
        for _ in range(c.reps):
            docs.insert(rng.randrange(len(docs) + 1), c.text)
    return docs


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def secret_losses(model, tokenizer, prefix: str, secrets: list[str], batch: int = 256) -> torch.Tensor:
    """The summed negative log-likelihood of each of ``secrets`` after ``prefix`` ``[len(secrets)]``
    (Carlini et al.'s log-perplexity of the secret)."""
    head = _encode(tokenizer, prefix)
    bodies = []
    for s in secrets:
        ids = _encode(tokenizer, f"{prefix} {s}")
        if ids[: len(head)] != head:
            raise ValueError(f"{prefix!r} tokenises differently before {s!r}: end the prefix on a word")
        bodies.append(ids[len(head) :])
    losses = torch.empty(len(secrets), dtype=torch.float64)
    for start in range(0, len(bodies), batch):
        chunk = bodies[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), len(head) + width, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, body in enumerate(chunk):
            ids[i, : len(head) + len(body)] = torch.tensor(head + body)
            mask[i, len(head) : len(head) + len(body)] = True
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        losses[start : start + len(chunk)] = (nll * mask[:, 1:]).sum(1)
    return losses


def exposure(model, tokenizer, canary: Canary, candidates: list[str]) -> float:
    """Carlini et al.'s exposure ``log2 |R| - log2 rank`` of ``canary``, its rank estimated among
    ``candidates`` (random secrets of the same form; |R| = len(candidates) + 1; ties count
    against the canary)."""
    losses = secret_losses(model, tokenizer, canary.prefix, [canary.secret, *candidates])
    rank = 1 + int((losses[1:] <= losses[0]).sum())
    return math.log2(len(candidates) + 1) - math.log2(rank)


@torch.no_grad()
def extracted(model, tokenizer, canary: Canary) -> bool:
    """Whether greedy decoding after ``canary.prefix`` reproduces its secret verbatim."""
    ids = _encode(tokenizer, canary.prefix)
    want = _encode(tokenizer, canary.text)[len(ids) :]
    for _ in range(len(want)):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[-len(want) :] == want


def audit(model, tokenizer, canaries: list[Canary], candidates: list[str]) -> dict[int, dict[str, float]]:
    """Per repetition count: mean exposure (bits) and share extracted verbatim."""
    model.eval()
    out: dict[int, dict[str, float]] = {}
    for r in sorted({c.reps for c in canaries}):
        group = [c for c in canaries if c.reps == r]
        out[r] = {
            "exposure": sum(exposure(model, tokenizer, c, candidates) for c in group) / len(group),
            "extracted": sum(extracted(model, tokenizer, c) for c in group) / len(group),
        }
    return out


# -- the benchmark ------------------------------------------------------------------------
def settings(names: list[str]) -> dict[str, dict]:
    """Each setting's owner-side options: ``privacy`` (a PrivacyRecipe) and ``rank`` (LoRA)."""
    from flexmoe.spec import PrivacyRecipe

    out = {}
    for name in names:
        if name == "no-dp":
            out[name] = {}
        elif name.startswith("dp-eps"):
            out[name] = {"privacy": PrivacyRecipe(target_epsilon=float(name[len("dp-eps") :]))}
        elif name == "dp-stats":
            out[name] = {"privacy": PrivacyRecipe(statistics_epsilon=3.0)}
        elif name == "lora":
            out[name] = {"rank": 4}
        else:
            raise SystemExit(f"unknown setting {name!r}: no-dp, dp-epsN, dp-stats or lora")
    return out


def make_spec(public: Path, args):
    from flexmoe.core.hashing import fingerprint
    from flexmoe.formats.load import load_public_model
    from flexmoe.spec import ExpertRecipe, FederationSpec, RoutingRecipe

    recipe = ExpertRecipe(
        max_steps=args.expert_steps,
        batch_size=args.expert_batch,
        seq_len=args.seq_len,
        lr=args.expert_lr,
        warmup_steps=max(1, args.expert_steps // 10),
    )
    fp = fingerprint(load_public_model(str(public)))
    routing = RoutingRecipe(bigram_buckets=args.bigram_buckets)
    return FederationSpec(public_model=str(public), fingerprint=fp, embedder=None, expert=recipe, routing=routing)


def train(work: Path, spec, documents: list[str], owner: str, tag: str, options: dict, args) -> dict:
    """Train one owner's expert under ``options`` (cached); returns its artifact path and time."""
    import lightning.pytorch as pl

    from flexmoe.training.expert import ExpertModule

    art = work / "experts" / f"{owner}-{tag}.safetensors"
    meta = art.with_suffix(".json")
    if art.is_file() and meta.is_file():
        return {**json.loads(meta.read_text()), "path": art}
    source = work / "owners" / f"{owner}-{'canaries' if options.get('canaries') else 'plain'}.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    log(f"training {owner}/{tag} ({args.expert_steps} steps)")
    pl.seed_everything(SEED, verbose=False)
    if options.get("rank"):
        from flexmoe.lora import LoraExpertModule

        module = LoraExpertModule(spec.public_model, spec, owner=owner, rank=options["rank"])
    else:
        module = ExpertModule(spec.public_model, spec, owner=owner, privacy=options.get("privacy"))
    seconds, rows = fit_expert(
        module,
        spec,
        source,
        art,
        work=work,
        steps=args.expert_steps,
        seq_len=args.seq_len,
        batch_size=args.expert_batch,
    )
    info = {"train_s": round(seconds, 1), "rows": rows}
    meta.write_text(json.dumps(info))
    return {**info, "path": art}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="/tmp/flexmoe-audit", help="cache of corpus, public model and experts")
    p.add_argument("--owners", nargs="+", default=["docstrings", "unicode_names"], help="the first is audited")
    p.add_argument("--settings", nargs="+", default=["no-dp", "dp-eps8", "dp-eps3", "dp-eps1", "dp-stats", "lora"])
    p.add_argument("--reps", nargs="+", type=int, default=[1, 4, 16], help="copies of each canary")
    p.add_argument("--per-rep", type=int, default=3, help="canaries per repetition count")
    p.add_argument("--candidates", type=int, default=1000, help="random secrets each canary is ranked among")
    p.add_argument("--docs", type=int, default=40, help="documents per domain (hash-chosen sample)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="public-model pretraining batch")
    p.add_argument("--expert-steps", type=int, default=150)
    p.add_argument("--expert-batch", type=int, default=16)
    p.add_argument("--expert-lr", type=float, default=2e-3)
    p.add_argument("--bigram-buckets", type=int, default=2**16)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain (whole rows)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is faster on a shared machine)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    import flexmoe
    from flexmoe.artifacts.load import load_expert
    from flexmoe.assembly import merge_experts
    from flexmoe.data.packing import pack_domain
    from flexmoe.evaluate import perplexity
    from flexmoe.formats.load import load_public_model

    work = Path(args.work)
    started = time.perf_counter()
    audited, others = args.owners[0], args.owners[1:]
    paths = build_corpus(work, args.owners, args.docs)
    public = pretrain_public(work, paths, args, seed=SEED)
    tokenizer = AutoTokenizer.from_pretrained(public)
    spec = make_spec(public, args)
    canaries = make_canaries(args.reps, args.per_rep)
    rng = random.Random(SEED + 2)
    candidates = [random_secret(rng) for _ in range(args.candidates)]
    own_docs = plant(read_jsonl(paths[audited] / "train.jsonl"), canaries)
    public_docs = [d for name in PUBLIC_DOMAINS for d in read_jsonl(paths[name] / "train.jsonl")]

    def rows(names):
        docs = [d for name in names for d in read_jsonl(paths[name] / "val.jsonl")]
        return pack_domain(docs, tokenizer, args.seq_len, max_tokens=args.eval_tokens)

    held_out = {"public": rows(PUBLIC_DOMAINS), **{o: rows([o]) for o in args.owners}}
    other_arts = [train(work, spec, read_jsonl(paths[o] / "train.jsonl"), o, "no-dp", {}, args)["path"] for o in others]
    public_model = load_public_model(str(public)).eval()
    results = [
        {"setting": "public model", "own": perplexity(public_model, {"own": held_out[audited]})["per_domain"]["own"]}
    ]
    results[0]["audit"] = audit(public_model, tokenizer, canaries, candidates)
    for name, options in settings(args.settings).items():
        info = train(work, spec, own_docs, audited, name, {**options, "canaries": True}, args)
        art = load_expert(info["path"], load_public_model(str(public)))  # a LoRA one materialised
        alone = flexmoe.assemble(load_public_model(str(public)), [art], top_k=2)  # what the owner trained
        merged = merge_experts(
            str(public),
            [art, *[load_expert(a, public_model) for a in other_arts]],
            spec=spec,
            public_documents=public_docs,
        ).model.eval()
        ppl = perplexity(merged, held_out)["per_domain"]
        row = {
            "setting": name,
            "own": perplexity(alone.eval(), {"own": held_out[audited]})["per_domain"]["own"],
            "merged_avg": sum(ppl.values()) / len(ppl),
            "merged": ppl,
            "train_s": info["train_s"],
            "epsilon": (art.privacy or {}).get("dp_epsilon"),
            "audit": audit(alone, tokenizer, canaries, candidates),
            "audit_merged": audit(merged, tokenizer, canaries, candidates),
        }
        results.append(row)
        log(f"{name}: own ppl {row['own']:.2f}, merged avg {row['merged_avg']:.2f}, epsilon {row['epsilon']}")

    print()
    print(
        f"public OLMo-2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.pretrain_steps} "
        f"pretraining steps; owners {', '.join(args.owners)} ({args.docs} docs each; {audited} audited, "
        f"{len(canaries)} canaries of {DIGITS} digits, {args.per_rep} per repetition count, ranked among "
        f"{args.candidates} candidates: at most {math.log2(args.candidates + 1):.1f} bits); experts "
        f"{args.expert_steps} steps x {args.expert_batch} rows x {args.seq_len} tokens, lr {args.expert_lr:g}; "
        f"{args.eval_tokens} held-out tokens per domain"
    )
    base = next((r["train_s"] for r in results if r["setting"] == "no-dp"), None)
    head = ["setting", "epsilon", "ppl own", "merged avg"]
    head += [f"exposure x{r} (own / merged)" for r in args.reps] + [f"extracted x{r}" for r in args.reps]
    head += ["train s", "vs no-dp"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        a, m = r["audit"], r.get("audit_merged", {})
        cells = [r["setting"], f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else ""]
        cells += [f"{r['own']:.2f}", f"{r['merged_avg']:.2f}" if "merged_avg" in r else ""]
        for k in args.reps:
            merged = f" / {m[k]['exposure']:.1f}" if m else ""
            cells.append(f"{a[k]['exposure']:.1f}{merged}")
        for k in args.reps:
            merged = f" / {m[k]['extracted']:.2f}" if m else ""
            cells.append(f"{a[k]['extracted']:.2f}{merged}")
        secs = r.get("train_s")
        cells += [f"{secs}" if secs else "", f"{secs / base:.1f}x" if secs and base else ""]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
