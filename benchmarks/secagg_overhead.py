"""What secure aggregation costs a router round: plain rounds against SecAgg+ rounds, real processes.

One loopback deployment (a ``flower-superlink`` and one ``flower-supernode`` per owner,
:mod:`flexmoe.testing.federation`) runs examples/federation several times:

alternating, ``--repeats`` times each: ``plain`` (``secure-aggregation=false``), ``own-rows`` and,
with ``--modes``, ``all-rows``. Each run trains the owners' experts (seeded: the same experts every
time) and then tunes the routers in ``--rounds`` rounds. (A ``resume=true`` rerun on kept experts
would skip the training, but a coordinator whose every owner is already accepted queries no
SuperNode, so it finds no owner to tune with.)

Per run, the coordinator's report gives each round's wall time (sending the round, the owners'
local steps, their replies, and, in a secure round, the SecAgg+ protocol: four more messages per
owner) and the part spent in SecAgg+. The first round of every run also carries the experts to
the owners; it is reported apart. After each secure run the coordinator's kept sums
(``out-dir/router-rounds/``) are compared with what each owner kept it sent
(``work-dir/router-tuning/secure-round-<r>.safetensors``): the measured quantization error.

    python benchmarks/secagg_overhead.py                 # 2 owners, 3 rounds, 2 repeats
    python benchmarks/secagg_overhead.py --owners 3 --modes plain,own-rows,all-rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["docstrings", "stdlib_code", "unicode_names", "licenses"]


def build_world(root: Path, args) -> dict:
    """A random-init OLMo-2 public model with a BPE tokenizer, a spec with federated router
    tuning (``rounds`` rounds of 2 local steps), and the owners' data."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexmoe.core.hashing import fingerprint
    from flexmoe.data.corpus import local_corpus, write_corpus
    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.spec import ExpertRecipe, FederationSpec, ProxyBudget, RouterTuningRecipe, RoutingRecipe
    from flexmoe.training.pretrain import olmo2_config

    corpus = local_corpus(args.max_docs, domains=DOMAINS[: args.owners + 1])
    data = write_corpus(corpus, root / "data")
    tok = train_tokenizer(corpus["docstrings"].train, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    config = olmo2_config(
        len(tok),
        args.hidden,
        args.layers,
        max(1, args.hidden // 32),
        max_position_embeddings=args.seq_len,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    public = root / "public"
    model.save_pretrained(public)
    tok.save_pretrained(public)
    spec = FederationSpec(
        public_model=str(public),
        fingerprint=fingerprint(model),
        embedder=None,
        expert=ExpertRecipe(max_steps=args.steps, batch_size=4, seq_len=args.seq_len, warmup_steps=2),
        router_tuning=RouterTuningRecipe(
            data="owners", rounds=args.rounds, max_steps=2 * args.rounds, batch_size=4, seq_len=args.seq_len
        ),
        proxy=ProxyBudget(min_docs=4),
        routing=RoutingRecipe(method="lda", bigram_buckets=2**10),  # a token router: the one tuned
    )
    spec.save(root / "spec.json")
    owners = {d: data[d] for d in DOMAINS[1 : args.owners + 1]}
    return {"public_data": data["docstrings"] / "train.jsonl", "owners": owners, "hidden": args.hidden}


def run(d, root: Path, world: dict, name: str, **config) -> dict:
    """One ``flwr run`` of examples/federation; returns its report."""
    out = root / name
    run_config = {
        "spec": str(root / "spec.json"),
        "expected-owners": ",".join(world["owners"]),
        "out-dir": str(out),
        "public-data": str(world["public_data"]),
        "allow-approximate": True,
        "poll-interval": 0.5,
        **config,
    }
    run_id = d.run(ROOT / "examples" / "federation", run_config)
    status = d.wait(run_id, 3600, until=(out / "report.json").is_file)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"run {name} failed: {status}\n{d.log(run_id)[-3000:]}")
    return json.loads((out / "report.json").read_text())


def quantization_error(root: Path, out: Path, owners, rounds) -> float:
    """The largest difference between a round's secure sum as the coordinator kept it and the sum
    of what the owners kept they put into it."""
    from safetensors.torch import load_file

    worst = 0.0
    for r in rounds:
        seen = load_file(out / "router-rounds" / f"round-{r}.safetensors")
        sent = [load_file(root / "owners" / o / "router-tuning" / f"secure-round-{r}.safetensors") for o in owners]
        for k, v in seen.items():
            worst = max(worst, float((v - sum(s[k].double() for s in sent)).abs().max()))
    return worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--owners", type=int, default=2, choices=(2, 3))
    p.add_argument("--rounds", type=int, default=3, help="router rounds per run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    p.add_argument("--modes", default="plain,own-rows", help="comma-separated: plain, own-rows, all-rows")
    p.add_argument("--steps", type=int, default=10, help="each owner's expert training steps")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--max-docs", type=int, default=40, help="documents per domain")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from flexmoe.testing.federation import Deployment, wait_for

    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flexmoe-secagg-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    errors: dict[str, list[tuple[float, float]]] = {m: [] for m in modes if m != "plain"}
    try:
        world = build_world(root, args)
        with Deployment(root / "deployment") as d:
            d.start_superlink()
            for owner, path in world["owners"].items():
                node = {"owner": owner, "data-path": str(path), "work-dir": str(root / "owners" / owner)}
                d.start_supernode(owner, node)
            log = d.logs["superlink"]
            wait_for(lambda: log.read_text().count("Activated node_id") >= len(world["owners"]), 300, "the SuperNodes")
            for i in range(args.repeats):
                for mode in modes:
                    name = f"{mode}-{i}"
                    config = {"router-tuning": True, "secure-aggregation": {"plain": False}.get(mode, mode)}
                    t0 = time.perf_counter()
                    report = run(d, root, world, name, **config)
                    tuning = report["router_tuning"]
                    if len(tuning["rounds"]) != args.rounds:
                        raise RuntimeError(f"run {name} tuned {len(tuning['rounds'])} rounds: {report['notes']}")
                    rows[mode].append({"rounds": tuning["rounds"], "wall": time.perf_counter() - t0})
                    if mode != "plain":
                        worst = quantization_error(root, root / name, world["owners"], range(args.rounds))
                        bound = max(r["secure"]["error_bound"] for r in tuning["rounds"])
                        errors[mode].append((worst, bound))
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)

    def mean(values):
        return statistics.fmean(values) if values else float("nan")

    print(
        f"\n{args.owners} owners, {args.rounds} router rounds of 2 local steps per run, {args.repeats} runs per mode "
        f"(alternating), OLMo-2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}; "
        f"{os.cpu_count()} CPUs, every process on this machine\n"
    )
    base_first = mean([run["rounds"][0]["seconds"] for run in rows.get("plain", [])])
    base_later = mean([r["seconds"] for run in rows.get("plain", []) for r in run["rounds"][1:]])
    print(
        "| mode | round 1 (s; carries the experts) | later rounds (s) | of which SecAgg+ (s) | later rounds / plain |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in modes:
        first = mean([run["rounds"][0]["seconds"] for run in rows[mode]])
        later = [r for run in rows[mode] for r in run["rounds"][1:]]
        later_s = mean([r["seconds"] for r in later])
        secagg = mean([r["secure"]["seconds"] for r in later if "secure" in r]) if mode != "plain" else 0.0
        print(f"| {mode} | {first:.1f} | {later_s:.1f} | {secagg:.1f} | {later_s / base_later:.2f} |")
    if "plain" in rows:
        print(f"\n(plain round 1: {base_first:.1f} s; per-round figures are means over {args.repeats} runs)")
    for mode, values in errors.items():
        worst = max(e for e, _ in values)
        bound = max(b for _, b in values)
        print(
            f"{mode}: largest |secure sum - exact sum| over every coordinate and round {worst:.3g} (bound {bound:.3g})"
        )


if __name__ == "__main__":
    main()
