"""The memory-lean owner run: bf16 public weights, float32 for what trains, checkpointed layers, FSDP units."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from flexmoe.callbacks import ExportExpert, FreezePublicModel
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe.core.errors import InputError
from flexmoe.core.sharding import is_sharded
from flexmoe.core.surgery import decoder_layers, moe_blocks
from flexmoe.spec import ExpertRecipe, FederationSpec, PrivacyRecipe
from flexmoe.testing import VOCAB, tiny_model
from flexmoe.training.expert import ExpertModule, float32_fingerprint, fsdp_units

RECIPE = {"max_steps": 4, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 0}


@pytest.fixture(scope="module")
def public(public_dir):
    return AutoModelForCausalLM.from_pretrained(public_dir)  # float32, as the coordinator loads it


def make_spec(public_dir, public, **recipe):
    expert = ExpertRecipe(**{**RECIPE, **recipe})
    return FederationSpec(str(public_dir), flexmoe.fingerprint(public), embedder=None, expert=expert)


def rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": torch.randint(3, VOCAB, (16,), generator=g)} for _ in range(n)], batch_size=2)


def fit(module, tmp_path, callbacks=(), ckpt_path=None, **kw):
    kw = {"max_steps": 4, "precision": module.precision, **kw}
    t = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kw,
    )
    t.fit(module, train_dataloaders=rows(), ckpt_path=ckpt_path)
    return t


def test_default_memory_settings_keep_old_spec_hashes(public_dir, public):
    spec = make_spec(public_dir, public)
    d = spec.to_dict()["expert"]
    assert "precision" not in d and "activation_checkpointing" not in d
    lean = make_spec(public_dir, public, precision="bf16-mixed", activation_checkpointing=True)
    assert lean.sha256 != spec.sha256 and FederationSpec.from_json(lean.to_json()) == lean
    with pytest.raises(InputError, match="precision must be one of"):
        ExpertRecipe(precision="bf16-true")


def test_bf16_mixed_holds_the_public_model_in_bf16_and_what_trains_in_float32(public_dir, public, tmp_path):
    spec = make_spec(public_dir, public, precision="bf16-mixed")
    module = ExpertModule(spec.public_model, spec, owner="o")  # fp32 files: checked by streaming them
    held = {(p.dtype, p.requires_grad) for p in module.model.parameters()}
    assert held == {(torch.bfloat16, False), (torch.float32, True)}
    t = fit(module, tmp_path, [FreezePublicModel(spec.fingerprint), ExportExpert(tmp_path / "o.safetensors")])
    assert torch.isfinite(t.callback_metrics["train/loss"])
    # The artifact keeps the float32 contract the coordinator's public model validates it against.
    art = flexmoe.ExpertArtifact.load(tmp_path / "o.safetensors", fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    art.validate(public, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    assert art.metadata["dtype"] == "F32" and art.training_tokens == 4 * 2 * 16


def test_a_public_model_published_in_bf16_hashes_to_the_coordinators_fingerprint(tmp_path):
    tiny_model("olmo2").to(torch.bfloat16).save_pretrained(tmp_path)
    coordinator = flexmoe.fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    held = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert float32_fingerprint(held) == coordinator != flexmoe.fingerprint(held)


def test_bf16_mixed_refuses_another_public_model_and_a_float32_trainer(public_dir, public, tmp_path):
    spec = make_spec(public_dir, public, precision="bf16-mixed")
    other = tiny_model("olmo2", seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="does not match the spec"):
        ExpertModule(str(tmp_path / "other"), spec)
    module = ExpertModule(spec.public_model, spec)
    with pytest.raises(InputError, match="precision='bf16-mixed'"):
        fit(module, tmp_path, precision="32-true")


def test_activation_checkpointing_recomputes_the_layers_and_gives_the_same_expert(public_dir, public, tmp_path):
    def run(checkpointing):
        pl.seed_everything(0)
        spec = make_spec(public_dir, public, activation_checkpointing=checkpointing)
        module = ExpertModule(public_dir, spec)
        calls = []
        decoder_layers(module.model)[1].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
        fit(module, tmp_path, max_steps=2)
        return module.artifact().tensors, len(calls)

    (plain, forwards), (checkpointed, recomputed) = run(False), run(True)
    assert recomputed == 2 * forwards  # each layer runs again in the backward pass
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_bf16_checkpointed_run_resumes_to_the_same_expert(public_dir, public, tmp_path):
    spec = make_spec(
        public_dir, public, precision="bf16-mixed", activation_checkpointing=True, batch_size=4, seq_len=32
    )

    def run(stop_at=None, ckpt_path=None):
        pl.seed_everything(0)
        module = ExpertModule(spec.public_model, spec, owner="o")
        callbacks = [FreezePublicModel(spec.fingerprint), ModelCheckpoint(tmp_path / "ck", every_n_train_steps=3)]
        if stop_at:
            callbacks.append(StopAt(stop_at))
        t = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=6, logger=False, enable_progress_bar=False,
                       limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
        t.fit(module, owner_data(spec, tmp_path), ckpt_path=ckpt_path)
        return module.artifact().tensors

    run(stop_at=5)  # "crashes" at step 5, after the checkpoint at step 3
    ckpt = next((tmp_path / "ck").glob("*step=3*.ckpt"))
    # The checkpoint keeps what trains and the public model's fingerprint, not the frozen weights.
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = ExpertModule(spec.public_model, spec, owner="o")
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    assert saved["flexmoe_public_fingerprint"] == spec.fingerprint
    resumed = run(ckpt_path=ckpt)
    full = run()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)


def test_a_checkpoint_resumes_only_against_its_public_model(public_dir, public, tmp_path):
    spec = make_spec(public_dir, public, batch_size=4, seq_len=32)
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ExpertModule(spec.public_model, spec, owner="o"), owner_data(spec, tmp_path))
    assert type(trainer.strategy.checkpoint_io).__name__ == "StreamingCheckpointIO"  # no in-memory copy on save
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", map_location="cpu", weights_only=True)
    saved["flexmoe_public_fingerprint"] = "0" * 64
    torch.save(saved, tmp_path / "other.ckpt")
    again = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                       limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(InputError, match="trained against the public model 0000"):
        module = ExpertModule(spec.public_model, spec, owner="o")
        again.fit(module, owner_data(spec, tmp_path), ckpt_path=tmp_path / "other.ckpt")


class StopAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def owner_data(spec, tmp_path):
    from flexmoe.data.datamodule import TextDataModule
    from flexmoe.testing import LICENSES

    e = spec.expert
    return TextDataModule(
        f"{LICENSES}/GPL-3", tokenizer=spec.public_model, seq_len=e.seq_len, batch_size=e.batch_size,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip


def test_dp_sgd_trains_under_bf16_and_checkpointing(public_dir, public, tmp_path):
    pytest.importorskip("opacus")
    privacy = PrivacyRecipe(noise_multiplier=1.0, max_grad_norm=1.0)
    spec = make_spec(public_dir, public, precision="bf16-mixed", activation_checkpointing=True, privacy=privacy)
    module = ExpertModule(spec.public_model, spec, owner="o")
    r0 = moe_blocks(module.model)[0].router.weight[0].clone()
    data = owner_data(spec, tmp_path)
    callbacks = [FreezePublicModel(spec.fingerprint)]
    t = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks)  # fmt: skip
    t.fit(module, data)
    assert module.private.steps == 2 and 0 < module.private.epsilon() < float("inf")
    assert torch.equal(moe_blocks(module.model)[0].router.weight[0], r0)  # the public row: no noise


def test_dp_sgd_refuses_fsdp(public_dir, public):
    pytest.importorskip("opacus")
    spec = make_spec(public_dir, public, privacy=PrivacyRecipe(noise_multiplier=1.0))
    module = ExpertModule(spec.public_model, spec)
    # setup only reads these of the Trainer (a real one would launch processes to get that far).
    module._trainer = SimpleNamespace(precision="32-true", strategy=module.fsdp_strategy(), world_size=1)
    with pytest.raises(InputError, match="does not run under FSDP"):
        module.setup("fit")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp_units_each_hold_one_dtype_and_one_requires_grad(public_dir, public, precision):
    """What FSDP2 needs of each unit's parameter group (one original dtype), checked without
    processes: ``configure_model`` shards every decoder layer, its frozen parts and the root, so
    each unit's own parameters (those not in a nested unit) have one dtype and one
    ``requires_grad``; a layer's own are exactly what trains. The sharded runs:
    test_expert_fsdp.py."""
    spec = make_spec(public_dir, public, precision=precision)
    module = ExpertModule(spec.public_model, spec)
    units = fsdp_units(module.model)
    assert all(layer in units for layer in decoder_layers(module.model))
    owner = {}
    for unit in [module.model, *units]:  # the root first: an inner unit claims its parameters after
        for p in unit.parameters():
            owner[id(p)] = (unit, p)
    kinds = {}
    for unit, p in owner.values():
        kinds.setdefault(id(unit), set()).add((p.dtype, p.requires_grad))
    assert all(len(k) == 1 for k in kinds.values())
    for layer in decoder_layers(module.model):
        assert kinds[id(layer)] == {(torch.float32, True)}  # expert 1 and the router, nothing frozen
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for u in decoder_layers(module.model) for p in u.parameters() if p.requires_grad)


def test_fsdp_strategy_runs_on_the_cpu(public_dir, public):
    """FSDP2 through Lightning's ModelParallelStrategy builds a CPU Trainer (gloo; the sharded
    runs: test_expert_fsdp.py): data parallel over every device, bf16-mixed as autocast (Lightning's
    plain MixedPrecision plugin, not FSDP's), checkpoints in one file."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = ExpertModule(public_dir, make_spec(public_dir, public, precision="bf16-mixed"))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=module.fsdp_strategy(), precision="bf16-mixed",
                         logger=False)  # fmt: skip
    strategy = trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and strategy.num_processes == 2
    assert type(trainer.precision_plugin) is MixedPrecision
    assert not strategy._save_distributed_checkpoint
    with pytest.raises(InputError, match="save_distributed_checkpoint=False"):
        module.fsdp_strategy(save_distributed_checkpoint=True)
    with pytest.raises(InputError, match="tensor parallelism"):
        module.fsdp_strategy(tensor_parallel_size=2)
    module.configure_model()  # without a Trainer (or under another strategy): nothing is sharded
    assert not is_sharded(module.model)


def test_lora_expert_under_bf16_trains_float32_factors(public_dir, public, tmp_path):
    pytest.importorskip("peft")
    from flexmoe.training.lora_expert import LoraExpertModule

    spec = make_spec(public_dir, public, precision="bf16-mixed", lora_rank=2)
    module = LoraExpertModule(spec.public_model, spec, owner="o")
    trainable = {p.dtype for p in module.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in module.model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    fit(module, tmp_path, [ExportExpert(tmp_path / "o.safetensors")], max_steps=2)
    from flexmoe.artifacts.load import load_expert

    art = load_expert(tmp_path / "o.safetensors", public, fingerprint=spec.fingerprint)  # materialised
    art.validate(public, fingerprint=spec.fingerprint)
    assert art.metadata["dtype"] == "F32"
