"""Prepare the FedAvg example: a tiny starting model, two owners' data and a run config.

    python examples/fedavg/prepare.py [--out demo_out/fedavg]
    flwr run examples/fedavg --run-config demo_out/fedavg/run_config.toml --federation-config "num-supernodes=2"

Owners: the standard library's code (docstrings and comments removed) and its docstrings, from
:func:`flexmoe.data.corpus.local_corpus` (no download). The starting model is a randomly initialised
small OLMo-2 (:func:`flexmoe.training.pretrain.olmo2_config`) with a byte-level BPE tokenizer trained on
both owners' text, saved as a ``transformers`` directory. The run config repeats
``pyproject.toml``'s defaults with absolute paths.
"""

from __future__ import annotations

from pathlib import Path

OWNERS = ("stdlib_code", "docstrings")


def main(
    out: str = "demo_out/fedavg",
    max_docs_per_domain: int = 120,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Write ``out/public``, ``out/data/<owner>/{train,val}.jsonl`` and ``out/run_config.toml``.

    Args:
        out: Output folder.
        max_docs_per_domain: Documents per owner (a fixed sample of the standard library).
        vocab_size: Tokenizer vocabulary.
        hidden_size: Model width.
        num_layers: Decoder layers.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from flexmoe.data.corpus import local_corpus, write_corpus
    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.training.pretrain import olmo2_config

    root = Path(out).resolve()
    domains = local_corpus(max_docs_per_domain=max_docs_per_domain, domains=list(OWNERS))
    paths = write_corpus(domains, root / "data")
    tokenizer = train_tokenizer([t for d in domains.values() for t in d.train], vocab_size=vocab_size)
    torch.manual_seed(0)
    config = olmo2_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "public")
    tokenizer.save_pretrained(root / "public")
    run_config = {
        "model": str(root / "public"),
        "eval-data": str(root / "data" / "*" / "val.jsonl"),
        "out-dir": str(root / "out"),
        "data-paths": ",".join(str(paths[o] / "train.jsonl") for o in OWNERS),
    }
    text = "".join(f'{k} = "{v}"\n' for k, v in run_config.items())
    (root / "run_config.toml").write_text(text)
    print(f"wrote {root}/public, {root}/data/{{{','.join(OWNERS)}}} and {root}/run_config.toml")
    return root / "run_config.toml"


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
