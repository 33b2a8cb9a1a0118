"""The data owner's Flower ``ClientApp`` (FlexOlmo step 2).

One SuperNode per owner, started with its name and data::

    flower-supernode --superlink HOST:PORT --node-config 'owner="clinic" data-path="/data/notes"'

``query`` answers which owner this SuperNode is. ``train`` receives the coordinator's
:class:`~flexmoe.FederationSpec`, trains the expert (:func:`~flexmoe.federation.task.train_owner_expert`,
exactly as ``flexmoe train-expert`` does) and replies with the artifact file's tensors and
metadata, training metrics and, only if the owner's node config says ``share-proxy=true``, its
proxy selection (ids of public documents). ``train.router`` is one round of federated router
tuning (:func:`~flexmoe.federation.task.tune_router_round`); only the routers go back. The
owner's text, its token ids and its local paths never enter a reply; the artifact also stays on
the owner's disk (``work-dir``), so the owner can later opt in to a merged model with
``flexmoe add-expert``.

The handlers only turn records into arguments and results into records: the work is in
:mod:`flexmoe.federation.task`.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

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
from flexmoe.federation.settings import OwnerSettings, as_list
from flexmoe.federation.task import OwnerResult, train_owner_expert, tune_router_round
from flexmoe.owner.proxy import ProxySelection
from flexmoe.spec import FederationSpec

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which owner this SuperNode is (the coordinator keys owners by name, not node id)."""
    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    return Message(RecordDict({OWNER: ConfigRecord({"name": s.owner, "share-proxy": s.share_proxy})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this owner's expert under the received spec and reply with it."""
    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    seed = int(msg.content[TRAIN]["seed"]) if TRAIN in msg.content else 0
    result = train_owner_expert(s, received_spec(msg.content), seed=seed)
    return Message(reply_content(result, s), reply_to=msg)


@app.train("router")
def router_round(msg: Message, context: Context) -> Message:
    """One round of federated router tuning on the owner's own text; only the routers go back."""
    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    content = msg.content
    r = content[ROUND]
    round_index = int(r["round"])
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
    rows, metrics = tune_router_round(
        s,
        received_spec(content),
        round_index=round_index,
        seed=int(r["seed"]),
        experts=list(zip(owners, hashes)),
        received=received,
        routers=arrays_to_tensors(content.array_records[ROUTERS], "coordinator"),
    )
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
