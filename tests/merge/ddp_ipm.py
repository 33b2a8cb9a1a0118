"""Post-local SGD (iterative parameter mixing) on 2 CPU processes with Lightning's own DDPStrategy
(run by test_parameter_mixing.py; the recipe is docs/parameter_mixing.md).

usage: python ddp_ipm.py PUBLIC_DIR DATA OUT_DIR MAX_STEPS WARMUP PERIOD

Writes OUT_DIR/rank{0,1}.json: the sha256 of the rank's parameters after every optimizer step.
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post_localSGD
from transformers import AutoConfig

from flexmoe.data.datamodule import TextDataModule
from flexmoe.training.pretrain import PretrainModule


class PostLocalSGDOnCPU(pl.Callback):
    """Lightning registers DDP communication hooks on CUDA only; on CPU (gloo) register the
    post-local-SGD hook on the DDP-wrapped model once it exists."""

    def __init__(self, state: post_localSGD.PostLocalSGDState):
        self.state = state

    def on_fit_start(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cpu":
            trainer.strategy.model.register_comm_hook(self.state, post_localSGD.post_localSGD_hook)


class RecordParameters(pl.Callback):
    def __init__(self, out: Path):
        self.out, self.hashes = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = hashlib.sha256()
        for p in pl_module.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        self.hashes.append(h.hexdigest())

    def on_fit_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"hashes": self.hashes}))


public, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
max_steps, warmup, period = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
pl.seed_everything(0)
module = PretrainModule(AutoConfig.from_pretrained(public), lr=1e-2, warmup_steps=0, max_steps=max_steps)
dm = TextDataModule(data, tokenizer=public, seq_len=32, batch_size=2, val_fraction=0, cache_dir=out / "cache")
# Gradients are all-reduced as in plain DDP for the first `warmup` steps; after that each process
# steps on its own gradients (post_local_gradient_allreduce=False: on one machine the default
# "intra-node" subgroup would be every process, i.e. plain DDP again) and the parameters are
# averaged every `period` steps by torch's PeriodicModelAverager, which Lightning runs after each
# optimizer step.
state = post_localSGD.PostLocalSGDState(
    process_group=None, subgroup=None, start_localSGD_iter=warmup, post_local_gradient_allreduce=False
)
strategy = DDPStrategy(
    ddp_comm_state=state, ddp_comm_hook=post_localSGD.post_localSGD_hook, model_averaging_period=period
)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=strategy,
    max_steps=max_steps,
    limit_val_batches=0,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[PostLocalSGDOnCPU(state), RecordParameters(out)],
)
trainer.fit(module, dm)
