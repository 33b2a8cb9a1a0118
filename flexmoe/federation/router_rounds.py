"""The coordinator's side of federated router tuning (``RouterTuningRecipe.data="owners"``).

Each round, every accepted owner still connected trains the merged model's routers on its own
text (message ``train.router``; the owner's side is
:func:`flexmoe.federation.task.tune_router_round`) while the coordinator does the same on the
public data. An owner speaks only for its own expert: its reply may change its own router row and
bias and the public expert's row ``r_0``, nothing else (:func:`owner_change` refuses it
otherwise), and each change is clipped to what the recipe's local steps can honestly move a row
(:func:`change_bounds`). The round's routers are :func:`robust_aggregate` of the changes: per row,
the coordinate-wise median over the participants allowed to change it, scaled as
``start + server_lr * mean(change)`` over the participants would be (each row's median equals that
mean when at most two participants change the row, so only ``r_0`` is aggregated differently).
Replies are checked like artifacts, before a byte is copied; an owner that fails or sends a bad
reply sits the round out, and after two such rounds in a row is left out of the rest.

With run config ``secure-aggregation`` the owners keep their changes, clipped on their own
machines, and the coordinator learns only their sum (:mod:`flexmoe.federation.secure_sum`, Flower's
SecAgg+): :func:`clip_sum` bounds the sum row by row and :func:`secure_aggregate` takes the mean
where :func:`robust_aggregate` takes the median; nothing is checked or clipped per owner.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import save_file

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import content_sha256
from flexmoe.core.io import atomic_file
from flexmoe.core.surgery import settings as moe_settings
from flexmoe.data.packing import pack_documents
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    ROUND,
    ROUTER_MESSAGE,
    ROUTERS,
    SPEC,
    ReplyError,
    arrays_to_tensors,
    check_records,
    read_artifact_file,
    round_metrics,
    tensors_to_arrays,
)
from flexmoe.federation.report import say
from flexmoe.federation.secure_sum import SCOPES, SecureSum, secure_sum
from flexmoe.federation.task import CLIP_MARGIN, ROUTER_DOCUMENTS, change_bounds, clip_rows
from flexmoe.training.router_tuning import check_router_rows, local_router_round, router_rows, set_router_rows

if TYPE_CHECKING:  # the coordinator calls in here; only the type is needed
    from flexmoe.federation.coordinator import Coordinator

# Rounds in a row an owner may fail before it is left out of the rest.
STRIKES = 2


def tune_router_with_owners(c: Coordinator, model, owners: list[str], tokenizer) -> dict:
    """Run the spec's rounds on ``model`` (changed in place) with the accepted ``owners`` (in
    expert order) that are connected in this run, and return the summary for the report."""
    recipe = c.spec.router_tuning
    public_rows = pack_documents(c.public_docs, tokenizer, recipe.seq_len, ROUTER_DOCUMENTS)
    files = {o: read_artifact_file(c.artifacts_dir / f"{o}.safetensors") for o in owners}  # read once
    hashes = {o: content_sha256(*files[o]) for o in owners}
    node_of = {name: node for node, name in c.nodes.items() if name}
    row_of = {o: moe_settings(model).owners.index(o) for o in owners}  # expert j's router row is row j
    active = [o for o in owners if o in node_of]
    for o in sorted(set(owners) - set(active)):
        c.note(f"router tuning: owner {o!r} is not connected in this run; its data is not used")
    has_experts = dict.fromkeys(owners, False)
    strikes = dict.fromkeys(owners, 0)
    scope = c.s.secure_aggregation if c.s.secure_aggregation in SCOPES else ""
    kept = c.out / "router-rounds"
    rounds = []
    for r in range(recipe.rounds):
        t = time.monotonic()
        start = router_rows(model)
        bounds = change_bounds(start, recipe)
        lacking = [o for o in active if not has_experts[o]]
        sent = _send_round(c, r, start, files, hashes, lacking, active, node_of, scope)
        public = local_router_round(model, public_rows, recipe, r, seed=c.s.seed)  # meanwhile, the public share
        public_rows_after, losses = router_rows(model), {"public": public["loss_last"]}
        set_router_rows(model, start)
        replies = _replies(c, sent)
        changes = {}  # expert row -> its owner's clipped change (plain rounds); None when kept for the secure sum
        for owner in sorted(replies):  # a fixed order: the aggregate does not depend on who answered first
            reply = replies[owner]
            problem = reply if isinstance(reply, str) else None
            if problem is None:
                try:
                    if scope:
                        change, metrics = None, _read_secure_reply(reply, node_of[owner], owner)
                    else:
                        change, metrics = _read_reply(reply, node_of[owner], model, start, bounds, row_of[owner], owner)
                except Exception as e:  # whatever a reply holds, its owner sits the round out
                    problem = f"bad reply: {e}" if isinstance(e, (ArtifactError, ReplyError)) else f"bad reply: {e!r}"
            if problem is not None:
                has_experts[owner] = False  # resend the experts next time, in case it lost them
                strikes[owner] += 1
                c.note(f"router tuning round {r}: owner {owner!r} sat out ({problem})")
                continue
            strikes[owner] = 0
            has_experts[owner] = True
            changes[row_of[owner]] = change
            losses[owner] = float(metrics.get("loss-last", float("nan")))
        secure = None
        if scope and len(changes) >= 2:
            ready = [o for o in sorted(replies) if o in losses]
            secure, problem = _secure_round(c, r, start, bounds, [node_of[o] for o in ready])
            if secure is None:
                c.note(f"router tuning stopped at round {r}: {problem}")
                break
            for o in ready:
                if node_of[o] not in secure.contributors:  # answered train.router, then left the protocol
                    strikes[o] += 1
                    del changes[row_of[o]], losses[o]
                    c.note(f"router tuning round {r}: owner {o!r} sat out (it left the secure sum)")
        dropped = [o for o in active if strikes[o] >= STRIKES]
        for o in dropped:
            c.note(f"router tuning: owner {o!r} failed {STRIKES} rounds in a row; left out of the rest")
        active = [o for o in active if o not in dropped]
        if not changes:
            c.note(
                f"router tuning stopped at round {r}: no owner returned routers, and tuning on "
                "public data alone would teach it to send everything to the public expert"
            )
            break
        if scope and secure is None:
            c.note(
                f"router tuning stopped at round {r}: only owner {next(iter(losses.keys() - {'public'}))!r} took "
                "part, and a secure sum over one owner is that owner's change"
            )
            break
        entry = {"round": r, "owners": sorted(set(losses) - {"public"}), "loss_last": losses}
        if secure is None:
            set_router_rows(model, robust_aggregate(start, public_rows_after, changes, server_lr=recipe.server_lr))
        else:
            total, clipped = clip_sum(secure, bounds, sorted(changes), scope)
            set_router_rows(model, secure_aggregate(start, public_rows_after, total, len(changes), recipe.server_lr))
            kept.mkdir(parents=True, exist_ok=True)
            with atomic_file(kept / f"round-{r}.safetensors") as tmp:  # all the coordinator saw of the owners
                save_file(secure.total, str(tmp), metadata={"owners": ",".join(entry["owners"]), "round": str(r)})
            entry["secure"] = {
                "scope": scope,
                "clipping_range": secure.clipping_range,
                "error_bound": secure.error_bound,
                "clipped_rows": clipped,
                "seconds": secure.seconds,
            }
        entry["seconds"] = time.monotonic() - t
        rounds.append(entry)
        say(
            f"router tuning round {r + 1}/{recipe.rounds}: {len(changes)} owner(s) + public"
            + (f", secure sum {secure.seconds:.1f} s" if secure else "")
            + f", {time.monotonic() - t:.1f} s"
        )
    return {
        "rounds": rounds,
        "local_steps": recipe.local_steps,
        "steps": len(rounds) * recipe.local_steps,
        "clip_margin": CLIP_MARGIN,
        "secure_aggregation": scope or "off",
    }


def _read_secure_reply(reply, node: int, owner: str) -> dict:
    """An owner's reply to a secure round: from its node, its ``metrics`` record only (its change
    goes into the secure sum, never into this reply); returns the metrics."""
    if reply.metadata.src_node_id != node:
        raise ReplyError(owner, "sender", f"SuperNode {node}", reply.metadata.src_node_id)
    check_records(reply.content, owner, required={METRICS: MetricRecord})
    return round_metrics(reply.content[METRICS], owner)


def _secure_round(c: Coordinator, r: int, start, bounds, nodes: list[int]):
    """The secure sum of round ``r`` over the owners' ``nodes`` (:func:`~flexmoe.federation.secure_sum.secure_sum`),
    with SecAgg+'s clipping range at the round's largest row bound (no honest coordinate is
    clipped). Returns ``(SecureSum, None)``, or ``(None, why)`` when it could not finish: too few
    owners left to unmask, or a reply the workflow could not read (SecAgg+ does not say whose)."""
    shapes = {name: tuple(t.shape) for name, t in start.items()}
    clipping_range = max(float(b.max()) for b in bounds.values())
    try:
        result = secure_sum(
            c.grid,
            c.run_id,
            nodes,
            r,
            shapes,
            clipping_range=clipping_range,
            timeout=c.s.train_timeout,
        )
    except Exception as e:  # a malformed protocol reply from any owner: the round cannot be summed
        return None, f"the secure sum failed ({type(e).__name__}: {e})"
    if result is None:
        return None, "the secure sum halted: too few owners stayed in the protocol to unmask it"
    return result, None


def clip_sum(secure: SecureSum, bounds: dict[str, torch.Tensor], rows: list[int], scope: str):
    """The secure sum with each row clipped to the most the contributors' honest, clipped changes
    can add up to (plus SecAgg+'s quantization error): with ``own-rows``, owner ``j``'s bound on
    row ``j`` (0 on the row of an owner not in the sum) and every contributor's on ``r_0``; with
    ``all-rows``, every contributor's on every row. This bounds what all owners together move a
    row, whatever one of them sent; it cannot say who sent what. Returns ``(sum, rows clipped)``."""
    n, out, clipped = len(secure.contributors), {}, 0
    for name, total in secure.total.items():
        b = bounds[name].double()
        if scope == "all-rows":
            allowed = n * b
        else:
            allowed = torch.zeros_like(b)
            allowed[rows] = b[rows]
            if total.dim() == 2:
                allowed[0] = n * b[0]
        width = total[0].numel()
        allowed = allowed + secure.error_bound * width**0.5  # a row of quantization errors
        norms = total.reshape(total.shape[0], -1).norm(dim=1)
        clipped += int((norms > allowed).sum())
        out[name] = clip_rows(total, allowed)
    return out, clipped


def secure_aggregate(
    start: dict[str, torch.Tensor],
    public: dict[str, torch.Tensor],
    total: dict[str, torch.Tensor],
    owners: int,
    server_lr: float | None = None,
) -> dict[str, torch.Tensor]:
    """One secure round's routers: ``start + server_lr * (public change + total) / participants``,
    the participants being the public data and the ``owners`` in ``total`` (the secure sum of
    their changes); ``server_lr`` defaults to the number of participants. On every row only owner
    ``j`` and the public data change (own rows) this is exactly :func:`robust_aggregate`; on ``r_0``
    it is the mean where plain rounds take the coordinate-wise median."""
    participants = 1 + owners
    lr = participants if server_lr is None else server_lr
    out = {}
    for name, s0 in start.items():
        s0 = s0.double()
        change = public[name].double() - s0 + total[name].double()
        out[name] = (s0 + lr / participants * change).float()
    return out


def _read_reply(reply, node: int, model, start, bounds, row: int, owner: str):
    """An owner's reply to a round, checked before use: from its node, the ``routers`` (declared
    layout first, then values) and ``metrics`` records only; returns its clipped change
    (:func:`owner_change`) and its metrics."""
    if reply.metadata.src_node_id != node:
        raise ReplyError(owner, "sender", f"SuperNode {node}", reply.metadata.src_node_id)
    content = reply.content
    check_records(content, owner, required={ROUTERS: ArrayRecord}, optional={METRICS: MetricRecord})
    metrics = round_metrics(content[METRICS], owner) if METRICS in content else {}
    rows = arrays_to_tensors(content[ROUTERS], owner, {k: tuple(v.shape) for k, v in start.items()})
    check_router_rows(rows, model, owner)
    return owner_change(start, rows, row, owner, bounds), metrics


def owner_change(
    start: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], row: int, owner: str, bounds: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The change ``owner`` (expert ``row``) made to the routers, refused (an
    :class:`ArtifactError`) if it changed another owner's row or any bias but its own, and each
    changed row clipped to its norm bound (``bounds``, :func:`change_bounds`)."""
    out = {}
    for name, s0 in start.items():
        change = rows[name].double() - s0.double()  # float64: 3e38 - (-3e38) and its norm stay finite
        allowed = torch.zeros(s0.shape[0], dtype=torch.bool)
        allowed[row] = True
        if s0.dim() == 2:
            allowed[0] = True  # r_0: every owner's text says "not the public expert here"
        moved = change.reshape(s0.shape[0], -1).ne(0).any(dim=1)
        if (moved & ~allowed).any():
            where = [int(i) for i in (moved & ~allowed).nonzero().flatten()[:8]]
            raise ArtifactError(
                owner,
                f"rows of {name}",
                f"changes only to rows {sorted(int(i) for i in allowed.nonzero().flatten())} (its own and r_0)",
                f"changes to rows {where}",
                hint="an owner may change only its own router row and bias, and the public expert's row",
            )
        out[name] = clip_rows(change, bounds[name]).float()
    return out


def robust_aggregate(
    start: dict[str, torch.Tensor],
    public: dict[str, torch.Tensor],
    changes: dict[int, dict[str, torch.Tensor]],
    *,
    server_lr: float | None = None,
) -> dict[str, torch.Tensor]:
    """One round's routers from the coordinator's own ``public`` routers and the owners'
    ``changes`` (expert row -> :func:`owner_change`'s). Row ``j`` of each tensor has as sources the
    public participant and every owner allowed to change it (owner ``j``; every owner for the
    weight row 0); it becomes ``start_j + server_lr * (sources / participants) * median_j``, where
    ``median_j`` is the coordinate-wise median of the sources' changes (the mean of the middle two
    for an even count) and ``server_lr`` defaults to the number of participants. With at most
    two sources the median is their mean, and this is ``start + server_lr * mean(change)`` over the
    participants (:func:`~flexmoe.training.router_tuning.aggregate_router_rows`); on ``r_0``, which
    every owner may move, fewer than half the sources cannot move any coordinate of it outside the
    range of the others'."""
    participants = 1 + len(changes)
    lr = participants if server_lr is None else server_lr
    out = {}
    for name, s0 in start.items():
        s0 = s0.float()
        mine = public[name].float() - s0
        new = s0.clone()
        for j in range(s0.shape[0]):
            sources = [mine[j]]
            if j == 0 and s0.dim() == 2:
                sources += [changes[k][name][0] for k in sorted(changes)]
            elif j in changes:
                sources.append(changes[j][name][j])
            ordered = torch.stack(sources).sort(dim=0).values
            n = len(sources)
            median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            new[j] = s0[j] + lr * n / participants * median
        out[name] = new
    return out


def _send_round(c: Coordinator, r: int, start, files, hashes, lacking, active, node_of, scope: str = "") -> dict:
    """Push round ``r`` to every ``active`` owner, with the experts (``files``: owner -> tensors,
    metadata) to those ``lacking`` them; ``scope`` (``own-rows``, ``all-rows``) asks each owner to
    keep its change for the secure sum instead of sending it. Returns message id -> owner."""
    owners = list(files)
    base = {
        SPEC: ConfigRecord({"json": c.spec.to_json(), "sha256": c.spec.sha256}),
        ROUND: ConfigRecord(
            {
                "round": r,
                "owners": ",".join(owners),
                "sha256": ",".join(hashes[o] for o in owners),
                "seed": c.s.seed,
                "secure": scope,
            }
        ),
        ROUTERS: tensors_to_arrays(start),
    }
    experts = {}
    if lacking:  # converted once, shared by every message that carries them
        experts = {o: (tensors_to_arrays(t), ConfigRecord(dict(m))) for o, (t, m) in files.items()}
    messages = []
    for owner in active:
        content = RecordDict(dict(base))
        if owner in lacking:
            for o, (arrays, manifest) in experts.items():
                content[f"{EXPERT}:{o}"], content[f"{MANIFEST}:{o}"] = arrays, manifest
        messages.append(c.message(content, node_of[owner], ROUTER_MESSAGE))
    return dict(zip(c.grid.push_messages(messages), active))


def _replies(c: Coordinator, sent: dict) -> dict:
    """Each owner's reply to a router round (or why there is none) within train-timeout."""
    out, deadline = {}, time.monotonic() + c.s.train_timeout
    pending = dict(sent)
    while pending and time.monotonic() < deadline:
        replies = list(c.grid.pull_messages(list(pending)))
        for reply in replies:
            owner = pending.pop(reply.metadata.reply_to_message_id, None)
            if owner is not None:
                out[owner] = f"its round failed: {reply.error.reason}" if reply.has_error() else reply
        if not replies:
            time.sleep(c.s.poll_interval)
    for owner in pending.values():
        out[owner] = f"no reply within train-timeout={c.s.train_timeout:g} s"
    return out
