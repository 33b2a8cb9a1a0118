"""YAML merge configs and directory-to-directory merges (``flexmoe merge CONFIG --out DIR``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.merge import (
    MergeConfig,
    MergeConfigError,
    average,
    dare,
    dare_dirs,
    kernel,
    merge,
    task_arithmetic,
    ties,
    ties_dirs,
)
from flexmoe.merge.stream import SafetensorsDir
from flexmoe.testing import perturb_, tiny_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, public_dir):
    """The public model (with its tokenizer) and three fine-tuned variants, saved by plain
    ``save_pretrained`` (no flexmoe involved)."""
    root = tmp_path_factory.mktemp("merge_inputs")
    out = {"base": public_dir}
    for i in range(3):
        model = AutoModelForCausalLM.from_pretrained(public_dir)
        perturb_(model, seed=i + 1, scale=0.02)
        model.save_pretrained(root / f"ft{i}")
        out[f"ft{i}"] = root / f"ft{i}"
    other = tiny_model(
        "olmo2", hidden_size=64, vocab_size=AutoModelForCausalLM.from_pretrained(public_dir).config.vocab_size
    )
    other.save_pretrained(root / "wider")
    out["wider"] = root / "wider"
    return out


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


IN_MEMORY = {
    "average": lambda base, fts: average(fts, weights=[1.0, 2.0, 1.0]),
    "task_arithmetic": lambda base, fts: task_arithmetic(base, fts, lam=0.5, weights=[1.0, -1.0, 0.5]),
    "ties_global": lambda base, fts: ties(base, fts, density=0.2, lam=1.2),
    "ties_per_tensor": lambda base, fts: ties(
        base, fts, density=0.3, trim="per_tensor", sign="weighted_mass", weights=[1.0, 2.0, 3.0]
    ),
    "dare_linear": lambda base, fts: dare(base, fts, drop=0.8, seed=7),
    "dare_ties": lambda base, fts: dare(base, fts, drop=0.5, seed=7, then="ties"),
}
CONFIGS = {
    "average": {"method": "average", "weights": [1.0, 2.0, 1.0]},
    "task_arithmetic": {"method": "task_arithmetic", "lam": 0.5, "weights": [1.0, -1.0, 0.5]},
    "ties_global": {"method": "ties", "density": 0.2, "lam": 1.2},
    "ties_per_tensor": {
        "method": "ties",
        "density": 0.3,
        "trim": "per_tensor",
        "sign": "weighted_mass",
        "weights": [1.0, 2.0, 3.0],
    },
    "dare_linear": {"method": "dare", "drop": 0.8, "seed": 7},
    "dare_ties": {"method": "dare", "drop": 0.5, "seed": 7, "then": "ties"},
}


@pytest.mark.parametrize("blocks", [None, 1000], ids=["whole_tensors", "row_blocks"])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_directory_merge_equals_in_memory_merge(case, blocks, dirs, tmp_path, monkeypatch):
    if blocks is not None:  # large tensors go through in blocks of rows, on disk and in memory alike
        monkeypatch.setattr(kernel, "BLOCK_ENTRIES", blocks)
    models = [str(dirs[f"ft{i}"]) for i in range(3)]
    config = dict(CONFIGS[case], models=models)
    if config["method"] != "average":
        config["base"] = str(dirs["base"])
    out = merge(str(_write(tmp_path / "merge.yaml", config)), str(tmp_path / "merged"))
    expected = IN_MEMORY[case](_load(dirs["base"]), [_load(m) for m in models])
    _equal_models(_load(out), expected)


def test_output_is_a_transformers_directory_with_the_base_tokenizer(dirs, tmp_path):
    config = _write(
        tmp_path / "ties.yaml",
        {"method": "ties", "base": str(dirs["base"]), "density": 0.2, "models": [str(dirs["ft0"]), str(dirs["ft1"])]},
    )
    out = merge(str(config), str(tmp_path / "merged"))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == AutoTokenizer.from_pretrained(dirs["base"])("hello world")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(_load(out)(torch.tensor([[1, 5, 9, 3]])).logits).all()
    with pytest.raises(FileExistsError, match="not an empty directory"):
        merge(str(config), str(out))


def test_relative_paths_resolve_against_the_config_file(dirs, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    rel = [os.path.relpath(dirs[f"ft{i}"], folder) for i in range(2)]
    config = MergeConfig.from_dict({"method": "average", "models": rel}, source=folder / "m.yaml")
    assert [Path(p).resolve() for p in config.models] == [dirs["ft0"].resolve(), dirs["ft1"].resolve()]


def test_small_shards_and_a_dtype_override(dirs, tmp_path):
    config = {
        "method": "task_arithmetic",
        "base": str(dirs["base"]),
        "models": [str(dirs["ft0"])],
        "dtype": "bfloat16",
        "max_shard_size": "20KB",
    }
    out = merge(str(_write(tmp_path / "ta.yaml", config)), str(tmp_path / "merged"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    expected = task_arithmetic(_load(dirs["base"]), [_load(dirs["ft0"])], dtype=torch.bfloat16)
    _equal_models(merged, expected)


def test_config_round_trips(dirs, tmp_path):
    config = MergeConfig(
        method="ties", base=str(dirs["base"]), models=[str(dirs["ft0"])], density=0.2, trim="per_tensor"
    )
    assert MergeConfig.from_dict(config.to_dict()) == config
    majority = MergeConfig(
        method="ties", base=str(dirs["base"]), models=[str(dirs["ft0"])], density=0.2, tie_break="majority"
    )
    assert majority.to_dict()["tie_break"] == "majority"
    again = MergeConfig.from_yaml(_write(tmp_path / "m.yaml", majority.to_dict()))
    assert again == majority and again.method_settings().tie_break == "majority"
    assert config.method_settings().tie_break == "zero"  # the default: algorithm 1 as printed
    dare_ties = {"method": "dare", "base": str(dirs["base"]), "models": [str(dirs["ft0"])], "drop": 0.5}
    dare_ties.update(then="ties", tie_break="majority")
    assert MergeConfig.from_dict(dare_ties).method_settings().tie_break == "majority"


# -- a tied sign vote resolved to the majority sign, streamed ----------------------------------------------


def _grid_(model, generator, step):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=generator).float() * step)


@pytest.fixture(scope="module")
def tied_dirs(tmp_path_factory, public_dir):
    """A base and three fine-tuned models whose weights all lie on a grid of 1/64, so the task
    vectors are exact in float32: the second model mirrors the first's task vector on 70% of the
    entries and the third keeps the base there on 70%, so many sign votes tie exactly."""
    root = tmp_path_factory.mktemp("tied")
    g = torch.Generator().manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(public_dir)
    _grid_(base, g, 1 / 64)
    base.save_pretrained(root / "base")
    models = [AutoModelForCausalLM.from_pretrained(public_dir) for _ in range(3)]
    for m in models:
        _grid_(m, g, 1 / 64)  # the task vectors, for now
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, b in base.named_parameters():
            t0, t1, t2 = (p[name] for p in params)
            mirror = torch.rand(b.shape, generator=g) < 0.7
            t1[mirror] = -t0[mirror]
            t2[torch.rand(b.shape, generator=g) < 0.7] = 0.0
            for t in (t0, t1, t2):
                t.add_(b)
    for i, m in enumerate(models):
        m.save_pretrained(root / f"ft{i}")
    return {"base": root / "base", "models": [root / f"ft{i}" for i in range(3)]}


# -- validation, before any weight is read ------------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"a weight ({name}) was read before the config was validated")

    monkeypatch.setattr(SafetensorsDir, "get", refuse)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"method": "lineär"}, "unknown merge method 'lineär'"),
        ({"method": "linear"}, "did you mean average"),
        ({"method": "dare_ties"}, "then: ties"),
        ({"density": None}, "ties needs density"),
        ({"dropp": 0.5}, "unknown key 'dropp' \\(did you mean 'drop'\\?\\)"),
        ({"drop": 0.5}, "drop is not a parameter of ties"),
        ({"weights": [1.0]}, "one number per model"),
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"density": 2.0}, "density"),
        ({"trim": "rows"}, "trim"),
        ({"base": None}, "name the base model"),
        ({"models": []}, "models"),
        ({"dtype": "int8"}, "dtype"),
        ({"tie_break": "minority"}, "tie_break must be 'zero' .* or 'majority'"),
        ({"tie_break": 1}, "tie_break: expected a string"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(change, match, dirs, tmp_path, no_weight_reads):
    data = {"method": "ties", "base": str(dirs["base"]), "models": [str(dirs["ft0"]), str(dirs["ft1"])], "density": 0.2}
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    path = _write(tmp_path / "bad.yaml", data)
    with pytest.raises(MergeConfigError, match=match) as info:
        merge(str(path), str(tmp_path / "out"))
    assert str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_average_takes_no_base_and_dare_needs_drop(dirs, tmp_path, no_weight_reads):
    with pytest.raises(MergeConfigError, match="takes no base"):
        MergeConfig(method="average", base=str(dirs["base"]), models=[str(dirs["ft0"])])
    with pytest.raises(MergeConfigError, match="dare needs drop"):
        MergeConfig(method="dare", base=str(dirs["base"]), models=[str(dirs["ft0"])])
    with pytest.raises(MergeConfigError, match="sign only matters"):
        MergeConfig(method="dare", base=str(dirs["base"]), models=[str(dirs["ft0"])], drop=0.5, sign="count")
    with pytest.raises(MergeConfigError, match="tie_break only matters"):
        MergeConfig(method="dare", base=str(dirs["base"]), models=[str(dirs["ft0"])], drop=0.5, tie_break="majority")


def test_mismatched_architectures_are_refused_before_loading(dirs, tmp_path, no_weight_reads):
    path = _write(
        tmp_path / "m.yaml",
        {"method": "task_arithmetic", "base": str(dirs["base"]), "models": [str(dirs["ft0"]), str(dirs["wider"])]},
    )
    with pytest.raises(MergeConfigError, match="hidden_size: 32 vs 64"):
        merge(str(path), str(tmp_path / "out"))


def test_missing_inputs_are_named(dirs, tmp_path, no_weight_reads):
    path = _write(tmp_path / "m.yaml", {"method": "average", "models": [str(dirs["ft0"]), str(tmp_path / "nope")]})
    with pytest.raises(MergeConfigError, match="nope does not exist"):
        merge(str(path), str(tmp_path / "out"))
    with pytest.raises(MergeConfigError, match="no such config file"):
        merge(str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(MergeConfigError, match="expected a mapping"):
        merge(str(tmp_path / "list.yaml"), str(tmp_path / "out"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((dirs["ft0"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    path = _write(tmp_path / "p.yaml", {"method": "average", "models": [str(dirs["ft0"]), str(pickled)]})
    with pytest.raises(MergeConfigError, match="does not unpickle"):
        merge(str(path), str(tmp_path / "out"))


@pytest.mark.parametrize("blocks", [None, 1000], ids=["whole_tensors", "row_blocks"])
@pytest.mark.parametrize("trim", ["global", "per_tensor"])
def test_majority_tie_break_streams_from_directories(trim, blocks, tied_dirs, tmp_path, monkeypatch):
    """``ties_dirs`` and a YAML config with ``tie_break: majority`` give the in-memory
    ``ties(..., tie_break="majority")`` exactly, on models with many tied votes (the in-memory
    merge is checked against TIES written out in tests/merge/test_ties.py). In row blocks of 1000
    entries the majority of a per-tensor scope is counted over several blocks before the merge."""
    if blocks is not None:
        monkeypatch.setattr(kernel, "BLOCK_ENTRIES", blocks)
    base, models = tied_dirs["base"], tied_dirs["models"]
    loaded = [_load(m) for m in models]
    expected = ties(_load(base), loaded, density=0.7, lam=0.5, trim=trim, tie_break="majority")
    streamed = ties_dirs(base, models, tmp_path / "streamed", density=0.7, lam=0.5, trim=trim, tie_break="majority")
    _equal_models(_load(streamed), expected)
    config = {"method": "ties", "base": str(base), "models": [str(m) for m in models], "density": 0.7, "lam": 0.5}
    config.update(trim=trim, tie_break="majority")
    _equal_models(_load(merge(str(_write(tmp_path / "m.yaml", config)), str(tmp_path / "yaml"))), expected)
    # the case has ties, and they matter: resolving them to 0 gives another model
    zero = ties(_load(base), loaded, density=0.7, lam=0.5, trim=trim)
    moved = sum(int((a != b).sum()) for a, b in zip(expected.state_dict().values(), zero.state_dict().values()))
    assert moved > 100


def test_dare_ties_majority_streams_from_directories(tied_dirs, tmp_path):
    base, models = tied_dirs["base"], tied_dirs["models"]
    loaded = [_load(m) for m in models]
    expected = dare(_load(base), loaded, drop=0.5, seed=3, then="ties", tie_break="majority")
    streamed = dare_dirs(base, models, tmp_path / "streamed", drop=0.5, seed=3, then="ties", tie_break="majority")
    _equal_models(_load(streamed), expected)
    zero = dare(_load(base), loaded, drop=0.5, seed=3, then="ties")
    assert any(not torch.equal(a, b) for a, b in zip(expected.state_dict().values(), zero.state_dict().values()))
