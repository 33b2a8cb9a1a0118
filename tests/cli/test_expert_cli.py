"""`flexmoe spec` and `flexmoe train-expert`: an owner trains from the command line; bad input stops early."""

import json
import os
import subprocess
import sys

import pytest

from flexmoe import ExpertArtifact, FederationSpec
from flexmoe.cli import main
from flexmoe.testing import LICENSES


@pytest.fixture(scope="module")
def spec_path(public_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    main(
        [
            "spec",
            "--public",
            str(public_dir),
            "--out",
            str(path),
            "--public-data",
            f"{LICENSES}/Apache-2.0",
            "--embedder",
            "null",
            "--expert.batch_size",
            "4",
            "--expert.seq_len",
            "32",
            "--expert.max_steps",
            "3",
        ]
    )
    return path


def test_spec_command_writes_a_checked_spec(spec_path, public_dir):
    spec = FederationSpec.load(spec_path)
    assert spec.public_model == str(public_dir) and spec.embedder is None
    assert spec.expert.max_steps == 3 and spec.expert.seq_len == 32
    assert len(spec.public_router_embedding) == 2  # one r_pub row per layer (hidden-state fallback)


@pytest.mark.slow
def test_train_expert_command_end_to_end(spec_path, tmp_path):
    out = tmp_path / "owner" / "gpl.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "flexmoe",
        "train-expert",
        "--spec",
        str(spec_path),
        "--data",
        f"{LICENSES}/GPL-3",
        "--owner",
        "gpl",
        "--out",
        str(out),
        "--public-data",
        f"{LICENSES}/Apache-2.0",
        f"{LICENSES}/GFDL-1.3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr[-3000:]
    spec = FederationSpec.load(spec_path)
    art = ExpertArtifact.load(out, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    assert art.owner == "gpl" and art.training_tokens == 3 * 4 * 32  # the spec's recipe sets steps and batch
    proxy = json.loads(out.with_name("gpl.proxy.json").read_text())
    assert proxy["indices"] and "GNU" not in json.dumps(proxy)  # ids and scores only, no text


def run_failing(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["train-expert", *map(str, args)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    return err


def test_missing_data_path(spec_path, tmp_path, capsys):
    err = run_failing(
        capsys, "--spec", spec_path, "--data", tmp_path / "nope", "--owner", "o", "--out", tmp_path / "o.safetensors"
    )
    assert "flexmoe: error: data source" in err and "does not exist" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_empty_corpus(spec_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n  \n")
    err = run_failing(
        capsys, "--spec", spec_path, "--data", tmp_path / "empty", "--owner", "o", "--out", tmp_path / "o.safetensors"
    )
    assert "flexmoe: error: the data sources" in err and "hold no text" in err


def test_spec_of_another_public_model(spec_path, tmp_path, capsys):
    wrong = FederationSpec.from_dict({**FederationSpec.load(spec_path).to_dict(), "fingerprint": "1" * 64})
    wrong.save(tmp_path / "wrong.json")
    err = run_failing(
        capsys,
        "--spec",
        tmp_path / "wrong.json",
        "--data",
        f"{LICENSES}/GPL-3",
        "--owner",
        "o",
        "--out",
        tmp_path / "o.safetensors",
    )
    assert "does not match the spec" in err


def test_unwritable_output(spec_path, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = run_failing(
        capsys, "--spec", spec_path, "--data", f"{LICENSES}/GPL-3", "--owner", "o", "--out", blocker / "o.safetensors"
    )
    assert "flexmoe: error:" in err


def test_train_expert_trains_a_lora_expert_when_the_spec_sets_a_rank(spec_path, tmp_path):
    """With ``expert.lora_rank`` in the spec, ``train-expert`` trains and writes a LoRA-sized expert."""
    from flexmoe.lora import LoraExpertArtifact

    d = FederationSpec.load(spec_path).to_dict()
    d["expert"]["lora_rank"] = 2
    lora_spec = FederationSpec.from_dict(d)
    lora_spec.save(tmp_path / "lora.json")
    out = tmp_path / "gpl.safetensors"
    main(
        [
            "train-expert",
            "--spec",
            str(tmp_path / "lora.json"),
            "--data",
            f"{LICENSES}/GPL-3",
            "--owner",
            "gpl",
            "--out",
            str(out),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    art = LoraExpertArtifact.load(out, fingerprint=lora_spec.fingerprint, spec_sha256=lora_spec.sha256)
    assert art.rank == 2 and art.owner == "gpl"


def test_spec_command_writes_the_public_statistics_next_to_the_spec(spec_path, public_dir, tmp_path):
    import shutil

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from flexmoe.artifacts.unigram import load_public_statistics
    from flexmoe.core.errors import InputError
    from flexmoe.data.documents import read_documents
    from flexmoe.data.packing import tokenize_and_pack
    from flexmoe.data.statistics import bigram_counts

    spec = FederationSpec.load(spec_path)
    sidecar = spec_path.with_name("spec.public_stats.safetensors")
    assert spec.public_statistics.file == sidecar.name and sidecar.is_file()
    vocab_size = AutoConfig.from_pretrained(public_dir).vocab_size
    counts = load_public_statistics(spec, spec_path, vocab_size=vocab_size)
    rows, _ = tokenize_and_pack(
        read_documents(f"{LICENSES}/Apache-2.0"), AutoTokenizer.from_pretrained(public_dir), spec.expert.seq_len
    )
    assert torch.equal(counts.unigram, torch.bincount(rows.reshape(-1).long(), minlength=vocab_size).float())
    assert torch.equal(counts.bigram, bigram_counts(rows, spec.routing.bigram_buckets))

    # A copy whose counts were changed after the spec was written is refused by its hash.
    copy = tmp_path / "spec.json"
    shutil.copy(spec_path, copy)
    data = bytearray(sidecar.read_bytes())
    data[-4:] = bytes([0, 0, 0x80, 0x3F])  # the last count becomes 1.0 (float32, little-endian)
    copy.with_name(sidecar.name).write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"sha256: expected .* \(recorded in the spec\)"):
        load_public_statistics(spec, copy)
    copy.with_name(sidecar.name).unlink()
    with pytest.raises(InputError, match="are missing"):
        load_public_statistics(spec, copy)
