"""ExpertArtifact: a faithful round trip, and a clear refusal of every kind of bad file."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexmoe
from flexmoe import ArtifactError, ExpertArtifact
from flexmoe.core.surgery import moe_blocks
from flexmoe.testing import perturb_, tiny_model


def trained_expert(arch="olmo2", owner="alice", seed=1, **config):
    model = flexmoe.upcycle(tiny_model(arch, **config), num_experts=1, owners=[owner])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=seed)
        block.router.weight.data[1].normal_(generator=torch.Generator().manual_seed(seed))
        block.router.bias.data[1] = -0.25
    return model


@pytest.fixture
def artifact(tmp_path):
    model = trained_expert()
    art = ExpertArtifact.from_model(model, owner="alice", spec_sha256="spec-1", training_tokens=1234)
    return art, art.save(tmp_path / "alice.safetensors"), flexmoe.fingerprint(model)


def rewrite(path, tensors=None, metadata=None, **changes):
    """Re-save an artifact with some tensors or metadata changed (as a careless or hostile owner might)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = dict(header["__metadata__"])
    meta.update(metadata or {})
    t = load_file(str(path))
    t.update(tensors or {})
    for k, v in changes.items():
        if v is None:
            t.pop(k)
    save_file(t, str(path), metadata=meta)


def test_round_trip_keeps_tensors_and_metadata(artifact):
    art, path, fp = artifact
    loaded = ExpertArtifact.load(path, fingerprint=fp, spec_sha256="spec-1")
    assert loaded.owner == "alice" and loaded.training_tokens == 1234 and loaded.num_layers == 2
    assert loaded.metadata == art.metadata
    assert set(loaded.tensors) == set(art.tensors)
    assert all(torch.equal(loaded.tensors[k], art.tensors[k]) for k in art.tensors)
    meta = loaded.metadata
    assert meta["architecture"] == "olmo2" and meta["hidden_size"] == "32" and meta["intermediate_size"] == "48"
    assert meta["dtype"] == "F32" and meta["fingerprint"] == fp
    assert "layers.1.expert.gate_proj.weight" in loaded.tensors
    assert loaded.tensors["layers.0.router.embedding"].shape == (32,)
    assert loaded.tensors["layers.0.router.bias"].tolist() == [-0.25]
    assert not path.with_name(path.name + ".partial").exists()


def test_assemble_from_paths_equals_the_trained_model(artifact, ids):
    _, path, _ = artifact
    merged = flexmoe.assemble(tiny_model(), [path], top_k=2)
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, trained_expert()(ids).logits)


def test_wrong_fingerprint_names_owner_and_both_values(artifact):
    _, path, fp = artifact
    with pytest.raises(ArtifactError) as e:
        ExpertArtifact.load(path, fingerprint="0" * 64)
    msg = str(e.value)
    assert "'alice'" in msg and "fingerprint" in msg and "0" * 64 in msg and fp in msg
    assert e.value.field == "fingerprint" and e.value.got == fp


def test_assemble_refuses_an_expert_of_another_public_model(artifact):
    _, path, _ = artifact
    with pytest.raises(ArtifactError, match="fingerprint"):
        flexmoe.assemble(tiny_model(seed=5), [path])


def test_wrong_spec(artifact):
    _, path, _ = artifact
    with pytest.raises(ArtifactError, match="spec_sha256: expected other, got spec-1"):
        ExpertArtifact.load(path, spec_sha256="other")


def test_shape_mismatch_against_the_public_model(tmp_path):
    other = trained_expert(intermediate_size=40)
    path = ExpertArtifact.from_model(other, owner="bob").save(tmp_path / "bob.safetensors")
    art = ExpertArtifact.load(path)
    with pytest.raises(
        ArtifactError, match=r"'bob'.*shape of layers\.0\.expert\.\w+_proj\.weight: expected \[\d+, \d+\], got"
    ):
        art.validate(tiny_model())


def test_dtype_mismatch_against_the_public_model(tmp_path):
    half = flexmoe.upcycle(tiny_model().to(torch.bfloat16), num_experts=1)
    path = ExpertArtifact.from_model(half, owner="carol").save(tmp_path / "c.safetensors")
    with pytest.raises(ArtifactError, match="dtype of layers.0.expert.*expected torch.float32, got torch.bfloat16"):
        ExpertArtifact.load(path).validate(tiny_model())


def test_dtype_disagreeing_with_metadata(artifact):
    _, path, _ = artifact
    rewrite(
        path, tensors={"layers.0.expert.up_proj.weight": load_file(str(path))["layers.0.expert.up_proj.weight"].half()}
    )
    with pytest.raises(ArtifactError, match="dtype of layers.0.expert.up_proj.weight: expected F32, got F16"):
        ExpertArtifact.load(path)


def test_missing_tensor(artifact):
    _, path, _ = artifact
    rewrite(path, **{"layers.1.expert.down_proj.weight": None})
    with pytest.raises(ArtifactError, match="tensors of layer 1"):
        ExpertArtifact.load(path)


def test_missing_router(artifact):
    _, path, _ = artifact
    rewrite(path, **{"layers.0.router.bias": None})
    with pytest.raises(ArtifactError, match=r"layers\.0\.router\.bias: expected present, got missing"):
        ExpertArtifact.load(path)


def test_extra_tensor_and_extra_layer(artifact, tmp_path):
    _, path, _ = artifact
    rewrite(path, tensors={"layers.0.expert.secret.weight": torch.zeros(2)})
    with pytest.raises(ArtifactError, match="secret"):
        ExpertArtifact.load(path).validate(tiny_model())
    rewrite(path, tensors={"layers.7.router.bias": torch.zeros(1)})
    with pytest.raises(ArtifactError, match=r"layers: expected 0..1, got missing \[\], extra \[7\]"):
        ExpertArtifact.load(path)
    rewrite(path, tensors={"payload": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="tensor names.*got payload"):
        ExpertArtifact.load(path)


def test_layer_count_mismatch_against_the_public_model(tmp_path):
    deeper = trained_expert(num_hidden_layers=3)
    path = ExpertArtifact.from_model(deeper, owner="dan").save(tmp_path / "d.safetensors")
    with pytest.raises(ArtifactError, match="num_layers: expected 2, got 3"):
        ExpertArtifact.load(path).validate(tiny_model())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(artifact, bad):
    _, path, _ = artifact
    w = load_file(str(path))["layers.1.expert.gate_proj.weight"]
    w[3, 4] = bad
    rewrite(path, tensors={"layers.1.expert.gate_proj.weight": w})
    with pytest.raises(
        ArtifactError, match=r"values of layers\.1\.expert\.gate_proj\.weight: expected finite numbers, got 1 NaN/Inf"
    ):
        ExpertArtifact.load(path)


def test_truncated_file(artifact):
    _, path, _ = artifact
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="file length.*truncated"):
        ExpertArtifact.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(ArtifactError, match="'alice.safetensors'"):
        ExpertArtifact.load(path)


def test_appended_bytes(artifact):
    _, path, _ = artifact
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    with pytest.raises(ArtifactError, match="trailing bytes"):
        ExpertArtifact.load(path)


def test_pickle_is_recognised_and_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": Boom()}))
    with pytest.raises(ArtifactError, match="format: expected safetensors, got a pickle.*never unpickles"):
        ExpertArtifact.load(path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.pt")
    with pytest.raises(ArtifactError, match="zip archive"):
        ExpertArtifact.load(tmp_path / "zip.pt")


def test_random_and_malformed_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    )
    with pytest.raises(ArtifactError, match="header length"):
        ExpertArtifact.load(path)
    header = b"{not json"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ArtifactError, match="header: expected a JSON object"):
        ExpertArtifact.load(path)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(ArtifactError, match="metadata 'format_version': expected present, got missing"):
        ExpertArtifact.load(path)


def test_oversize_file_is_refused_before_reading(artifact):
    _, path, _ = artifact
    with pytest.raises(ArtifactError, match="file size: expected at most 1000 bytes"):
        ExpertArtifact.load(path, max_bytes=1000)


def test_unsupported_format_version(artifact):
    _, path, _ = artifact
    rewrite(path, metadata={"format_version": "99"})
    with pytest.raises(ArtifactError, match="format_version: expected 1, got 99"):
        ExpertArtifact.load(path)


def test_artifact_error_is_a_value_error():
    assert issubclass(ArtifactError, ValueError)


def test_public_expert_is_not_an_artifact():
    with pytest.raises(ValueError, match="public"):
        ExpertArtifact.from_model(trained_expert(), owner="x", expert=0)
