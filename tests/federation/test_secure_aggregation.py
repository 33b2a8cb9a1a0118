"""Secure aggregation of router rounds (issue 18; docs/federation.md, "Secure aggregation").

With run config ``secure-aggregation`` the coordinator learns only the sum of the owners' router
changes, through Flower's SecAgg+ (its server workflow and client mod, unchanged). In process, a
grid that hands each message to the real owner ClientApp shows the protocol returns the exact sum
within SecAgg+'s quantization bound while every reply the coordinator reads is masked; that the
secure aggregate is the plain one (the mean where plain rounds take the median on ``r_0``); that
the coordinator's row-wise clip of the sum bounds what any owner can add. With real SuperLink and
SuperNode processes, a secure run completes and what the coordinator kept of each round is the sum
of what the owners kept they sent, within the bound.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.torch import load_file

from flexmoe.federation.client_app import app, router_round
from flexmoe.federation.router_rounds import clip_sum, robust_aggregate, secure_aggregate
from flexmoe.federation.secure_sum import QUANTIZATION_RANGE, SecureSum, keep_contribution, secure_sum
from flexmoe.federation.settings import CoordinatorSettings, OwnerSettings
from flexmoe.federation.task import change_bounds, clip_rows, own_rows_only
from flexmoe.spec import RouterTuningRecipe
from flexmoe.testing.federation import Deployment

APP = Path(__file__).resolve().parents[2] / "examples" / "federation"
RUN_TIMEOUT = 480.0  # seconds; generous for a loaded 2-core machine
RECIPE = RouterTuningRecipe(data="owners", rounds=2, max_steps=4, batch_size=4, seq_len=32, warmup_steps=1)
EXPERTS, HIDDEN = 4, 16  # r_0 (public) and three owners' rows


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The run this process serves, as a ServerApp process knows it (Flower stamps it on every
    message built here)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class OwnersGrid:
    """``Grid.send_and_receive`` in process: a copy of each message (as if it had crossed the wire)
    goes to the real owner ClientApp of its node, with that node's own ``Context`` (Flower keeps it
    from message to message); ``seen`` holds every reply, which is all the coordinator ever reads."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts, self.seen = contexts, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = app(copy.deepcopy(m), self.contexts[m.metadata.dst_node_id])
            replies.append(reply)
        self.seen += replies
        return replies


def routers(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.router.{kind}": torch.randn(EXPERTS, HIDDEN, generator=g) * 0.1
        if kind == "weight"
        else torch.zeros(EXPERTS)
        for i in range(2)
        for kind in ("weight", "bias")
    }


def honest_change(start, row: int, seed: int) -> dict[str, torch.Tensor]:
    """What an honest owner (expert ``row``) keeps for the sum: a random move of its own row and
    ``r_0`` of about half its bound, clipped (``clipped_change``'s arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    moved = {k: v + torch.randn(v.shape, generator=g) * 2e-3 for k, v in start.items()}
    rows = own_rows_only(moved, start, row)
    bounds = change_bounds(start, RECIPE)
    return {k: clip_rows(rows[k].double() - s.double(), bounds[k]).float() for k, s in start.items()}


def owner_contexts(changes: dict[int, dict], round_index: int) -> dict[int, Context]:
    contexts = {}
    for node, change in changes.items():
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        keep_contribution(context, round_index, change)
        contexts[node] = context
    return contexts


def test_secure_sum_is_the_sum_and_the_coordinator_reads_only_masked_vectors():
    start = routers()
    changes = {101 + j: honest_change(start, j + 1, seed=j) for j in range(3)}
    grid = OwnersGrid(owner_contexts(changes, round_index=0))
    bounds = change_bounds(start, RECIPE)
    clipping_range = max(float(b.max()) for b in bounds.values())
    result = secure_sum(
        grid,
        1,
        list(changes),
        0,
        {k: tuple(v.shape) for k, v in start.items()},
        clipping_range=clipping_range,
        timeout=5,
    )
    assert result is not None and result.contributors == sorted(changes)
    exact = {k: sum(c[k].double() for c in changes.values()) for k in start}
    error = max(float((result.total[k] - exact[k]).abs().max()) for k in start)
    # Each owner's stochastic rounding moves a coordinate by less than one level of the grid.
    assert result.error_bound == pytest.approx(3 * 2 * clipping_range / QUANTIZATION_RANGE)
    assert 0 < error < result.error_bound
    print(f"\nsecure sum of 3 owners: max |error| {error:.3g}, bound {result.error_bound:.3g}")

    # Every array the coordinator received from an owner was masked: the fit reply's arrays are
    # cleared, and the masked vector of an owner whose change is zero almost everywhere is spread
    # over [0, 2**32) (the unmasked quantized zero would be QUANTIZATION_RANGE / 2 everywhere).
    masked = [r for r in grid.seen if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(a) == 0 for a in reply.content.array_records.values())
        vector = np.concatenate(
            [bytes_to_ndarray(b).ravel() for b in reply.content[RECORD_KEY_CONFIGS]["masked_params"]]
        )
        assert np.mean(vector[1:] == QUANTIZATION_RANGE // 2) < 0.01
        assert 0.4 < np.mean(vector[1:] / 2**32) < 0.6


def test_an_owner_adds_only_the_change_it_kept_for_that_round():
    start = routers()
    changes = {101: honest_change(start, 1, 0), 102: honest_change(start, 2, 1)}
    grid = OwnersGrid(owner_contexts(changes, round_index=0))
    shapes = {k: tuple(v.shape) for k, v in start.items()}
    with pytest.raises(Exception, match="round 1"):  # a change kept for round 0 is not added to round 1's sum
        secure_sum(grid, 1, list(changes), 1, shapes, clipping_range=1.0, timeout=5)
    with pytest.raises(ValueError, match="at least 2 owners"):  # a sum over one owner is its change
        secure_sum(grid, 1, [101], 0, shapes, clipping_range=1.0, timeout=5)


def test_secure_aggregate_is_the_plain_aggregate_with_the_mean_on_r0():
    """Given the same clipped changes, the secure round's routers equal the plain round's on every
    row but the public expert's ``r_0``, where the secure one is the mean (plain: the median)."""
    start = routers()
    public = {k: v + 1e-3 * torch.ones_like(v) for k, v in start.items()}
    changes = {j: honest_change(start, j, seed=j) for j in (1, 2, 3)}
    total = {k: sum(c[k].double() for c in changes.values()) for k in start}
    secure = secure_aggregate(start, public, total, len(changes))
    plain = robust_aggregate(start, public, changes)
    for name in start:
        assert torch.allclose(secure[name][1:], plain[name][1:], atol=1e-7), name
    w = "layers.0.router.weight"
    mean = start[w][0] + (public[w][0] - start[w][0] + sum(c[w][0] for c in changes.values()))
    assert torch.allclose(secure[w][0], mean, atol=1e-7)
    # With one owner, r_0 has two sources and the median is their mean: the rounds agree everywhere.
    one = {2: changes[2]}
    secure = secure_aggregate(start, public, {k: v.double() for k, v in changes[2].items()}, 1)
    plain = robust_aggregate(start, public, one)
    assert all(torch.allclose(secure[k], plain[k], atol=1e-7) for k in start)


def test_the_coordinator_clips_the_sum_row_by_row():
    """A sum that moves another owner's row, or any row further than the contributors' honest
    changes can, is clipped to that bound: what every owner together can move a row is bounded,
    whoever sent it."""
    start = routers()
    bounds = change_bounds(start, RECIPE)
    honest = {k: sum(honest_change(start, j, j)[k].double() for j in (1, 2)) for k in start}
    w = "layers.1.router.weight"
    poisoned = {k: v.clone() for k, v in honest.items()}
    poisoned[w][3] = float(bounds[w][3]) / HIDDEN**0.5  # owner 3's row (norm: one bound): not in this sum
    poisoned[w][1] = 1e3  # owner 1's row, far beyond its bound
    total, clipped = clip_sum(SecureSum(poisoned, [101, 102], 1.0, 0.0), bounds, [1, 2], "own-rows")
    slack = 2 * 2 * 1.0 / QUANTIZATION_RANGE * HIDDEN**0.5
    assert clipped == 2
    assert float(total[w][3].norm()) <= slack
    assert float(total[w][1].norm()) <= float(bounds[w][1]) + slack
    assert torch.equal(total[w][2], honest[w][2]) and torch.equal(total[w][0], honest[w][0])
    total, clipped = clip_sum(SecureSum(honest, [101, 102], 1.0, 0.0), bounds, [1, 2], "own-rows")
    assert clipped == 0  # honest sums pass unchanged
    # all-rows: every contributor may move every row, so the bound is theirs together: row 3 passes.
    _, clipped = clip_sum(SecureSum(poisoned, [101, 102], 1.0, 0.0), bounds, [1, 2], "all-rows")
    assert clipped == 1


def test_settings_and_an_owner_that_requires_secure_rounds(world):
    s = CoordinatorSettings.from_run_config({"spec": "s.json", "expected-owners": "a,b"})
    assert s.secure_aggregation == "off"
    for value, scope in ((True, "own-rows"), ("true", "own-rows"), (False, "off"), ("all-rows", "all-rows")):
        run_config = {"spec": "s.json", "expected-owners": "a,b", "secure-aggregation": value}
        assert CoordinatorSettings.from_run_config(run_config).secure_aggregation == scope
    with pytest.raises(ValueError, match="secure-aggregation"):
        CoordinatorSettings.from_run_config({"spec": "s.json", "expected-owners": "a", "secure-aggregation": "rows"})
    node = world.node("a", **{"require-secure-aggregation": True})
    assert OwnerSettings.from_configs(node, {}).require_secure_aggregation
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    content = RecordDict({"round": ConfigRecord({"round": 0, "owners": "a", "sha256": "0" * 64, "seed": 0})})
    message = Message(content, dst_node_id=5, message_type="train.router")
    with pytest.raises(ValueError, match="requires secure aggregation"):  # refused before any training
        router_round(message, context)


# -- end to end, real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_secure_router_rounds_with_real_processes(world, tmp_path):
    """Owners a and b (the second requiring secure rounds) tune the routers in two secure rounds over
    a real SuperLink: the run completes, each owner put only its own rows and r_0 into the sum, and
    what the coordinator kept of each round is the sum of what the owners kept they sent, within
    SecAgg+'s quantization bound."""
    out = tmp_path / "coordinator"
    with Deployment(tmp_path / "deployment") as d:
        d.start_superlink()
        d.start_supernode("a", world.node("a"))
        d.start_supernode("b", world.node("b", **{"require-secure-aggregation": True}))
        run_id = d.run(APP, world.run_config(out, "a,b", **{"secure-aggregation": True}))
        run = d.wait(run_id, RUN_TIMEOUT, until=(out / "report.json").is_file)
        log = d.log(run_id) if run["status"] != "finished:completed" else ""
    assert run["status"] == "finished:completed", log
    tuning = json.loads((out / "report.json").read_text())["router_tuning"]
    assert tuning["secure_aggregation"] == "own-rows"
    assert [r["owners"] for r in tuning["rounds"]] == [["a", "b"], ["a", "b"]]
    for r in tuning["rounds"]:
        seen = load_file(out / "router-rounds" / f"round-{r['round']}.safetensors")
        sent = {
            o: load_file(world.root / "owners" / o / "router-tuning" / f"secure-round-{r['round']}.safetensors")
            for o in "ab"
        }
        for row, owner in ((1, "a"), (2, "b")):  # each owner's own rows and r_0 only
            for name, t in sent[owner].items():
                others = [j for j in range(t.shape[0]) if j not in (row, 0 if t.dim() == 2 else row)]
                assert not t[others].any(), (owner, name)
        error = max(float((seen[k] - sent["a"][k].double() - sent["b"][k].double()).abs().max()) for k in seen)
        assert error < r["secure"]["error_bound"] and r["secure"]["clipped_rows"] == 0
        print(
            f"\nround {r['round']}: max |sum error| {error:.3g} (bound {r['secure']['error_bound']:.3g}), "
            f"secure sum {r['secure']['seconds']:.1f} s of {r['seconds']:.1f} s"
        )
