"""The device check: owner steps and merged-model inference at ~1B on a GPU, against `flexmoe plan`.

On a machine with a CUDA GPU (one prepared run, a few minutes):

1. **owner steps**, with and without activation checkpointing: the OLMo-2 1B shape with random
   weights, public model in bfloat16, :class:`~flexmoe.training.expert.ExpertModule` in a Lightning
   ``Trainer(precision="bf16-mixed")`` with the trainable expert and routers cast to float32 (the
   plan's ``bf16-mixed``: float32 master weights and AdamW state only for what trains); prints
   tokens/s (after the first step) and ``torch.cuda.max_memory_allocated`` next to the plan's
   peak for the same setting;
2. **merged-model inference**: the same public model upcycled to 1 + ``--experts`` experts
   (top-2), bfloat16, forward passes over ``--batch`` x ``--seq-len`` tokens; tokens/s and peak
   memory next to the weights' size.

Without a GPU the same code runs on the CPU at a tiny size, float32 (tests/test_plan.py runs it),
so the script cannot rot between the runs that have a GPU.

    .venv/bin/python benchmarks/device_check.py               # GPU if there is one, else the tiny CPU path
    .venv/bin/python benchmarks/device_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from flexmoe.plan import KNOWN_CONFIGS, ModelShape, Setting, estimate

TINY = {
    "model_type": "olmo2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}


def _peak_bytes(cuda: bool) -> int:
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _public(fields: dict, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**fields)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype), config


def owner_steps(fields: dict, *, cuda: bool, checkpointing: bool, batch: int, seq_len: int, steps: int) -> dict:
    """A few owner steps; tokens/s, measured peak and the plan's peak for the same setting."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from flexmoe.spec import ExpertRecipe, FederationSpec
    from flexmoe.training.expert import ExpertModule

    device, precision = ("cuda", "bf16-mixed") if cuda else ("cpu", "32-true")
    _reset_peak(cuda)
    public, config = _public(fields, torch.bfloat16 if cuda else torch.float32, device)
    recipe = ExpertRecipe(batch_size=batch, seq_len=seq_len, max_steps=steps, warmup_steps=0)
    spec = FederationSpec(public_model="device-check", fingerprint="0" * 64, embedder=None, expert=recipe)
    module = ExpertModule(public, spec, owner="owner", check_fingerprint=False)
    for p in module.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # what trains keeps float32 master weights (the plan's bf16-mixed)
    if checkpointing:
        module.model.activation_checkpointing_enable()  # use_reentrant=False: frozen inputs are fine
    rows = [{"input_ids": torch.randint(0, fields["vocab_size"], (seq_len,))} for _ in range(batch * steps)]
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch))
    tokens_per_s = (len(times) - 1) * batch * seq_len / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    setting = Setting(batch, seq_len, checkpointing=checkpointing, precision=precision, device=device)
    planned = estimate(ModelShape.from_config(config), setting)
    measured = _peak_bytes(cuda)
    del trainer, module, public
    return {
        "what": f"owner steps{' (checkpointed)' if checkpointing else ''}",
        "tokens_per_s": tokens_per_s,
        "measured": measured,
        # The plan's CUDA runtime allowance is not in max_memory_allocated; the CPU figure is the
        # whole process, interpreter included.
        "planned": planned.peak - planned.runtime,
    }


def merged_inference(fields: dict, *, cuda: bool, experts: int, batch: int, seq_len: int, repeats: int) -> dict:
    """Forward passes of a merged MoE (1 + ``experts`` experts, top-2); tokens/s and peak memory."""
    from flexmoe.core.surgery import upcycle

    device = "cuda" if cuda else "cpu"
    _reset_peak(cuda)
    public, config = _public(fields, torch.bfloat16 if cuda else torch.float32, device)
    model = upcycle(public, experts, top_k=2).eval()
    shape = ModelShape.from_config(config)
    weights = (shape.dense_params + experts * shape.trainable_params) * (2 if cuda else 4)
    ids = torch.randint(0, fields["vocab_size"], (batch, seq_len), device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, use_cache=False)
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    measured = _peak_bytes(cuda)
    del model, public
    return {
        "what": f"merged inference, {1 + experts} experts",
        "tokens_per_s": repeats * batch * seq_len / elapsed,
        "measured": measured,
        "planned": weights,  # the weights alone; the rest is the forward's activations
    }


def run(*, cuda: bool | None = None, steps: int = 3, experts: int = 7, batch: int | None = None,
        seq_len: int | None = None) -> list[dict]:  # fmt: skip
    """Every row of the check: a ~1B model on a GPU, the tiny model on the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fields = KNOWN_CONFIGS["olmo2-1b"] if cuda else TINY
    batch = batch or (4 if cuda else 2)
    seq_len = seq_len or (2048 if cuda else 32)
    rows = [
        owner_steps(fields, cuda=cuda, checkpointing=c, batch=batch, seq_len=seq_len, steps=steps)
        for c in (False, True)
    ]
    rows.append(merged_inference(fields, cuda=cuda, experts=experts, batch=batch, seq_len=seq_len, repeats=3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the tiny CPU path even where there is a GPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--experts", type=int, default=7, help="owner experts in the merged model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    cuda = False if args.cpu else torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else "CPU (tiny model; the GPU run is the one that counts)"
    print(f"device check on {where}")
    rows = run(cuda=cuda, steps=args.steps, experts=args.experts, batch=args.batch, seq_len=args.seq_len)
    print(f"{'':>34} | {'tokens/s':>9} | {'measured GiB':>12} | {'planned GiB':>11} | {'ratio':>6}")
    for r in rows:
        # On the CPU the measured peak is the whole process's (the interpreter dwarfs a tiny model).
        ratio = f"{r['measured'] / r['planned']:.2f}" if cuda else "-"
        print(
            f"{r['what']:>34} | {r['tokens_per_s']:>9.0f} | {r['measured'] / 2**30:>12.2f} | "
            f"{r['planned'] / 2**30:>11.2f} | {ratio:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
