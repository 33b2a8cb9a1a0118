"""LoRA-sized FlexOlmo experts: an owner trains a LoRA on the public MLP's copy and uploads only the
factors; the coordinator materialises them into an ordinary ExpertArtifact that merges and exports
like a full one. Corrupt or foreign LoRA files are refused with an ArtifactError."""

import json
import pickle
import struct

import lightning.pytorch as pl
import pytest
import torch
from flexmoe.callbacks import ExportExpert, FreezePublicModel, RouterEmbeddingInit
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe import ArtifactError, ExpertArtifact
from flexmoe.core.surgery import moe_blocks
from flexmoe.data.datamodule import TextDataModule
from flexmoe.lora import LoraExpertArtifact, LoraExpertModule
from flexmoe.routing import route
from flexmoe.spec import ExpertRecipe, FederationSpec, RoutingRecipe
from flexmoe.testing import LICENSES

RANK = 4


@pytest.fixture(scope="module")
def spec(public_dir):
    fp = flexmoe.fingerprint(AutoModelForCausalLM.from_pretrained(public_dir))
    recipe = ExpertRecipe(max_steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, lora_rank=RANK)
    return FederationSpec(
        public_model=str(public_dir),
        fingerprint=fp,
        embedder=None,
        expert=recipe,
        routing=RoutingRecipe(stats_tokens=512),
    )


@pytest.fixture(scope="module")
def trained(spec, tmp_path_factory):
    """An owner's LoRA expert after 8 real Lightning steps with the owner callbacks; its artifact path."""
    tmp = tmp_path_factory.mktemp("lora_owner")
    pl.seed_everything(0)
    module = LoraExpertModule(spec.public_model, spec, owner="gpl")
    data = TextDataModule(
        f"{LICENSES}/GPL-3", tokenizer=spec.public_model, seq_len=32, batch_size=4, cache_dir=tmp / "cache"
    )
    freeze = FreezePublicModel(spec.fingerprint)
    callbacks = [freeze, RouterEmbeddingInit(embedder=None), ExportExpert(tmp / "gpl.safetensors")]
    trainer = pl.Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, data)
    assert freeze.verified == spec.fingerprint  # the public model stayed frozen
    return module, tmp / "gpl.safetensors"


def public(spec):
    return AutoModelForCausalLM.from_pretrained(spec.public_model).eval()


def test_only_the_lora_factors_and_the_router_row_train(trained, spec):
    module, _ = trained
    pub = public(spec)
    for L, block in enumerate(moe_blocks(module.model)):
        expert = block.experts[1]
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(expert, name)
            # The copy of the public MLP is untouched (FreezePublicModel asks the module what trains) ...
            assert torch.equal(layer.base_layer.weight, getattr(pub.model.layers[L].mlp, name).weight)
            assert not layer.base_layer.weight.requires_grad  # no gradient is even computed for it
            # ... and the LoRA update is not zero any more (B starts at zero).
            assert layer.lora_B["default"].weight.abs().sum() > 0
    optimized = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    lora = {id(p) for p in module.lora_parameters()}
    routers = {id(p) for b in moe_blocks(module.model) for p in (b.router.weight, b.router.bias)}
    assert optimized == lora | routers
    assert len(lora) == 2 * 3 * 2  # (A, B) x (gate, up, down) x 2 layers


def test_the_freeze_callback_asks_the_module_what_trains(spec):
    """The module states what trains: FreezePublicModel's freeze, whenever Lightning runs it, leaves
    exactly the LoRA factors and the routers trainable, never expert 1's own weights."""
    module = LoraExpertModule(spec.public_model, spec, owner="gpl")
    routers = {id(p) for b in moe_blocks(module.model) for p in (b.router.weight, b.router.bias)}
    expected = {id(p) for p in module.lora_parameters()} | routers
    assert {id(p) for p in module.parameters() if p.requires_grad} == expected
    FreezePublicModel(spec.fingerprint).freeze_before_training(module)
    assert {id(p) for p in module.parameters() if p.requires_grad} == expected


def test_rank_comes_from_the_spec(spec):
    no_rank = FederationSpec.from_dict({**spec.to_dict(), "expert": {**spec.to_dict()["expert"], "lora_rank": None}})
    with pytest.raises(ValueError, match="lora_rank"):
        LoraExpertModule(spec.public_model, no_rank)
    with pytest.raises(ValueError, match="contradicts"):
        LoraExpertModule(spec.public_model, spec, rank=RANK + 1)
    with pytest.raises(ValueError, match="linear layers of the MLP"):
        LoraExpertModule(spec.public_model, spec, target_modules=["q_proj"])


def test_artifact_carries_only_the_factors_and_is_several_times_smaller(trained, spec, tmp_path):
    _, path = trained
    art = LoraExpertArtifact.load(path, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    assert art.owner == "gpl" and art.rank == RANK and art.scaling == 2.0 and art.training_tokens == 8 * 4 * 32
    assert sorted(art.targets) == ["down_proj", "gate_proj", "up_proj"]
    assert art.tensors["layers.0.expert.gate_proj.lora_A"].shape == (RANK, 32)
    assert art.tensors["layers.0.expert.down_proj.lora_B"].shape == (32, RANK)
    full = art.materialize(public(spec))
    assert full.routing_stats is not None and torch.equal(full.routing_stats.mean, art_stats(art))  # travels along
    assert art.unigram is not None and torch.equal(full.unigram, art.unigram)  # so do the token counts

    def expert_numel(a):
        return sum(t.numel() for k, t in a.tensors.items() if ".expert." in k)

    # Per layer: 3 * r * (H + I) factor entries against 3 * H * I weights (H=32, I=48, r=4).
    assert expert_numel(art) == 2 * 3 * RANK * (32 + 48) and expert_numel(full) == 2 * 3 * 32 * 48
    assert full.save(tmp_path / "full.safetensors").stat().st_size > path.stat().st_size + 2 * 3 * 32 * 48 * 3


def art_stats(art):
    return torch.stack([art.tensors[f"layers.{L}.stats.mean"] for L in range(art.num_layers)]).double()


def test_a_merged_lora_expert_is_recorded_by_the_hash_of_the_file_its_owner_sent(trained, spec):
    """The model card names what the owner sent (the LoRA file, as `flexmoe inspect` hashes it), not
    the coordinator's materialised copy."""
    from flexmoe.core.hashing import content_sha256
    from flexmoe.core.surgery import settings

    _, path = trained
    lora = LoraExpertArtifact.load(path, fingerprint=spec.fingerprint)
    full = lora.materialize(public(spec), spec.sha256)
    merged = flexmoe.assemble(public(spec), [full], top_k=2, spec_sha256=spec.sha256)
    (record,) = settings(merged).provenance.experts.values()
    assert record.content_sha256 == content_sha256(lora.tensors, lora.metadata)
    assert record.content_sha256 != content_sha256(full.tensors, full.metadata)


def test_materialised_expert_merges_and_exports_like_a_full_one(trained, spec, tmp_path, ids):
    module, path = trained
    full = LoraExpertArtifact.load(path, fingerprint=spec.fingerprint).materialize(public(spec), spec.sha256)
    full = ExpertArtifact.load(full.save(tmp_path / "gpl_full.safetensors"), fingerprint=spec.fingerprint)
    assert full.metadata["format_version"] == "1" and full.metadata["materialized_from"].startswith("lora-1")

    merged = flexmoe.assemble(public(spec), [full], top_k=2, spec_sha256=spec.sha256)
    owner_model = module.model.eval()
    with torch.no_grad():
        want = owner_model(ids).logits  # the owner's own 2-expert model with the LoRA unmerged
        got = merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # The coordinator's default routing recipe works from the statistics the LoRA expert shipped;
    # folded into bias-free rows, the model exports exactly to a transformers FlexOlmo checkpoint.
    public_rows = TextDataModule(
        f"{LICENSES}/BSD", tokenizer=spec.public_model, seq_len=32, val_fraction=0.0, cache_dir=tmp_path / "c"
    )
    public_rows.setup()
    assert route(merged, [full], public_rows.train_rows, spec.routing, exportable=True)["folded"]
    flexmoe.export(merged, tmp_path / "merged", format="flexolmo")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(ids).logits - merged(ids).logits).abs().max() <= 1e-4

    # Opt-in into an existing merged model works the same way.
    again = flexmoe.assemble(public(spec), [], top_k=None)
    flexmoe.add_expert(again, full)
    flexmoe.set_top_k(again, 2)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5)


# -- corrupt, foreign and hostile files ----------------------------------------------------------


def rewrite(path, out, tensors=None, metadata=None, drop=()):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = dict(json.loads(f.read(n))["__metadata__"])
    meta.update(metadata or {})
    t = load_file(str(path))
    t.update(tensors or {})
    for k in drop:
        t.pop(k)
    save_file(t, str(out), metadata=meta)
    return out


def corrupt(name, path, out, spec):
    a0 = load_file(str(path))["layers.0.expert.up_proj.lora_A"]
    if name == "nan":
        bad = a0.clone()
        bad[0, 0] = float("nan")
        return rewrite(path, out, {"layers.0.expert.up_proj.lora_A": bad}), "values of layers.0.expert.up_proj.lora_A"
    if name == "wrong rank":
        return rewrite(path, out, {"layers.1.expert.up_proj.lora_A": torch.zeros(RANK + 1, 32)}), "shape of layers.1"
    if name == "missing factor":
        return rewrite(path, out, drop=["layers.1.expert.down_proj.lora_B"]), "tensors of layer 1"
    if name == "extra tensor":
        return rewrite(path, out, {"layers.0.expert.up_proj.weight": torch.zeros(48, 32)}), "tensor names"
    if name == "half precision":
        return rewrite(path, out, {"layers.0.expert.up_proj.lora_A": a0.half()}), "dtype of layers.0.expert.up_proj"
    if name == "bad scaling":
        return rewrite(path, out, metadata={"lora_scaling": "inf"}), "lora_scaling"
    if name == "truncated":
        out.write_bytes(path.read_bytes()[:-10])
        return out, "file length"
    if name == "pickle":
        out.write_bytes(pickle.dumps({"layers.0.expert.up_proj.lora_A": a0.tolist()}))
        return out, "flexmoe never unpickles"
    if name == "other public model":
        return rewrite(path, out, metadata={"fingerprint": "0" * 64}), "trained on a different public model"
    if name == "full artifact":
        full = LoraExpertArtifact.load(path).materialize(public(spec))
        return full.save(out), "load it with flexmoe.ExpertArtifact.load"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "nan",
        "wrong rank",
        "missing factor",
        "extra tensor",
        "half precision",
        "bad scaling",
        "truncated",
        "pickle",
        "other public model",
        "full artifact",
    ],
)
def test_corrupt_lora_artifacts_are_refused_with_a_clear_error(trained, spec, tmp_path, name):
    _, path = trained
    bad, expected = corrupt(name, path, tmp_path / "bad.safetensors", spec)
    with pytest.raises(ArtifactError) as e:
        LoraExpertArtifact.load(bad, fingerprint=spec.fingerprint)
    assert expected in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_full_loader_refuses_a_lora_file_by_its_version(trained, spec):
    _, path = trained
    with pytest.raises(ArtifactError) as e:
        ExpertArtifact.load(path, fingerprint=spec.fingerprint)
    assert e.value.field == "format_version" and e.value.got == "lora-1" and "'gpl'" in str(e.value)


def test_a_lora_for_another_mlp_shape_is_refused_before_materialising(trained, spec):
    _, path = trained
    art = LoraExpertArtifact.load(path)
    art.tensors["layers.0.expert.up_proj.lora_B"] = torch.zeros(40, RANK)  # up_proj maps 32 -> 48
    art.tensors["layers.1.expert.up_proj.lora_B"] = torch.zeros(40, RANK)
    art.check_structure()  # self-consistent ...
    with pytest.raises(ArtifactError, match=r"shape of layers.0.expert.up_proj.lora_B: expected \[48, 4\]"):
        art.materialize(public(spec))  # ... but not for this public model


def test_assemble_and_the_cli_take_lora_files_directly(trained, spec, tmp_path, ids):
    """``flexmoe.assemble`` and ``flexmoe assemble`` / ``add-expert`` accept a LoRA expert's file
    as they accept a full one: it is materialised on the public model first."""
    from flexmoe.cli import main

    _, path = trained
    want = flexmoe.assemble(public(spec), [LoraExpertArtifact.load(path).materialize(public(spec))], top_k=2)
    got = flexmoe.assemble(public(spec), [path], top_k=2)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits)
    main(
        [
            "assemble",
            "--public",
            spec.public_model,
            "--experts",
            str(path),
            "--out",
            str(tmp_path / "m"),
            "--routing",
            "published",
            "--top-k",
            "2",
            "--format",
            "native",
        ]
    )
    with torch.no_grad():
        assert (flexmoe.load(tmp_path / "m")(ids).logits - want(ids).logits).abs().max() < 1e-5
    dense_moe = flexmoe.assemble(public(spec), [], top_k=None)
    flexmoe.export(dense_moe, tmp_path / "p", format="native", tokenizer=spec.public_model)
    main(["add-expert", "--model", str(tmp_path / "p"), "--expert", str(path), "--out", str(tmp_path / "added")])
    from flexmoe.core.surgery import settings

    assert settings(flexmoe.load(tmp_path / "added")).owners == ["public", "gpl"]
