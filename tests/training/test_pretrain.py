"""pretrain: a public OLMo-2 model and tokenizer learned from scratch, saved for transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flexmoe.data.corpus import local_corpus, write_corpus
from flexmoe.data.packing import pack
from flexmoe.training.pretrain import PretrainModule, olmo2_config, pretrain

TINY = {"vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_len": 64, "batch_size": 8}
DOMAINS = ["pydoc_topics", "docstrings"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread; on a busy machine, threads that wait on
    each other make each step some 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    domains = local_corpus(max_docs_per_domain=24, domains=DOMAINS)
    return domains, write_corpus(domains, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    _, paths = corpus
    out = tmp_path_factory.mktemp("public") / "model"
    cache = tmp_path_factory.mktemp("cache")
    data = [str(paths[name] / "train.jsonl") for name in DOMAINS]
    pretrain(
        data, str(out), max_steps=20, warmup_steps=2, lr=1e-2, val_every=10, val_batches=4, cache_dir=str(cache), **TINY
    )
    return out


def held_out_loss(model, tokenizer, texts, seq_len=64) -> float:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows, _ = pack(ids, tokenizer.eos_token_id, seq_len)
    with torch.no_grad():
        return model(input_ids=rows.long(), labels=rows.long()).loss.item()


def test_saved_directory_loads_with_transformers_and_learned_the_held_out_domains(corpus, trained):
    domains, _ = corpus
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert model.config.model_type == "olmo2" and model.config.num_hidden_layers == 2
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.config.vocab_size == len(tokenizer) == 300

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained)).eval()
    for name in DOMAINS:  # validation documents that neither the tokenizer nor the model saw
        val = domains[name].val
        assert held_out_loss(model, tokenizer, val) < held_out_loss(untrained, tokenizer, val) - 0.5, name

    prompt = tokenizer("The for statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_report_records_the_run(trained):
    report = json.loads((trained / "flexmoe_pretrain.json").read_text())
    assert report["settings"]["max_steps"] == 20 and report["train_tokens"] == 20 * 8 * 64
    assert report["val_loss"] < report["val_loss_init"]
    assert report["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(trained).parameters())
    assert (trained / "logs" / "metrics.csv").is_file()


def test_bad_input_fails_before_any_work(corpus, tmp_path):
    _, paths = corpus
    data = [str(paths["pydoc_topics"] / "train.jsonl")]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        pretrain([str(tmp_path / "missing.jsonl")], str(tmp_path / "a"), **TINY)
    assert not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        pretrain(data, str(tmp_path / "full"), **TINY)
    with pytest.raises(NotADirectoryError):
        pretrain(data, str(tmp_path / "full" / "x"), **TINY)
    with pytest.raises(ValueError, match="no training data"):
        pretrain([], str(tmp_path / "b"), **TINY)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        pretrain(data, str(tmp_path / "b"), **{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="warmup_steps"):
        pretrain(data, str(tmp_path / "b"), max_steps=10, warmup_steps=10, **TINY)
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(data, str(tmp_path / "b"), **{**TINY, "vocab_size": 100})
    assert not (tmp_path / "b").exists()


def test_module_schedule_and_optimizer_groups():
    module = PretrainModule(olmo2_config(300, hidden_size=32, num_layers=1), lr=1e-3, warmup_steps=4, max_steps=20)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decayed, plain = opt.param_groups
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 4) and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 2e-4
    # The hyperparameters rebuild the same architecture (what a Lightning checkpoint stores).
    again = PretrainModule(module.hparams.config)
    assert again.model.config.hidden_size == 32
    assert olmo2_config(300, hidden_size=256).intermediate_size == 688


def test_limited_validation_spreads_over_every_source(corpus, tmp_path):
    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.training.pretrain import PretrainData

    _, paths = corpus
    data = [str(paths[name] / "train.jsonl") for name in DOMAINS]
    tokenizer = train_tokenizer(["a few words to train on"], vocab_size=300)
    dm = PretrainData(data, tokenizer, seq_len=32, batch_size=4, val_fraction=0.2, cache_dir=tmp_path, val_batches=3)
    dm.setup()
    everything = dm.val_dataloader().dataset.dataset.data
    rows = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert rows.shape[0] == 12 < everything.shape[0]
    assert torch.equal(rows[0], everything[0].long()) and torch.equal(rows[-1], everything[-1].long())
    dm.val_batches = 0
    assert len(dm.val_dataloader().dataset) == everything.shape[0]
