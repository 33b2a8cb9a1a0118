"""examples/quickstart.py, the FlexOlmo flow in one script, runs end to end (with small settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # trains a public model and two owners

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    small = [
        "--public_steps",
        "10",
        "--owner_steps",
        "5",
        "--files",
        "15",
        "--max_bytes",
        "30000",
        "--eval_windows_per_domain",
        "4",
    ]
    r = subprocess.run(
        [sys.executable, str(QUICKSTART), "--out", str(out), *small],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in (
        "public model:",
        "owner 'code'",
        "owner 'licenses'",
        "$ flexmoe assemble",
        "max |logit difference| vs flexmoe.assemble",
        "held-out perplexity",
        "opted out",
    ):
        assert step in r.stdout, f"missing {step!r} in:\n{r.stdout}"
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["code.safetensors", "licenses.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "FlexOlmoForCausalLM" and merged.config.num_experts == 3
