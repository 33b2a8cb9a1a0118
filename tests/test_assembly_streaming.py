"""The coordinator's streamed assembly (flexmoe.assembly.assemble_to_dir) at any size: it reads,
checks and writes one artifact tensor at a time, refuses exactly what the in-memory validation
refuses, and writes the same files as the in-memory merge's export (docs/scale.md)."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact, MLPInputStats
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import ContentHash, content_sha256
from flexmoe.core.surgery import moe_blocks
from flexmoe.formats import export as hf
from flexmoe.formats.export import write_shard_streamed
from flexmoe.testing import perturb_, tiny_model


def owner_artifact(public_dir, i: int, directory, *, stats: bool = False, corrupt=None):
    """Owner ``i``'s expert on the public model: its MLPs perturbed, a random router row and a
    negative bias, and with ``stats`` the MLP-input moments; ``corrupt(tensors)`` edits it."""
    model = flexmoe.upcycle(AutoModelForCausalLM.from_pretrained(public_dir), 1)
    g = torch.Generator().manual_seed(100 + i)
    with torch.no_grad():
        for block in moe_blocks(model):
            perturb_(block.experts[1], seed=200 + i)
            block.router.weight[1] = torch.randn(block.router.weight.shape[1], generator=g)
            block.router.bias[1] = -float(torch.rand(1, generator=g))
    moments = None
    if stats:
        layers, hidden = len(moe_blocks(model)), model.config.hidden_size
        covariance = torch.eye(hidden).expand(layers, -1, -1).clone()
        moments = MLPInputStats(mean=torch.zeros(layers, hidden), count=100, covariance=covariance)
    art = ExpertArtifact.from_model(model, owner=f"owner_{i}", spec_sha256="spec", stats=moments)
    if corrupt is not None:
        corrupt(art.tensors)
    return art.save(directory / f"owner_{i}.safetensors")


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("streaming") / "public"
    tiny_model("llama").save_pretrained(path)
    return path


def test_a_streamed_shard_is_the_file_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(2, 2, generator=g).to(torch.float16),
        "a.scale": torch.tensor(1.5),
        "z.empty": torch.empty(0, 4),
        "model.layers.10.mlp.experts.1.up_proj.weight": torch.randn(4, 3, generator=g),
        "model.layers.2.mlp.experts.1.up_proj.weight": torch.randn(4, 3, generator=g),
    }
    save_file(tensors, str(tmp_path / "eager.safetensors"), metadata={"format": "pt"})
    declared = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}

    size = write_shard_streamed(tmp_path / "streamed.safetensors", declared, reversed(list(tensors.items())))

    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    with pytest.raises(ValueError, match="never given"):
        write_shard_streamed(tmp_path / "short.safetensors", declared, list(tensors.items())[1:])
    with pytest.raises(ValueError, match="not declared"):
        write_shard_streamed(tmp_path / "wrong.safetensors", declared, [("b.weight", torch.zeros(5, 3))])


@pytest.mark.parametrize(("arch", "fmt"), [("llama", "native"), ("olmo2", "flexolmo")])
def test_the_streamed_export_is_the_in_memory_export_file_for_file(tmp_path, arch, fmt):
    tiny_model(arch).save_pretrained(tmp_path / "public")
    paths = [owner_artifact(tmp_path / "public", i, tmp_path) for i in range(2)]
    if fmt != "native":  # a transformers gate has no bias
        for path in paths:
            art = ExpertArtifact.load(path)
            for L in range(art.num_layers):
                art.tensors[f"layers.{L}.router.bias"].zero_()
            art.save(path)

    streamed = flexmoe.assemble_to_dir(tmp_path / "public", paths, tmp_path / "streamed", format=fmt, top_k=2)
    merged = flexmoe.assemble(AutoModelForCausalLM.from_pretrained(tmp_path / "public"), paths, 2)
    in_memory = flexmoe.export(merged, tmp_path / "in_memory", fmt)

    shards = sorted(p.name for p in in_memory.glob("*.safetensors"))
    assert shards == sorted(p.name for p in streamed.glob("*.safetensors")) and len(shards) == 3
    for name in [*shards, hf.INDEX]:
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name


def test_open_reads_only_the_small_tensors_and_read_tensors_gives_what_load_gives(public_dir, tmp_path):
    path = owner_artifact(public_dir, 0, tmp_path, stats=True)
    loaded = ExpertArtifact.load(path)

    opened = ExpertArtifact.open(path)

    unread = sorted(k for k, t in opened.tensors.items() if t.is_meta)
    assert unread and all(".expert." in k or k.endswith("stats.covariance") for k in unread)
    assert all(torch.equal(opened.tensors[k], t) for k, t in loaded.tensors.items() if k not in unread)
    content = ContentHash()
    for name, t in opened.read_tensors(AutoModelForCausalLM.from_pretrained(public_dir)):
        assert torch.equal(t, loaded.tensors[name]) and t.dtype == loaded.tensors[name].dtype
        content.add(name, t)
    assert content.hexdigest(opened.metadata) == content_sha256(loaded.tensors, loaded.metadata)


def test_the_streamed_assembly_holds_one_artifact_tensor_at_a_time(public_dir, tmp_path, monkeypatch):
    paths = [owner_artifact(public_dir, i, tmp_path, stats=True) for i in range(2)]
    held_before_each = []  # how many earlier unread tensors were still alive when the next was read
    read_tensors = ExpertArtifact.read_tensors

    def watched(self, *args, **kwargs):
        earlier = []
        for name, t in read_tensors(self, *args, **kwargs):
            if self.tensors[name].is_meta:
                held_before_each.append(sum(ref() is not None for ref in earlier))
                earlier.append(weakref.ref(t))
            yield name, t
            del t

    monkeypatch.setattr(ExpertArtifact, "read_tensors", watched)
    flexmoe.assemble_to_dir(public_dir, paths, tmp_path / "out", format="native")

    layers = AutoModelForCausalLM.from_pretrained(public_dir).config.num_hidden_layers
    assert len(held_before_each) == 2 * layers * 4  # gate, up, down and the covariance, per layer and owner
    assert max(held_before_each) == 0


def _scale(tensors):
    tensors["layers.1.expert.down_proj.weight"] *= 1000


def _nan(tensors):
    tensors["layers.0.expert.up_proj.weight"][2, 3] = float("nan")


def _bias(tensors):
    tensors["layers.1.router.bias"].fill_(-100.0)


def _indefinite(tensors):
    covariance = tensors["layers.1.stats.covariance"]
    covariance[0, 1] = covariance[1, 0] = 2.0  # symmetric, positive diagonal, an eigenvalue of -1


@pytest.mark.parametrize("corrupt", [_scale, _nan, _bias, _indefinite])
def test_the_streamed_assembly_refuses_what_validation_refuses(public_dir, tmp_path, corrupt):
    good = owner_artifact(public_dir, 0, tmp_path, stats=True)
    (tmp_path / "bad").mkdir()
    bad = owner_artifact(public_dir, 1, tmp_path / "bad", stats=True, corrupt=corrupt)
    public = AutoModelForCausalLM.from_pretrained(public_dir)
    with pytest.raises(ArtifactError) as in_memory:
        ExpertArtifact.load(bad).validate(public)

    with pytest.raises(ArtifactError) as streamed:
        flexmoe.assemble_to_dir(public_dir, [good, bad], tmp_path / "out", format="native")

    assert (streamed.value.owner, streamed.value.field) == (in_memory.value.owner, in_memory.value.field)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
