"""Why the merged model's token router falls short of BTM on a demo run, measured.

Starts from a finished ``flexmoe demo`` run (``--demo DIR``: its public model, the accepted
experts, the coordinator's exported model, the ``flexolmo_token`` row, and the corpus) and prints
four tables, which call that token-routed model ``flexolmo`` (the demo's ``flexolmo`` row routes by
the prefix's domain posterior instead, the answer to what these tables find):

1. **Where the loss is.** Per held-out domain: ``flexolmo``; ``flexolmo`` restricted to the right
   pair (every other owner removed with :func:`flexmoe.core.surgery.opt_out`, so each token mixes the
   public expert and the domain's owner with the tuned router's own weights); and ``oracle`` (the
   owner's own 2-expert model). A restricted model near the oracle means the experts mix well and
   what is missing is choosing them.
2. **By position in the row.** Perplexity of ``flexolmo`` and ``oracle`` over row positions
   (0-3, 4-15, 16-31, 32-end): a gap that closes later in the row is a router short of context; a
   gap that stays is one that context does not fix.
3. **The router's decisions**, per layer: how often the right expert is the top-1 choice, and the
   softmax mass on the right pair (public + owner; the public expert alone for public text).
4. **What any linear token router could reach.** A multinomial logistic regression (the best
   linear classifier of one token's router input into the 5 domains, fitted with L-BFGS on
   ``--probe-rows`` training rows per domain, scored on the held-out rows) per layer and position
   bucket, on the MLP inputs of ``flexolmo`` (the router's actual input) and of every
   ``--probe-model`` (default: the run's public model; pass others, e.g. one pretrained longer,
   to see whether a stronger public model carries the domain). The router is exactly such a
   linear map, so its top-1 choices cannot be right more often than this, whatever it is tuned on.

    .venv/bin/python benchmarks/routing_diagnosis.py --demo demo_out
    .venv/bin/python benchmarks/routing_diagnosis.py --demo demo_out --probe-model demo_out/public OTHER_PUBLIC_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BUCKETS = ((0, 4), (4, 16), (16, 32), (32, None))


def bucket_names(seq_len: int) -> list[str]:
    return [f"{a}-{(b or seq_len) - 1}" for a, b in BUCKETS]


def nll_by_position(model, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Next-token NLL ``[N, S-1]`` of every held-out row (position p predicts token p+1)."""
    out = []
    with torch.inference_mode():
        for s in range(0, rows.shape[0], batch_size):
            x = rows[s : s + batch_size]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
    return torch.cat(out)


def by_bucket(nll: torch.Tensor) -> list[float]:
    return [math.exp(nll[:, a:b].mean().item()) for a, b in BUCKETS]


def router_decisions(model, rows: torch.Tensor, right: list[int], batch_size: int) -> list[tuple[float, float]]:
    """Per layer: (share of tokens whose top-1 expert is ``right[0]``, mean softmax mass on ``right``)."""
    from flexmoe.core.moe import record_router_logits

    top1, mass, n = None, None, 0
    with torch.inference_mode():
        for s in range(0, rows.shape[0], batch_size):
            with record_router_logits(model) as logits:
                model(input_ids=rows[s : s + batch_size], use_cache=False)
            t = torch.stack([(lg.argmax(-1) == right[0]).float().sum() for lg in logits])
            m = torch.stack([torch.softmax(lg, -1)[:, right].sum(-1).sum() for lg in logits])
            top1, mass = (t, m) if top1 is None else (top1 + t, mass + m)
            n += logits[0].shape[0]
    return [(float(a) / n, float(b) / n) for a, b in zip(top1, mass)]


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-4, iters: int = 200):
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda v: (((v - mu) / sd) @ w + b).argmax(-1)


def probe(model, train: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor], batch_size: int) -> list[dict]:
    """Per layer: ``{domain: [accuracy per position bucket]}`` of the best linear domain classifier."""
    from flexmoe.routing import mlp_inputs

    names = list(train)
    feats_train = {d: [x.float() for x in mlp_inputs(model, train[d], batch_size=batch_size)] for d in names}
    feats_held = {d: [x.float() for x in mlp_inputs(model, held_out[d], batch_size=batch_size)] for d in names}
    out = []
    for L in range(len(feats_train[names[0]])):
        x = torch.cat([feats_train[d][L].flatten(0, 1) for d in names])
        y = torch.cat(
            [torch.full((feats_train[d][L].shape[0] * feats_train[d][L].shape[1],), i) for i, d in enumerate(names)]
        )
        predict = fit_probe(x, y, len(names))
        layer = {}
        for i, d in enumerate(names):
            f = feats_held[d][L]
            right = (predict(f.flatten(0, 1)).reshape(f.shape[:2]) == i).float()
            layer[d] = [right[:, a:b].mean().item() for a, b in BUCKETS]
        out.append(layer)
    return out


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from flexmoe.core.surgery import expert_index, opt_out
    from flexmoe.data.packing import pack_documents, spread_rows
    from flexmoe.experiments import demo as D
    from flexmoe.formats.load import load_public_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a finished `flexmoe demo --out DIR` run")
    p.add_argument("--probe-model", nargs="*", help="dense public models to probe as well (default: the run's own)")
    p.add_argument("--probe-rows", type=int, default=256, help="training rows per domain for the probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write every figure as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    run = D.DemoRun.open(args.demo)
    cfg, rows, names = run.cfg, run.rows, [D.PUBLIC, *D.OWNERS]
    bs = cfg.eval_batch_size
    flexolmo = run.flexolmo_token()  # the token router: what this diagnosis is about
    results: dict = {"demo": str(run.root), "domains": {}, "probe": {}}

    print("\n## 1-3. Where flexolmo loses, by domain (held-out perplexity; router decisions per layer)\n")
    print(
        "| domain | flexolmo | right pair only | oracle | "
        + " | ".join(f"flexolmo / oracle, pos {b}" for b in bucket_names(cfg.seq_len))
        + " | right top-1 share by layer | mass on right pair by layer |"
    )
    print("|---" * (7 + len(BUCKETS)) + "|")
    for d in names:
        own = run.models.public() if d == D.PUBLIC else run.models.merged([d], 2)
        right = [0] if d == D.PUBLIC else [expert_index(flexolmo, d), 0]
        pair = run.flexolmo_token()
        for o in D.OWNERS:
            if o != d:
                opt_out(pair, o)
        f, o_, r = (nll_by_position(m, rows[d], bs) for m in (flexolmo, own, pair))
        decisions = router_decisions(flexolmo, rows[d], right, bs)
        results["domains"][d] = {
            "flexolmo": math.exp(f.mean().item()),
            "right_pair_only": math.exp(r.mean().item()),
            "oracle": math.exp(o_.mean().item()),
            "flexolmo_by_position": by_bucket(f),
            "oracle_by_position": by_bucket(o_),
            "right_top1_share": [a for a, _ in decisions],
            "right_pair_mass": [b for _, b in decisions],
        }
        x = results["domains"][d]
        print(
            f"| {d} | {x['flexolmo']:.1f} | {x['right_pair_only']:.1f} | {x['oracle']:.1f} | "
            + " | ".join(f"{a:.0f} / {b:.0f}" for a, b in zip(x["flexolmo_by_position"], x["oracle_by_position"]))
            + " | "
            + " ".join(f"{a:.2f}" for a in x["right_top1_share"])
            + " | "
            + " ".join(f"{b:.2f}" for b in x["right_pair_mass"])
            + " |",
            flush=True,
        )
    avg = {
        k: sum(results["domains"][d][k] for d in names) / len(names) for k in ("flexolmo", "right_pair_only", "oracle")
    }
    results["average"] = avg
    print(f"| **average** | {avg['flexolmo']:.1f} | {avg['right_pair_only']:.1f} | {avg['oracle']:.1f} |")

    train = {
        d: spread_rows(
            pack_documents(list(run.corpus["domains"][d].train), run.tokenizer, cfg.seq_len),
            args.probe_rows * cfg.seq_len,
        )
        for d in names
    }
    probed = {"flexolmo (router input)": flexolmo}
    for path in args.probe_model or [str(run.root / "public")]:
        if AutoTokenizer.from_pretrained(path).get_vocab() != run.tokenizer.get_vocab():
            raise SystemExit(f"--probe-model {path}: its tokenizer is not the demo run's, so the rows mean other text")
        probed[path] = load_public_model(path).eval()
    print(
        f"\n## 4. Best linear classifier of the domain from one token's MLP input (held-out accuracy; chance "
        f"{1 / len(names):.2f}; {args.probe_rows} training rows per domain)\n"
    )
    print("| model | layer | " + " | ".join(f"{d}, pos {' / '.join(bucket_names(cfg.seq_len))}" for d in names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for name, model in probed.items():
        layers = probe(model, train, rows, bs)
        results["probe"][name] = layers
        for L, layer in enumerate(layers):
            print(
                f"| {name} | {L} | " + " | ".join(" / ".join(f"{v:.2f}" for v in layer[d]) for d in names) + " |",
                flush=True,
            )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
