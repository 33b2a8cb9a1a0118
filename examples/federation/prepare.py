"""Prepare the federation demo: a small public model, the FederationSpec, and two owners' data.

    python examples/federation/prepare.py                  # writes federation_out/
    flwr run examples/federation --run-config federation_out/run_config.toml \\
             --federation-config "num-supernodes=2"        # the whole federation, simulated

Everything comes from this Python installation (:func:`flexmoe.data.corpus.local_corpus`), so no
download is needed: the public model is a small OLMo-2 pretrained with :func:`flexmoe.training.pretrain`
on the standard library's docstrings; owner ``code`` holds the library's code (docstrings and
comments removed), owner ``unicode`` the Unicode character names. Written under ``--out``::

    public/            the public model and its tokenizer (reused if present)
    spec.json          the FederationSpec the coordinator publishes
    data/<domain>/     train.jsonl / val.jsonl per domain (docstrings = the public data)
    run_config.toml    the app's run config with absolute paths, for ``flwr run --run-config``

It also prints the commands of a real deployment (one SuperLink, one SuperNode per owner);
docs/federation.md explains them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OWNERS = {"code": "stdlib_code", "unicode": "unicode_names"}  # owner name -> local_corpus domain
PUBLIC = "docstrings"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="federation_out", help="output folder (default: %(default)s)")
    p.add_argument("--max-docs", type=int, default=120, help="documents per domain (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--expert-steps", type=int, default=40, help="each owner's training steps (default: %(default)s)")
    p.add_argument("--router-tuning-steps", type=int, default=20)
    p.add_argument(
        "--embedder",
        default=None,
        help="sentence-transformers model for router init and proxy sets (default: none, the "
        "public model's own hidden states and TF-IDF features)",
    )
    args = p.parse_args(argv)

    from flexmoe.cli.commands import spec as write_spec
    from flexmoe.data.corpus import local_corpus, write_corpus
    from flexmoe.spec import ExpertRecipe, ProxyBudget, RouterTuningRecipe
    from flexmoe.training.pretrain import pretrain

    out = Path(args.out).resolve()
    corpus = local_corpus(args.max_docs, domains=[PUBLIC, *OWNERS.values()])
    data = write_corpus(corpus, out / "data")
    public_text = data[PUBLIC] / "train.jsonl"
    public = out / "public"
    if not (public / "config.json").is_file():
        pretrain(
            [str(public_text)],
            str(public),
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_steps=args.pretrain_steps,
            warmup_steps=max(1, args.pretrain_steps // 10),
        )
    write_spec(
        public=str(public),
        out=str(out / "spec.json"),
        public_data=[str(public_text)],
        embedder=args.embedder,
        expert=ExpertRecipe(
            max_steps=args.expert_steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            warmup_steps=max(1, args.expert_steps // 10),
        ),
        router_tuning=RouterTuningRecipe(
            enabled=True, max_steps=args.router_tuning_steps, batch_size=args.batch_size, seq_len=args.seq_len
        ),
        proxy=ProxyBudget(fraction=0.05, min_docs=4),
    )
    run_config = {
        "spec": str(out / "spec.json"),
        "expected-owners": ",".join(OWNERS),
        "out-dir": str(out / "coordinator"),
        "public-data": str(public_text),
        "data-paths": ",".join(str(data[d]) for d in OWNERS.values()),
        "share-proxy": True,
        "allow-approximate": True,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in run_config.items()]  # JSON scalars are valid TOML values
    (out / "run_config.toml").write_text("\n".join(lines) + "\n")

    app = Path(__file__).resolve().parent
    print(f"\nflexmoe: the federation demo is ready in {out}\n")
    print("Simulation (one machine, one virtual SuperNode per owner):\n")
    print(f'  flwr run {app} --run-config {out / "run_config.toml"} --federation-config "num-supernodes=2"\n')
    print("Deployment (insecure here for brevity; docs/federation.md adds TLS and SuperNode authentication):\n")
    print("  flower-superlink --insecure --disable-runtime-dependency-installation      # port 8000")
    for i, (owner, domain) in enumerate(OWNERS.items()):
        config = f'owner="{owner}" data-path="{data[domain]}" public-data="{public_text}" share-proxy=true'
        print(f"  flower-supernode --insecure --superlink 127.0.0.1:8000 --port {9094 + i} --node-config '{config}'")
    print('  # in ~/.flwr/config.toml:  [superlink.demo]  address = "127.0.0.1:8000"  insecure = true')
    print(f"  flwr run {app} demo --run-config {out / 'run_config.toml'}\n")
    print(f"Results: {out / 'coordinator'}/report.md and {out / 'coordinator'}/model/")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
