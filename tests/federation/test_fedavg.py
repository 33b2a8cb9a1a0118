"""FedAvg over data owners (iterative parameter mixing with owners as shards) on Flower's simulation
engine: two SuperNodes, each training the global dense model with Lightning on its own text."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation
from transformers import AutoModelForCausalLM

from flexmoe.federation.fedavg import FedAvgSettings, make_client_app, make_server_app, train_locally
from flexmoe.testing import LICENSES

# Two owners with different amounts of text (GPL-3 is about three times Apache-2.0).
OWNERS = [f"{LICENSES}/GPL-3", f"{LICENSES}/Apache-2.0"]


def _state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_fedavg_rounds_mix_the_owners_models(public_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path / "cache"))
    s = FedAvgSettings(
        model=str(public_dir),
        num_rounds=2,
        local_steps=4,
        lr=3e-3,
        batch_size=4,
        seq_len=32,
        eval_data=f"{LICENSES}/LGPL-3",
        out_dir=str(tmp_path / "out"),
        save_rounds=True,
    )
    run_simulation(
        make_server_app(s),
        make_client_app(OWNERS),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
    )
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert sorted(rounds) == ["0", "1", "2"]
    assert rounds["2"]["eval-loss"] < rounds["1"]["eval-loss"] < rounds["0"]["eval-loss"] - 0.05, rounds
    start, final = _state(public_dir), _state(out / "model")
    assert all(torch.equal(final[k], t) for k, t in _state(out / "rounds" / "round-2").items())
    assert not torch.allclose(final["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])

    # The final model is the data-size-weighted average of what the owners trained in the last
    # round: replay both owners' round 2 from the round-1 global model (training is deterministic).
    previous = _state(out / "rounds" / "round-1")
    states, sizes = [], []
    for path in OWNERS:
        state, n, _ = train_locally(
            str(public_dir), previous, path, local_steps=4, lr=3e-3, batch_size=4, seq_len=32, seed=s.seed + 2
        )
        states.append(state)
        sizes.append(n)
    assert sizes[0] > 2 * sizes[1]
    w = [n / sum(sizes) for n in sizes]
    worst, uniform_gap = 0.0, 0.0
    for name, t in final.items():
        expected = w[0] * states[0][name].double() + w[1] * states[1][name].double()
        worst = max(worst, (t.double() - expected).abs().max().item())
        uniform = (states[0][name].double() + states[1][name].double()) / 2
        uniform_gap = max(uniform_gap, (uniform - expected).abs().max().item())
    assert worst <= 1e-5, worst
    assert uniform_gap > 100 * max(worst, 1e-7)  # an unweighted average would have been caught


def test_settings_come_from_the_run_config():
    s = FedAvgSettings.from_run_config(
        {"model": "m", "num-rounds": 5, "lr": "0.01", "save-rounds": "true", "data-paths": "a,b"}
    )
    assert (s.num_rounds, s.lr, s.save_rounds) == (5, 0.01, True)
    with pytest.raises(ValueError, match="unknown FedAvg run config key"):
        FedAvgSettings.from_run_config({"model": "m", "rounds": 3})
    with pytest.raises(ValueError, match="local-steps"):
        FedAvgSettings(model="m", local_steps=0)
    with pytest.raises(ValueError, match="starting model"):
        FedAvgSettings(model="")


def test_each_supernode_finds_its_own_data():
    from flwr.app import Context, RecordDict

    from flexmoe.federation.fedavg import _data_path

    def context(node, run=None):
        return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run or {})

    simulated = {"partition-id": 1, "num-partitions": 2}
    assert _data_path(context(simulated, {"data-paths": "a.jsonl, b.jsonl"}), None) == "b.jsonl"
    assert _data_path(context(simulated), ["x", "y"]) == "y"  # make_client_app(data_paths=...)
    assert _data_path(context({"data-path": "/data/notes"}, {"data-paths": "a,b"}), ["x"]) == "/data/notes"
    with pytest.raises(ValueError, match="one path per SuperNode"):
        _data_path(context(simulated, {"data-paths": "a.jsonl"}), None)
    with pytest.raises(ValueError, match="--node-config"):
        _data_path(context({}), None)
