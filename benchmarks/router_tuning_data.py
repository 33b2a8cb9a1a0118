"""What router tuning should train on: proxy sets, the owners' own text centrally, or federated.

Starts from a finished ``flexmoe demo`` run (``--demo DIR``): its public model, the experts the
owners sent, its spec and its corpus. Every row is the demo's ``flexolmo_no_rt`` model (assemble,
default routing recipe, biases folded for the FlexOlmo export) tuned one way, then scored like
the demo scores its rows (held-out perplexity per domain, top-``top_k``):

    no tuning                 flexolmo_no_rt itself
    proxy                     FlexOlmo's recipe: tune_router on the owners' proxy sets + public data
    central:S                 tune_router on a uniform mixture of every owner's *own* text and the
                              public data, S steps: what a coordinator holding all the text could
                              reach (not private; the bound for the federated rows)
    federated:RxS@lr          the federated recipe in process: R rounds; in each, every owner and the
                              public data take S local steps (local_router_round) from the same
                              routers, then aggregate_router_rows with server_lr (None: the sum)

The federated rows run :func:`flexmoe.training.router_tuning.router_rounds_in_process`: the library's own
round functions, one participant after another, with no Flower in between, so the numbers are
what the Flower rounds compute, without the messaging.

    .venv/bin/python benchmarks/router_tuning_data.py --demo demo_out
    .venv/bin/python benchmarks/router_tuning_data.py --demo demo_out --central 100 400 \\
        --federated 10x10@1 10x10 20x5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def _parse_federated(text: str) -> tuple[int, int, float | None]:
    shape, _, lr = text.partition("@")
    rounds, steps = (int(x) for x in shape.split("x"))
    return rounds, steps, float(lr) if lr else None


def main(argv: list[str] | None = None) -> None:
    from flexmoe.data.packing import pack_documents
    from flexmoe.evaluate import perplexity
    from flexmoe.experiments import demo as D
    from flexmoe.training.router_tuning import router_rounds_in_process, tune_router

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a finished `flexmoe demo --out DIR` run (default sizes or not)")
    p.add_argument("--central", type=int, nargs="*", default=[100, 400], help="steps of the central rows")
    p.add_argument(
        "--federated",
        nargs="*",
        default=["10x10@1", "10x10", "20x5"],
        help="ROUNDSxLOCAL_STEPS[@SERVER_LR] (no @: the sum of the changes)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    run = D.DemoRun.open(args.demo)
    cfg, spec, corpus, tokenizer, models, rows = run.cfg, run.spec, run.corpus, run.tokenizer, run.models, run.rows
    report, public_docs = run.report, run.public_docs
    own = {o: pack_documents(list(corpus["domains"][o].train), tokenizer, cfg.seq_len) for o in D.OWNERS}
    public_rows = pack_documents(public_docs, tokenizer, cfg.seq_len, max_documents=2000)
    recipe = dataclasses.replace(spec.router_tuning, enabled=True)
    results: dict[str, dict] = {}

    def start():
        model, _ = D.routed_without_tuning(cfg, models, spec, public_docs, tokenizer)
        return model

    def score(name: str, model, seconds: float) -> None:
        r = perplexity(model.eval(), rows, batch_size=cfg.eval_batch_size, name=name)
        results[name] = {
            "average": float(r["average"]),
            "per_domain": {d: float(v) for d, v in r["per_domain"].items()},
            "seconds": round(seconds, 1),
        }
        print(
            f"{name:<24} {r['average']:8.1f}  "
            + "  ".join(f"{d} {v:.1f}" for d, v in r["per_domain"].items())
            + f"  ({seconds:.0f} s)",
            flush=True,
        )

    score("no tuning", start(), 0.0)
    t = time.perf_counter()
    score(
        "proxy", D.tune_on_proxies(cfg, models, spec, run.federation, public_docs, tokenizer), time.perf_counter() - t
    )
    for steps in args.central:
        model, t = start(), time.perf_counter()
        texts = {o: list(corpus["domains"][o].train) for o in D.OWNERS}
        tune_router(
            model,
            proxy_documents=texts,
            public_documents=public_docs,
            tokenizer=tokenizer,
            recipe=dataclasses.replace(recipe, data="proxy", max_steps=steps, warmup_steps=max(1, steps // 10)),
            trainer_kwargs={"enable_progress_bar": False},
        )
        score(f"central:{steps}", model, time.perf_counter() - t)
    for text in args.federated:
        rounds, local, server_lr = _parse_federated(text)
        r = dataclasses.replace(
            recipe,
            data="owners",
            rounds=rounds,
            max_steps=rounds * local,
            server_lr=server_lr,
            warmup_steps=max(1, rounds * local // 10),
        )
        model, t = start(), time.perf_counter()
        router_rounds_in_process(model, {"public": public_rows, **own}, r, seed=cfg.seed)
        score(f"federated:{text}", model, time.perf_counter() - t)
    for name in ("btm", "weighted_soup", "oracle"):
        if name in report["methods"]:
            print(f"{name + ' (the demo)':<24} {report['methods'][name]['average']:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
