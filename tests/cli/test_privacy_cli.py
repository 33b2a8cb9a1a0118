"""`flexmoe train-expert` with differential privacy: set by the spec, or by the owner when the spec sets none."""

import pytest

from flexmoe import ExpertArtifact, FederationSpec
from flexmoe.cli import main
from flexmoe.testing import LICENSES


def spec_command(public_dir, out, *extra):
    main(
        [
            "spec",
            "--public",
            str(public_dir),
            "--out",
            str(out),
            "--public-data",
            f"{LICENSES}/Apache-2.0",
            "--embedder",
            "null",
            "--expert.batch_size",
            "4",
            "--expert.seq_len",
            "32",
            "--expert.max_steps",
            "2",
            *extra,
        ]
    )
    return out


def train(spec, out, *extra):
    trainer = ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.limit_val_batches", "0"]
    args = ["train-expert", "--spec", str(spec), "--data", f"{LICENSES}/GPL-3", "--owner", "gpl", "--out", str(out)]
    main([*args, *trainer, "--trainer.enable_progress_bar", "false", *extra])
    return ExpertArtifact.load(out)


@pytest.mark.slow
def test_the_spec_or_the_owner_sets_dp_and_the_artifact_records_it(public_dir, tmp_path):
    private = ["--expert.privacy.target_epsilon", "3", "--expert.privacy.accountant", "rdp"]
    spec = spec_command(public_dir, tmp_path / "spec.json", *private)
    assert FederationSpec.load(spec).expert.privacy.target_epsilon == 3
    art = train(spec, tmp_path / "a.safetensors")
    assert art.privacy["dp_epsilon"] == pytest.approx(3, rel=0.02) and art.privacy["dp_steps"] == 2

    plain = spec_command(public_dir, tmp_path / "plain.json")
    own = ["--model.privacy.noise_multiplier", "0.8", "--model.privacy.accountant", "rdp"]
    art = train(plain, tmp_path / "b.safetensors", *own)
    assert art.privacy["dp_noise_multiplier"] == 0.8 and art.spec_sha256 == FederationSpec.load(plain).sha256
