"""Owner runs under FSDP on 2 CPU processes (gloo), run by test_expert_fsdp.py.

usage: python fsdp_expert.py PUBLIC_DIR DATA OUT_DIR

Lightning's launcher starts rank 1 by running this script again (under pytest it would rerun
pytest), so the script is what both ranks run. In one pair of processes it trains three runs,
each a ``Trainer(accelerator="cpu", devices=2, strategy=module.fsdp_strategy())`` with the
callbacks ``flexmoe train-expert`` attaches (``expert_callbacks``: the frozen check, the router
row's initialisation from the owner's documents, the export, the routing log) and a validation
batch every 3 steps:

1. ``bf16``: bf16-mixed with activation checkpointing, 6 steps, a checkpoint every 3; each rank
   writes its local element count and the whole shape of every parameter at fit start to
   ``shards.rank{R}.json``;
2. ``resumed``: the same run resumed from ``bf16``'s step-3 checkpoint;
3. ``f32``: 32-true, 3 steps; then rank 1 adds 1 to one of its frozen shards and every rank runs
   ``FreezePublicModel``'s end-of-fit check again, writing what it raised to ``tamper.rank{R}.json``.

Each run exports ``{name}.safetensors``. The test runs :func:`fit_owner` on one process for the
single-device references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from flexmoe.callbacks import FreezePublicModel, PublicModelChanged
from lightning.pytorch.callbacks import ModelCheckpoint

import flexmoe
from flexmoe.core.sharding import local_shard
from flexmoe.data.datamodule import TextDataModule
from flexmoe.formats.load import load_public_model
from flexmoe.spec import ExpertRecipe, FederationSpec
from flexmoe.training.expert import ExpertModule, expert_callbacks

# The global batch: 4 rows of 32 tokens per step, so 2 per rank on 2 processes.
GLOBAL_BATCH, SEQ = 4, 32


def make_spec(public: str, precision: str) -> FederationSpec:
    """The lean owner's recipe under bf16-mixed (activation checkpointing too), the plain one under 32-true."""
    fp = flexmoe.fingerprint(load_public_model(public))
    lean = precision == "bf16-mixed"
    recipe = ExpertRecipe(lr=3e-3, warmup_steps=1, batch_size=GLOBAL_BATCH, seq_len=SEQ, precision=precision,
                          activation_checkpointing=lean)  # fmt: skip
    return FederationSpec(public_model=public, fingerprint=fp, embedder=None, expert=recipe)


class ShardSizes(pl.Callback):
    """Each rank's local element count and the whole shape of every parameter, at fit start.

    FSDP2 keeps the root unit (embeddings, final norm, LM head) gathered from a forward pass to
    the next backward, so this runs before any forward."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        sizes = {
            n: {"local": local_shard(p).numel(), "shape": list(p.shape), "frozen": not p.requires_grad}
            for n, p in pl_module.model.named_parameters()
        }
        self.path.with_suffix(f".rank{trainer.global_rank}.json").write_text(json.dumps(sizes))


def fit_owner(public, data, out: Path, name, *, precision, devices, steps, ckpt_path=None, checkpoint_every=None):
    """One owner run; returns the Trainer and the module. ``devices=1``: the default strategy."""
    spec = make_spec(public, precision)
    pl.seed_everything(0)
    module = ExpertModule(public, spec, owner="o")
    callbacks = expert_callbacks(spec, out / f"{name}.safetensors")  # as `flexmoe train-expert` attaches them
    if devices > 1 and name == "bf16":  # first: before the router's initialisation runs the model forward
        callbacks.insert(0, ShardSizes(out / "shards.json"))
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(out / f"{name}_ck", every_n_train_steps=checkpoint_every, save_top_k=-1))
    # Each rank takes GLOBAL_BATCH / devices rows: TextDataModule's sampler deals one permutation
    # round-robin to the ranks, so every step trains on the rows one process would.
    dm = TextDataModule(data, tokenizer=public, seq_len=SEQ, batch_size=GLOBAL_BATCH // devices,
                        cache_dir=out / "cache")  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=module.fsdp_strategy() if devices > 1 else "auto",
        precision=precision,
        max_steps=steps,
        val_check_interval=3,  # validation forwards through the sharded model too
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=bool(checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def tamper(trainer, module, out: Path) -> None:
    """Rank 1 changes one element of a frozen shard; every rank checks again (a collective)."""
    freeze = next(c for c in trainer.callbacks if isinstance(c, FreezePublicModel))
    if trainer.global_rank == 1:
        frozen = next(p for p in module.model.parameters() if not p.requires_grad)
        with torch.no_grad():
            local_shard(frozen).view(-1)[0] += 1
    try:
        freeze.on_fit_end(trainer, module)
        raised = None
    except PublicModelChanged as e:
        raised = str(e)
    (out / f"tamper.rank{trainer.global_rank}.json").write_text(json.dumps({"raised": raised}))


def main(public: str, data: str, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    out.mkdir(parents=True, exist_ok=True)
    fit_owner(public, data, out, "bf16", precision="bf16-mixed", devices=2, steps=6, checkpoint_every=3)
    ckpt = next((out / "bf16_ck").glob("*step=3*.ckpt"))
    fit_owner(public, data, out, "resumed", precision="bf16-mixed", devices=2, steps=6, ckpt_path=ckpt)
    trainer, module = fit_owner(public, data, out, "f32", precision="32-true", devices=2, steps=3)
    tamper(trainer, module, out)
    torch.distributed.destroy_process_group()  # else gloo's threads may abort the interpreter's exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
