"""What the Flower federation costs: the same two-owner expert training, with and without Flower.

(a) ``direct``: both owners' experts trained one after the other in this process, by
    :func:`flexmoe.federation.task.train_owner_expert` (``ExpertModule`` +
    ``expert_callbacks`` + ``TextDataModule`` in a Lightning ``Trainer``: exactly what each
    owner's ClientApp runs).
(b) ``flower``: a real deployment on loopback (one ``flower-superlink``, two
    ``flower-supernode`` processes, :mod:`flexmoe.testing.federation`) running examples/federation:
    the coordinator queries the SuperNodes, sends the spec, both owners train side by side,
    their replies are validated and kept, the experts are merged and routed and the model is
    exported. Timed from ``flwr run`` to the run's report (the SuperLink and SuperNodes are
    long-lived services, started before the clock).

Reported: wall time of each, the ratio b/a, where (b)'s time went (the owners' own training
time inside their ClientApps, and the rest), and the bytes each owner sent (its ArrayRecord of
expert tensors plus manifest, metrics and proxy ids) against a full-model FedAvg upload of the
same model (every parameter of the upcycled 2-expert model, float32) and of the dense public
model.

Owners train on their own machines, side by side; here they share one: (a) trains one owner at a
time with ``--threads`` threads (default 1), (b) runs two ClientApps with one thread each. So
besides b/a, the table gives b against the slower owner's direct time (what the federation would
take if Flower cost nothing and the owners trained in parallel, as they do): that ratio is
Flower's overhead.

    python benchmarks/federation_overhead.py                       # defaults
    python benchmarks/federation_overhead.py --steps 40 --hidden 64  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_world(root: Path, args) -> dict:
    """A random-init OLMo-2 public model with a BPE tokenizer, its spec, two owners' data."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexmoe.core.hashing import fingerprint
    from flexmoe.data.corpus import local_corpus, write_corpus
    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.spec import ExpertRecipe, FederationSpec, ProxyBudget, RouterTuningRecipe
    from flexmoe.training.pretrain import olmo2_config

    corpus = local_corpus(args.max_docs, domains=["docstrings", "stdlib_code", "unicode_names"])
    data = write_corpus(corpus, root / "data")
    tok = train_tokenizer(corpus["docstrings"].train, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        olmo2_config(
            len(tok),
            args.hidden,
            args.layers,
            max(1, args.hidden // 32),
            max_position_embeddings=args.seq_len,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    public = root / "public"
    model.save_pretrained(public)
    tok.save_pretrained(public)
    spec = FederationSpec(
        public_model=str(public),
        fingerprint=fingerprint(model),
        embedder=None,
        expert=ExpertRecipe(
            max_steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            warmup_steps=max(1, args.steps // 10),
        ),
        router_tuning=RouterTuningRecipe(enabled=False),
        proxy=ProxyBudget(min_docs=4),
    )
    spec.save(root / "spec.json")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mlp_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." in n)
    return {
        "spec": spec,
        "public": public,
        "public_data": data["docstrings"] / "train.jsonl",
        "owners": {"code": data["stdlib_code"], "unicode": data["unicode_names"]},
        "dense_bytes": dense_bytes,
        "moe_bytes": dense_bytes + mlp_bytes + 2 * args.layers * args.hidden * 4,  # + expert 1 and its router rows
    }


def direct(world: dict, root: Path, threads: int) -> dict:
    import torch

    from flexmoe.federation.settings import OwnerSettings
    from flexmoe.federation.task import train_owner_expert

    torch.set_num_threads(threads)
    os.environ["FLEXMOE_CACHE"] = str(root / "cache-direct")
    t0 = time.perf_counter()
    per_owner = {}
    for owner, path in world["owners"].items():
        s = OwnerSettings(owner=owner, data_path=str(path), work_dir=str(root / "direct" / owner))
        result = train_owner_expert(s, world["spec"], seed=0)
        per_owner[owner] = result.metrics["train-seconds"]
    return {"seconds": time.perf_counter() - t0, "train_seconds": per_owner}


def flower(world: dict, root: Path) -> dict:
    from flexmoe.testing.federation import Deployment, wait_for

    out = root / "coordinator"
    with Deployment(root / "deployment") as d:
        d.start_superlink()
        for owner, path in world["owners"].items():
            d.start_supernode(owner, {"owner": owner, "data-path": str(path), "work-dir": str(root / "owners" / owner)})
        log = d.logs["superlink"]
        wait_for(lambda: log.read_text().count("Activated node_id") >= len(world["owners"]), 300, "the SuperNodes")
        config = {
            "spec": str(root / "spec.json"),
            "expected-owners": ",".join(world["owners"]),
            "out-dir": str(out),
            "public-data": str(world["public_data"]),
            "router-tuning": False,
            "poll-interval": 1.0,
        }
        t0 = time.perf_counter()
        run_id = d.run(ROOT / "examples" / "federation", config)
        run = d.wait(run_id, 3600, until=(out / "report.json").is_file)
        seconds = time.perf_counter() - t0
        if run["status"] != "finished:completed":
            raise RuntimeError(f"the federation run failed: {run}\n{d.log(run_id)[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "report": report, "run": run}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="each owner's training steps")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-docs", type=int, default=80, help="documents per domain")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the direct run")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flexmoe-federation-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        world = build_world(root, args)
        a = direct(world, root, args.threads)
        b = flower(world, root)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)

    report = b["report"]
    print(
        f"\nTwo owners, {args.steps} steps each (batch {args.batch_size} x {args.seq_len} tokens), OLMo-2 "
        f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}; {os.cpu_count()} CPUs\n"
    )
    slowest = max(a["train_seconds"].values())
    print("| path | wall time (s) | owners' training inside (s) | vs (a) | vs slower owner of (a) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| (a) direct, one process, Lightning | {a['seconds']:.1f} | "
        f"{' + '.join(f'{v:.1f}' for v in a['train_seconds'].values())} (one after the other) | 1.00 | "
        f"{a['seconds'] / slowest:.2f} |"
    )
    inside = [o["metrics"].get("train-seconds", float("nan")) for o in report["owners"].values()]
    print(
        f"| (b) Flower deployment on loopback | {b['seconds']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in inside)} (side by side) | {b['seconds'] / a['seconds']:.2f} | "
        f"{b['seconds'] / slowest:.2f} |"
    )
    replies = ", ".join(f"{n} {o['seconds_to_reply']:.1f} s" for n, o in report["owners"].items())
    print(
        f"\nCoordinator: {report['seconds']:.1f} s in the ServerApp (merge + routing {report['merge_seconds']:.1f} s, "
        f"export {report['export']['seconds']:.1f} s); replies {replies} after the spec was sent"
    )
    traffic = b["run"].get("network-traffic", {})
    print(f"Flower's count of the run's traffic: {traffic}\n")
    print("| owner | bytes sent | full-model FedAvg upload (2-expert model) | ratio | dense public model | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, o in report["owners"].items():
        sent = o["upload_bytes"]
        print(
            f"| {name} | {sent:,} | {world['moe_bytes']:,} | {sent / world['moe_bytes']:.3f} | "
            f"{world['dense_bytes']:,} | {sent / world['dense_bytes']:.3f} |"
        )


if __name__ == "__main__":
    main()
