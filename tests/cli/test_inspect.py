"""``flexmoe inspect FILE``: an owner sees exactly what its artifact holds before sending it."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open

import flexmoe
from flexmoe.artifacts.expert import MLPInputStats
from flexmoe.artifacts.guard import read_safetensors_header
from flexmoe.cli import main
from flexmoe.core.hashing import content_sha256, file_sha256
from flexmoe.core.surgery import moe_blocks
from flexmoe.testing import perturb_, tiny_model


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real artifact carrying everything an owner can ship: expert, router row, MLP-input
    moments, unigram and bigram counts."""
    model = flexmoe.upcycle(tiny_model("olmo2"), 1, owners=["clinic"])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=1)
    layers, hidden, vocab = model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size
    stats = MLPInputStats(
        mean=torch.zeros(layers, hidden), count=640, covariance=torch.eye(hidden).repeat(layers, 1, 1)
    )
    unigram = torch.zeros(vocab)
    unigram[[3, 5, 7]] = torch.tensor([10.0, 30.0, 20.0])
    bigram = torch.zeros(64)
    bigram[[1, 9]] = torch.tensor([4.0, 5.0])
    art = flexmoe.ExpertArtifact.from_model(
        model, "clinic", 1, training_tokens=640, stats=stats, unigram=unigram, bigram=bigram
    )
    art.metadata["note"] = "\x1b[31mred\x1b[0m " + "x" * 300  # an escape sequence must not reach the terminal
    return art.save(tmp_path_factory.mktemp("owner") / "clinic.safetensors")


def test_inspect_lists_every_tensor_with_shape_dtype_and_bytes(capsys, artifact):
    code, out, err = run_main(capsys, "inspect", artifact)
    assert code == 0, err
    header = read_safetensors_header(artifact)
    metadata = header.pop("__metadata__")
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert f"{entry['shape']}" in line and entry["dtype"] in line and f"{end - start:,}" in line
    for key in metadata:
        assert f"  {key}  " in out
    assert "\x1b" not in out and "\\x1b[31mred" in out and "--json shows all" in out
    assert file_sha256(artifact) in out and f"({artifact.stat().st_size:,} bytes)" in out
    art = flexmoe.ExpertArtifact.load(artifact)
    assert content_sha256(art.tensors, art.metadata) in out
    assert "60 tokens, 3 distinct token ids" in out and "5 (30)" in out
    assert "9 adjacent pairs in 2 of 64 buckets" in out
    assert "MLP-input covariance: [32, 32] in 2 layers, over 640 tokens" in out
    for words in ("expert MLP weights", "router row and bias", "MLP-input mean", "unigram counts", "bigram counts"):
        assert f"  - {words}: " in out


def test_inspect_json_holds_the_same_and_every_metadata_value_in_full(capsys, artifact):
    code, out, err = run_main(capsys, "inspect", "--file", artifact, "--json")
    assert code == 0, err
    got = json.loads(out)
    with safe_open(str(artifact), framework="pt") as f:
        names = set(f.keys())
        metadata = f.metadata()
    assert {t["name"] for t in got["tensors"]} == names
    assert got["metadata"] == metadata
    assert got["statistics"]["unigram"] == {
        "tokens": 60,
        "distinct_tokens": 3,
        "vocab_size": tiny_model("olmo2").config.vocab_size,
        "most_frequent": [[5, 30], [7, 20], [3, 10]] + got["statistics"]["unigram"]["most_frequent"][3:],
    }
    assert got["statistics"]["bigram"] == {"pairs": 9, "occupied_buckets": 2, "buckets": 64}
    assert got["statistics"]["mlp_input_mean"] == {"layers": 2, "shapes": [[32]]}
    assert [s["part"] for s in got["shared"]] == [
        "expert_mlp",
        "router_row",
        "mlp_input_mean",
        "mlp_input_covariance",
        "unigram_counts",
        "bigram_counts",
    ]
    assert got["unrecognised"] == []


def test_inspect_refuses_a_pickle_without_loading_it(capsys, tmp_path):
    bad = tmp_path / "expert.safetensors"
    bad.write_bytes(pickle.dumps({"layers.0.router.bias": [0.0]}))
    code, out, err = run_main(capsys, "inspect", bad)
    assert code == 1 and out == ""
    assert err.startswith("flexmoe: error: ") and "pickle" in err and len(err.strip().splitlines()) == 1
