"""The data owner's Flower ``ClientApp`` (DESIGN.md "Federation"; FlexOlmo step 2).

One SuperNode per owner, started with its name and data::

    flower-supernode --superlink HOST:PORT --node-config 'owner="clinic" data-path="/data/notes"'

``query`` answers which owner this SuperNode is. ``train`` receives the coordinator's
:class:`~flexmoe.FederationSpec`, checks it against the owner's own copy of the public model
(fingerprint), trains the expert exactly as ``flexmoe train-expert`` does (``ExpertModule`` +
``expert_callbacks`` + ``TextDataModule`` in a Lightning ``Trainer``) and replies with the artifact
file's tensors and metadata, training metrics and, only if the owner's node config says
``share-proxy=true``, its proxy selection (ids of public documents). The owner's text, its
token ids and its local paths never enter the reply; the artifact also stays on the owner's disk
(``work-dir``), so the owner can later opt in to a merged model with ``flexmoe add-expert``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flexmoe.core.hashing import content_sha256
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
    spec = received_spec(msg.content)
    seed = int(msg.content[TRAIN]["seed"]) if TRAIN in msg.content else 0
    result = train_owner_expert(s, spec, seed=seed)
    return Message(reply_content(result, s), reply_to=msg)


@app.train("router")
def router_round(msg: Message, context: Context) -> Message:
    """One round of federated router tuning: the merged model's routers take this round's steps
    on the owner's own text; only the routers go back (RouterTuningRecipe ``data="owners"``)."""
    s = OwnerSettings.from_configs(context.node_config, context.run_config)
    rows, metrics = tune_router_round(s, received_spec(msg.content), msg.content)
    return Message(RecordDict({ROUTERS: tensors_to_arrays(rows), METRICS: metrics_record(metrics)}), reply_to=msg)


def received_spec(content: RecordDict):
    """The coordinator's FederationSpec from a message, checked against its announced sha256."""
    from flexmoe.spec import FederationSpec

    spec_record = content[SPEC]
    spec = FederationSpec.from_json(str(spec_record["json"]))
    if spec.sha256 != spec_record["sha256"]:
        raise ValueError(
            f"the received FederationSpec hashes to {spec.sha256}, not the announced {spec_record['sha256']}"
        )
    return spec


def _public_model(s: OwnerSettings, spec):
    """The owner's own copy of the public model, refused unless it is the spec's (fingerprint)."""
    from flexmoe.core.hashing import fingerprint
    from flexmoe.formats.load import load_public_model

    public_path = s.public_model or spec.public_model
    public = load_public_model(public_path)
    fp = fingerprint(public)
    if fp != spec.fingerprint:
        raise ValueError(
            f"owner {s.owner!r}: the local public model {public_path} has fingerprint {fp[:16]}..., but the "
            f"coordinator's spec expects {spec.fingerprint[:16]}...; point node config 'public-model' at the "
            "exact public model the coordinator published"
        )
    return public, public_path


def tune_router_round(s: OwnerSettings, spec, content: RecordDict) -> tuple[dict, dict]:
    """The owner's side of one round: rebuild the merged model from its own public model and the
    received experts (each put through every :class:`~flexmoe.ExpertArtifact` check, and kept in
    ``work-dir/router-tuning/`` so later rounds need not carry them), load the received routers,
    train them on the owner's text, and return ``(routers, metrics)``."""
    import flexmoe
    from flexmoe.artifacts.expert import ExpertArtifact
    from flexmoe.artifacts.guard import ArtifactError
    from flexmoe.data.documents import read_documents
    from flexmoe.data.packing import pack_documents
    from flexmoe.training.router_tuning import check_router_rows, local_router_round, router_rows, set_router_rows

    started = time.perf_counter()
    recipe = spec.router_tuning
    r = content[ROUND]
    round_index, seed = int(r["round"]), int(r["seed"])
    owners, hashes = as_list(str(r["owners"]), "owners"), as_list(str(r["sha256"]), "sha256")
    if len(owners) != len(hashes) or s.owner not in owners:
        raise ValueError(
            f"owner {s.owner!r}: round {round_index} names experts {owners} with {len(hashes)} hashes; "
            "expected one hash per expert, this owner among them"
        )
    bad = [h for h in hashes if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:  # the hashes name the kept files: nothing else from the message reaches a path
        raise ValueError(
            f"owner {s.owner!r}: round {round_index} announces expert hashes that are not sha256 hex digests: {bad}"
        )
    public, public_path = _public_model(s, spec)
    cache = s.work_path / "router-tuning"
    cache.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for owner, sha in zip(owners, hashes):
        path = cache / f"{sha}.safetensors"
        received = f"{EXPERT}:{owner}" in content.array_records
        if received:
            from safetensors.torch import save_file

            tensors = arrays_to_tensors(content.array_records[f"{EXPERT}:{owner}"], owner)
            metadata = manifest_to_metadata(content.config_records[f"{MANIFEST}:{owner}"], owner)
            got = content_sha256(tensors, metadata)
            if got != sha:
                raise ArtifactError(
                    owner,
                    "sha256 of the expert sent for router tuning",
                    sha,
                    got,
                    hint="the coordinator announced another expert than it sent",
                )
            partial = path.with_name(path.name + ".partial")
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, path)
        elif not path.is_file():
            raise ValueError(
                f"owner {s.owner!r}: the expert of {owner!r} (sha256 {sha[:16]}...) is not in "
                f"{cache}; the coordinator must send it again"
            )
        artifact = ExpertArtifact.load(path, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
        if not received and content_sha256(artifact.tensors, artifact.metadata) != sha:  # changed on disk
            path.unlink()
            raise ValueError(
                f"owner {s.owner!r}: the kept expert of {owner!r} no longer hashes to {sha[:16]}...; "
                "removed, the coordinator must send it again"
            )
        artifact.validate(public, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
        if artifact.owner != owner:
            raise ArtifactError(owner, "owner of the expert sent for router tuning", owner, artifact.owner)
        artifacts.append(artifact)
    model = flexmoe.assemble(public, artifacts, spec_sha256=spec.sha256)
    rows = arrays_to_tensors(content.array_records[ROUTERS], "coordinator")
    check_router_rows(rows, model, "coordinator")
    set_router_rows(model, rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(public_path)
    text = pack_documents(read_documents(s.data_path), tokenizer, recipe.seq_len, max_documents=2000)
    result = local_router_round(model, text, recipe, round_index, seed=seed)
    metrics = {
        "round": round_index,
        "steps": result["steps"],
        "loss-first": result["loss_first"],
        "loss-last": result["loss_last"],
        "seconds": time.perf_counter() - started,
    }
    return router_rows(model), metrics


@dataclass
class OwnerResult:
    """What an owner's training left on its own disk, and what it measured."""

    artifact: Path
    proxy: Path | None
    metrics: dict = field(default_factory=dict)


def train_owner_expert(s: OwnerSettings, spec, *, seed: int = 0) -> OwnerResult:
    """The owner-side training run: the same Lightning path as ``flexmoe train-expert``."""
    import lightning.pytorch as pl

    from flexmoe.data.datamodule import TextDataModule
    from flexmoe.data.documents import read_documents
    from flexmoe.training.expert import ExpertModule, expert_callbacks

    started = time.perf_counter()
    public, public_path = _public_model(s, spec)
    work = s.work_path
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{s.owner}.safetensors"
    public_docs = read_documents(s.public_data) if s.share_proxy else None

    pl.seed_everything(seed, verbose=False)
    module = ExpertModule(public, spec, owner=s.owner, check_fingerprint=False)  # checked just above
    data = TextDataModule(
        s.data_path, public_path, seq_len=spec.expert.seq_len, batch_size=spec.expert.batch_size, seed=seed
    )
    callbacks = expert_callbacks(spec, out, public_docs)
    trainer = pl.Trainer(
        max_steps=spec.expert.max_steps,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(work, name="logs"),
        log_every_n_steps=max(1, min(10, spec.expert.max_steps)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=work,
    )
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "train/z_loss")}
    if data.num_val_tokens:  # the held-out loss of the finished expert, for the coordinator's report
        for k, v in trainer.validate(module, data, verbose=False)[0].items():
            metrics[k] = float(v)
    stats = next(c for c in callbacks if type(c).__name__ == "RouterStats")
    shares = stats.last or (stats.compute() if stats.tokens.sum() > 0 else {})
    layers = sorted({k.split("/")[1] for k in shares if k.startswith("router/layer")}, key=lambda x: int(x[5:]))
    metrics.update(
        {
            "training-tokens": int(module.tokens_seen),
            "steps": int(trainer.global_step),
            "train-seconds": time.perf_counter() - started,
            "train-loss": metrics.pop("train/loss", float("nan")),
            "z-loss": metrics.pop("train/z_loss", float("nan")),
            "val-loss": metrics.pop("val/loss", float("nan")),
            "val-ppl": metrics.pop("val/ppl", float("nan")),
            # Share of this owner's training tokens whose top-1 expert is its own, per layer.
            "router-top1-own": [shares[f"router/{L}/top1_{s.owner}"] for L in layers],
        }
    )
    export = next(c for c in callbacks if type(c).__name__ == "ExportExpert")
    return OwnerResult(artifact=out, proxy=export.proxy_path, metrics=metrics)


def reply_content(result: OwnerResult, s: OwnerSettings) -> RecordDict:
    """The reply: artifact tensors and metadata, metrics, and the proxy ids only if allowed."""
    tensors, metadata = read_artifact_file(result.artifact)
    if s.fault_injection:
        tensors, metadata = _inject_fault(s.fault_injection, tensors, metadata)
    content = RecordDict(
        {
            EXPERT: tensors_to_arrays(tensors),
            MANIFEST: ConfigRecord(dict(metadata)),
            METRICS: metrics_record(result.metrics),
        }
    )
    if s.share_proxy and result.proxy is not None:
        from flexmoe.owner.proxy import ProxySelection

        content[PROXY] = proxy_to_record(ProxySelection.from_json(result.proxy.read_text()))
    return content


def _inject_fault(fault: str, tensors: dict, metadata: dict) -> tuple[dict, dict]:
    """TEST HOOK (node config ``fault-injection``): corrupt the reply the way a broken or
    malicious owner would, so tests can prove the coordinator rejects it."""
    tensors, metadata = dict(tensors), dict(metadata)
    name = next(k for k in sorted(tensors) if ".expert." in k)
    if fault == "nan":
        t = tensors[name].clone()
        t.view(-1)[0] = float("nan")
        tensors[name] = t
    elif fault == "wrong-shape":
        tensors[name] = tensors[name][:-1].clone()
    elif fault == "wrong-fingerprint":
        metadata["fingerprint"] = "0" * 64
    return tensors, metadata
