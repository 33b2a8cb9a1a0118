"""The owner's side: an expert trains with a real Lightning Trainer, and the callbacks keep it right."""

import lightning.pytorch as pl
import pytest
import torch
from flexmoe.callbacks import ExportExpert, FreezePublicModel, PublicModelChanged, RouterEmbeddingInit, RouterStats
from lightning.pytorch.callbacks import ModelCheckpoint

import flexmoe
from flexmoe.core.surgery import moe_blocks
from flexmoe.data.datamodule import TextDataModule
from flexmoe.spec import ExpertRecipe, FederationSpec
from flexmoe.testing import LICENSES
from flexmoe.training.expert import ExpertModule
from flexmoe.training.optim import cosine_with_warmup


@pytest.fixture(scope="module")
def spec(public_dir):
    from transformers import AutoModelForCausalLM

    fp = flexmoe.fingerprint(AutoModelForCausalLM.from_pretrained(public_dir))
    return FederationSpec(
        public_model=str(public_dir),
        fingerprint=fp,
        embedder=None,
        expert=ExpertRecipe(max_steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2),
    )


def datamodule(spec, tmp_path, **kw):
    kw = {"seq_len": spec.expert.seq_len, "batch_size": spec.expert.batch_size, "cache_dir": tmp_path / "cache", **kw}
    return TextDataModule(f"{LICENSES}/GPL-3", tokenizer=spec.public_model, **kw)


def trainer(tmp_path, **kw):
    kw = {
        "max_steps": 8,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
        **kw,
    }
    return pl.Trainer(**kw)


def expert_tensors(module):
    return {k: v.clone() for k, v in module.artifact().tensors.items()}


def test_five_lines_of_lightning_train_a_valid_expert(spec, tmp_path):
    pl.seed_everything(0)
    module = ExpertModule(spec.public_model, spec, owner="gpl")
    data = datamodule(spec, tmp_path)
    public_r0 = moe_blocks(module.model)[0].router.weight[0].clone()
    callbacks = [
        FreezePublicModel(spec.fingerprint),
        RouterEmbeddingInit(embedder=None),
        ExportExpert(tmp_path / "gpl.safetensors"),
        RouterStats(every_n_steps=4),
    ]
    t = trainer(tmp_path, callbacks=callbacks, val_check_interval=4, limit_val_batches=2)
    t.validate(module, data)
    before = t.callback_metrics["val/ppl"].item()
    t.fit(module, data)
    after = t.callback_metrics["val/ppl"].item()
    assert after < before  # the expert learned the owner's domain

    art = flexmoe.ExpertArtifact.load(
        tmp_path / "gpl.safetensors", fingerprint=spec.fingerprint, spec_sha256=spec.sha256
    )
    assert art.owner == "gpl" and art.training_tokens == 8 * 4 * 32
    block = moe_blocks(module.model)[0]
    assert not torch.equal(block.experts[1].up_proj.weight, block.experts[0].up_proj.weight)
    assert torch.equal(block.router.weight[0], public_r0)  # r_0 is frozen bit for bit
    assert callbacks[0].verified == spec.fingerprint
    assert set(callbacks[3].last) >= {"router/layer0/prob_gpl", "router/layer1/entropy"}


def test_optimizer_sees_only_the_owner_expert_and_router(spec):
    module = ExpertModule(spec.public_model, spec, owner="o")
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {
        id(p) for b in moe_blocks(module.model) for p in [*b.experts[1].parameters(), b.router.weight, b.router.bias]
    }
    assert in_opt == trainable
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_public_model_that_changes_fails_loudly(spec, tmp_path):
    class Tamper(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] += 1.0

    module = ExpertModule(spec.public_model, spec, owner="o")
    t = trainer(tmp_path, max_steps=1, callbacks=[FreezePublicModel(spec.fingerprint), Tamper()], limit_val_batches=0)
    with pytest.raises(PublicModelChanged, match="frozen public model changed"):
        t.fit(module, datamodule(spec, tmp_path))


def test_wrong_public_model_is_refused_before_training(spec, tmp_path):
    wrong = FederationSpec.from_dict({**spec.to_dict(), "fingerprint": "0" * 64})
    with pytest.raises(ValueError, match="does not match the spec"):
        ExpertModule(spec.public_model, wrong)


class StopAt(pl.Callback):
    """Simulates a crash: the run ends at ``step`` although it was configured for more."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_from_checkpoint_reaches_the_same_weights(spec, tmp_path):
    def run(stop_at=None, ckpt_path=None):
        pl.seed_everything(0)
        module = ExpertModule(spec.public_model, spec, owner="o")
        callbacks = [
            FreezePublicModel(spec.fingerprint),
            RouterEmbeddingInit(embedder=None),
            RouterStats(every_n_steps=3),
        ]
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1))
        if stop_at:
            callbacks.append(StopAt(stop_at))
        t = trainer(tmp_path, max_steps=8, callbacks=callbacks, limit_val_batches=0, enable_checkpointing=True)
        t.fit(module, datamodule(spec, tmp_path), ckpt_path=ckpt_path)
        return module, callbacks

    run(stop_at=5)  # "crashes" at step 5, after a checkpoint at step 3
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    resumed, callbacks = run(ckpt_path=ckpt)
    full, _ = run()
    assert callbacks[1].done  # the router init did not overwrite the trained row on resume
    a, b = expert_tensors(full), expert_tensors(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert resumed.tokens_seen == full.tokens_seen == 8 * 4 * 32


def test_gradient_accumulation_matches_the_larger_batch(spec, tmp_path):
    def run(batch_size, accumulate):
        pl.seed_everything(0)
        module = ExpertModule(spec.public_model, spec, owner="o")
        data = datamodule(spec, tmp_path, batch_size=batch_size)
        trainer(tmp_path, max_steps=3, accumulate_grad_batches=accumulate, limit_val_batches=0).fit(module, data)
        return expert_tensors(module)

    big, accumulated = run(4, 1), run(2, 2)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_mixed_precision_trains(spec, tmp_path):
    module = ExpertModule(spec.public_model, spec, owner="o")
    start = moe_blocks(module.model)[0].experts[1].up_proj.weight.clone()
    t = trainer(
        tmp_path,
        max_steps=2,
        precision="bf16-mixed",
        limit_val_batches=0,
        callbacks=[FreezePublicModel(spec.fingerprint)],
    )
    t.fit(module, datamodule(spec, tmp_path))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    trained = moe_blocks(module.model)[0].experts[1].up_proj.weight
    assert trained.dtype == torch.float32 and not torch.equal(trained, start)  # fp32 master weights moved


def test_csv_and_tensorboard_loggers_get_the_metrics(spec, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    pytest.importorskip("tensorboard")
    module = ExpertModule(spec.public_model, spec, owner="o")
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    t = trainer(
        tmp_path,
        max_steps=4,
        logger=loggers,
        log_every_n_steps=1,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=[RouterStats(every_n_steps=2)],
    )
    t.fit(module, datamodule(spec, tmp_path))
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/ppl",
        "train/tokens_per_s",
        "val/ppl",
        "router/layer0/prob_o",
        "router/layer0/entropy",
    ):
        assert key in header
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_fast_dev_run_exports_an_expert(spec, tmp_path):
    module = ExpertModule(spec.public_model, spec, owner="o")
    t = pl.Trainer(fast_dev_run=True, callbacks=[ExportExpert(tmp_path / "o.safetensors")], enable_progress_bar=False)
    t.fit(module, datamodule(spec, tmp_path))
    assert flexmoe.ExpertArtifact.load(tmp_path / "o.safetensors").training_tokens == 4 * 32


def test_the_artifact_counts_exactly_the_tokens_of_the_owners_training_text(spec, tmp_path):
    from collections import Counter

    from transformers import AutoTokenizer

    module = ExpertModule(spec.public_model, spec, owner="o")
    data = datamodule(spec, tmp_path)
    t = pl.Trainer(fast_dev_run=True, callbacks=[ExportExpert(tmp_path / "o.safetensors")], enable_progress_bar=False)
    t.fit(module, data)
    art = flexmoe.ExpertArtifact.load(tmp_path / "o.safetensors")
    # Directly: the training documents tokenised, EOS after each, the stream's last partial row dropped.
    tokenizer = AutoTokenizer.from_pretrained(spec.public_model)
    stream = []
    for doc in data.train_documents():
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[: len(stream) // spec.expert.seq_len * spec.expert.seq_len]
    want = torch.zeros(module.model.config.vocab_size)
    for token, n in Counter(stream).items():
        want[token] = n
    assert torch.equal(art.unigram, want) and art.metadata["unigram_tokens"] == str(len(stream))
    # Every document ends in one EOS (the last may fall in the dropped partial row).
    assert art.unigram[tokenizer.eos_token_id] >= len(data.train_documents()) - 1


def test_cosine_schedule_shape():
    lr = [cosine_with_warmup(s, warmup=4, total=20, min_ratio=0.1) for s in range(25)]
    assert lr[0] == 0.25 and lr[3] == 1.0 and lr[4] == 1.0
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    assert abs(lr[20] - 0.1) < 1e-12 and lr[24] == lr[20]


def test_callback_state_round_trips():
    stats = RouterStats()
    stats._reset(2, 3)
    stats.counts[1, 2] = 5
    again = RouterStats()
    again.load_state_dict(stats.state_dict())
    assert torch.equal(again.counts, stats.counts)
    init = RouterEmbeddingInit(embedder=None)
    init.done = True
    fresh = RouterEmbeddingInit(embedder=None)
    fresh.load_state_dict(init.state_dict())
    assert fresh.done


def test_router_embedding_init_uses_the_sentence_embedder_and_spec_r_pub(spec):
    from types import SimpleNamespace

    pytest.importorskip("sentence_transformers")
    from flexmoe.owner.embed import router_embedding

    docs = ["This program is free software; you can redistribute it.", "THERE IS NO WARRANTY FOR THE PROGRAM."]
    r_pub = torch.linspace(-1, 1, 32).tolist()
    with_pub = FederationSpec.from_dict(
        {**spec.to_dict(), "public_router_embedding": r_pub, "embedder": "sentence-transformers/all-MiniLM-L6-v2"}
    )
    module = ExpertModule(spec.public_model, with_pub, owner="o")
    init = RouterEmbeddingInit.from_spec(with_pub, documents=docs)
    init.on_fit_start(SimpleNamespace(datamodule=None), module)
    expected = router_embedding(docs, module.model, embedder=with_pub.embedder, seed=with_pub.projection_seed)
    for L, block in enumerate(moe_blocks(module.model)):
        torch.testing.assert_close(block.router.weight[1], expected[L])
        torch.testing.assert_close(block.router.weight[0], torch.tensor(r_pub))
    assert init.done


def test_export_expert_writes_with_each_checkpoint(spec, tmp_path):
    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise RuntimeError("power cut")

    module = ExpertModule(spec.public_model, spec, owner="o")
    callbacks = [
        ExportExpert(tmp_path / "o.safetensors"),
        ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2),
        Crash(),
    ]
    t = trainer(tmp_path, max_steps=8, callbacks=callbacks, limit_val_batches=0, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="power cut"):
        t.fit(module, datamodule(spec, tmp_path))
    art = flexmoe.ExpertArtifact.load(tmp_path / "o.safetensors", fingerprint=spec.fingerprint)
    assert art.training_tokens == 2 * 4 * 32  # the expert as of the step-2 checkpoint survived the crash
    assert art.unigram is not None  # the counts do not wait for fit end
