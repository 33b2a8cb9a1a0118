"""Token unigram counts in the expert artifact: a faithful round trip, every rule enforced on load,
files without them still load, and a recipe that needs them says what to do."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import flexmoe
from flexmoe import ArtifactError, ExpertArtifact
from flexmoe.artifacts.unigram import (
    UNIGRAM_TENSOR,
    UNIGRAM_TOKENS,
    MissingUnigramStatistics,
    require_token_statistics,
    unigram_problem,
)
from flexmoe.core.surgery import moe_blocks
from flexmoe.testing import perturb_, tiny_model

VOCAB_SIZE = tiny_model().config.vocab_size


def expert_model(owner="alice"):
    model = flexmoe.upcycle(tiny_model(), num_experts=1, owners=[owner])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=1)
    return model


def counts_of(seed=0):
    ids = torch.randint(0, VOCAB_SIZE, (7, 16), generator=torch.Generator().manual_seed(seed))
    return torch.bincount(ids.reshape(-1), minlength=VOCAB_SIZE).float()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = expert_model()
    art = ExpertArtifact.from_model(model, owner="alice", unigram=counts_of())
    path = art.save(tmp_path_factory.mktemp("unigram") / "alice.safetensors")
    return model, art, path


def test_round_trip_keeps_the_counts_and_their_total(saved):
    model, art, path = saved
    loaded = ExpertArtifact.load(path)
    assert torch.equal(loaded.unigram, counts_of()) and loaded.unigram.dtype == torch.float32
    assert loaded.metadata[UNIGRAM_TOKENS] == str(7 * 16)
    loaded.validate(model)  # the public model's vocabulary
    require_token_statistics([loaded, path])


def test_an_artifact_without_counts_still_loads_and_the_recipe_says_what_to_do(tmp_path):
    path = ExpertArtifact.from_model(expert_model("bob"), owner="bob").save(tmp_path / "bob.safetensors")
    loaded = ExpertArtifact.load(path)
    assert loaded.unigram is None
    with pytest.raises(MissingUnigramStatistics, match=r"owner bob's artifact carries no unigram statistics: retrain"):
        require_token_statistics([path])
    with pytest.raises(MissingUnigramStatistics, match="flexmoe train-expert") as e:
        require_token_statistics([loaded])
    assert e.value.owners == ["bob"]


def write_with(path, out, counts=None, tokens=None, drop_tensor=False):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if drop_tensor:
        tensors.pop(UNIGRAM_TENSOR)
    if counts is not None:
        tensors[UNIGRAM_TENSOR] = counts
        metadata[UNIGRAM_TOKENS] = str(int(counts.double().nan_to_num(0, 0, 0).sum().clamp_min(0).round()))
    if tokens is not None:
        metadata[UNIGRAM_TOKENS] = tokens
    save_file(tensors, str(out), metadata=metadata)
    return out


def refusal(path, model=None) -> ArtifactError:
    with pytest.raises(ArtifactError) as e:
        art = ExpertArtifact.load(path)
        if model is not None:
            art.validate(model)
    assert e.value.owner == "alice"
    return e.value


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(size=st.integers(1, 300).filter(lambda n: n != VOCAB_SIZE))
def test_a_vector_of_another_vocabulary_is_refused_against_the_public_model(saved, tmp_path_factory, size):
    model, _, path = saved
    bad = write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", counts=torch.ones(size))
    e = refusal(bad, model)
    assert e.field == f"shape of {UNIGRAM_TENSOR}" and e.expected == [VOCAB_SIZE] and e.got == [size]


@SETTINGS
@given(shape=st.lists(st.integers(1, 12), min_size=2, max_size=3))
def test_a_vector_of_more_than_one_dimension_is_refused(saved, tmp_path_factory, shape):
    _, _, path = saved
    bad = write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", counts=torch.ones(shape))
    e = refusal(bad)
    assert e.field == f"shape of {UNIGRAM_TENSOR}" and e.got == shape


@SETTINGS
@given(at=st.integers(0, VOCAB_SIZE - 1), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_counts_are_refused(saved, tmp_path_factory, at, value):
    _, _, path = saved
    counts = counts_of()
    counts[at] = value
    e = refusal(write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", counts=counts))
    assert e.field == f"values of {UNIGRAM_TENSOR}" and e.expected == "finite counts"


@SETTINGS
@given(at=st.integers(0, VOCAB_SIZE - 1), value=st.integers(-(10**6), -1))
def test_negative_counts_are_refused(saved, tmp_path_factory, at, value):
    _, _, path = saved
    counts = counts_of()
    counts[at] = value
    e = refusal(write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", counts=counts))
    assert e.field == f"values of {UNIGRAM_TENSOR}" and e.expected == "non-negative counts"


@SETTINGS
@given(at=st.integers(0, VOCAB_SIZE - 1), fraction=st.floats(0.01, 0.99))
def test_fractional_counts_are_refused(saved, tmp_path_factory, at, fraction):
    _, _, path = saved
    counts = counts_of()
    counts[at] += fraction
    e = refusal(write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", counts=counts))
    assert e.field == f"values of {UNIGRAM_TENSOR}" and e.expected == "integral counts"


@SETTINGS
@given(offset=st.integers(-7 * 16, 10**6).filter(lambda d: d != 0))
def test_a_total_that_is_not_the_sum_is_refused(saved, tmp_path_factory, offset):
    _, _, path = saved
    bad = write_with(path, tmp_path_factory.mktemp("bad") / "a.safetensors", tokens=str(7 * 16 + offset))
    e = refusal(bad)
    assert e.field == f"sum of {UNIGRAM_TENSOR}" and e.got == str(7 * 16)


@pytest.mark.parametrize("tokens", ["", "-3", "1.5", "many"])
def test_a_total_that_is_not_a_count_is_refused(saved, tmp_path, tokens):
    _, _, path = saved
    e = refusal(write_with(path, tmp_path / "a.safetensors", tokens=tokens))
    assert e.field == f"metadata {UNIGRAM_TOKENS!r}"


def test_a_total_without_counts_is_refused(saved, tmp_path):
    _, _, path = saved
    e = refusal(write_with(path, tmp_path / "a.safetensors", drop_tensor=True))
    assert e.field == UNIGRAM_TENSOR and e.got == "missing"


def test_counts_in_another_dtype_are_refused(saved, tmp_path):
    _, _, path = saved
    e = refusal(write_with(path, tmp_path / "a.safetensors", counts=counts_of().half()))
    assert e.field == f"dtype of {UNIGRAM_TENSOR}"


def test_float32_rounding_of_large_counts_is_within_the_allowed_total():
    big = torch.tensor([2**24 + 1, 3], dtype=torch.long)
    assert unigram_problem(big.float(), int(big.sum())) is None  # 2**24 + 1 is rounded in float32


def test_a_header_length_that_begins_like_a_pickle_or_zip_is_still_safetensors(tmp_path):
    """The 8-byte header length may begin with 0x80 (a pickle's first byte) or "PK" (a zip's):
    the file is still safetensors and loads; a real pickle is still refused."""
    import pickle
    import struct

    from flexmoe.artifacts.guard import read_safetensors_header

    def header_length(pad: int, path) -> int:
        save_file({"x": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        return struct.unpack("<Q", path.read_bytes()[:8])[0]

    for first, target in ((b"\x80", 0x80), (b"PK", 0x4B50)):  # the little-endian lengths that begin so
        path = tmp_path / f"{target}.safetensors"
        base = target - header_length(0, path)
        for pad in range(max(0, base - 16), base + 16):
            if header_length(pad, path) == target:
                break
        assert path.read_bytes()[: len(first)] == first
        assert struct.unpack("<Q", path.read_bytes()[:8])[0] > 0
        assert "x" in read_safetensors_header(path)
    pickled = tmp_path / "p.safetensors"
    pickled.write_bytes(pickle.dumps({"x": [0.0, 0.0]}))
    with pytest.raises(ArtifactError, match="a pickle"):
        read_safetensors_header(pickled)


def test_public_statistics_are_read_for_the_merges_recipe_not_only_the_specs(tmp_path):
    """A spec whose public file holds unigrams only (written before bigram statistics) serves a merge
    that routes by unigrams; one that routes by bigrams is told what to do."""
    from flexmoe.artifacts.unigram import TokenStatistics, load_public_statistics, write_public_statistics
    from flexmoe.core.errors import InputError
    from flexmoe.spec import FederationSpec

    spec_path = tmp_path / "spec.json"
    record = write_public_statistics(spec_path, TokenStatistics(counts_of()))
    spec = FederationSpec(public_model="m", fingerprint="f" * 64, public_statistics=record)
    assert spec.routing.needs_bigram
    with pytest.raises(InputError, match=r"has none; rewrite the spec .*\(bigram_buckets=0\)"):
        load_public_statistics(spec, spec_path, VOCAB_SIZE)
    got = load_public_statistics(spec, spec_path, VOCAB_SIZE, bigram_buckets=0)
    assert torch.equal(got.unigram, counts_of()) and got.bigram is None
