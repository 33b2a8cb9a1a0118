"""An owner's run at OLMo-2 1B shapes on this machine: bf16-mixed, checkpointed, resumed, exported.

The memory-lean owner recipe end to end (:mod:`flexmoe.training.expert`), against ``flexmoe plan``:

1. ``build``: the public model from the OLMo-2 1B config with random weights, built in bfloat16
   (``from_config``; no float32 copy) with ``--layers`` of its 16 decoder layers, saved with
   ``save_pretrained`` (bfloat16, as published models are), and a spec whose fingerprint is the
   coordinator's (the model read back in float32);
2. ``train``: ``ExpertModule`` from that directory with ``precision="bf16-mixed"`` and activation
   checkpointing, in a Lightning ``Trainer(precision="bf16-mixed")`` for ``--steps`` steps on random
   token rows, a checkpoint (and the artifact written with it) at the last step;
3. ``resume``: a fresh process resumes that checkpoint for one more step and exports at fit end;
4. the artifact is loaded and validated against the public model as the coordinator loads it
   (float32), in this parent process after the runs.

Each run is a fresh process; measured = its peak resident set (``ru_maxrss``) minus its resident
set after the imports, as ``benchmarks/plan_check.py`` measures, against the plan's CPU estimate.

    .venv/bin/python benchmarks/owner_1b.py --layers 16 --steps 2  # the whole 1B (docs/scale.md, ~17 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plan_check import rss  # the same measurement: peak RSS minus RSS after the imports

SEQ_LEN, MICRO_BATCH = 256, 2


def build(work: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexmoe.plan import KNOWN_CONFIGS
    from flexmoe.spec import ExpertRecipe, FederationSpec
    from flexmoe.training.expert import float32_fingerprint

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**KNOWN_CONFIGS["olmo2-1b"], "num_hidden_layers": layers})
    public = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    public.save_pretrained(work / "public")
    recipe = ExpertRecipe(
        batch_size=MICRO_BATCH,
        seq_len=SEQ_LEN,
        max_steps=100,
        warmup_steps=0,
        precision="bf16-mixed",
        activation_checkpointing=True,
    )
    spec = FederationSpec(
        public_model=str(work / "public"), fingerprint=float32_fingerprint(public), embedder=None, expert=recipe
    )
    spec.save(work / "spec.json")


def train(work: Path, steps: int, resume: bool) -> None:
    """One owner run; prints its timings and memory as JSON."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from flexmoe.spec import FederationSpec
    from flexmoe.training.expert import ExpertModule, expert_callbacks

    baseline = rss()
    spec = FederationSpec.load(work / "spec.json")
    torch.manual_seed(0)
    vocab = 100352
    rows = [{"input_ids": torch.randint(0, vocab, (SEQ_LEN,))} for _ in range(MICRO_BATCH * (steps + 1))]
    t0 = time.perf_counter()
    module = ExpertModule(spec.public_model, spec, owner="owner")
    loaded = time.perf_counter() - t0
    checkpoints = ModelCheckpoint(dirpath=work / "ckpt", every_n_train_steps=steps, save_top_k=1)
    callbacks = expert_callbacks(spec, work / "owner.safetensors")
    callbacks = [c for c in callbacks if type(c).__name__ != "RouterEmbeddingInit"] + [checkpoints]
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=module.precision,
        max_steps=steps + 1 if resume else steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=work,
    )
    ckpt = next((work / "ckpt").glob("*.ckpt")) if resume else None
    t1 = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=MICRO_BATCH), ckpt_path=ckpt)
    fit = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "baseline": baseline,
        "peak": peak,
        "load_s": loaded,
        "fit_s": fit,
        "global_step": trainer.global_step,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "public_dtypes": sorted({str(p.dtype) for p in module.model.parameters() if not p.requires_grad}),
        "trainable_dtypes": sorted({str(p.dtype) for p in module.model.parameters() if p.requires_grad}),
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers of the 16 (16: ~17 GB; 4: ~6 GB)")
    ap.add_argument("--steps", type=int, default=2, help="steps before the checkpoint (then one more, resumed)")
    ap.add_argument("--work", type=Path, default=None, help="where the public model, checkpoint and artifact go")
    ap.add_argument("--child", choices=("build", "train", "resume"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="owner_1b_"))
    if args.child == "build":
        return build(work, args.layers)
    if args.child:
        return train(work, args.steps, resume=args.child == "resume")

    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.formats.load import load_public_model
    from flexmoe.plan import KNOWN_CONFIGS, ModelShape, Setting, estimate
    from flexmoe.spec import FederationSpec

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = {}
    for stage in ("build", "train", "resume"):
        cmd = [sys.executable, __file__, "--child", stage, "--work", str(work), "--layers", str(args.layers)]
        t = time.perf_counter()
        done = subprocess.run([*cmd, "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{stage} failed:\n{done.stderr[-3000:]}")
        print(f"{stage}: {time.perf_counter() - t:.0f} s", flush=True)
        if stage != "build":
            results[stage] = json.loads(done.stdout.strip().splitlines()[-1])

    spec = FederationSpec.load(work / "spec.json")
    public = load_public_model(spec.public_model).eval()  # the coordinator's float32 copy
    art = ExpertArtifact.load(work / "owner.safetensors", fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    art.validate(public, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    del public

    shape = ModelShape.from_config({**KNOWN_CONFIGS["olmo2-1b"], "num_hidden_layers": args.layers})
    gb = 1e9
    for ckpt in (False, True):
        e = estimate(shape, Setting(MICRO_BATCH, SEQ_LEN, checkpointing=ckpt, precision="bf16-mixed", device="cpu"))
        print(f"plan bf16-mixed, checkpointing={ckpt}: {e.peak / gb:.2f} GB")
    e = estimate(shape, Setting(MICRO_BATCH, SEQ_LEN, checkpointing=True, precision="bf16-mixed", device="cpu"))
    for stage, r in results.items():
        measured = r["peak"] - r["baseline"]
        print(
            f"{stage}: steps to {r['global_step']}, load {r['load_s']:.0f} s, fit {r['fit_s']:.0f} s, "
            f"loss {r['loss']:.3f}, measured {measured / gb:.2f} GB vs plan {e.peak / gb:.2f} GB "
            f"({measured / e.peak:.3f}); frozen {r['public_dtypes']}, trainable {r['trainable_dtypes']}",
            flush=True,
        )
    ckpt = next((work / "ckpt").glob("*.ckpt"))
    print(
        f"artifact: {art.metadata['dtype']}, training_tokens {art.training_tokens}, "
        f"{(work / 'owner.safetensors').stat().st_size / gb:.2f} GB; checkpoint {ckpt.stat().st_size / gb:.2f} GB; "
        f"valid against the float32 public model"
    )


if __name__ == "__main__":
    main()
