"""`flexmoe plan`: its counts are what transformers builds and what autograd saves.

The peaks themselves are checked against measurements in benchmarks/plan_check.py (docs/scale.md);
here, the parts that can be checked exactly and quickly on tiny or meta-device models.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexmoe.cli import main
from flexmoe.core.errors import InputError
from flexmoe.core.moe import record_router_logits, router_z_loss
from flexmoe.core.surgery import freeze_public, upcycle
from flexmoe.plan import KNOWN_CONFIGS, ModelShape, Setting, estimate, model_shape, parse_memory, plan
from flexmoe.spec import ExpertRecipe

TINY = {
    "model_type": "olmo2",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def owner_model(fields: dict):
    """The owner's model as ExpertModule builds it: upcycled to 2 experts, public part frozen."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    model = upcycle(model, 1, top_k=2, owners=["owner"])
    freeze_public(model, (1,))
    return model.train()


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_parameter_count_is_what_transformers_builds(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**KNOWN_CONFIGS[name]))
    assert model_shape(name).dense_params == sum(p.numel() for p in model.parameters())


def test_trainable_count_is_what_the_owner_trains():
    model = owner_model(TINY)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(TINY).trainable_params == trainable


@pytest.mark.parametrize("layers", [1, 3])
def test_saved_activations_are_what_autograd_saves(layers):
    """Bytes autograd keeps for the backward pass (parameters excluded), per token, equal the
    plan's count: every layer's saved tensors, plus the float32 log-softmax of the logits."""
    fields = {**TINY, "num_hidden_layers": layers}
    model = owner_model(fields)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, TINY["vocab_size"], (2, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), record_router_logits(model) as logits:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        router_z_loss(logits)
    shape = ModelShape.from_config(fields)
    inner, first, rest = shape.saved_per_token()
    predicted = (layers - 1) * inner + first + rest + 4 * shape.vocab_size  # the logits themselves are not saved
    assert sum(saved.values()) / ids.numel() == pytest.approx(predicted, rel=0.02)
    assert out.loss.requires_grad


def test_checkpointing_sharding_and_devices_lower_the_peak():
    shape = model_shape("olmo2-1b")
    base = estimate(shape, Setting(4, 2048))
    ckpt = estimate(shape, Setting(4, 2048, checkpointing=True))
    fsdp = estimate(shape, Setting(4, 2048, checkpointing=True, fsdp=True, devices=8))
    assert ckpt.activations < base.activations / 2
    assert ckpt.frozen_weights == base.frozen_weights and ckpt.optimizer_state == base.optimizer_state
    assert fsdp.peak < ckpt.peak and fsdp.frozen_weights == pytest.approx(ckpt.frozen_weights / 8, abs=1)
    # float32 moments for what trains only: 8 bytes a trainable parameter, whatever the precision
    assert base.optimizer_state == 8 * shape.trainable_params
    assert estimate(shape, Setting(4, 2048, precision="32-true")).frozen_weights == 2 * base.frozen_weights


def test_fits_are_within_the_budget():
    budget = parse_memory("40GB")
    result = plan(model_shape("olmo2-1b"), ExpertRecipe(batch_size=8, seq_len=4096), memory=budget)
    assert result.fits and all(e.peak <= budget for e in result.fits)
    # the estimates use the recipe's whole batch: too much for 40 GB without checkpointing
    assert max(e.peak for e in result.estimates) > budget
    big = plan(model_shape("olmo2-7b"), ExpertRecipe(), memory=parse_memory("80GB"), devices=8)
    assert big.fits and all(e.setting.fsdp for e in big.fits)  # a 7B owner's state needs sharding


def test_memory_sizes():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("1.5 gib") == int(1.5 * 2**30)
    with pytest.raises(InputError, match="80GB"):
        parse_memory("eighty")


def test_cli_prints_json(capsys, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_CONFIGS["olmo2-1b"]))
    main(["plan", "--model", str(tmp_path), "--memory", "80GB", "--devices", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["dense_params"] == model_shape("olmo2-1b").dense_params
    assert out["fits"] and all(f["peak"] <= 80 * 10**9 for f in out["fits"])
    main(["plan", "--model", "olmo2-7b", "--layers", "2"])
    assert "olmo2-7b" in capsys.readouterr().out


def test_cli_unknown_model_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--model", "olmo2-3b"])
    assert "olmo2-1b" in capsys.readouterr().err


def test_device_check_cpu_path():
    """The GPU check's CPU path (a tiny model): owner steps with and without checkpointing, and
    merged-model inference, all complete with a throughput and a plan to compare with."""
    path = Path(__file__).parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    rows = device_check.run(cuda=False, steps=2, experts=2)
    assert [r["what"] for r in rows] == ["owner steps", "owner steps (checkpointed)", "merged inference, 3 experts"]
    assert all(r["tokens_per_s"] > 0 and r["planned"] > 0 and r["measured"] > 0 for r in rows)


def test_the_plans_precisions_are_the_recipes():
    import typing

    from flexmoe.plan import Precision
    from flexmoe.spec import PRECISIONS

    assert typing.get_args(Precision) == PRECISIONS


def test_cli_plans_the_specs_precision_unless_told(capsys, tmp_path: Path):
    from flexmoe.spec import FederationSpec

    (tmp_path / "config.json").write_text(json.dumps(KNOWN_CONFIGS["olmo2-1b"]))
    for precision in ("32-true", "bf16-mixed"):
        recipe = ExpertRecipe(precision=precision)
        spec = FederationSpec(public_model=str(tmp_path), fingerprint="0" * 64, expert=recipe)
        spec.save(tmp_path / "spec.json")
        main(["plan", "--spec", str(tmp_path / "spec.json"), "--json"])
        assert json.loads(capsys.readouterr().out)["estimates"][0]["setting"]["precision"] == precision
    main(["plan", "--spec", str(tmp_path / "spec.json"), "--precision", "32-true", "--json"])
    assert json.loads(capsys.readouterr().out)["estimates"][0]["setting"]["precision"] == "32-true"
    main(["plan", "--model", "olmo2-1b", "--json"])  # no spec: what an owner at scale runs
    assert json.loads(capsys.readouterr().out)["estimates"][0]["setting"]["precision"] == "bf16-mixed"


def test_fsdp_counts_the_root_unit_gathered_whole():
    """FSDP2 keeps the root unit (embeddings, final norm, LM head) gathered from its forward pass to
    its backward: the plan counts it whole, beside the shards of everything else."""
    shape = model_shape("olmo2-7b")
    root = 2 * shape.vocab_size * shape.hidden_size + shape.hidden_size
    one, eight = (estimate(shape, Setting(1, 128, fsdp=True, devices=d, checkpointing=True)) for d in (2, 8))
    assert eight.activations - one.activations == pytest.approx(2 * root * (1 / 2 - 1 / 8), rel=1e-6)
