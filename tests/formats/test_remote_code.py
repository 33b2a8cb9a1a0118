"""The ``remote`` export: a ``transformers`` checkpoint carrying its own modeling code.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, in a fresh interpreter that
can import neither this repository nor flexmoe (proof that the shipped modeling code needs only
torch and transformers), gives flexmoe's logits (float32, max abs difference <= 1e-4) and its
greedy tokens, generating from the KV cache with a posterior that reads one new position per
token; flexmoe reopens the same directory as a model that takes opt-outs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexmoe
import flexmoe.modeling
from flexmoe.core.errors import InputError
from flexmoe.core.posterior import PosteriorRouter, use_posterior_routers
from flexmoe.core.surgery import moe_blocks, settings, upcycle
from flexmoe.formats.export import export
from flexmoe.formats.load import detect_format, load
from flexmoe.modeling import FILES
from flexmoe.testing import VOCAB, perturb_, tiny_model

TOL = 1e-4
OWNERS = 3
BANDS = [range(3 + 20 * d, 3 + 20 * (d + 1)) for d in range(OWNERS + 1)]  # each domain's share of the vocabulary
PROMPT, NEW = 8, 10
# name -> (base, router recipe). "clamped": the assembled token router with its biases, which the
# FlexOlmo and Mixtral formats cannot hold exactly but this one can.
CASES = {
    "olmo2-posterior": ("olmo2", "posterior"),
    "llama-posterior-reset": ("llama", "posterior-reset"),
    "olmo2-clamped": ("olmo2", "clamped"),
}


def merged(arch: str, recipe: str, seed: int = 0):
    """A tiny assembled merge (public + perturbed owners, random rows, raw biases in [-1, 1]),
    routed by the posterior over unigram counts of each domain's band unless ``recipe`` is clamped."""
    model = upcycle(tiny_model(arch, seed=seed), num_experts=OWNERS)
    g = torch.Generator().manual_seed(seed + 1)
    for block in moe_blocks(model):
        for j in range(1, OWNERS + 1):
            perturb_(block.experts[j], seed=seed + 10 * j)
        with torch.no_grad():
            block.router.weight.normal_(generator=g)
            block.router.bias.uniform_(-1.0, 1.0, generator=g)
    if recipe.startswith("posterior"):
        counts = torch.zeros(len(BANDS), VOCAB)
        for d, band in enumerate(BANDS):
            counts[d, list(band)] = 1e4 / len(band)
        use_posterior_routers(model, counts, reset_at_eos=recipe.endswith("reset"))
    return model.eval()


def rows(seed: int = 3) -> torch.Tensor:
    """Two rows mixing every domain's band (the posterior moves along them), with a document end
    in the second so a resetting posterior restarts mid-row."""
    ids = torch.randint(3, 83, (2, 16), generator=torch.Generator().manual_seed(seed))
    ids[1, 6] = 2
    return ids


# Runs in a fresh interpreter: loads each export by transformers alone and reports what it computed.
CHILD = r"""
import importlib.abc, json, sys
class NoFlexmoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flexmoe" or name.startswith("flexmoe."):
            raise ImportError(f"the remote modeling code imported {name}")
sys.meta_path.insert(0, NoFlexmoe())
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
report = {"sys_path": sys.path}
for case, directory in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    inputs = torch.load(f"{directory}/../{case}.pt")
    with torch.no_grad():
        logits = model(input_ids=inputs["ids"], use_cache=False).logits
        prompt = inputs["ids"][:, : inputs["prompt"]]
        state = model.posterior
        if state is not None:
            state.scanned = 0
        out = model.generate(
            prompt, max_new_tokens=inputs["new"], min_new_tokens=inputs["new"], do_sample=False, pad_token_id=0
        )
    report[case] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "max_diff": float((logits - inputs["logits"]).abs().max()),
        "tokens": out.tolist(),
        "scanned": None if state is None else state.scanned,
    }
    half = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.bfloat16)
    report[case]["bf16_router"] = {k: str(v.dtype) for k, v in half.model.layers[0].mlp.router.state_dict().items()}
    report[case]["bf16_expert"] = str(half.model.layers[0].mlp.experts[0].up_proj.weight.dtype)
report["flexmoe_imported"] = any(m == "flexmoe" or m.startswith("flexmoe.") for m in sys.modules)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported (remote), flexmoe's logits and greedy tokens, and what the fresh
    interpreter computed from the exports."""
    root = tmp_path_factory.mktemp("remote")
    cases = {}
    for case, (arch, recipe) in CASES.items():
        model = merged(arch, recipe)
        out = export(model, root / case, "remote")
        ids = rows()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            tokens = model.generate(
                ids[:, :PROMPT], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
            )
        torch.save({"ids": ids, "logits": logits, "prompt": PROMPT, "new": NEW}, root / f"{case}.pt")
        cases[case] = {"model": model, "dir": out, "tokens": tokens}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_MODULES_CACHE"] = str(root / "hf_modules")  # the modeling code lands here, not in ~/.cache
    # -I: no PYTHONPATH, no user site, no script or current directory on sys.path; cwd away from the repo.
    arg = json.dumps({case: str(c["dir"]) for case, c in cases.items()})
    r = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, arg], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return cases, json.loads(r.stdout.strip().splitlines()[-1])


def test_the_export_holds_the_native_layout_a_config_json_and_the_modeling_code(exported):
    cases, _ = exported
    directory = cases["olmo2-posterior"]["dir"]
    for name in (*FILES, "config.json", "base_config.json", "flexmoe_config.json", "model.safetensors.index.json"):
        assert (directory / name).is_file(), name
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "flexmoe" and config["base_model_type"] == "olmo2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flexmoe.FlexMoEForCausalLM"
    assert config["moe_router"] == "posterior" and config["moe_top_k"] == 2
    assert config["moe_owners"] == ["public", "expert_1", "expert_2", "expert_3"]
    base = json.loads((directory / "base_config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "rope_parameters")} == {
        k: base[k] for k in ("hidden_size", "num_hidden_layers", "rope_parameters")
    }
    assert detect_format(directory) == "remote"
    source = Path(flexmoe.modeling.__file__).parent
    for name in FILES:  # shipped as they are
        assert (directory / name).read_bytes() == (source / name).read_bytes()


def test_the_modeling_code_runs_without_the_repository_or_flexmoe(exported):
    _, report = exported
    assert not report["flexmoe_imported"]
    repo = str(Path(__file__).resolve().parents[2])
    # The virtual environment may live inside the checkout (`make` puts it in .venv): its
    # site-packages is the interpreter's, not the repository's source.
    assert not [p for p in report["sys_path"] if p.startswith(repo) and not p.startswith(sys.prefix)]


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_with_remote_code_gives_flexmoes_logits_and_greedy_tokens(exported, case):
    cases, report = exported
    got = report[case]
    assert got["class"].endswith("modeling_flexmoe.FlexMoEForCausalLM")
    assert got["max_diff"] <= TOL
    assert torch.equal(torch.tensor(got["tokens"]), cases[case]["tokens"])
    if CASES[case][1].startswith("posterior"):
        # one prefill of the prompt, then one position per new token: the cache carries the sums
        assert got["scanned"] == PROMPT + NEW - 1


def test_loaded_in_bf16_the_routers_and_the_posteriors_statistics_stay_float32(exported):
    _, report = exported
    got = report["llama-posterior-reset"]
    assert got["bf16_expert"] == "torch.bfloat16"
    assert got["bf16_router"] == {
        **dict.fromkeys(("weight", "bias", "unigram", "log_prior", "temperature", "smoothing"), "torch.float32"),
        "reset_tokens": "torch.int64",
    }


def test_flexmoe_load_reopens_a_remote_export_that_takes_opt_outs(exported):
    cases, _ = exported
    model, directory = cases["olmo2-posterior"]["model"], cases["olmo2-posterior"]["dir"]
    loaded = load(directory)
    assert all(type(b.router) is PosteriorRouter for b in moe_blocks(loaded))
    assert settings(loaded).owners == settings(model).owners and settings(loaded).top_k == 2
    ids = rows()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    flexmoe.opt_out(loaded, "expert_2")
    assert settings(loaded).owners == ["public", "expert_1", "expert_3"]
    with torch.no_grad():
        loaded(input_ids=ids)


def test_a_base_the_modeling_code_does_not_rebuild_is_refused(tmp_path, monkeypatch):
    model = merged("olmo2", "posterior")
    monkeypatch.setattr(model.config, "model_type", "gpt_neox")
    with pytest.raises(InputError, match="remote format's modeling code rebuilds"):
        export(model, tmp_path / "out", "remote")
    assert not (tmp_path / "out").exists()
