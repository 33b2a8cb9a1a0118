"""DDP on two CPU processes (gloo) trains the same expert as one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexmoe import ExpertArtifact
from flexmoe.testing import LICENSES

pytestmark = pytest.mark.slow  # two-process DDP in subprocesses

SCRIPT = Path(__file__).with_name("ddp_expert.py")


def train(public_dir, out, devices, batch):
    cmd = [sys.executable, str(SCRIPT), str(public_dir), f"{LICENSES}/GPL-3", str(out), str(devices), str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return ExpertArtifact.load(out)


def test_two_process_ddp_matches_one_process(public_dir, tmp_path):
    single = train(public_dir, tmp_path / "single.safetensors", devices=1, batch=4)
    ddp = train(public_dir, tmp_path / "ddp.safetensors", devices=2, batch=2)
    assert ddp.training_tokens == single.training_tokens == 3 * 4 * 32
    for name, t in single.tensors.items():
        torch.testing.assert_close(ddp.tensors[name], t, rtol=1e-4, atol=1e-5, msg=name)
    # and training did move the expert away from the public MLP it started from
    public = AutoModelForCausalLM.from_pretrained(public_dir)
    assert not torch.allclose(
        single.tensors["layers.0.expert.up_proj.weight"], public.model.layers[0].mlp.up_proj.weight
    )
