"""Secure aggregation of router rounds (run config ``secure-aggregation``; docs/federation.md,
"Secure aggregation"): the coordinator learns the sum of the owners' router changes, not each one.

Flower's SecAgg+ does the cryptography, unchanged: its server workflow
(:class:`flwr.server.workflow.SecAggPlusWorkflow`) and its client mod
(:func:`flwr.client.mod.secaggplus_mod`). The workflow is written for Flower's legacy
``DefaultWorkflow`` fit round (a ``LegacyContext`` holding a ``Strategy`` and a client manager;
four ``"train"`` messages per node whose third asks the ``ClientApp`` to fit), so flexmoe runs it
for the *aggregation step only*, after its own ``train.router`` round:

1. the round's ``train.router`` message as in plain rounds; the owner trains, clips its change to
   the round's bounds on its own machine (:func:`~flexmoe.federation.task.clipped_change`), keeps it
   in its ``Context.state`` (:func:`keep_contribution`) and replies with its losses only;
2. :func:`secure_sum`: one ``SecAggPlusWorkflow`` run over the owners that replied, with a
   ``LegacyContext`` whose strategy (:class:`_RouterSum`) picks exactly those nodes and keeps
   the unmasked result. On the owner, :func:`secure_router_sum` (a mod on the default ``train``
   handler) hands those four messages to ``secaggplus_mod``, whose "fit" is
   :func:`_contribution`: the kept change, never the expert-training handler.

Every owner sends weight 1 (``num_examples=1``, ``max_weight=1``), so the workflow's weighted mean
times the number of contributors is the sum. SecAgg+ quantizes each coordinate stochastically to
``QUANTIZATION_RANGE`` levels over ``[-clipping_range, clipping_range]``; with the clipping range
set to the round's largest row bound no honest coordinate is clipped, and each contributor adds
less than one level, ``2 * clipping_range / QUANTIZATION_RANGE``, of error to every coordinate of
the sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from flexmoe.federation.records import arrays_to_tensors, tensors_to_arrays

# Which rows an owner's contribution may change: its own row and bias and the public expert's row
# r_0 (as in plain rounds, so the sum shows each owner's own row on its own), or every row (the sum
# hides every owner's change, and no row is any one owner's).
SCOPES = ("own-rows", "all-rows")
# SecAgg+'s integer grid: Flower's defaults. Each coordinate becomes one of 2**22 levels; sums are
# taken modulo 2**32, so up to 2**32 / 2**22 = 1024 owners add up without overflow.
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
# Every owner in the round holds a share of every other's keys (num_shares = all of them); two
# thirds of the shares (at least 2) rebuild a dropped owner's pairwise masks.
RECONSTRUCTION_THRESHOLD = 2 / 3
# Where an owner keeps its clipped change between its train.router reply and the secure sum.
CHANGE_RECORD = "flexmoe.secure-change"
ROUND_KEY = "flexmoe-round"


# -- the owner's side -----------------------------------------------------------------------------


def keep_contribution(context: Context, round_index: int, change: dict[str, torch.Tensor]) -> None:
    """Keep ``change`` (router name -> float32 tensor) in the owner's Flower ``Context.state``
    for round ``round_index``'s secure sum; Flower carries the state from one message to the next."""
    context.state[CHANGE_RECORD] = tensors_to_arrays(change)
    context.state[CHANGE_RECORD + ".round"] = ConfigRecord({"round": round_index})


def secure_router_sum(msg: Message, context: Context, call_next) -> Message:
    """Flower mod for the owner's default ``train`` handler: a message of the SecAgg+ workflow
    (it carries the ``secaggplus_configs`` record) goes to Flower's ``secaggplus_mod``, whose
    fitting step is :func:`_contribution`; every other message (the expert's training) goes on
    to the handler unchanged."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _contribution)


def _contribution(msg: Message, context: Context) -> Message:
    """The fit result ``secaggplus_mod`` masks: this owner's kept change for the round the
    coordinator names, its tensors in sorted-name order (float64), weight 1. Refused if the owner
    kept none for that round, so that a change is never reused for another round's sum."""
    wanted = int(msg.content.config_records["fitins.config"][ROUND_KEY])
    kept = context.state.config_records.get(CHANGE_RECORD + ".round")
    if CHANGE_RECORD not in context.state.array_records or kept is None or int(kept["round"]) != wanted:
        raise ValueError(
            f"secure aggregation: the coordinator asked for this owner's change of round {wanted}, "
            f"but it kept {'none' if kept is None else 'round ' + str(kept['round'])}"
        )
    change = arrays_to_tensors(context.state.array_records[CHANGE_RECORD], "this owner")
    arrays = [change[name].double().numpy() for name in sorted(change)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=1, metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# -- the coordinator's side -----------------------------------------------------------------------


@dataclass
class SecureSum:
    """What the coordinator learns from a secure sum: the sum of the contributors' changes
    (float64, router name -> tensor), who contributed (node ids), and the quantization it used."""

    total: dict[str, torch.Tensor]
    contributors: list[int]
    clipping_range: float
    seconds: float

    @property
    def error_bound(self) -> float:
        """The most SecAgg+'s stochastic quantization can move any coordinate of the sum: less
        than one level, ``2 * clipping_range / QUANTIZATION_RANGE``, per contributor."""
        return len(self.contributors) * 2 * self.clipping_range / QUANTIZATION_RANGE


class _RouterSum:
    """The two strategy calls ``SecAggPlusWorkflow`` makes: ``configure_fit`` picks exactly
    the round's owners (their nodes, each told which round's change to add), ``aggregate_fit``
    keeps the unmasked mean and who it is over. The workflow calls nothing else."""

    def __init__(self, grid, run_id: int, nodes: list[int], round_index: int):
        self.grid, self.run_id, self.nodes, self.round_index = grid, run_id, nodes, round_index
        self.mean: list[np.ndarray] | None = None
        self.contributors: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        ins = FitIns(Parameters(tensors=[], tensor_type=""), {ROUND_KEY: self.round_index})
        return [(GridClientProxy(node, self.grid, self.run_id), ins) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the aggregate
            self.contributors = sorted(proxy.node_id for proxy, _ in results)
        return None, {}


def secure_sum(
    grid,
    run_id: int,
    nodes: list[int],
    round_index: int,
    shapes: dict[str, tuple[int, ...]],
    *,
    clipping_range: float,
    timeout: float,
) -> SecureSum | None:
    """Run one ``SecAggPlusWorkflow`` over ``nodes`` (at least two) for round ``round_index``;
    return the sum of their kept changes, reshaped to ``shapes`` (router name -> shape), or
    ``None`` if the protocol halted (too few owners left to unmask). Raises whatever the workflow
    raises on a reply it cannot read."""
    if len(nodes) < 2:
        raise ValueError(f"secure aggregation needs at least 2 owners in a round, got {len(nodes)}")
    started = time.monotonic()
    strategy = _RouterSum(grid, run_id, sorted(nodes), round_index)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index + 1}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}))
    context.strategy = strategy  # the workflow calls only configure_fit and aggregate_fit
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=1.0,
        clipping_range=float(clipping_range),
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    if strategy.mean is None:
        return None
    names = sorted(shapes)
    if len(strategy.mean) != len(names):
        raise ValueError(f"secure aggregation returned {len(strategy.mean)} arrays, expected {len(names)}")
    n = len(strategy.contributors)
    total = {}
    for name, array in zip(names, strategy.mean):
        if tuple(array.shape) != tuple(shapes[name]):
            raise ValueError(f"secure aggregation returned {name} of shape {array.shape}, expected {shapes[name]}")
        total[name] = torch.from_numpy(np.asarray(array, dtype=np.float64) * n)
    return SecureSum(total, strategy.contributors, float(clipping_range), time.monotonic() - started)
