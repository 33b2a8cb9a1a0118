"""FederationSpec round-trips through JSON and hashes canonically."""

import json

import pytest

from flexmoe.core.errors import InputError
from flexmoe.spec import ExpertRecipe, FederationSpec, PublicStatistics, RoutingRecipe

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
        ({"routing": {"method": "oracle"}}, "routing method must be one of"),
        ({"routing": {"temperature": 0}}, "RoutingRecipe.temperature must be > 0"),
        ({"routing": {"smoothing": -0.1}}, "RoutingRecipe.smoothing must be > 0"),
        ({"routing": {"reset_at_eos": "yes"}}, "reset_at_eos: expected true or false"),
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


def test_the_posterior_recipe_is_the_default_and_round_trips_with_its_settings(tmp_path):
    spec = FederationSpec(public_model="m", fingerprint=FP)
    assert spec.routing.method == "posterior" and spec.routing.needs_unigram
    settings = {"method": "posterior", "temperature": 0.5, "smoothing": 0.1, "reset_at_eos": False}
    assert spec.routing.settings() == {**settings, "bigram_buckets": 2**20, "bigram_weight": 30.0}
    assert spec.routing.needs_bigram and not RoutingRecipe(bigram_buckets=0).needs_bigram
    # Owners also ship the token router's statistics, which a transformers export carries.
    assert spec.routing.owner_statistics == "covariance" and spec.routing.token_router().method == "lda"
    tuned = RoutingRecipe(temperature=0.2, smoothing=0.2, reset_at_eos=True, bigram_buckets=2**16, bigram_weight=100)
    spec = FederationSpec(public_model="m", fingerprint=FP, routing=tuned)
    assert spec.to_dict()["routing"]["temperature"] == 0.2 and spec.to_dict()["routing"]["bigram_buckets"] == 2**16
    back = FederationSpec.load(spec.save(tmp_path / "spec.json"))
    assert back == spec and back.routing == tuned and back.sha256 == spec.sha256


@pytest.mark.parametrize("method", ["lda", "published"])
def test_a_spec_written_before_the_posterior_recipe_keeps_working_and_its_hash(method):
    """A token-router spec's JSON has no posterior settings: one written before they existed reads
    back equal, with the sha256 its owners' artifacts carry."""
    spec = FederationSpec(public_model="m", fingerprint=FP, routing=RoutingRecipe(method=method))
    d = spec.to_dict()
    assert not {"temperature", "smoothing", "reset_at_eos", "bigram_buckets", "bigram_weight"} & set(d["routing"])
    back = FederationSpec.from_json(json.dumps(d))
    assert back == spec and back.routing.method == method and back.sha256 == spec.sha256
    assert (back.routing.owner_statistics is None) == (method == "published") and not back.routing.needs_unigram


@pytest.mark.parametrize("buckets", [1, 3, 2**25, -4, 2.0, True, "1024"])
def test_bigram_buckets_must_be_zero_or_a_power_of_two(buckets):
    with pytest.raises(InputError, match="bigram_buckets must be 0"):
        RoutingRecipe(bigram_buckets=buckets)
