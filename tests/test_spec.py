"""FederationSpec round-trips through JSON and hashes canonically."""

import json

import pytest

from flexmoe.spec import ExpertRecipe, FederationSpec, PublicStatistics

FP = "ab" * 32


def test_json_round_trip_and_hash(tmp_path):
    spec = FederationSpec(public_model="/models/pub", fingerprint=FP, public_router_embedding=[0.5, -1.0])
    back = FederationSpec.load(spec.save(tmp_path / "spec.json"))
    assert back == spec and back.sha256 == spec.sha256
    assert isinstance(back.expert, ExpertRecipe) and back.expert.betas == (0.9, 0.95)
    # formatting does not matter, content does
    assert FederationSpec.from_json(json.dumps(spec.to_dict())).sha256 == spec.sha256
    changed = FederationSpec.from_dict({**spec.to_dict(), "projection_seed": 1})
    assert changed.sha256 != spec.sha256


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"fingerprint": "nope"}, "sha256 hex digest"),
        ({"version": 99}, "version 99"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"expert": {"lr": -1}}, "ExpertRecipe.lr must be > 0"),
        ({"expert": {"top_k": 3}}, "top_k 1 or 2"),
        ({"proxy": {"fraction": 2}}, "proxy fraction"),
        ({"public_statistics": {"file": "../x.safetensors", "sha256": FP}}, "a file name next to the spec"),
        ({"public_statistics": {"file": "x.safetensors", "sha256": "nope"}}, "PublicStatistics.sha256"),
        ({"public_statistics": {"file": "x.safetensors"}}, "sha256"),
    ],
)
def test_bad_specs_say_what_is_wrong(patch, message):
    d = FederationSpec(public_model="m", fingerprint=FP).to_dict()
    for k, v in patch.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    with pytest.raises(ValueError, match=message):
        FederationSpec.from_dict(d)


def test_proxy_budget_has_a_floor():
    spec = FederationSpec(public_model="m", fingerprint=FP)
    assert spec.proxy.size(10) == spec.proxy.min_docs
    assert spec.proxy.size(100_000) == 500


def test_public_statistics_round_trip_and_enter_the_hash(tmp_path):
    plain = FederationSpec(public_model="m", fingerprint=FP)
    # A spec without public statistics hashes as before the field existed: its artifacts still match.
    assert "public_statistics" not in plain.to_dict()
    spec = FederationSpec(public_model="m", fingerprint=FP, public_statistics=PublicStatistics("s.bin", "cd" * 32))
    back = FederationSpec.load(spec.save(tmp_path / "spec.json"))
    assert back == spec and isinstance(back.public_statistics, PublicStatistics)
    assert spec.sha256 != plain.sha256
