"""The evaluation table: per-domain perplexity of dense, MoE, BTM and oracle rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import flexmoe
from flexmoe.core.surgery import moe_blocks
from flexmoe.data.packing import pack_domain
from flexmoe.evaluate import eval_models, perplexity
from flexmoe.merge import BTMEnsemble
from flexmoe.testing import LICENSES, perturb_, tiny_model, train_tiny_tokenizer

SEQ = 32
DATA = [f"gpl={LICENSES}/GPL-3", f"apache={LICENSES}/Apache-2.0"]


@pytest.fixture(scope="module")
def dirs(public_dir, tmp_path_factory):
    """A dense public model (with tokenizer), a damaged dense copy (no tokenizer files), and a
    native flexmoe MoE of the public model with two owner experts and a non-trivial router."""
    root = tmp_path_factory.mktemp("eval")
    tok = AutoTokenizer.from_pretrained(public_dir)
    other = AutoModelForCausalLM.from_pretrained(public_dir)
    perturb_(other, seed=5, scale=0.2)
    other.save_pretrained(root / "other")
    moe = flexmoe.upcycle(AutoModelForCausalLM.from_pretrained(public_dir), 2, top_k=1, owners=["law", "code"])
    for block in moe_blocks(moe):
        perturb_(block.experts[1], seed=1)
        perturb_(block.experts[2], seed=2)
        perturb_(block.router, seed=3, scale=1.0)
    flexmoe.export(moe, root / "moe", format="native", tokenizer=tok)
    return {"dense": str(public_dir), "other": str(root / "other"), "moe": str(root / "moe"), "root": root}


def test_table_json_has_exactly_the_documented_shape(dirs, tmp_path, capsys):
    btm = f"btm:{dirs['dense']},{dirs['other']}"
    models = [dirs["dense"], dirs["other"], dirs["moe"], btm]
    oracle = [f"gpl={dirs['dense']}", f"apache={dirs['other']}"]
    out = tmp_path / "table" / "eval.json"
    result = eval_models(models, DATA, oracle=oracle, json_out=str(out), seq_len=SEQ, max_tokens=8 * SEQ)

    assert json.loads(out.read_text()) == result
    assert set(result) == {"models"}
    assert list(result["models"]) == [*models, "oracle"]
    for name, row in result["models"].items():
        keys = {"per_domain", "average", "geometric_average", "tokens_per_s"}
        assert set(row) == (keys | {"routing"} if name == dirs["moe"] else keys), name
        assert list(row["per_domain"]) == ["gpl", "apache"]
        ppl = list(row["per_domain"].values())
        assert all(isinstance(p, float) and 1 < p < 1e4 for p in ppl)
        assert row["average"] == pytest.approx(sum(ppl) / 2)
        assert row["geometric_average"] == pytest.approx(math.sqrt(ppl[0] * ppl[1]))
        assert row["tokens_per_s"] > 0

    routing = result["models"][dirs["moe"]]["routing"]
    assert list(routing) == ["gpl", "apache"]
    for layers in routing.values():
        assert list(layers) == ["layer0", "layer1"]
        for shares in layers.values():
            assert list(shares) == ["public", "law", "code"]
            assert sum(shares.values()) == pytest.approx(1.0)
    # oracle routing: each domain through its own model
    rows = result["models"]
    assert rows["oracle"]["per_domain"] == {
        "gpl": pytest.approx(rows[dirs["dense"]]["per_domain"]["gpl"], rel=1e-6),
        "apache": pytest.approx(rows[dirs["other"]]["per_domain"]["apache"], rel=1e-6),
    }
    # BTM never does worse than the worse member (a Bayesian mixture of them)
    for d in ("gpl", "apache"):
        worse = max(rows[dirs["dense"]]["per_domain"][d], rows[dirs["other"]]["per_domain"][d])
        assert rows[btm]["per_domain"][d] <= worse

    printed = capsys.readouterr().out
    for name in [*models, "oracle", "gpl", "apache", "average", "law", "code"]:
        assert name in printed


@pytest.mark.parametrize("which", ["dense", "moe", "btm"])
def test_perplexity_is_exp_of_the_models_own_loss(dirs, which):
    """On the same packed rows, ppl = exp(transformers' mean next-token loss)."""
    tok = AutoTokenizer.from_pretrained(dirs["dense"])
    path, budget = f"{LICENSES}/Apache-2.0", 24 * SEQ
    rows = pack_domain(path, tok, SEQ, max_tokens=budget)
    model = BTMEnsemble.from_dirs([dirs["dense"], dirs["other"]]) if which == "btm" else flexmoe.load(dirs[which])
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    # a batch size that leaves a partial last batch
    result = perplexity(model, {"apache": path}, tok, seq_len=SEQ, batch_size=7, max_tokens=budget)
    assert rows.shape[0] % 7
    assert result["per_domain"]["apache"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert ("routing" in result) == (which == "moe")


def test_domains_are_packed_as_the_datamodule_packs_them(dirs, tmp_path):
    from flexmoe.data.datamodule import TextDataModule

    tok = AutoTokenizer.from_pretrained(dirs["dense"])
    dm = TextDataModule(f"{LICENSES}/Apache-2.0", tok, seq_len=SEQ, val_fraction=0, cache_dir=tmp_path)
    dm.setup()
    rows = pack_domain(f"{LICENSES}/Apache-2.0", tok, SEQ)
    assert torch.equal(rows, dm.train_dataloader().dataset.data.long())
    # a list of documents is the same thing as the file they came from
    docs = dm.documents()
    assert torch.equal(pack_domain(docs, tok, SEQ), rows)
    assert pack_domain(docs, tok, SEQ, max_tokens=3 * SEQ + 5).shape == (3, SEQ)


def test_routing_shares_count_top1_experts(dirs):
    """A router that sends every token to the public expert shows a share of 1.0 for it."""
    model = flexmoe.load(dirs["moe"])
    for block in moe_blocks(model):
        with torch.no_grad():
            block.router.weight.zero_()
            block.router.bias.copy_(torch.tensor([0.0, -5.0, -5.0]))
    tok = AutoTokenizer.from_pretrained(dirs["dense"])
    docs = [Path(LICENSES, "GPL-2").read_text(encoding="utf-8")]
    result = perplexity(model, {"gpl": docs}, tok, seq_len=SEQ, max_tokens=4 * SEQ)
    assert result["routing"] == {"gpl": {f"layer{L}": {"public": 1.0, "law": 0.0, "code": 0.0} for L in (0, 1)}}


def test_mistakes_stop_with_a_clear_message(dirs, tmp_path):
    small = tmp_path / "small"
    tiny_model("olmo2", vocab_size=500).save_pretrained(small)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        eval_models([dirs["dense"], str(small)], DATA, seq_len=SEQ)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        eval_models([f"btm:{dirs['dense']},{small}"], DATA, seq_len=SEQ)
    with pytest.raises(ValueError, match="NAME=PATH"):
        eval_models([dirs["dense"]], [f"{LICENSES}/GPL-3"], seq_len=SEQ)
    with pytest.raises(ValueError, match="one model per --data domain"):
        eval_models([dirs["dense"]], DATA, oracle=[f"gpl={dirs['dense']}"], seq_len=SEQ)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_models([str(tmp_path / "nowhere")], DATA, seq_len=SEQ)
    with pytest.raises(ValueError, match="fewer than one row"):
        eval_models([dirs["dense"]], [f"bsd={LICENSES}/BSD"], seq_len=4096)
    with pytest.raises(ValueError, match="holds a tokenizer"):
        eval_models([dirs["other"]], DATA, seq_len=SEQ)
    # a different tokenizer over the same number of ids is still a different tokenizer
    twin = tmp_path / "twin"
    AutoModelForCausalLM.from_pretrained(dirs["dense"]).save_pretrained(twin)
    size = len(AutoTokenizer.from_pretrained(dirs["dense"]))
    train_tiny_tokenizer(["completely different text " * 50], vocab_size=size).save_pretrained(twin)
    with pytest.raises(ValueError, match="differs"):
        eval_models([dirs["dense"], str(twin)], DATA, seq_len=SEQ)
