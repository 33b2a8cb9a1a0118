"""Faulty owners, for tests that prove the coordinator rejects what a broken or malicious owner sends.

:data:`app` is the owner's ClientApp (the library's own handlers) with one Flower mod,
:func:`fault_injection`: a SuperNode whose node config says ``fault-injection="nan"`` (or
``wrong-shape``, ``wrong-fingerprint``) corrupts its ``train`` reply after training, exactly as
:func:`corrupt` does; ``no-owner`` answers the ``query`` without its ``owner`` record;
``poison-routers`` answers each router round with another owner's row at -1e30 and its own at
3e38 (:func:`poison_routers`), ``list-metric`` with a list where a number belongs; every other
SuperNode runs unchanged. :func:`app_with_faults` copies a
Flower app folder (``examples/federation``) with its ClientApp pointed here, for real-process
deployments; in process, :func:`inject_fault` corrupts a reply built with
:func:`~flexmoe.federation.client_app.reply_content`.

The library never reads ``fault-injection``: only this app does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import tomli_w
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexmoe.federation import client_app
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    QUERY_MESSAGE,
    ROUND,
    ROUTER_MESSAGE,
    ROUTERS,
    TRAIN_MESSAGE,
    arrays_to_tensors,
    manifest_to_metadata,
    tensors_to_arrays,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: Flower depends on tomli, the same parser
    import tomli as tomllib

FAULTS = ("nan", "wrong-shape", "wrong-fingerprint")  # of the expert in a ``train`` reply
QUERY_FAULTS = ("no-owner",)
ROUTER_FAULTS = ("poison-routers", "list-metric")
NODE_CONFIG_KEY = "fault-injection"


def corrupt(fault: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """Copies of an expert's ``tensors`` and ``metadata`` with one fault: a NaN in its first
    expert weight, that weight one row short, or the fingerprint of another public model."""
    if fault not in FAULTS:
        raise ValueError(f"node config {NODE_CONFIG_KEY!r} must be one of {FAULTS}, got {fault!r}")
    tensors, metadata = dict(tensors), dict(metadata)
    name = next(k for k in sorted(tensors) if ".expert." in k)
    if fault == "nan":
        t = tensors[name].clone()
        t.view(-1)[0] = float("nan")
        tensors[name] = t
    elif fault == "wrong-shape":
        tensors[name] = tensors[name][:-1].clone()
    else:
        metadata["fingerprint"] = "0" * 64
    return tensors, metadata


def inject_fault(content: RecordDict, fault: str) -> RecordDict:
    """A ``train`` reply's content with its expert corrupted by :func:`corrupt`."""
    tensors = arrays_to_tensors(content[EXPERT], "faulty owner")
    metadata = manifest_to_metadata(content[MANIFEST], "faulty owner")
    tensors, metadata = corrupt(fault, tensors, metadata)
    out = RecordDict(dict(content))
    out[EXPERT], out[MANIFEST] = tensors_to_arrays(tensors), ConfigRecord(metadata)
    return out


def poison_routers(rows: dict[str, torch.Tensor], own: int) -> dict[str, torch.Tensor]:
    """Routers as a malicious owner (expert row ``own``) would return them: in every layer another
    owner's row at -1e30 (silencing it) and its own at 3e38 (every logit NaN in an unguarded merge)."""
    out = {k: v.clone() for k, v in rows.items()}
    for t in out.values():
        if t.dim() == 2:
            other = next((j for j in range(1, t.shape[0]) if j != own), None)
            if other is not None:
                t[other] = -1e30
            t[own] = 3e38
    return out


def fault_injection(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: corrupt this SuperNode's reply when its node config asks for a fault."""
    fault = str(context.node_config.get(NODE_CONFIG_KEY, ""))
    if fault and fault not in FAULTS + QUERY_FAULTS + ROUTER_FAULTS:  # refuse before training, not after
        raise ValueError(
            f"node config {NODE_CONFIG_KEY!r} must be one of {FAULTS + QUERY_FAULTS + ROUTER_FAULTS}, got {fault!r}"
        )
    reply = call_next(msg, context)
    kind = msg.metadata.message_type
    if not fault or reply.has_error():
        return reply
    if fault in FAULTS and kind == TRAIN_MESSAGE:
        return Message(inject_fault(reply.content, fault), reply_to=msg)
    if fault == "no-owner" and kind == QUERY_MESSAGE:
        return Message(RecordDict({"who": ConfigRecord({"name": "anyone"})}), reply_to=msg)
    if fault in ROUTER_FAULTS and kind == ROUTER_MESSAGE:
        content = RecordDict(dict(reply.content))
        if fault == "list-metric":
            content[METRICS] = MetricRecord({"loss-last": [1.0, 2.0]})
        else:
            owners = str(msg.content[ROUND]["owners"]).split(",")
            own = owners.index(str(context.node_config["owner"])) + 1
            rows = poison_routers(arrays_to_tensors(content[ROUTERS], "faulty owner"), own)
            content[ROUTERS] = tensors_to_arrays(rows)
        return Message(content, reply_to=msg)
    return reply


app = ClientApp(mods=[fault_injection])
app.query()(client_app.query)
app.train(mods=[client_app.secure_router_sum])(client_app.train)
app.train("router")(client_app.router_round)


def app_with_faults(app_dir: str | Path, dest: str | Path) -> Path:
    """A copy of the Flower app in ``app_dir`` (its run config and all) at ``dest``, whose
    ClientApp is :data:`app`: SuperNodes started with ``fault-injection`` in their node config
    then send corrupt experts."""
    dest = Path(dest)
    shutil.copytree(app_dir, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pyproject = dest / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text())
    config["tool"]["flwr"]["app"]["components"]["clientapp"] = f"{__name__}:app"
    # Flower accepts a --run-config override only for keys the app's config lists.
    config["tool"]["flwr"]["app"]["config"].setdefault("owner-keys", "")
    pyproject.write_text(tomli_w.dumps(config))
    return dest
