"""`flexmoe plan` against measured peak memory: an owner's training steps on real model shapes.

For each case, a fresh Python process (so no case inherits another's heap):

1. imports torch, transformers and Lightning, and reads its resident set (``VmRSS``): the baseline;
2. builds the public model from a real config with random weights (``AutoModelForCausalLM.from_config``,
   float32, no download), shortened to fewer decoder layers where the whole model would not fit
   this machine's memory;
3. trains it the way ``flexmoe train-expert`` does: :class:`~flexmoe.training.expert.ExpertModule`
   (upcycle, freeze the public model, AdamW over expert 1 and the routers, z-loss, clipping) in a
   Lightning ``Trainer`` for ``--steps`` optimizer steps on random token rows, optionally with the
   decoder layers checkpointed (the recipe's ``activation_checkpointing``);
4. reads its peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark:
   nothing between samples is missed).

Measured = peak - baseline: what the model and its training added, the quantity the plan predicts
(the plan's ``device="cpu"`` estimate at the case's precision: ``32-true``, or ``bf16-mixed`` with
the public model in bfloat16 and what trains in float32). RSS rather than ``tracemalloc`` because
torch's CPU tensors bypass Python's allocator; it also counts the allocator's fragmentation and
the model-building transients, which is what a machine has to have.

    .venv/bin/python benchmarks/plan_check.py                    # the docs/scale.md table (~10 min)
    .venv/bin/python benchmarks/plan_check.py --cases olmo2-150m  # one case
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# name -> (known config, decoder layers (None: all), micro-batch, sequence length, checkpointing,
# precision). Sized so every case peaks under ~9 GB on this 24 GB machine. The bf16-mixed cases
# build the public model in bfloat16 (no float32 copy), as ExpertModule loads it under that recipe.
CASES: dict[str, tuple[str, int | None, int, int, bool, str]] = {
    "olmo2-150m": ("olmo2-150m", None, 2, 256, False, "32-true"),
    "olmo2-1b/4L": ("olmo2-1b", 4, 2, 256, False, "32-true"),
    "olmo2-1b/4L-ckpt": ("olmo2-1b", 4, 2, 256, True, "32-true"),
    "olmo2-7b/1L": ("olmo2-7b", 1, 1, 256, False, "32-true"),
    "olmo2-1b/4L-bf16": ("olmo2-1b", 4, 2, 256, False, "bf16-mixed"),
    "olmo2-1b/4L-bf16-ckpt": ("olmo2-1b", 4, 2, 256, True, "bf16-mixed"),
}


def rss() -> int:
    """This process's resident set now, in bytes (``VmRSS``); peaks come from ``ru_maxrss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(case: str, steps: int) -> None:
    """Run one case and print ``{"baseline", "peak", "predicted", ...}`` (bytes) as JSON."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexmoe.plan import KNOWN_CONFIGS, ModelShape, Setting, estimate
    from flexmoe.spec import ExpertRecipe, FederationSpec
    from flexmoe.training.expert import ExpertModule

    name, layers, batch, seq_len, ckpt, precision = CASES[case]
    fields = {**KNOWN_CONFIGS[name], **({"num_hidden_layers": layers} if layers else {})}
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(0, fields["vocab_size"], (seq_len,))} for _ in range(batch * steps)]
    loader = DataLoader(rows, batch_size=batch)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    baseline = rss()

    config = AutoConfig.for_model(**fields)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    public = AutoModelForCausalLM.from_config(config, dtype=dtype)
    recipe = ExpertRecipe(
        batch_size=batch,
        seq_len=seq_len,
        max_steps=steps,
        warmup_steps=0,
        precision=precision,
        activation_checkpointing=ckpt,
    )
    spec = FederationSpec(public_model=name, fingerprint="0" * 64, embedder=None, expert=recipe)
    module = ExpertModule(public, spec, owner="owner", check_fingerprint=False)
    trainer.fit(module, train_dataloaders=loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    shape = ModelShape.from_config(config)
    e = estimate(shape, Setting(batch, seq_len, checkpointing=ckpt, precision=precision, device="cpu"))
    print(json.dumps({"baseline": baseline, "peak": peak, "predicted": e.peak, "estimate": e.to_dict()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (the peak comes at step 2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.steps)

    gb = 1e9
    print(f"{'case':>18} | {'tokens':>6} | {'predicted GB':>12} | {'measured GB':>11} | {'measured/predicted':>18}")
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--steps", str(args.steps)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        measured = r["peak"] - r["baseline"]
        s = r["estimate"]["setting"]
        print(
            f"{case:>18} | {s['micro_batch'] * s['seq_len']:>6} | {r['predicted'] / gb:>12.2f} | "
            f"{measured / gb:>11.2f} | {measured / r['predicted']:>18.3f}",
            flush=True,
        )
        parts = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations")
        print(" " * 21 + "plan: " + ", ".join(f"{p} {r['estimate'][p] / gb:.2f}" for p in parts), flush=True)
        print(" " * 21 + f"process baseline {r['baseline'] / gb:.2f} GB, peak RSS {r['peak'] / gb:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
