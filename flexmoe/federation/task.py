"""The data owner's work, with no Flower in it: what each ClientApp handler runs.

* :func:`train_owner_expert`: FlexOlmo step 2, exactly as ``flexmoe train-expert`` does it
  (:class:`~flexmoe.ExpertModule` + :func:`~flexmoe.expert_callbacks` + ``TextDataModule`` in a
  Lightning ``Trainer``), against the owner's own copy of the public model.
* :func:`tune_router_round`: the owner's share of one round of federated router tuning
  (``RouterTuningRecipe.data="owners"``): rebuild the merged model from the received experts,
  train its routers on the owner's own text, return them with only the rows it may change
  changed (:func:`own_rows_only`).
* :func:`clipped_change`: what an owner puts into a secure sum (``secure-aggregation``): its change
  to the routers, clipped here, on its own machine, to :func:`change_bounds` (the coordinator,
  which sees only the sum, cannot clip one owner's change).

:mod:`flexmoe.federation.client_app` turns Flower messages into these calls and their results
into replies; nothing here sees a message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.assembly import assemble
from flexmoe.callbacks import ExportExpert, RouterStats
from flexmoe.core.hashing import content_sha256, fingerprint
from flexmoe.core.io import atomic_file
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.documents import read_documents
from flexmoe.data.packing import pack_documents
from flexmoe.federation.settings import OwnerSettings
from flexmoe.formats.load import load_public_model
from flexmoe.spec import FederationSpec, RouterTuningRecipe
from flexmoe.training.expert import ExpertModule, expert_callbacks
from flexmoe.training.router_tuning import check_router_rows, local_router_round, router_rows, set_router_rows

# Documents of the owner's text tokenised for a router-tuning round (the round takes only
# ``local_steps * batch_size`` rows of them).
ROUTER_DOCUMENTS = 2000
# How far above the largest change honest local steps can make a row a change may go before it is
# clipped (change_bounds): AdamW moves a coordinate at most about 1.17 lr a step with the recipe's
# betas (0.9, 0.95), plus the decay; 2 leaves room for its epsilon and the rounding of the sum.
CLIP_MARGIN = 2.0


@dataclass
class OwnerResult:
    """What an owner's training left on its own disk, and what it measured."""

    artifact: Path
    proxy: Path | None
    metrics: dict = field(default_factory=dict)


def public_model(s: OwnerSettings, spec: FederationSpec):
    """The owner's own copy of the public model and its path, refused unless it is the spec's
    (fingerprint)."""
    path = s.public_model or spec.public_model
    public = load_public_model(path)
    fp = fingerprint(public)
    if fp != spec.fingerprint:
        raise ValueError(
            f"owner {s.owner!r}: the local public model {path} has fingerprint {fp[:16]}..., but the "
            f"coordinator's spec expects {spec.fingerprint[:16]}...; point node config 'public-model' at the "
            "exact public model the coordinator published"
        )
    return public, path


def train_owner_expert(s: OwnerSettings, spec: FederationSpec, *, seed: int = 0) -> OwnerResult:
    """The owner-side training run: the same Lightning path as ``flexmoe train-expert``. The
    artifact (and, with ``share-proxy``, the proxy selection) stays in ``work-dir``."""
    started = time.perf_counter()
    public, public_path = public_model(s, spec)
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
    stats = next(c for c in callbacks if isinstance(c, RouterStats))
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
    export = next(c for c in callbacks if isinstance(c, ExportExpert))
    return OwnerResult(artifact=out, proxy=export.proxy_path, metrics=metrics)


def tune_router_round(
    s: OwnerSettings,
    spec: FederationSpec,
    *,
    round_index: int,
    seed: int,
    experts: Sequence[tuple[str, str]],
    received: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
    routers: Mapping[str, torch.Tensor],
    own_rows: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The owner's side of one round of federated router tuning.

    ``experts`` names the merge, in expert order, as ``(owner, content_sha256)``; ``received``
    holds the experts sent with this round (owner -> tensors, metadata), which are kept in
    ``work-dir/router-tuning/<sha256>.safetensors`` so later rounds need not carry them. Every
    expert is put through every :class:`~flexmoe.ExpertArtifact` check against the owner's own
    public model, the merged model is assembled, ``routers`` are loaded into it and trained on
    the owner's text. Returns ``(routers, metrics)``, with every change but to the rows this owner
    may change undone (:func:`own_rows_only`) unless ``own_rows`` is false (secure aggregation's
    ``all-rows`` scope, where every owner's text tunes every row).
    """
    started = time.perf_counter()
    owners = [o for o, _ in experts]
    bad = [h for _, h in experts if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:  # the hashes name the kept files: nothing else from the coordinator reaches a path
        raise ValueError(
            f"owner {s.owner!r}: round {round_index} announces expert hashes that are not sha256 hex digests: {bad}"
        )
    if s.owner not in owners:
        raise ValueError(f"owner {s.owner!r}: round {round_index} merges experts {owners}, not this owner's")
    public, public_path = public_model(s, spec)
    cache = s.work_path / "router-tuning"
    artifacts = [_kept_expert(s, spec, public, cache, owner, sha, received.get(owner)) for owner, sha in experts]
    model = assemble(public, artifacts, spec_sha256=spec.sha256)
    check_router_rows(routers, model, "coordinator")
    set_router_rows(model, routers)
    tokenizer = AutoTokenizer.from_pretrained(public_path)
    text = pack_documents(read_documents(s.data_path), tokenizer, spec.router_tuning.seq_len, ROUTER_DOCUMENTS)
    result = local_router_round(model, text, spec.router_tuning, round_index, seed=seed)
    rows = router_rows(model)
    if own_rows:
        rows = own_rows_only(rows, routers, owners.index(s.owner) + 1)
    metrics = {
        "round": round_index,
        "steps": result["steps"],
        "loss-first": result["loss_first"],
        "loss-last": result["loss_last"],
        "seconds": time.perf_counter() - started,
    }
    return rows, metrics


def own_rows_only(rows: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], row: int) -> dict:
    """``rows`` (every layer's router weight ``[E, H]`` and bias ``[E]``) with every change undone
    except to the public expert's row ``r_0`` (which every owner's text teaches: "not the public
    expert here") and to the owner's own row ``row`` and bias. Each owner speaks for its own expert
    only; the coordinator refuses a reply that changes anything else
    (:func:`flexmoe.federation.router_rounds.owner_change`)."""
    out = {}
    for name, t in rows.items():
        keep = torch.zeros(t.shape[0], dtype=torch.bool)
        keep[row] = True
        if name.endswith(".weight"):
            keep[0] = True
        out[name] = torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, start[name])
    return out


def change_bounds(start: Mapping[str, torch.Tensor], recipe: RouterTuningRecipe) -> dict[str, torch.Tensor]:
    """Per router tensor, per row, the largest change (L2 norm) one owner's round may make: what
    ``recipe.local_steps`` AdamW steps at peak ``lr`` can move it, times :data:`CLIP_MARGIN`.
    AdamW moves each coordinate by at most about ``lr`` a step (Kingma & Ba, 2015, section 2.1,
    with the recipe's betas) plus the decay ``lr * weight_decay * |w|``, so a row of ``H``
    coordinates moves at most ``steps * lr * (sqrt(H) + weight_decay * |row|)``. Biases move only
    when the recipe trains them (``train_bias``); otherwise their bound is 0. Both sides compute
    it from the round's routers: the coordinator to clip a plain reply, an owner to clip what it
    puts into a secure sum."""
    steps, lr, wd = recipe.local_steps, recipe.lr, recipe.weight_decay
    out = {}
    for name, t in start.items():
        t = t.float()
        if t.dim() == 2:
            out[name] = CLIP_MARGIN * steps * lr * (t.shape[1] ** 0.5 + wd * t.norm(dim=1))
        elif recipe.train_bias:
            out[name] = CLIP_MARGIN * steps * lr * (1 + wd * t.abs())
        else:
            out[name] = torch.zeros_like(t)
    return out


def clip_rows(change: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``change`` (float64, one row per expert) with each row scaled down to L2 norm ``bound[row]``
    where it is longer; shorter rows are left exactly as they are."""
    norms = change.reshape(change.shape[0], -1).norm(dim=1)
    bound = bound.double()
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
    return change * scale.view(-1, *([1] * (change.dim() - 1)))


def clipped_change(
    rows: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], recipe: RouterTuningRecipe
) -> dict[str, torch.Tensor]:
    """An owner's contribution to a secure sum: its routers after the round minus the round's
    ``start``, each row clipped to :func:`change_bounds` (float32, like a plain reply's change
    once the coordinator has clipped it). Clipping here is what bounds each owner's share of the
    sum: the coordinator never sees the change on its own."""
    bounds = change_bounds(start, recipe)
    return {name: clip_rows(rows[name].double() - s0.double(), bounds[name]).float() for name, s0 in start.items()}


def _kept_expert(s: OwnerSettings, spec: FederationSpec, public, cache: Path, owner: str, sha: str, sent):
    """``owner``'s expert for a router round: ``sent`` (tensors, metadata), checked against its
    announced hash and kept, or else the copy kept from an earlier round; checked in full either way."""
    path = cache / f"{sha}.safetensors"
    if sent is not None:
        tensors, metadata = sent
        got = content_sha256(tensors, metadata)
        if got != sha:
            raise ArtifactError(
                owner,
                "sha256 of the expert sent for router tuning",
                sha,
                got,
                hint="the coordinator announced another expert than it sent",
            )
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    elif not path.is_file():
        raise ValueError(
            f"owner {s.owner!r}: the expert of {owner!r} (sha256 {sha[:16]}...) is not in "
            f"{cache}; the coordinator must send it again"
        )
    artifact = ExpertArtifact.load(path, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    if sent is None and content_sha256(artifact.tensors, artifact.metadata) != sha:  # changed on disk
        path.unlink()
        raise ValueError(
            f"owner {s.owner!r}: the kept expert of {owner!r} no longer hashes to {sha[:16]}...; "
            "removed, the coordinator must send it again"
        )
    artifact.validate(public, fingerprint=spec.fingerprint, spec_sha256=spec.sha256)
    if artifact.owner != owner:
        raise ArtifactError(owner, "owner of the expert sent for router tuning", owner, artifact.owner)
    return artifact
