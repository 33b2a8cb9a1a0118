"""The coordinator's side of federated router tuning (``RouterTuningRecipe.data="owners"``).

Each round, every accepted owner still connected trains the merged model's routers on its own
text (message ``train.router``; the owner's side is
:func:`flexmoe.federation.task.tune_router_round`) while the coordinator does the same on the
public data; the round's routers are ``start + server_lr * mean(change)`` over the participants
(:func:`~flexmoe.training.router_tuning.aggregate_router_rows`). Replies are checked like
artifacts; an owner that fails or sends bad routers sits the round out, and after two such rounds
in a row is left out of the rest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, RecordDict

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import content_sha256
from flexmoe.data.packing import pack_documents
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    ROUND,
    ROUTER_MESSAGE,
    ROUTERS,
    SPEC,
    arrays_to_tensors,
    read_artifact_file,
    tensors_to_arrays,
)
from flexmoe.federation.report import say
from flexmoe.federation.task import ROUTER_DOCUMENTS
from flexmoe.training.router_tuning import (
    aggregate_router_rows,
    check_router_rows,
    local_router_round,
    router_rows,
    set_router_rows,
)

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
    active = [o for o in owners if o in node_of]
    for o in sorted(set(owners) - set(active)):
        c.notes.append(f"router tuning: owner {o!r} is not connected in this run; its data is not used")
    has_experts = dict.fromkeys(owners, False)
    strikes = dict.fromkeys(owners, 0)
    rounds = []
    for r in range(recipe.rounds):
        t = time.monotonic()
        start = router_rows(model)
        sent = _send_round(c, r, start, files, hashes, [o for o in active if not has_experts[o]], active, node_of)
        public = local_router_round(model, public_rows, recipe, r, seed=c.s.seed)  # meanwhile, the public share
        updates, losses = [router_rows(model)], {"public": public["loss_last"]}
        set_router_rows(model, start)
        replies = _replies(c, sent)
        for owner in sorted(replies):  # a fixed order: the average does not depend on who answered first
            reply = replies[owner]
            problem = reply if isinstance(reply, str) else None
            if problem is None:
                try:
                    rows = arrays_to_tensors(reply.content.array_records[ROUTERS], owner)
                    check_router_rows(rows, model, owner)
                except (ArtifactError, KeyError, TypeError, ValueError) as e:
                    problem = f"bad routers: {e}"
            if problem is not None:
                has_experts[owner] = False  # resend the experts next time, in case it lost them
                strikes[owner] += 1
                c.notes.append(f"router tuning round {r}: owner {owner!r} sat out ({problem})")
                continue
            strikes[owner] = 0
            has_experts[owner] = True
            updates.append(rows)
            metrics = dict(reply.content.metric_records.get(METRICS, {}))
            losses[owner] = float(metrics.get("loss-last", float("nan")))
        dropped = [o for o in active if strikes[o] >= STRIKES]
        for o in dropped:
            c.notes.append(f"router tuning: owner {o!r} failed {STRIKES} rounds in a row; left out of the rest")
        active = [o for o in active if o not in dropped]
        if len(updates) == 1:
            c.notes.append(
                f"router tuning stopped at round {r}: no owner returned routers, and tuning on "
                "public data alone would teach it to send everything to the public expert"
            )
            break
        set_router_rows(model, aggregate_router_rows(start, updates, server_lr=recipe.server_lr))
        rounds.append(
            {
                "round": r,
                "owners": sorted(set(losses) - {"public"}),
                "loss_last": losses,
                "seconds": time.monotonic() - t,
            }
        )
        say(
            f"router tuning round {r + 1}/{recipe.rounds}: {len(updates) - 1} owner(s) + public, "
            f"{time.monotonic() - t:.1f} s"
        )
    return {"rounds": rounds, "local_steps": recipe.local_steps, "steps": len(rounds) * recipe.local_steps}


def _send_round(c: Coordinator, r: int, start, files, hashes, lacking, active, node_of) -> dict:
    """Push round ``r`` to every ``active`` owner, with the experts (``files``: owner -> tensors,
    metadata) to those ``lacking`` them; returns message id -> owner."""
    owners = list(files)
    base = {
        SPEC: ConfigRecord({"json": c.spec.to_json(), "sha256": c.spec.sha256}),
        ROUND: ConfigRecord(
            {
                "round": r,
                "owners": ",".join(owners),
                "sha256": ",".join(hashes[o] for o in owners),
                "seed": c.s.seed,
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
