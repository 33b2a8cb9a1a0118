"""The coordinator's work inside the ServerApp: collect, validate, keep, merge, tune, export, report.

FlexOlmo steps 3-5 (DESIGN.md): every owner's reply is rebuilt into an artifact file and put
through all of :class:`~flexmoe.ExpertArtifact`'s checks (layout, identity against the spec's
fingerprint and sha256, shapes against the public model, finite values, the owner's own name);
a bad reply is rejected with its reason and the rest go on. Each accepted artifact is written to
``out-dir/artifacts/`` the moment it is accepted, atomically, with what else the owner sent in
``out-dir/received/``; so a coordinator that dies mid-run loses no accepted work, and a rerun
with ``resume=true`` asks only the owners still missing. Owners are keyed by their node-config
name, never by Flower's random node id.

Files in ``out-dir``::

    artifacts/<owner>.safetensors   accepted experts (the merge's inputs)
    received/<owner>.json           each accepted owner's manifest, metrics and proxy selection
    progress.json                   the live state: pid, run id, phase, each owner's status
    model/                          the merged model (FlexOlmo / Mixtral / native export)
    report.json, report.md          who was accepted or rejected and why, tokens, losses, routing
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import content_sha256, file_sha256
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    OWNER,
    PROXY,
    QUERY_MESSAGE,
    REPLY_RECORDS,
    ROUND,
    ROUTER_MESSAGE,
    ROUTERS,
    SPEC,
    TRAIN,
    TRAIN_MESSAGE,
    arrays_to_tensors,
    manifest_to_metadata,
    read_artifact_file,
    record_bytes,
    record_to_proxy,
    tensors_to_arrays,
)
from flexmoe.federation.report import write_report
from flexmoe.federation.settings import CoordinatorSettings
from flexmoe.spec import FederationSpec

# Owner statuses. Unresolved: waiting (not connected yet), training (spec sent, no reply yet).
WAITING, TRAINING = "waiting", "training"
ACCEPTED, REJECTED, FAILED, MISSING = "accepted", "rejected", "failed", "missing"


@dataclass
class OwnerState:
    """What the coordinator knows about one expected owner."""

    name: str
    status: str = WAITING
    reason: str | None = None
    node_id: int | None = None
    resumed: bool = False
    seconds_to_reply: float | None = None
    upload_bytes: int | None = None
    training_tokens: int | None = None
    metrics: dict = field(default_factory=dict)
    proxy: dict | None = None
    artifact: str | None = None
    artifact_sha256: str | None = None
    sent_at: float | None = field(default=None, repr=False)


_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress for ``flwr log`` (the ServerApp's output is the run's log)."""
    print(f"flexmoe coordinator [{time.monotonic() - _T0:7.1f} s]: {msg}", flush=True)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Coordinator:
    """One federation run. ``grid`` is Flower's; :meth:`run` does everything."""

    def __init__(self, grid, settings: CoordinatorSettings, run_id: int = 0):
        self.grid, self.s, self.run_id = grid, settings, run_id
        self.out = Path(settings.out_dir)
        self.artifacts_dir, self.received_dir = self.out / "artifacts", self.out / "received"
        self.spec = FederationSpec.load(settings.spec)
        self.public_path = settings.public_model or self.spec.public_model
        self.owners = {name: OwnerState(name) for name in settings.expected_owners}
        self.nodes: dict[int, str | None] = {}  # node id -> owner name (None until it says)
        self.pending: dict[str, tuple[str, int]] = {}  # message id -> ("query" | "train", node id)
        self.earlier: list[Path] = []
        self.connect_deadline = 0.0
        self.notes: list[str] = []
        self.phase = "starting"
        self.summary: dict = {}
        self.started = time.monotonic()
        self.public = None
        self.public_docs: list[str] | None = None

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.start()
            self.query_new_nodes()  # their ClientApps start up while the public model loads
            self.prepare()
            self.collect()
            accepted = [o for o in self.owners.values() if o.status == ACCEPTED]
            if len(accepted) < self.s.required:
                raise RuntimeError(
                    f"only {len(accepted)} of the expected owners' experts were accepted, fewer than the quorum of "
                    f"{self.s.required}; see {self.out / 'report.md'} for why each owner is missing"
                )
            self.merge([o.name for o in accepted])
        except BaseException as e:
            self.summary["error"] = f"{type(e).__name__}: {e}"
            self.finish("failed")
            raise
        return self.finish("merged")

    def start(self) -> None:
        """Refuse to mix with an earlier run's results unless resuming."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.phase = "preparing"
        self.progress()
        if self.s.router_tuning is None and self.spec.router_tuning.enabled and not self.s.public_data:
            raise ValueError(
                "the spec enables router tuning, which needs the public data: set run config "
                "'public-data', or 'router-tuning=false'"
            )
        self.earlier = sorted(self.artifacts_dir.glob("*.safetensors"))
        if not self.s.resume and (self.earlier or (self.out / "model").exists()):
            raise FileExistsError(
                f"{self.out} holds the results of an earlier run; set run config 'resume=true' to keep its accepted "
                "experts and train only the missing owners, or choose another 'out-dir'"
            )
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.received_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.artifacts_dir / ".incoming").glob("*.safetensors"):
            stale.unlink()  # replies a dead coordinator was still checking: their owners are asked again
        self.connect_deadline = time.monotonic() + self.s.connect_timeout

    def prepare(self) -> None:
        """Check the spec against the coordinator's public model; keep valid earlier artifacts."""
        from flexmoe.core.hashing import fingerprint
        from flexmoe.formats.load import load_public_model

        self.public = load_public_model(self.public_path).eval()
        fp = fingerprint(self.public)
        if fp != self.spec.fingerprint:
            raise ValueError(
                f"the coordinator's public model {self.public_path} has fingerprint {fp[:16]}..., but the spec "
                f"{self.s.spec} says {self.spec.fingerprint[:16]}...; set run config 'public-model' to the published model"
            )
        if self.s.public_data:
            from flexmoe.data.documents import read_documents

            self.public_docs = read_documents(self.s.public_data)
        for path in self.earlier:
            owner = path.name.removesuffix(".safetensors")
            if owner not in self.owners:
                self.notes.append(f"{path.name} is from an owner not in expected-owners; left out")
                continue
            try:
                self.check_artifact(path, owner)
            except ArtifactError as e:
                path.rename(path.with_name(path.name + ".invalid"))
                self.notes.append(f"kept artifact of {owner!r} failed its checks ({e}); asking {owner!r} again")
                continue
            state = self.owners[owner]
            received = self.received_dir / f"{owner}.json"
            if received.is_file():
                for k, v in json.loads(received.read_text()).items():
                    if k in ("metrics", "proxy", "upload_bytes", "training_tokens", "node_id", "seconds_to_reply"):
                        setattr(state, k, v)
            state.status, state.resumed = ACCEPTED, True
            state.artifact, state.artifact_sha256 = str(path), file_sha256(path)
            say(f"resume: keeping the accepted expert of {owner!r} ({path})")

    # -- collecting the experts -------------------------------------------------------------------
    def collect(self) -> None:
        """Query every SuperNode that connects, send the spec to the expected owners not yet
        accepted, and take their replies as they come, until each owner is resolved."""
        self.phase = "collecting"
        self.progress()
        while any(o.status in (WAITING, TRAINING) for o in self.owners.values()):
            self.query_new_nodes()
            replies = list(self.grid.pull_messages(list(self.pending))) if self.pending else []
            for reply in replies:
                kind, node = self.pending.pop(reply.metadata.reply_to_message_id, (None, None))
                if kind == "query":
                    self.on_query(reply, node)
                elif kind == "train":
                    self.on_train(reply, node)
            now = time.monotonic()
            for o in self.owners.values():
                if o.status == TRAINING and now - o.sent_at > self.s.train_timeout:
                    self.resolve(o, FAILED, f"no reply within train-timeout={self.s.train_timeout:g} s")
                    self.pending = {m: v for m, v in self.pending.items() if v[1] != o.node_id}
                elif o.status == WAITING and now > self.connect_deadline:
                    self.resolve(o, MISSING, f"did not connect within connect-timeout={self.s.connect_timeout:g} s")
            if not replies:
                time.sleep(self.s.poll_interval)

    def query_new_nodes(self) -> None:
        """Ask each newly connected SuperNode which owner it is (while any owner is awaited)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.nodes]
        if not new or not any(o.status == WAITING for o in self.owners.values()):
            return
        messages = [self._message(RecordDict({OWNER: ConfigRecord({"want": "name"})}), n, QUERY_MESSAGE) for n in new]
        for n, mid in zip(new, self.grid.push_messages(messages)):
            self.nodes[n] = None
            self.pending[mid] = ("query", n)

    def _message(self, content: RecordDict, node: int, kind: str) -> Message:
        ttl = self.s.train_timeout + self.s.connect_timeout + 60
        return Message(content, node, kind, group_id=f"flexmoe-{self.spec.sha256[:12]}", ttl=ttl)

    def on_query(self, reply: Message, node: int) -> None:
        """A SuperNode said who it is: send the spec if it is an owner still to train."""
        if reply.has_error():
            self.notes.append(f"SuperNode {node} did not say which owner it is: {reply.error.reason}")
            return
        name = str(reply.content.config_records[OWNER]["name"])
        self.nodes[node] = name
        state = self.owners.get(name)
        if state is None:
            self.notes.append(f"SuperNode {node} is owner {name!r}, who is not in expected-owners; ignored")
            return
        if state.status != WAITING:
            why = "its expert is already accepted" if state.status == ACCEPTED else f"it is {state.status}"
            self.notes.append(f"SuperNode {node} is owner {name!r} again; not asked to train ({why})")
            return
        content = RecordDict(
            {
                SPEC: ConfigRecord({"json": self.spec.to_json(), "sha256": self.spec.sha256}),
                TRAIN: ConfigRecord({"seed": self.s.seed}),
            }
        )
        [mid] = list(self.grid.push_messages([self._message(content, node, TRAIN_MESSAGE)]))
        self.pending[mid] = ("train", node)
        state.status, state.node_id, state.sent_at = TRAINING, node, time.monotonic()
        say(f"owner {name!r} connected (SuperNode {node}); spec sent, training")
        self.progress()

    def on_train(self, reply: Message, node: int) -> None:
        state = self.owners[self.nodes[node]]
        if state.status != TRAINING:
            return
        state.seconds_to_reply = time.monotonic() - state.sent_at
        if reply.has_error():
            self.resolve(state, FAILED, f"the owner's training failed or it went away: {reply.error.reason}")
            return
        try:
            self.accept(state, reply.content)
        except (ArtifactError, KeyError, TypeError, ValueError) as e:
            self.resolve(state, REJECTED, str(e) or type(e).__name__)

    def accept(self, state: OwnerState, content: RecordDict) -> None:
        """Validate a reply as an artifact file; keep it (atomically) only if every check passes."""
        from safetensors.torch import save_file

        owner = state.name
        extra = sorted(set(content.keys()) - REPLY_RECORDS)
        if extra:
            raise ArtifactError(
                owner,
                "reply records",
                sorted(REPLY_RECORDS),
                f"also {extra}",
                hint="an owner sends its expert, manifest, metrics and proxy ids, nothing else",
            )
        if EXPERT not in content.array_records or MANIFEST not in content.config_records:
            raise ArtifactError(
                owner, "reply records", "an 'expert' ArrayRecord and a 'manifest' ConfigRecord", sorted(content.keys())
            )
        tensors = arrays_to_tensors(content.array_records[EXPERT], owner)
        metadata = manifest_to_metadata(content.config_records[MANIFEST], owner)
        incoming = self.artifacts_dir / ".incoming"
        incoming.mkdir(exist_ok=True)
        staged = incoming / f"{owner}.safetensors"
        save_file(tensors, str(staged), metadata=metadata)
        try:
            artifact = self.check_artifact(staged, owner)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
        proxy = None
        if PROXY in content.config_records:
            selection = record_to_proxy(content.config_records[PROXY])
            if self.public_docs is not None and selection.num_public != len(self.public_docs):
                self.notes.append(
                    f"{owner!r}'s proxy selection indexes {selection.num_public} public documents, the "
                    f"coordinator's public data has {len(self.public_docs)}; proxy set not used"
                )
            else:
                proxy = selection.to_dict()
        final = self.artifacts_dir / f"{owner}.safetensors"
        state.metrics, state.proxy = metrics, proxy
        state.training_tokens = artifact.training_tokens
        state.upload_bytes = record_bytes(*content.values())
        _write_json(
            self.received_dir / f"{owner}.json",
            {
                "metadata": metadata,
                "metrics": metrics,
                "proxy": proxy,
                "upload_bytes": state.upload_bytes,
                "training_tokens": state.training_tokens,
                "node_id": state.node_id,
                "seconds_to_reply": state.seconds_to_reply,
            },
        )
        os.replace(staged, final)  # the artifact's presence is what marks the owner accepted
        state.artifact, state.artifact_sha256 = str(final), file_sha256(final)
        self.resolve(state, ACCEPTED, None)

    def check_artifact(self, path: Path, owner: str) -> ExpertArtifact:
        """Every ExpertArtifact check, plus: the artifact is the sending owner's own."""
        artifact = ExpertArtifact.load(path, fingerprint=self.spec.fingerprint, spec_sha256=self.spec.sha256)
        artifact.validate(self.public, fingerprint=self.spec.fingerprint, spec_sha256=self.spec.sha256)
        if artifact.owner != owner:
            raise ArtifactError(owner, "owner", owner, artifact.owner, hint="an owner may only send its own expert")
        return artifact

    def resolve(self, state: OwnerState, status: str, reason: str | None) -> None:
        state.status, state.reason = status, reason
        say(f"owner {state.name!r}: {status}" + (f" ({reason})" if reason else ""))
        self.progress()

    # -- merging ------------------------------------------------------------------------------
    def merge(self, owners: list[str]):
        """FlexOlmo steps 3-4: assemble ``[public, e_1 ... e_n]`` (expected-owners order), set the
        routers by the spec's routing recipe, optionally tune them, and export. Returns the model."""
        import flexmoe
        from flexmoe.core.surgery import settings as moe_settings
        from flexmoe.formats.export import target_format
        from flexmoe.formats.load import detect_format

        self.phase = "merging"
        self.progress()
        t = time.monotonic()
        artifacts = [
            ExpertArtifact.load(
                self.artifacts_dir / f"{o}.safetensors", fingerprint=self.spec.fingerprint, spec_sha256=self.spec.sha256
            )
            for o in owners
        ]
        model = flexmoe.assemble(self.public, artifacts, top_k=self.s.top_k or None, spec_sha256=self.spec.sha256)
        self.summary["experts"] = list(moe_settings(model).owners)
        target = target_format(model, self.s.export_format)
        tokenizer = None
        if self.public_docs is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.public_path)
        self.summary["routing_recipe"] = self.route(model, artifacts, tokenizer, exportable=target != "native")
        self.summary["merge_seconds"] = time.monotonic() - t
        tune = self.spec.router_tuning.enabled if self.s.router_tuning is None else self.s.router_tuning
        if tune:
            from flexmoe.training.router_tuning import tune_router

            self.phase = "tuning the router"
            self.progress()
            t = time.monotonic()
            if self.spec.router_tuning.data == "owners":
                result = self.tune_router_with_owners(model, owners, tokenizer)
            else:
                proxies = {o: self.proxy_texts(o) for o in owners if self.owners[o].proxy is not None}
                result = tune_router(
                    model,
                    proxy_documents=proxies,
                    public_documents=self.public_docs,
                    tokenizer=tokenizer,
                    recipe=self.spec.router_tuning,
                )
                result["proxy_owners"] = sorted(proxies)
            self.summary["router_tuning"] = {
                **result,
                "data": self.spec.router_tuning.data,
                "seconds": time.monotonic() - t,
            }
        else:
            why = (
                "run config router-tuning=false"
                if self.s.router_tuning is False
                else "spec router_tuning.enabled=false"
            )
            self.summary["router_tuning"] = {"skipped": why}
        if self.public_docs is not None:
            self.summary["routing"] = self.routing_usage(model, tokenizer, owners)
        self.phase = "exporting"
        self.progress()
        t = time.monotonic()
        out = self.out / "model"
        if out.exists() and self.s.resume:
            shutil.rmtree(out)  # our own earlier export, rebuilt from the kept artifacts
        # Routers folded for a transformers format export to it exactly; otherwise "auto" falls back to
        # native unless allow-approximate accepts dropping the router biases (FlexOlmo's merge drops them).
        folded = self.summary["routing_recipe"].get("folded", False)
        requested = self.s.export_format
        fmt = target if requested != "auto" or folded or self.s.allow_approximate else "auto"
        flexmoe.export(model, out, format=fmt, allow_approximate=self.s.allow_approximate, tokenizer=self.public_path)
        self.summary["export"] = {
            "dir": str(out),
            "format": detect_format(out),
            "requested": requested,
            "allow_approximate": self.s.allow_approximate,
            "seconds": time.monotonic() - t,
        }
        say(f"merged {len(owners)} expert(s) -> {out} ({self.summary['export']['format']})")
        return model

    def tune_router_with_owners(self, model, owners: list[str], tokenizer) -> dict:
        """Federated router tuning (``RouterTuningRecipe.data="owners"``): each round, every
        accepted owner still connected trains the routers on its own text (message
        ``train.router``) while the coordinator does the same on the public data; the round's
        routers are ``start + server_lr * mean(change)`` over the participants
        (:func:`~flexmoe.training.router_tuning.aggregate_router_rows`).
        Replies are checked like artifacts; an owner that fails or sends bad routers sits the round
        out, and after two such rounds in a row is left out of the rest. Returns the summary."""
        from flexmoe.data.packing import pack_documents
        from flexmoe.training.router_tuning import (
            aggregate_router_rows,
            check_router_rows,
            local_router_round,
            router_rows,
            set_router_rows,
        )

        recipe = self.spec.router_tuning
        public_rows = pack_documents(self.public_docs, tokenizer, recipe.seq_len, max_documents=2000)
        files = {o: read_artifact_file(self.artifacts_dir / f"{o}.safetensors") for o in owners}  # read once
        hashes = {o: content_sha256(*files[o]) for o in owners}
        node_of = {name: node for node, name in self.nodes.items() if name}
        active = [o for o in owners if o in node_of]
        for o in sorted(set(owners) - set(active)):
            self.notes.append(f"router tuning: owner {o!r} is not connected in this run; its data is not used")
        has_experts = dict.fromkeys(owners, False)
        strikes = dict.fromkeys(owners, 0)
        rounds = []
        for r in range(recipe.rounds):
            t = time.monotonic()
            start = router_rows(model)
            sent = self._send_router_round(r, start, files, hashes, active, has_experts, node_of)
            public = local_router_round(model, public_rows, recipe, r, seed=self.s.seed)  # meanwhile, the public share
            updates, losses = [router_rows(model)], {"public": public["loss_last"]}
            set_router_rows(model, start)
            replies = self._router_replies(sent)
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
                    self.notes.append(f"router tuning round {r}: owner {owner!r} sat out ({problem})")
                    continue
                strikes[owner] = 0
                has_experts[owner] = True
                updates.append(rows)
                metrics = dict(reply.content.metric_records.get(METRICS, {}))
                losses[owner] = float(metrics.get("loss-last", float("nan")))
            dropped = [o for o in active if strikes[o] >= 2]
            for o in dropped:
                self.notes.append(f"router tuning: owner {o!r} failed two rounds in a row; left out of the rest")
            active = [o for o in active if o not in dropped]
            if len(updates) == 1:
                self.notes.append(
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

    def _send_router_round(self, r, start, files, hashes, active, has_experts, node_of) -> dict:
        """Push round ``r`` to every active owner, with the experts (``files``: owner -> tensors,
        metadata) to those that lack them; returns message id -> owner."""
        owners = list(files)
        base = {
            SPEC: ConfigRecord({"json": self.spec.to_json(), "sha256": self.spec.sha256}),
            ROUND: ConfigRecord(
                {
                    "round": r,
                    "owners": ",".join(owners),
                    "sha256": ",".join(hashes[o] for o in owners),
                    "seed": self.s.seed,
                }
            ),
            ROUTERS: tensors_to_arrays(start),
        }
        experts = {}
        messages, names = [], []
        for owner in active:
            content = RecordDict(dict(base))
            if not has_experts[owner]:
                if not experts:
                    experts = {o: (tensors_to_arrays(t), ConfigRecord(dict(m))) for o, (t, m) in files.items()}
                for o, (arrays, manifest) in experts.items():
                    content[f"{EXPERT}:{o}"], content[f"{MANIFEST}:{o}"] = arrays, manifest
            messages.append(self._message(content, node_of[owner], ROUTER_MESSAGE))
            names.append(owner)
        return dict(zip(self.grid.push_messages(messages), names))

    def _router_replies(self, sent: dict) -> dict:
        """Each owner's reply to a router round (or why there is none) within train-timeout."""
        out, deadline = {}, time.monotonic() + self.s.train_timeout
        pending = dict(sent)
        while pending and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages(list(pending)))
            for reply in replies:
                owner = pending.pop(reply.metadata.reply_to_message_id, None)
                if owner is not None:
                    out[owner] = f"its round failed: {reply.error.reason}" if reply.has_error() else reply
            if not replies:
                time.sleep(self.s.poll_interval)
        for owner in pending.values():
            out[owner] = f"no reply within train-timeout={self.s.train_timeout:g} s"
        return out

    def route(self, model, artifacts, tokenizer, *, exportable: bool) -> dict:
        """The spec's routing recipe (docs/routing.md): the discriminant router from the owners'
        shipped statistics and the public data, or FlexOlmo's published merge (router rows stacked)
        when the recipe says so, there is no public data, or an owner shipped no statistics."""
        recipe = self.spec.routing
        if recipe.method == "published":
            return {"method": "published"}
        missing = [a.owner for a in artifacts if a.routing_stats is None]
        if self.public_docs is None or missing:
            why = f"owners {missing} shipped no routing statistics" if missing else "no run config 'public-data'"
            self.notes.append(f"routing recipe {recipe.method!r} not applied ({why}); FlexOlmo's published merge used")
            return {"method": "published", "wanted": recipe.method}
        from flexmoe.data.packing import pack_domain
        from flexmoe.routing import route

        rows = pack_domain(self.public_docs, tokenizer, self.spec.expert.seq_len)
        summary = route(model, artifacts, rows, recipe, exportable=exportable)
        return {**{k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))}, "folded": exportable}

    def proxy_texts(self, owner: str) -> list[str]:
        from flexmoe.owner.proxy import ProxySelection

        return ProxySelection.from_dict(self.owners[owner].proxy).texts(self.public_docs)

    def routing_usage(self, model, tokenizer, owners: list[str]) -> dict:
        """Top-1 routing shares of the merged model on public text and each owner's proxy set."""
        from flexmoe.evaluate import perplexity

        seq_len = self.spec.expert.seq_len
        domains = {"public": self.public_docs}
        domains.update({f"proxy:{o}": self.proxy_texts(o) for o in owners if self.owners[o].proxy is not None})
        usage = {}
        for name, docs in domains.items():
            try:
                r = perplexity(model, {name: docs}, tokenizer, seq_len=seq_len, max_tokens=32 * seq_len)
            except ValueError as e:  # too little text for one row
                self.notes.append(f"routing usage on {name} not measured: {e}")
                continue
            usage[name] = {"perplexity": r["per_domain"][name], "top1_share": r["routing"][name]}
        return usage

    # -- bookkeeping --------------------------------------------------------------------------
    def progress(self) -> None:
        _write_json(
            self.out / "progress.json",
            {
                "pid": os.getpid(),
                "run_id": self.run_id,
                "phase": self.phase,
                "updated": time.time(),
                "owners": {o.name: o.status for o in self.owners.values()},
            },
        )

    def finish(self, status: str) -> dict:
        self.phase = status
        owners = {
            name: {k: v for k, v in asdict(o).items() if k not in ("name", "sent_at")}
            for name, o in self.owners.items()
        }
        report = {
            "status": status,
            "run_id": self.run_id,
            "spec": {
                "path": self.s.spec,
                "sha256": self.spec.sha256,
                "fingerprint": self.spec.fingerprint,
                "public_model": self.public_path,
            },
            "settings": asdict(self.s),
            "owners": owners,
            "accepted": [n for n, o in self.owners.items() if o.status == ACCEPTED],
            "rejected": {n: o.reason for n, o in self.owners.items() if o.status == REJECTED},
            "missing": {
                n: o.reason for n, o in self.owners.items() if o.status in (FAILED, MISSING, WAITING, TRAINING)
            },
            "notes": self.notes,
            "seconds": time.monotonic() - self.started,
            **self.summary,
        }
        if self.out.is_dir():
            write_report(self.out, report)
            self.progress()
        return report
