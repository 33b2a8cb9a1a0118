"""What an accepted expert can do to the merge: bounded counts, plausible values, finite logits.

Issue 17's promise for the values inside an expert file: every count the metadata declares is
an ASCII decimal within a bound before anything is sized by it; every value is plausible next to
the public model (``Plausibility``: router rows, biases, weight scales, statistics); and then,
whatever is accepted, the merged model's logits are finite under every routing recipe. The last
tests state what one owner's router row can take of another domain's tokens under each recipe.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flexmoe
from flexmoe import ArtifactError, ExpertArtifact
from flexmoe.artifacts.expert import MAX_LAYERS, Plausibility
from flexmoe.artifacts.guard import check_owner_name
from flexmoe.artifacts.load import load_expert
from flexmoe.artifacts.lora import LoraExpertArtifact
from flexmoe.core.parsing import valid_owner_name
from flexmoe.core.posterior import use_posterior_routers
from flexmoe.core.surgery import moe_blocks, upcycle
from flexmoe.routing import mlp_input_moments, route
from flexmoe.spec import RoutingRecipe
from flexmoe.testing import VOCAB, perturb_, tiny_model

PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def honest_expert(owner="alice", seed=1, stats=True):
    """A tiny owner's 2-expert model and its artifact, with values of the size training gives:
    expert weights moved by noise, a unit-norm router row, a small bias, statistics of its own
    MLP inputs on its own rows."""
    model = flexmoe.upcycle(tiny_model("olmo2"), num_experts=1, owners=[owner])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            perturb_(block.experts[1], seed=seed, scale=0.01)
            row = torch.randn(block.router.weight.shape[1], generator=g)
            block.router.weight[1] = row / row.norm()
            block.router.bias[1] = -0.05
    moments = None
    if stats:
        ids = torch.randint(3, VOCAB, (8, 16), generator=g)
        moments = mlp_input_moments(model, ids, covariance=True)
    unigram = torch.bincount(torch.randint(3, VOCAB, (500,), generator=g), minlength=VOCAB).float()
    art = ExpertArtifact.from_model(model, owner=owner, spec_sha256="spec", stats=moments, unigram=unigram)
    return model, art


def public_of(model):
    """The dense public model the owner trained against (expert 0 of its MoE, in a fresh copy)."""
    public = tiny_model("olmo2")
    assert flexmoe.fingerprint(public) == flexmoe.fingerprint(model)
    return public


def changed(art: ExpertArtifact, tensors=None, metadata=None) -> ExpertArtifact:
    return dataclasses.replace(
        art, tensors={**art.tensors, **(tensors or {})}, metadata={**art.metadata, **(metadata or {})}
    )


def resave(path, metadata=None, tensors=None):
    """Rewrite the file at ``path`` with some metadata or tensors changed, as a hostile owner might."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    t = flexmoe.ExpertArtifact.load(path).tensors
    t.update(tensors or {})
    save_file(t, str(path), metadata={**meta, **(metadata or {})})
    return path


# -- counts before work ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_layers", "100000000000"),  # built a set of that size before: RAM grew until killed
        ("num_layers", str(MAX_LAYERS + 1)),
        ("num_layers", "0"),
        ("num_layers", "²"),  # '²'.isdigit() is true and int('²') raises
        ("hidden_size", "٣٢"),  # Arabic-Indic digits: isdigit() and int() both accept them
        ("intermediate_size", " 48"),
        ("training_tokens", "-1"),
        ("stats_tokens", str(10**21)),  # an OverflowError in the discriminant's pooling before
        ("unigram_tokens", "9" * 5000),  # int() refuses more than 4,300 digits with its own error
        ("bigram_pairs", "1e9"),
    ],
)
def test_metadata_counts_are_bounded_ascii_decimals(tmp_path, key, value):
    _, art = honest_expert()
    path = art.save(tmp_path / "a.safetensors")
    if key == "bigram_pairs":
        resave(path, tensors={"stats.bigram": torch.zeros(4)}, metadata={"bigram_pairs": "0"})
    resave(path, metadata={key: value})
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=f"metadata '{key}'"):
        ExpertArtifact.load(path)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("name", ["layers.01.router.embedding", "layers.1.router.embeddings", "layers.+1.stats.mean"])
def test_a_layer_has_one_spelling(tmp_path, name):
    """``layers.01`` was read as layer 1 and then looked up as ``layers.1``: a bare KeyError."""
    _, art = honest_expert()
    path = art.save(tmp_path / "a.safetensors")
    resave(path, tensors={name: torch.zeros(32)})
    with pytest.raises(ArtifactError, match="tensor names"):
        ExpertArtifact.load(path)


def lora_file(tmp_path, **metadata):
    """A hand-made LoRA-sized expert for the tiny public model (down_proj, rank 2)."""
    public = tiny_model("olmo2")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for L in range(2):
        tensors[f"layers.{L}.expert.down_proj.lora_A"] = torch.randn(2, 48, generator=g) * 0.01
        tensors[f"layers.{L}.expert.down_proj.lora_B"] = torch.randn(32, 2, generator=g) * 0.01
        tensors[f"layers.{L}.router.embedding"] = torch.randn(32, generator=g) / 6
        tensors[f"layers.{L}.router.bias"] = torch.zeros(1)
    meta = {
        "format_version": "lora-1",
        "owner": "lora",
        "fingerprint": flexmoe.fingerprint(public),
        "spec_sha256": "",
        "architecture": "olmo2",
        "num_layers": "2",
        "hidden_size": "32",
        "intermediate_size": "48",
        "dtype": "F32",
        "training_tokens": "10",
        "lora_rank": "2",
        "lora_scaling": "2.0",
        "lora_targets": "down_proj",
        **metadata,
    }
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path, public


def test_an_honest_lora_expert_loads_and_materialises(tmp_path):
    path, public = lora_file(tmp_path)
    art = load_expert(path, public)
    art.validate(public)


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("lora_scaling", "3e38", "lora_scaling"),  # W + 3e38 B A: inf everywhere
        ("lora_scaling", "nan", "lora_scaling"),
        ("lora_scaling", "1" * 100, "lora_scaling"),
        ("lora_rank", "²", "lora_rank"),
        ("lora_rank", "0", "lora_rank"),
        ("num_layers", "100000000000", "num_layers"),
    ],
)
def test_lora_metadata_is_bounded(tmp_path, key, value, field):
    path, public = lora_file(tmp_path, **{key: value})
    with pytest.raises(ArtifactError, match=f"metadata '{field}'"):
        LoraExpertArtifact.load(path)
    with pytest.raises(ArtifactError, match=field):
        load_expert(path, public)


def test_expert_loads_are_bounded_by_the_public_model(tmp_path):
    """A sparse file declaring a 128 MiB tensor: the tiny public model's experts hold ~70 MB at
    most, so the coordinator's load refuses it from the header (nothing is read)."""
    path = tmp_path / "big.safetensors"
    header = json.dumps(
        {
            "__metadata__": {"owner": "big"},
            "stats.bigram": {"dtype": "F32", "shape": [2**25], "data_offsets": [0, 2**27]},
        }
    ).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**27)
    with pytest.raises(ArtifactError, match="file size"):
        load_expert(path, tiny_model("olmo2"))


# -- plausible values ------------------------------------------------------------------------------


def test_honest_experts_are_plausible():
    model, art = honest_expert()
    art.validate(public_of(model))


def _scale(art, name, factor):
    return changed(art, {name: art.tensors[name] * factor})


def _spike(art, name, value):
    t = art.tensors[name].clone()
    t.view(-1)[0] = value
    return changed(art, {name: t})


ATTACKS = {
    "router row 3e38": (lambda a: changed(a, {"layers.0.router.embedding": torch.full((32,), 3e38)}), "norm of"),
    "router row x100": (lambda a: _scale(a, "layers.1.router.embedding", 100.0), "norm of layers.1.router"),
    "public row of norm 113": (
        lambda a: changed(a, {"layers.0.router.public_embedding": torch.full((32,), 20.0)}),
        "public_embedding",
    ),
    "bias -1e30": (lambda a: changed(a, {"layers.0.router.bias": torch.tensor([-1e30])}), "router.bias"),
    "bias +100": (lambda a: changed(a, {"layers.1.router.bias": torch.tensor([100.0])}), "router.bias"),
    "weights x100": (lambda a: _scale(a, "layers.0.expert.up_proj.weight", 100.0), "scale of layers.0.expert"),
    "one weight 3e38": (
        lambda a: _spike(a, "layers.1.expert.down_proj.weight", 3e38),
        "scale of layers.1.expert.down_proj",
    ),
    "non-PSD covariance": (
        lambda a: changed(a, {"layers.0.stats.covariance": 1.5 * torch.eye(32) - 0.5 * torch.ones(32, 32)}),
        "positive semi-definite",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_implausible_values_are_refused_naming_the_field(attack):
    model, art = honest_expert()
    make, field = ATTACKS[attack]
    with pytest.raises(ArtifactError, match=field) as e:
        flexmoe.assemble(public_of(model), [make(art)])
    assert "alice" in str(e.value) and "expected" in str(e.value)


def test_an_empty_owner_name_is_refused_before_the_model_is_written():
    """An empty owner was accepted and the written model could not be reopened."""
    model, art = honest_expert()
    with pytest.raises(ArtifactError, match="owner"):
        flexmoe.assemble(public_of(model), [dataclasses.replace(art, owner="")])
    with pytest.raises(ValueError, match="owner names"):
        upcycle(tiny_model("olmo2"), num_experts=1, owners=[" bob"])


@PROPERTY
@given(st.text(max_size=140))
def test_the_core_owner_rule_is_the_guards(name):
    """surgery cannot import the artifacts floor's rule, so it keeps its own: the same one."""
    assert valid_owner_name(name) == check_owner_name(name)


# -- statistics, against the public class's --------------------------------------------------------


def public_rows():
    return torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))


def lda_merge(*arts):
    merged = flexmoe.assemble(tiny_model("olmo2"), list(arts))
    route(merged, list(arts), public_rows(), RoutingRecipe(method="lda", stats_tokens=128))
    return merged


def with_stats(art, mean_scale=1.0, cov_scale=1.0, count=None):
    t, meta = {}, {}
    for L in range(2):
        t[f"layers.{L}.stats.mean"] = art.tensors[f"layers.{L}.stats.mean"] * mean_scale
        t[f"layers.{L}.stats.covariance"] = art.tensors[f"layers.{L}.stats.covariance"] * cov_scale
    if count is not None:
        meta["stats_tokens"] = str(count)
    return changed(art, t, meta)


@pytest.mark.parametrize(
    "mean_scale, cov_scale, field",
    [(1e30, 1.0, "stats.mean"), (1e4, 1.0, "stats.mean"), (1.0, 1e6, "stats.covariance")],
)
def test_statistics_far_from_the_public_class_are_refused(mean_scale, cov_scale, field):
    """A mean of 1e30 made every exported logit NaN; now the route names the owner and field."""
    _, art = honest_expert()
    with pytest.raises(ArtifactError, match=field):
        lda_merge(with_stats(art, mean_scale, cov_scale))


def test_a_huge_token_count_neither_overflows_nor_dominates_the_pooled_covariance():
    """stats_tokens = 2**53 (10**21 is refused on load) weighs as much as an honest count."""
    _, art = honest_expert()
    _, other = honest_expert("bob", seed=2)
    honest = lda_merge(with_stats(art, count=128), other)
    huge = lda_merge(with_stats(art, count=2**53), other)
    for a, b in zip(moe_blocks(honest), moe_blocks(huge)):
        torch.testing.assert_close(a.router.weight, b.router.weight)


# -- the guarantee: anything accepted merges into finite logits -----------------------------------

FIELDS = ["router.embedding", "router.public_embedding", "router.bias", "expert.up_proj.weight", "stats.mean"]


def merged_logits(arts, method):
    if method == "published":
        model = flexmoe.assemble(tiny_model("olmo2"), list(arts))
    elif method == "lda":
        model = lda_merge(*arts)
    else:
        model = flexmoe.assemble(tiny_model("olmo2"), list(arts))
        public = torch.bincount(public_rows().flatten(), minlength=VOCAB).float()
        use_posterior_routers(model, torch.stack([public, *(a.unigram for a in arts)]))
    with torch.no_grad():
        return model(input_ids=public_rows()).logits


@PROPERTY
@given(
    field=st.sampled_from(FIELDS),
    exponent=st.floats(-30, 38),
    sign=st.sampled_from([1.0, -1.0]),
    method=st.sampled_from(["published", "lda", "posterior"]),
)
def test_whatever_the_loader_accepts_merges_into_finite_logits(field, exponent, sign, method):
    """One field of an honest expert scaled by ``±10**exponent`` (finite, up to float32's range):
    either it is refused with an ``ArtifactError``, or every logit of the merge is finite."""
    _, art = honest_expert()
    _, other = honest_expert("bob", seed=2)
    factor = sign * 10.0**exponent
    names = [n for n in art.tensors if n.endswith(field)]
    scaled = changed(art, {n: (art.tensors[n].double() * factor).clamp(-3e38, 3e38).float() for n in names})
    if field == "router.public_embedding":
        other = changed(other, {n: scaled.tensors[n] for n in names})  # r_0 must agree among owners
    try:
        logits = merged_logits([scaled, other], method)
    except ArtifactError:
        return
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["published", "lda", "posterior"])
def test_values_at_every_bound_merge_into_finite_logits(method):
    """Every plausibility bound met at once, just inside: the merge is finite."""
    model, art = honest_expert()
    _, other = honest_expert("bob", seed=2)
    public = public_of(model)
    bounds = Plausibility()
    t = {}
    for L, layer in enumerate(public.model.layers):
        row = art.tensors[f"layers.{L}.router.embedding"]
        t[f"layers.{L}.router.embedding"] = row * (0.99 * bounds.router_row_bound(32) / float(row.norm()))
        t[f"layers.{L}.router.bias"] = torch.tensor([-0.99 * bounds.router_bias])
        for name, ref in layer.mlp.state_dict().items():
            w = art.tensors[f"layers.{L}.expert.{name}"]
            rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
            room = min(rms(ref) / rms(w), float(ref.abs().max() / w.abs().max()))
            t[f"layers.{L}.expert.{name}"] = w * (0.99 * bounds.weight_scale * room)
    extreme = changed(art, t)
    extreme.validate(public)
    assert torch.isfinite(merged_logits([extreme, other], method)).all()


# -- what one owner's router row can take of another domain's tokens -------------------------------


def test_under_lda_an_owners_row_and_bias_take_nothing():
    """The discriminant replaces every row and bias from the statistics: a row at the bound (10x
    any honest one) leaves the merged routers exactly as they were."""
    _, art = honest_expert()
    _, other = honest_expert("bob", seed=2)
    row_bound = Plausibility().router_row_bound(32)
    bold = changed(
        art,
        {
            f"layers.{L}.router.embedding": other.tensors[f"layers.{L}.router.embedding"] * 0.99 * row_bound
            for L in range(2)
        },
    )
    plain, attacked = lda_merge(art, other), lda_merge(bold, other)
    for a, b in zip(moe_blocks(plain), moe_blocks(attacked)):
        assert torch.equal(a.router.weight, b.router.weight) and torch.equal(a.router.bias, b.router.bias)


def test_under_the_posterior_an_owners_row_only_mixes_its_own_tokens():
    """The posterior chooses the owner from token counts; an owner's row only mixes its expert
    with the public one on the tokens chosen for it. With its row at 10x another owner's, the
    same tokens are chosen for each owner in every layer, and the other owner's gate on its
    tokens is exactly what it was (only the public expert's share there moves, by at most the
    attacker's posterior, which reaches deeper layers through their inputs)."""
    _, art = honest_expert()
    _, other = honest_expert("bob", seed=2)
    bold = changed(
        art, {f"layers.{L}.router.embedding": other.tensors[f"layers.{L}.router.embedding"] * 10 for L in range(2)}
    )
    gates = []
    for arts in ([art, other], [bold, other]):
        model = flexmoe.assemble(tiny_model("olmo2"), arts)
        public = torch.bincount(public_rows().flatten(), minlength=VOCAB).float()
        use_posterior_routers(model, torch.stack([public, *(a.unigram for a in arts)]))
        seen = []
        hooks = [b.router.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o)) for b in moe_blocks(model)]
        with torch.no_grad():
            model(input_ids=public_rows())
        for h in hooks:
            h.remove()
        gates.append(seen)
    for L, (plain, attacked) in enumerate(zip(*gates)):
        bob = plain[:, 2] > 0  # tokens whose chosen owner is bob
        assert bob.any() and (attacked[bob, 1] == 0).all()
        assert torch.equal(plain[:, 1] > 0, attacked[:, 1] > 0)  # the same tokens chosen for alice
        if L == 0:  # deeper layers see inputs that the public expert's share moved
            assert torch.equal(plain[bob, 2], attacked[bob, 2])


def test_plausibility_checks_cost_little_at_this_size():
    """The Cholesky per layer is O(hidden^3); at the tiny size it must not dominate validate."""
    model, art = honest_expert()
    public = public_of(model)
    start = time.perf_counter()
    art.validate(public)
    assert time.perf_counter() - start < 1
