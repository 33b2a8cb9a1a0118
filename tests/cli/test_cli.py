"""The ``flexmoe`` command line: what a coordinator types, and what a mistake looks like.

The main path runs the installed command in a subprocess, as a user would; the other cases
call :func:`flexmoe.cli.main` in-process (same code, no interpreter start-up per case).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe.cli import main, normalize_argv
from flexmoe.core.surgery import moe_blocks
from flexmoe.spec import RoutingRecipe
from flexmoe.testing import LICENSES, perturb_, tiny_model

OWNERS = ["alice", "bob"]


def flexmoe_command() -> list[str]:
    script = Path(sys.executable).with_name("flexmoe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flexmoe"]


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLEXMOE_DEBUG"}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return subprocess.run([*flexmoe_command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``flexmoe ARGS`` in-process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def no_progress_bars():
    """Keep transformers' loading bars out of the captured stderr of in-process runs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def load_public(public_dir):
    return AutoModelForCausalLM.from_pretrained(public_dir).eval()


@pytest.fixture(scope="module")
def artifacts(public_dir, tmp_path_factory):
    """Two owners' artifact files, trained (here: perturbed) on the saved public model."""
    model = flexmoe.upcycle(load_public(public_dir), num_experts=2, owners=OWNERS)
    for block in moe_blocks(model):
        for j in (1, 2):
            perturb_(block.experts[j], seed=10 * j)
        with torch.no_grad():  # router rows only: biases stay 0, which the FlexOlmo format requires
            block.router.weight[1:].normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    out = tmp_path_factory.mktemp("experts")
    return [flexmoe.ExpertArtifact.from_model(model, owner=o, expert=o).save(out / f"{o}.safetensors") for o in OWNERS]


@pytest.fixture(scope="module")
def merged_dir(public_dir, artifacts, tmp_path_factory):
    """``flexmoe assemble`` run as a subprocess, with the spellings of the issue text."""
    out = tmp_path_factory.mktemp("merged") / "model"
    r = run_cli(
        "assemble",
        "--public",
        public_dir,
        "--experts",
        *artifacts,
        "--out",
        out,
        "--format",
        "flexolmo",
        "--top-k",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return out


@pytest.mark.slow
def test_assemble_output_loads_with_transformers_and_matches_flexmoe(merged_dir, public_dir, artifacts, ids):
    hf = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(hf).__name__ == "FlexOlmoForCausalLM"
    assert hf.config.num_experts == 3 and hf.config.num_experts_per_tok == 2
    ours = flexmoe.assemble(load_public(public_dir), artifacts, top_k=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    assert (merged_dir / "tokenizer.json").is_file(), "the public model's tokenizer travels with the merged model"


@pytest.mark.slow
def test_pickled_artifact_is_refused_without_traceback(public_dir, artifacts, tmp_path):
    bad = tmp_path / "mallory.safetensors"
    bad.write_bytes(pickle.dumps({"layers.0.router.bias": [0.0]}))
    r = run_cli("assemble", "--public", public_dir, "--experts", artifacts[0], bad, "--out", tmp_path / "out")
    assert r.returncode != 0
    assert r.stderr.startswith("flexmoe: error: "), r.stderr
    assert "pickle" in r.stderr and "mallory.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_truncated_artifact_names_owner_and_problem(capsys, public_dir, artifacts, tmp_path):
    data = artifacts[1].read_bytes()
    cut = tmp_path / "bob.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_main(
        capsys, "assemble", "--public", public_dir, "--experts", artifacts[0], cut, "--out", tmp_path / "out"
    )
    assert code == 1
    assert err.startswith("flexmoe: error: ") and "'bob'" in err and "truncated" in err


def test_artifact_from_another_public_model_is_refused(capsys, public_dir, tmp_path):
    other = flexmoe.upcycle(
        tiny_model("olmo2", seed=7, vocab_size=load_public(public_dir).config.vocab_size), 1, owners=["carol"]
    )
    path = flexmoe.ExpertArtifact.from_model(other, owner="carol").save(tmp_path / "carol.safetensors")
    code, _, err = run_main(capsys, "assemble", "--public", public_dir, "--experts", path, "--out", tmp_path / "out")
    assert code == 1
    assert "'carol'" in err and "fingerprint" in err


def test_missing_public_model_is_one_line(capsys, artifacts, tmp_path):
    code, _, err = run_main(
        capsys, "assemble", "--public", tmp_path / "nowhere", "--experts", *artifacts, "--out", tmp_path / "out"
    )
    assert code == 1
    assert err.startswith("flexmoe: error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_opt_out_then_add_expert_restores_the_model(capsys, merged_dir, artifacts, tmp_path, ids):
    without_bob = tmp_path / "without_bob"
    code, _, err = run_main(capsys, "opt-out", "--model", merged_dir, "--owner", "bob", "--out", without_bob)
    assert code == 0, err
    hf = AutoModelForCausalLM.from_pretrained(without_bob)
    assert hf.config.num_experts == 2, "bob's expert is gone"
    assert (without_bob / "tokenizer.json").is_file()

    back = tmp_path / "back"
    # top-k is a number on disk: 2 of 2 experts reopens as "all", so say again that it is 2
    code, _, err = run_main(
        capsys, "add-expert", "--model", without_bob, "--expert", artifacts[1], "--out", back, "--top-k", "2"
    )
    assert code == 0, err
    with torch.no_grad():
        restored = AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(restored, original, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_opt_out_of_unknown_owner_is_an_error(capsys, merged_dir, tmp_path):
    code, _, err = run_main(capsys, "opt-out", "--model", merged_dir, "--owner", "zed", "--out", tmp_path / "o")
    assert code == 1 and "zed" in err and "alice" in err


@pytest.mark.slow
def test_export_to_native_reopens_with_flexmoe_load(capsys, merged_dir, tmp_path, ids):
    native = tmp_path / "native"
    code, _, err = run_main(capsys, "export", "--model", merged_dir, "--format", "native", "--out", native)
    assert code == 0, err
    assert (native / "tokenizer.json").is_file()
    reopened = flexmoe.load(native).eval()
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        torch.testing.assert_close(reopened(ids).logits, hf, atol=1e-4, rtol=0)


def test_config_file_gives_the_same_command(capsys, public_dir, artifacts, tmp_path):
    config = tmp_path / "assemble.yaml"
    out = tmp_path / "from_config"
    config.write_text(
        yaml.safe_dump(
            {"public": str(public_dir), "experts": [str(a) for a in artifacts], "out": str(out), "format": "native"}
        )
    )
    code, _, err = run_main(capsys, "assemble", "--config", config)
    assert code == 0, err
    assert flexmoe.load(out).config.model_type == "olmo2"


def test_argv_spellings():
    assert normalize_argv(["assemble", "--top-k", "2", "--experts", "a b", "c", "--normalize", "--out", "o"]) == [
        "assemble",
        "--top_k",
        "2",
        "--normalize=true",
        "--out",
        "o",
        "--experts",
        '["a b", "c"]',
    ]
    # a repeated list option collects its values
    assert normalize_argv(["eval", "--model", "a", "--data", "x=1", "--model", "b"]) == [
        "eval",
        "--model",
        '["a", "b"]',
        "--data",
        '["x=1"]',
    ]
    # jsonargparse's own syntax passes through untouched
    assert normalize_argv(["assemble", "--experts", "[a, b]", "--normalize", "false", "--experts+", "c"]) == [
        "assemble",
        "--experts",
        "[a, b]",
        "--normalize",
        "false",
        "--experts+",
        "c",
    ]
    assert normalize_argv(["opt-out", "--print-config"]) == ["opt-out", "--print_config"]


@pytest.mark.slow
def test_eval_command_scores_each_model_as_given(capsys, public_dir, merged_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, err = run_main(
        capsys,
        "eval",
        "--model",
        public_dir,
        "--model",
        merged_dir,
        "--data",
        f"gpl={LICENSES}/GPL-3",
        "--data",
        f"apache={LICENSES}/Apache-2.0",
        "--json",
        out,
        "--seq-len",
        32,
        "--max-tokens",
        640,
    )
    assert code == 0, err
    result = json.loads(out.read_text())["models"]
    assert set(result) == {str(public_dir), str(merged_dir)}
    for entry in result.values():
        assert set(entry["per_domain"]) == {"gpl", "apache"} and entry["average"] > 1
    assert "routing" in result[str(merged_dir)] and "routing" not in result[str(public_dir)]


def test_merge_command_takes_the_recipe_as_first_argument(capsys, public_dir, tmp_path):
    tuned = AutoModelForCausalLM.from_pretrained(public_dir)
    perturb_(tuned, seed=3)
    tuned.save_pretrained(tmp_path / "tuned")
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump({"method": "ties", "base": str(public_dir), "models": [str(tmp_path / "tuned")], "density": 0.5})
    )
    code, _, err = run_main(capsys, "merge", recipe, "--out", tmp_path / "merged")
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.vocab_size == tuned.config.vocab_size
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(public_dir), "models": [str(tmp_path / "tuned")]}))
    code, _, err = run_main(capsys, "merge", recipe, "--out", tmp_path / "again")
    assert code == 1 and "density" in err and "Traceback" not in err and not (tmp_path / "again").exists()


def test_option_kinds_read_pep604_hints():
    """``list[str] | None`` is a list option just like ``Optional[list[str]]``."""
    from flexmoe.cli import _option_kinds
    from flexmoe.cli.commands import assemble

    def command(a: list[str] | None = None, c: bool = False, d: int | None = None):
        pass

    assert _option_kinds(command) == {"a": "list", "c": "bool", "d": "other"}
    assert _option_kinds(assemble)["public_data"] == "list"  # Optional[list[str]]


def test_spec_command_sets_the_routing_recipe(capsys, public_dir, tmp_path):
    out = tmp_path / "spec.json"
    argv = ["spec", "--public", public_dir, "--out", out, "--embedder", "null"]
    code, _, err = run_main(capsys, *argv, "--routing.method", "published", "--routing.shrinkage", "0.25")
    assert code == 0, err
    routing = flexmoe.FederationSpec.load(out).routing
    assert routing.method == "published" and routing.shrinkage == 0.25 and routing.owner_statistics is None
    code, _, err = run_main(capsys, *argv, "--routing.covariance", "diagonal")
    assert code != 0 and "covariance" in err and "Traceback" not in err


def test_spec_command_writes_the_posterior_recipe_by_default(capsys, public_dir, tmp_path):
    out = tmp_path / "spec.json"
    argv = ["spec", "--public", public_dir, "--out", out, "--embedder", "null"]
    code, stdout, err = run_main(capsys, *argv)
    assert code == 0, err
    routing = flexmoe.FederationSpec.load(out).routing
    assert routing == RoutingRecipe() and routing.method == "posterior" and routing.needs_bigram
    assert "--public-data" in stdout  # no public counts written: the merge will need the public text
    tuned = ("--routing.temperature", "0.2", "--routing.reset_at_eos", "true", "--routing.bigram_buckets", "0")
    code, _, err = run_main(capsys, *argv, *tuned)
    assert code == 0, err
    routing = flexmoe.FederationSpec.load(out).routing
    assert routing.temperature == 0.2 and routing.reset_at_eos is True and not routing.needs_bigram
    code, _, err = run_main(capsys, *argv, "--routing.temperature", "0")
    assert code != 0 and "temperature" in err and "Traceback" not in err


def test_assemble_without_public_counts_says_what_to_pass(capsys, public_dir, artifacts, tmp_path):
    """``--routing posterior`` with neither public data nor a spec carrying public statistics is an
    error saying what to pass, not another routing."""
    argv = ["assemble", "--public", public_dir, "--experts", *artifacts, "--out", tmp_path / "out"]
    code, _, err = run_main(capsys, *argv, "--routing", "posterior")
    # These owners' files carry no token counts either: that is said first, naming them.
    assert code == 1 and "alice" in err and "bob" in err and "stats.unigram" in err and "Traceback" not in err
    counted = []
    for path in artifacts:
        art = flexmoe.ExpertArtifact.load(path)
        vocab = load_public(public_dir).config.vocab_size
        unigram = torch.ones(vocab)
        bigram = torch.zeros(RoutingRecipe().bigram_buckets)
        tensors = {**art.tensors, "stats.unigram": unigram, "stats.bigram": bigram}
        metadata = {**art.metadata, "unigram_tokens": str(vocab), "bigram_pairs": "0"}
        counted.append(flexmoe.ExpertArtifact(art.owner, tensors, metadata).save(tmp_path / path.name))
    argv = ["assemble", "--public", public_dir, "--experts", *counted, "--out", tmp_path / "out"]
    code, _, err = run_main(capsys, *argv, "--routing", "posterior")
    assert code == 1 and "--public-data" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """Only bad input (InputError, OSError) is one line; anything else is a bug in flexmoe."""
    from flexmoe.cli import commands

    def export(model: str, out: str) -> None:
        """A command with a bug."""
        return {}["no such key"]

    monkeypatch.setattr(commands, "export", export)
    with pytest.raises(KeyError, match="no such key"):
        main(["export", "--model", "m", "--out", "o"])
