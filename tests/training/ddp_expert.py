"""Train an expert for a few steps on 1 or 2 CPU processes (run by test_expert_ddp.py).

usage: python ddp_expert.py PUBLIC_DIR DATA OUT DEVICES PER_DEVICE_BATCH
"""

import sys

import lightning.pytorch as pl
from flexmoe.callbacks import ExportExpert, FreezePublicModel

import flexmoe
from flexmoe.data.datamodule import TextDataModule
from flexmoe.formats.load import load_public_model
from flexmoe.spec import ExpertRecipe, FederationSpec
from flexmoe.training.expert import ExpertModule

public, data, out, devices, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
fp = flexmoe.fingerprint(load_public_model(public))
spec = FederationSpec(public_model=public, fingerprint=fp, embedder=None, expert=ExpertRecipe(lr=3e-3, warmup_steps=1))
pl.seed_everything(0)
module = ExpertModule(public, spec, owner="o")
dm = TextDataModule(data, tokenizer=public, seq_len=32, batch_size=batch, cache_dir=out + ".cache")
trainer = pl.Trainer(
    accelerator="cpu",
    devices=devices,
    strategy="ddp" if devices > 1 else "auto",
    max_steps=3,
    limit_val_batches=0,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[FreezePublicModel(fp), ExportExpert(out)],
)
trainer.fit(module, dm)
