"""examples/quickstart.py, the FlexOlmo flow in one script, runs end to end (with small settings),
merges with the default recipe (the posterior router) and shows what that recipe promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # trains a public model and two owners

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
# The merged model's perplexity over the reference model's (the public model on public text, the
# owner's own model on its text) may be at most this. Measured at the settings below: 1.005-1.019
# (2026-12-07; 0.981-1.025 at the script's defaults before); the slack is for noise, not for
# routing elsewhere. On each owner's text the merged model must beat the public model: measured
# 0.815 (code) and 0.935 (licences) at the settings below.
CLOSE = 1.03


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # The script's own training steps (fewer leave the owners' experts no better than the public
    # model on their own text); less data and fewer evaluation windows.
    small = [
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
        "routing: posterior",
        "max |logit difference| vs flexmoe.merge_experts = 0.00e+00",
        "held-out perplexity",
        "opted out",
    ):
        assert step in r.stdout, f"missing {step!r} in:\n{r.stdout}"
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["code.safetensors", "licenses.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True)
    assert type(merged).__name__ == "FlexMoEForCausalLM" and merged.config.moe_router == "posterior"
    assert merged.config.moe_owners == ["public", "code", "licenses"]
    ratios = dict(re.findall(r"merged / (?:the public model|its own model) on (\w+) text: ([\d.]+)", r.stdout))
    assert sorted(ratios) == ["code", "licenses", "public"], r.stdout
    for domain, ratio in ratios.items():
        assert float(ratio) <= CLOSE, (domain, ratio, r.stdout)
    # and on every owner's held-out text the merged model beats the public model alone
    gains = dict(re.findall(r"merged / public model on the owner's (\w+) text: ([\d.]+)", r.stdout))
    assert sorted(gains) == ["code", "licenses"], r.stdout
    for domain, ratio in gains.items():
        assert float(ratio) < 1.0, (domain, ratio, r.stdout)
