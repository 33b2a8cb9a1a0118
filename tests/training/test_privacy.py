"""Differentially private experts: DP-SGD inside the owner's Lightning run, and what the artifact records."""

import dataclasses
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from flexmoe.callbacks import ExportExpert, FreezePublicModel, RouterEmbeddingInit
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import flexmoe
from flexmoe.artifacts.expert import ArtifactError
from flexmoe.core.errors import InputError
from flexmoe.core.surgery import moe_blocks
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.private_statistics import accountant_epsilon
from flexmoe.spec import ExpertRecipe, FederationSpec, PrivacyRecipe
from flexmoe.testing import LICENSES
from flexmoe.training.expert import ExpertModule
from flexmoe.training.privacy import PrivateTraining


def private_spec(public_dir, **privacy):
    from transformers import AutoModelForCausalLM

    privacy = {"noise_multiplier": 1.0, "accountant": "rdp", **privacy}
    return FederationSpec(
        public_model=str(public_dir),
        fingerprint=flexmoe.fingerprint(AutoModelForCausalLM.from_pretrained(public_dir)),
        embedder=None,
        expert=ExpertRecipe(
            max_steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, privacy=PrivacyRecipe(**privacy)
        ),
    )


@pytest.fixture(scope="module")
def spec(public_dir):
    return private_spec(public_dir)


def fit(spec, tmp_path, module=None, callbacks=(), ckpt_path=None, **kw):
    module = module or ExpertModule(spec.public_model, spec, owner="clinic")
    data = TextDataModule(
        f"{LICENSES}/GPL-3",
        tokenizer=spec.public_model,
        seq_len=spec.expert.seq_len,
        batch_size=spec.expert.batch_size,
        cache_dir=tmp_path / "cache",
    )
    kw = {
        "max_steps": spec.expert.max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "limit_val_batches": 0,
        **kw,
    }
    pl.Trainer(callbacks=list(callbacks), **kw).fit(module, data, ckpt_path=ckpt_path)
    return module, data


def test_a_private_expert_trains_in_the_same_trainer_and_records_its_epsilon(spec, tmp_path):
    module = ExpertModule(spec.public_model, spec, owner="clinic")
    block = moe_blocks(module.model)[0]
    r0, expert_before = block.router.weight[0].clone(), block.experts[1].up_proj.weight.clone()
    callbacks = [FreezePublicModel(spec.fingerprint), RouterEmbeddingInit(embedder=None)]
    callbacks.append(ExportExpert(tmp_path / "clinic.safetensors"))
    _, data = fit(spec, tmp_path, module, callbacks)

    assert not torch.equal(block.experts[1].up_proj.weight, expert_before)  # the expert learned
    assert torch.equal(block.router.weight[0], r0)  # no noise on the frozen public row r_0
    assert callbacks[0].verified == spec.fingerprint  # nor on any public tensor
    art = flexmoe.ExpertArtifact.load(tmp_path / "clinic.safetensors", spec.fingerprint, spec.sha256)
    dp = art.privacy
    rate = spec.expert.batch_size / data.num_train_sequences
    assert dp["dp_steps"] == 4 and dp["dp_noise_multiplier"] == 1.0 and dp["dp_max_grad_norm"] == 1.0
    assert dp["dp_sample_rate"] == pytest.approx(rate)
    assert dp["dp_epsilon"] == pytest.approx(accountant_epsilon([(1.0, rate, 4)], 1e-5, "rdp"))
    assert dp["dp_covers"] == ["expert"]  # the token counts ship exact, and the summary says so
    assert "exact: stats.unigram" in art.privacy_summary()
    assert module.tokens_seen == art.training_tokens > 0


def test_the_update_is_the_noisy_mean_of_per_row_clipped_gradients():
    """DP-SGD (Abadi et al., 2016, Algorithm 1): every row's gradient clipped to C on its own,
    summed, noise N(0, (sigma C)^2) added, divided by the expected batch size."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    rows = torch.randn(5, 3) * 10
    recipe = PrivacyRecipe(noise_multiplier=1e-9, max_grad_norm=0.5, accountant="rdp")
    private = PrivateTraining(recipe)
    private.sample_rate = 0.5
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = private.wrap(sgd, expected_batch_size=4, frozen={model.bias: torch.tensor([0.0, 1.0])})

    def loss_of(x):
        return model(x).square().sum()

    expected = [torch.zeros_like(p) for p in model.parameters()]
    for x in rows:
        grads = torch.autograd.grad(loss_of(x[None]), list(model.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        for e, g in zip(expected, grads):
            e += g * min(1.0, 0.5 / float(norm))
    PrivateTraining.clip_rows(dp, rows, loss_of)
    before = [p.detach().clone() for p in model.parameters()]
    dp.step()
    weight_step, bias_step = (b - p.detach() for b, p in zip(before, model.parameters()))
    torch.testing.assert_close(weight_step, expected[0] / 4)
    torch.testing.assert_close(bias_step, expected[1] / 4 * torch.tensor([0.0, 1.0]))  # masked entry: no step
    assert private.steps == 1 and private.accountant.history == [(1e-9, 0.5, 1)]


def test_target_epsilon_sets_the_noise_and_the_run_stays_within_it(public_dir, tmp_path):
    spec = private_spec(public_dir, noise_multiplier=None, target_epsilon=2.0)
    module, _ = fit(spec, tmp_path)
    assert module.private.noise_multiplier > 0
    assert module.private.epsilon() == pytest.approx(2.0, rel=0.02)  # all max_steps spent: the target, met


def test_resume_goes_on_spending_the_same_budget(spec, tmp_path):
    def run(max_steps, ckpt_path=None):
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        module, _ = fit(
            spec, tmp_path, callbacks=[ckpt], ckpt_path=ckpt_path, max_steps=max_steps, enable_checkpointing=True
        )
        return module

    first = run(2)
    resumed = run(4, ckpt_path=next((tmp_path / "ckpt").glob("*step=2*.ckpt")))
    assert resumed.private.steps == 4  # the accountant's history came back with the checkpoint
    assert resumed.private.noise_multiplier == first.private.noise_multiplier
    assert resumed.private.epsilon() > first.private.epsilon()


def test_a_checkpoint_on_other_data_is_refused(spec):
    private = PrivateTraining(spec.expert.privacy)
    private.calibrate(num_rows=100, batch_size=4, max_steps=4)
    with pytest.raises(InputError, match="same batch size"):
        private.load_state_dict({"history": [(1.0, 0.01, 3)], "noise_multiplier": 1.0, "sample_rate": 0.01})


@pytest.mark.parametrize(
    "trainer, message",
    [
        (SimpleNamespace(world_size=2, accumulate_grad_batches=1, datamodule=object()), "one process"),
        (SimpleNamespace(world_size=1, accumulate_grad_batches=2, datamodule=object()), "accumulate_grad_batches"),
        (SimpleNamespace(world_size=1, accumulate_grad_batches=1, datamodule=None), "LightningDataModule"),
    ],
)
def test_what_dp_training_cannot_do_is_refused_before_a_step(spec, trainer, message):
    module = ExpertModule(spec.public_model, spec, owner="clinic")
    module._trainer = trainer
    with pytest.raises(InputError, match=message):
        module.setup("fit")


def test_the_owner_may_set_privacy_when_the_spec_does_not_but_not_contradict_it(spec, public_dir):
    plain = dataclasses.replace(spec, expert=dataclasses.replace(spec.expert, privacy=None))
    own = PrivacyRecipe(target_epsilon=8.0)
    assert ExpertModule(plain.public_model, plain, privacy=own).private is not None
    with pytest.raises(InputError, match="the spec fixes the recipe"):
        ExpertModule(spec.public_model, spec, privacy=own)


def test_a_spec_without_privacy_keeps_its_hash_and_one_with_it_round_trips(spec):
    plain = dataclasses.replace(spec, expert=dataclasses.replace(spec.expert, privacy=None))
    assert "privacy" not in plain.to_dict()["expert"]  # as written before privacy existed
    again = FederationSpec.from_json(spec.to_json())
    assert again.expert.privacy == spec.expert.privacy and again.sha256 == spec.sha256 != plain.sha256
    with pytest.raises(InputError, match="not both"):
        PrivacyRecipe(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(InputError, match="protects nothing"):
        PrivacyRecipe()


def test_private_statistics_are_valid_counts_composed_with_the_expert(public_dir, tmp_path):
    spec = private_spec(public_dir, statistics_epsilon=4.0)
    spec = dataclasses.replace(spec, routing=dataclasses.replace(spec.routing, bigram_buckets=2**10))
    fit(spec, tmp_path, callbacks=[ExportExpert(tmp_path / "clinic.safetensors")], max_steps=2)
    art = flexmoe.ExpertArtifact.load(tmp_path / "clinic.safetensors", spec.fingerprint, spec.sha256)
    dp = art.privacy
    assert dp["dp_covers"] == ["expert", "stats.unigram", "stats.bigram"]
    assert dp["dp_statistics_epsilon"] == pytest.approx(4.0, rel=0.02)
    assert max(dp["dp_statistics_epsilon"], dp["dp_expert_epsilon"]) < dp["dp_epsilon"]
    assert dp["dp_epsilon"] <= dp["dp_statistics_epsilon"] + dp["dp_expert_epsilon"]  # no worse than adding them
    assert art.routing_stats is None  # the MLP-input moments are not shipped exact beside them
    assert "exact" not in art.privacy_summary()


def tampered(path, tmp_path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    metadata.update(changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    out = tmp_path / "tampered.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"dp_epsilon": "nan"}, "dp_epsilon"),
        ({"dp_epsilon": "-1"}, "dp_epsilon"),
        ({"dp_delta": "1.5"}, "dp_delta"),
        ({"dp_noise_multiplier": "0"}, "dp_noise_multiplier"),
        ({"dp_steps": "1e3"}, "dp_steps"),
        ({"dp_covers": "expert,expert"}, "dp_covers"),
        ({"dp_covers": "everything"}, "dp_covers"),
        ({"dp_accountant": "trust-me"}, "dp_accountant"),
        ({"dp_max_grad_norm": None}, "dp_max_grad_norm"),
        ({"dp_secret": "1"}, "dp_secret"),
    ],
)
def test_a_wrong_privacy_record_is_refused_by_name(spec, tmp_path, changes, field):
    module = ExpertModule(spec.public_model, spec, owner="clinic")
    module.private.calibrate(num_rows=100, batch_size=4, max_steps=4)
    path = module.artifact().save(tmp_path / "clinic.safetensors")
    assert flexmoe.ExpertArtifact.load(path).privacy["dp_epsilon"] == 0.0  # nothing spent yet
    with pytest.raises(ArtifactError, match=field):
        flexmoe.ExpertArtifact.load(tampered(path, tmp_path, **changes))


def test_an_artifact_without_privacy_says_so(public_dir, tmp_path):
    plain = FederationSpec(public_model=str(public_dir), fingerprint="0" * 64, embedder=None)
    module = ExpertModule(plain.public_model, plain, owner="o", check_fingerprint=False)
    art = module.artifact()
    assert art.privacy is None and art.privacy_summary() == "no differential privacy"
    assert not any(k.startswith("dp_") for k in art.metadata)
    assert math.isfinite(accountant_epsilon([], 1e-5))


def test_a_lora_expert_trains_privately_too(spec, tmp_path):
    pytest.importorskip("peft")
    from flexmoe.lora import LoraExpertArtifact, LoraExpertModule

    lora = dataclasses.replace(spec, expert=dataclasses.replace(spec.expert, lora_rank=2))
    module = LoraExpertModule(lora.public_model, lora, owner="clinic")
    fit(lora, tmp_path, module, [ExportExpert(tmp_path / "clinic.safetensors")], max_steps=2)
    art = LoraExpertArtifact.load(tmp_path / "clinic.safetensors", lora.fingerprint, lora.sha256)
    assert art.privacy["dp_steps"] == 2 and art.privacy["dp_covers"] == ["expert"]
    assert module.private.accountant.history == [(1.0, art.privacy["dp_sample_rate"], 2)]
