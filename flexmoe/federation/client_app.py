"""The data owner's Flower ``ClientApp`` (FlexOlmo step 2).

One SuperNode per owner, started with its name and data::

    flower-supernode --superlink HOST:PORT --node-config 'owner="clinic" data-path="/data/notes"'

``query`` answers which owner this SuperNode is. ``train`` receives the coordinator's
:class:`~flexmoe.FederationSpec`, trains the expert (:func:`~flexmoe.federation.task.train_owner_expert`,
exactly as ``flexmoe train-expert`` does) and replies with the artifact file's tensors and
metadata, training metrics and, only if the owner's node config says ``share-proxy=true``, its
proxy selection (ids of public documents). ``train.router`` is one round of federated router
tuning (:func:`~flexmoe.federation.task.tune_router_round`); only the routers go back, or, when the
round says ``secure``, nothing but the losses: the owner clips its change and keeps it for the
secure sum that follows (:mod:`flexmoe.federation.secure_sum`; Flower's ``secaggplus_mod``
answers those messages through :func:`~flexmoe.federation.secure_sum.secure_router_sum`). The
owner's text, its token ids and its local paths never enter a reply; the artifact also stays on
the owner's disk (``work-dir``), so the owner can later opt in to a merged model with
``flexmoe add-expert``.

The handlers only turn records into arguments and results into records: the work is in
:mod:`flexmoe.federation.task`. Flower starts a ClientApp process for every message, and the
secure sum's four protocol messages need none of training's stack, so the handlers that train
import :mod:`~flexmoe.federation.task` (Lightning, transformers) when they run: a protocol message
costs its process about a quarter of the import time (docs/federation.md, "Secure aggregation").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from flexmoe.core.io import atomic_file
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    OWNER,
    PROXY,
    ROUND,
    ROUTERS,
    SPEC,
    TRAIN,
    arrays_to_tensors,
    manifest_to_metadata,
    metrics_record,
    proxy_to_record,
    read_artifact_file,
    tensors_to_arrays,
)
from flexmoe.federation.secure_sum import SCOPES, keep_contribution, secure_router_sum
from flexmoe.federation.settings import OwnerSettings, as_list
from flexmoe.owner.proxy import ProxySelection
from flexmoe.spec import FederationSpec

if TYPE_CHECKING:
    from flexmoe.federation.task import OwnerResult

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which owner this SuperNode is (the coordinator keys owners by name, not node id)."""
    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    return Message(RecordDict({OWNER: ConfigRecord({"name": s.owner, "share-proxy": s.share_proxy})}), reply_to=msg)


@app.train(mods=[secure_router_sum])  # SecAgg+'s messages are plain "train" messages
def train(msg: Message, context: Context) -> Message:
    """Train this owner's expert under the received spec and reply with it."""
    from flexmoe.federation.task import train_owner_expert  # deferred: Lightning, for training messages only

    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    seed = int(msg.content[TRAIN]["seed"]) if TRAIN in msg.content else 0
    result = train_owner_expert(s, received_spec(msg.content), seed=seed)
    return Message(reply_content(result, s), reply_to=msg)


@app.train("router")
def router_round(msg: Message, context: Context) -> Message:
    """One round of federated router tuning on the owner's own text; only the routers go back, or,
    in a secure round, only the losses (the change is kept for the secure sum)."""
    from flexmoe.federation.task import clipped_change, tune_router_round  # deferred: Lightning, as in train()

    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    content = msg.content
    r = content[ROUND]
    round_index = int(r["round"])
    scope = str(r.get("secure", ""))
    if scope and scope not in SCOPES:
        raise ValueError(
            f"owner {s.owner!r}: round {round_index} asks for secure aggregation {scope!r}, not one of {SCOPES}"
        )
    if s.require_secure_aggregation and not scope:
        raise ValueError(
            f"owner {s.owner!r} requires secure aggregation (node config 'require-secure-aggregation'); round "
            f"{round_index} would send its routers in the clear: set the coordinator's run config 'secure-aggregation'"
        )
    owners, hashes = as_list(str(r["owners"]), "owners"), as_list(str(r["sha256"]), "sha256")
    if len(owners) != len(hashes):
        raise ValueError(
            f"owner {s.owner!r}: round {round_index} names experts {owners} with {len(hashes)} hashes; "
            "expected one hash per expert"
        )
    received = {
        o: (
            arrays_to_tensors(content.array_records[f"{EXPERT}:{o}"], o),
            manifest_to_metadata(content.config_records[f"{MANIFEST}:{o}"], o),
        )
        for o in owners
        if f"{EXPERT}:{o}" in content.array_records
    }
    spec = received_spec(content)
    routers = arrays_to_tensors(content.array_records[ROUTERS], "coordinator")
    rows, metrics = tune_router_round(
        s,
        spec,
        round_index=round_index,
        seed=int(r["seed"]),
        experts=list(zip(owners, hashes)),
        received=received,
        routers=routers,
        own_rows=scope != "all-rows",
    )
    if scope:
        change = clipped_change(rows, routers, spec.router_tuning)
        keep_contribution(context, round_index, change)
        # The owner's record of exactly what it put into the sum (its own disk; never sent).
        audit = s.work_path / "router-tuning" / f"secure-round-{round_index}.safetensors"
        with atomic_file(audit) as tmp:
            save_file(change, str(tmp), metadata={"round": str(round_index), "scope": scope})
        return Message(RecordDict({METRICS: metrics_record(metrics)}), reply_to=msg)
    return Message(RecordDict({ROUTERS: tensors_to_arrays(rows), METRICS: metrics_record(metrics)}), reply_to=msg)


def received_spec(content: RecordDict) -> FederationSpec:
    """The coordinator's FederationSpec from a message, checked against its announced sha256."""
    spec_record = content[SPEC]
    spec = FederationSpec.from_json(str(spec_record["json"]))
    if spec.sha256 != spec_record["sha256"]:
        raise ValueError(
            f"the received FederationSpec hashes to {spec.sha256}, not the announced {spec_record['sha256']}"
        )
    return spec


def reply_content(result: OwnerResult, s: OwnerSettings) -> RecordDict:
    """The reply: artifact tensors and metadata, metrics, and the proxy ids only if allowed."""
    tensors, metadata = read_artifact_file(result.artifact)
    content = RecordDict(
        {
            EXPERT: tensors_to_arrays(tensors),
            MANIFEST: ConfigRecord(dict(metadata)),
            METRICS: metrics_record(result.metrics),
        }
    )
    if s.share_proxy and result.proxy is not None:
        content[PROXY] = proxy_to_record(ProxySelection.from_json(result.proxy.read_text()))
    return content
