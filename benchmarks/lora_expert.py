"""LoRA-sized FlexOlmo experts against full ones: what an owner uploads, and what it costs in perplexity.

Setting (defaults): the public model is ``flexmoe.training.pretrain``-ed on ``stdlib_code`` + ``pydoc_topics``
from :func:`flexmoe.data.corpus.local_corpus` (a fixed, hash-chosen sample of ``--docs`` documents per
domain); each owner domain (``--owners``, default ``docstrings`` and ``unicode_names``) gets

    full        :class:`flexmoe.ExpertModule`: expert 1 = a trained full copy of the public MLP
    lora-rR     :class:`flexmoe.lora.LoraExpertModule`: the copy stays frozen, a rank-R LoRA on its
                gate/up/down projections trains (alpha = 2R), for each R in ``--ranks``

all with the same recipe (steps, batch, learning rate, warmup; ``--lora-lr`` overrides the LoRA
rows' learning rate), the same data and seed, ``expert_callbacks`` on a Lightning ``Trainer``.

Columns:
    trained     trained numbers in the expert (MLP copy or LoRA factors; router rows not counted)
    upload      the artifact file the owner sends (default spec: includes the routing statistics,
                ``layers.*.stats.*``, the same for every variant)
    expert      bytes of the expert tensors alone (``layers.*.expert.*``), and that as a share of full
    ppl own     held-out perplexity on the owner's validation documents of the owner's model
                (public + its expert, top-2; for LoRA rows, the coordinator's materialised artifact
                assembled with the public model, which the tests show is the owner's model exactly)
    ppl public  the same model on the public domains' validation documents (forgetting)

Everything trained is cached under ``--work``; a rerun only evaluates.

    .venv/bin/python benchmarks/lora_expert.py --work WORK     # docs/lora.md has the results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flexmoe.testing.harness import PUBLIC_DOMAINS, build_corpus, fit_expert, log, pretrain_public, read_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0


def make_spec(public: Path, args, rank: int | None, lr: float):
    from flexmoe.core.hashing import fingerprint
    from flexmoe.formats.load import load_public_model
    from flexmoe.spec import ExpertRecipe, FederationSpec

    recipe = ExpertRecipe(
        max_steps=args.expert_steps,
        batch_size=args.expert_batch,
        seq_len=args.seq_len,
        lr=lr,
        warmup_steps=max(1, args.expert_steps // 10),
        lora_rank=rank,
    )
    fp = fingerprint(load_public_model(str(public)))
    return FederationSpec(public_model=str(public), fingerprint=fp, embedder=None, expert=recipe)


def train(work: Path, public: Path, paths, owner: str, variant: str, rank: int | None, args) -> dict:
    """Train one expert (cached); returns its artifact path, trained-number count and time."""
    import lightning.pytorch as pl

    from flexmoe.lora import LoraExpertModule
    from flexmoe.training.expert import ExpertModule

    art = work / "experts" / f"{owner}-{variant}.safetensors"
    meta = art.with_suffix(".json")
    if art.is_file() and meta.is_file():
        return {**json.loads(meta.read_text()), "path": art}
    lr = args.lora_lr if rank is not None and args.lora_lr else args.expert_lr
    spec = make_spec(public, args, rank, lr)
    log(f"training {owner}/{variant} ({args.expert_steps} steps, lr {lr:g})")
    pl.seed_everything(SEED, verbose=False)
    module = LoraExpertModule(str(public), spec, owner=owner) if rank else ExpertModule(str(public), spec, owner=owner)
    if rank:
        trained = sum(p.numel() for p in module.lora_parameters())
    else:
        from flexmoe.core.surgery import moe_blocks

        trained = sum(p.numel() for b in moe_blocks(module.model) for p in b.experts[1].parameters())
    seconds, _ = fit_expert(
        module,
        spec,
        paths[owner] / "train.jsonl",
        art,
        work=work,
        steps=args.expert_steps,
        seq_len=args.seq_len,
        batch_size=args.expert_batch,
    )
    info = {"trained": trained, "train_s": round(seconds, 1), "lr": lr}
    meta.write_text(json.dumps(info))
    return {**info, "path": art}


def full_artifact(path: Path, public: Path):
    """The coordinator's view: a full ExpertArtifact (a LoRA one materialised on the public model)."""
    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.artifacts.guard import read_safetensors_header
    from flexmoe.formats.load import load_public_model
    from flexmoe.lora import LORA_FORMAT_VERSION, LoraExpertArtifact

    if read_safetensors_header(path)["__metadata__"]["format_version"] == LORA_FORMAT_VERSION:
        return LoraExpertArtifact.load(path).materialize(load_public_model(str(public)))
    return ExpertArtifact.load(path)


def tensor_bytes(path: Path, part: str) -> int:
    """Bytes of the tensors named ``layers.*.{part}.*`` in a safetensors file."""
    import math

    from safetensors import safe_open

    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            if f".{part}." in key:
                sl = f.get_slice(key)
                total += math.prod(sl.get_shape()) * itemsize[sl.get_dtype()]
    return total


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="/tmp/flexmoe-lora", help="cache of corpus, public model and experts")
    p.add_argument("--owners", nargs="+", default=["docstrings", "unicode_names"])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 16])
    p.add_argument("--docs", type=int, default=40, help="documents per domain (hash-chosen sample)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="public-model pretraining batch")
    p.add_argument("--expert-steps", type=int, default=100)
    p.add_argument("--expert-batch", type=int, default=8)
    p.add_argument("--expert-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=None, help="learning rate of the LoRA rows (default: --expert-lr)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain (whole rows)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is faster on a shared machine)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    import flexmoe
    from flexmoe.data.packing import pack_domain
    from flexmoe.evaluate import perplexity
    from flexmoe.formats.load import load_public_model

    work = Path(args.work)
    started = time.perf_counter()
    paths = build_corpus(work, args.owners, args.docs)
    public = pretrain_public(work, paths, args, seed=SEED)
    tokenizer = AutoTokenizer.from_pretrained(public)

    def rows(domains):
        docs = [d for name in domains for d in read_jsonl(paths[name] / "val.jsonl")]
        return pack_domain(docs, tokenizer, args.seq_len, max_tokens=args.eval_tokens)

    public_rows = rows(PUBLIC_DOMAINS)
    base_ppl = perplexity(load_public_model(str(public)).eval(), {"public": public_rows}, batch_size=8)
    lines = []
    for owner in args.owners:
        own_rows = rows([owner])
        ref = perplexity(load_public_model(str(public)).eval(), {"own": own_rows}, batch_size=8)["per_domain"]["own"]
        lines.append((owner, "public model", None, None, None, ref, base_ppl["per_domain"]["public"], None))
        lr_tag = f"-lr{args.lora_lr:g}" if args.lora_lr else ""
        variants = [("full", None)] + [(f"lora-r{r}{lr_tag}", r) for r in args.ranks]
        for variant, rank in variants:
            info = train(work, public, paths, owner, variant, rank, args)
            expert = tensor_bytes(info["path"], "expert")
            model = flexmoe.assemble(load_public_model(str(public)), [full_artifact(info["path"], public)], top_k=2)
            ppl = perplexity(model.eval(), {"own": own_rows, "public": public_rows}, batch_size=8)["per_domain"]
            size = info["path"].stat().st_size
            lines.append((owner, variant, info["trained"], size, expert, ppl["own"], ppl["public"], info["train_s"]))
            log(f"{owner}/{variant}: upload {size} B, ppl own {ppl['own']:.2f}, public {ppl['public']:.2f}")

    cfg = (
        f"public OLMo-2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.pretrain_steps} "
        f"pretraining steps; experts {args.expert_steps} steps x {args.expert_batch} x {args.seq_len} tokens, "
        f"lr {args.expert_lr:g} (LoRA {args.lora_lr or args.expert_lr:g}); "
        f"{args.eval_tokens} held-out tokens per domain"
    )
    print()
    print(cfg)
    head = ["owner", "expert", "trained", "upload (B)", "expert (B)", "vs full", "ppl own", "ppl public", "train s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    full_bytes = {}
    for owner, variant, trained, size, expert, own, pub, secs in lines:
        if variant == "full":
            full_bytes[owner] = expert
        share = f"{expert / full_bytes[owner]:.3f}" if expert is not None else ""
        cells = [
            owner,
            variant,
            f"{trained:,}" if trained else "",
            f"{size:,}" if size else "",
            f"{expert:,}" if expert else "",
            share,
            f"{own:.2f}",
            f"{pub:.2f}",
            f"{secs}" if secs else "",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
