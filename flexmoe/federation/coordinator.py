"""The coordinator's work inside the ServerApp: collect, validate, keep, merge, tune, export, report.

FlexOlmo steps 3-5 (docs/design.md): every owner's reply is rebuilt into an artifact file and put
through all of :class:`~flexmoe.ExpertArtifact`'s checks (layout, identity against the spec's
fingerprint and sha256, shapes against the public model, finite values, the owner's own name);
a bad reply is rejected with its reason and the rest go on. Every reply from any node is checked
as it came before anything is built from it (:mod:`flexmoe.federation.records`: records, types,
declared sizes against the public model, metrics): whatever a node sends costs at most its own
rejection, a note, or its owner's rejection, never the run. Each accepted artifact is written to
``out-dir/artifacts/`` the moment it is accepted, atomically, with what else the owner sent in
``out-dir/received/``; so a coordinator that dies mid-run loses no accepted work, and a rerun
with ``resume=true`` asks only the owners still missing. Owners are keyed by their node-config
name, never by Flower's random node id; with run config ``owner-keys`` a node is an owner only if
it holds that owner's SuperNode key (:mod:`flexmoe.federation.identity`).

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
from dataclasses import asdict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import save_file
from transformers import AutoTokenizer

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError, HeaderBounds
from flexmoe.assembly import (
    STATISTICS_HINT,
    UNIGRAM_HINT,
    built_recipe,
    check_public_source,
    lacks_statistics,
    merge_experts,
    statistics_needed,
)
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import file_sha256, fingerprint
from flexmoe.core.io import atomic_write_json
from flexmoe.core.surgery import settings as moe_settings
from flexmoe.data.documents import read_documents
from flexmoe.evaluate import perplexity
from flexmoe.federation import router_rounds
from flexmoe.federation.identity import OwnerKeys
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    OWNER,
    PROXY,
    QUERY_MESSAGE,
    SPEC,
    TRAIN,
    TRAIN_MESSAGE,
    ReplyError,
    arrays_to_tensors,
    check_records,
    expert_layout,
    manifest_to_metadata,
    query_owner,
    record_bytes,
    record_to_proxy,
    train_metrics,
)
from flexmoe.federation.report import (
    ACCEPTED,
    FAILED,
    MISSING,
    REJECTED,
    TRAINING,
    WAITING,
    OwnerState,
    clip,
    run_report,
    say,
    write_report,
)
from flexmoe.federation.settings import CoordinatorSettings
from flexmoe.formats.load import detect_format, load_public_model
from flexmoe.owner.proxy import ProxySelection
from flexmoe.spec import FederationSpec
from flexmoe.training.router_tuning import tune_router


def reason(e: BaseException) -> str:
    """Why a reply was refused, for the report: the error's message (an :class:`ArtifactError`'s or
    :class:`ReplyError`'s names the field), else its type and message, cut to a readable length."""
    known = isinstance(e, (ArtifactError, ReplyError, InputError))
    return clip(str(e) if known and str(e) else f"{type(e).__name__}: {e}")


class Coordinator:
    """One federation run. ``grid`` is Flower's; :meth:`run` does everything."""

    def __init__(self, grid, settings: CoordinatorSettings, run_id: int = 0):
        self.grid, self.s, self.run_id = grid, settings, run_id
        self.out = Path(settings.out_dir)
        self.artifacts_dir, self.received_dir = self.out / "artifacts", self.out / "received"
        self.spec = FederationSpec.load(settings.spec)
        self.public_path = settings.public_model or self.spec.public_model
        self.owners = {name: OwnerState(name) for name in settings.expected_owners}
        # node id -> the owner it answers for in this run; None until it says, or when it is no owner
        # (not expected, not its key, or another node answers for that owner).
        self.nodes: dict[int, str | None] = {}
        self.keys: OwnerKeys | None = None
        self.layout: dict[str, tuple[int, ...]] = {}
        self.pending: dict[str, tuple[str, int]] = {}  # message id -> ("query" | "train", node id)
        self.earlier: list[Path] = []
        self.connect_deadline = 0.0
        self.notes: list[str] = []
        self.phase = "starting"
        self.summary: dict = {}
        self.started = time.monotonic()
        self.public = None
        self.bounds: HeaderBounds | None = None
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
        tunes = self.spec.router_tuning.enabled and not self.recipe.needs_unigram  # token routers only
        if self.s.router_tuning is None and tunes and not self.s.public_data:
            raise ValueError(
                "the spec enables router tuning, which needs the public data: set run config "
                "'public-data', or 'router-tuning=false'"
            )
        recipe = self.recipe
        if recipe.method == "lda" and not self.s.public_data:
            raise InputError(
                f"the spec's routing recipe {self.spec.routing.method!r} needs the public data for its public "
                "statistics: set run config 'public-data', or publish a spec whose routing.method is 'published'"
            )
        if recipe.needs_unigram and not self.s.public_data:
            check_public_source(recipe, self.spec, self.s.spec, None)  # the spec's public-statistics file
        self.earlier = sorted(self.artifacts_dir.glob("*.safetensors"))
        if not self.s.resume and (self.earlier or (self.out / "model").exists()):
            raise FileExistsError(
                f"{self.out} holds the results of an earlier run; set run config 'resume=true' to keep its accepted "
                "experts and train only the missing owners, or choose another 'out-dir'"
            )
        if self.s.owner_keys:
            self.keys = OwnerKeys(self.s.owner_keys, self.s.expected_owners)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.received_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.artifacts_dir / ".incoming").glob("*.safetensors"):
            stale.unlink()  # replies a dead coordinator was still checking: their owners are asked again
        self.connect_deadline = time.monotonic() + self.s.connect_timeout

    @property
    def recipe(self):
        """The routing recipe the merge builds: the spec's, except that a ``posterior`` spec
        exported to FlexOlmo or Mixtral by name builds its token router
        (:func:`flexmoe.assembly.built_recipe`)."""
        return built_recipe(self.spec.routing, self.s.export_format)

    def prepare(self) -> None:
        """Check the spec against the coordinator's public model; keep valid earlier artifacts."""
        self.public = load_public_model(self.public_path).eval()
        # What an expert file for this public model and spec can hold: a file declaring more is
        # refused from its header, before any tensor is read.
        self.bounds = HeaderBounds.for_expert(
            self.public.config, bigram_buckets=self.spec.routing.bigram_buckets or None
        )
        fp = fingerprint(self.public)
        if fp != self.spec.fingerprint:
            raise ValueError(
                f"the coordinator's public model {self.public_path} has fingerprint {fp[:16]}..., but the spec "
                f"{self.s.spec} says {self.spec.fingerprint[:16]}...; "
                "set run config 'public-model' to the published model"
            )
        self.layout = expert_layout(self.public, bigram_buckets=self.spec.routing.bigram_buckets)
        if self.s.public_data:
            self.public_docs = read_documents(self.s.public_data)
        for path in self.earlier:
            owner = path.name.removesuffix(".safetensors")
            if owner not in self.owners:
                self.note(f"{path.name} is from an owner not in expected-owners; left out")
                continue
            try:
                artifact = self.check_artifact(path, owner)
            except Exception as e:  # whatever a kept file holds, it costs only its owner's place
                path.rename(path.with_name(path.name + ".invalid"))
                self.note(f"kept artifact of {owner!r} failed its checks ({reason(e)}); asking {owner!r} again")
                continue
            state = self.owners[owner]
            self.restore_received(state)
            state.training_tokens = artifact.training_tokens
            state.privacy = artifact.privacy_summary()
            state.status, state.resumed = ACCEPTED, True
            state.artifact, state.artifact_sha256 = str(path), file_sha256(path)
            say(f"resume: keeping the accepted expert of {owner!r} ({path})")

    def restore_received(self, state: OwnerState) -> None:
        """What a kept owner sent besides its expert, from ``received/<owner>.json``, checked again
        like a fresh reply; anything unreadable or malformed is left out, with a note."""
        received = self.received_dir / f"{state.name}.json"
        if not received.is_file():
            return
        try:
            kept = json.loads(received.read_text())
            metrics = kept.get("metrics") or {}
            state.metrics = train_metrics(MetricRecord(metrics), state.name, len(self.public_layers))
            proxy = kept.get("proxy")
            if proxy is not None:
                state.proxy = ProxySelection.from_dict(proxy).to_dict()
            for k in ("upload_bytes", "seconds_to_reply"):
                if isinstance(kept.get(k), (int, float)) and not isinstance(kept.get(k), bool):
                    setattr(state, k, kept[k])
        except Exception as e:  # a kept file may hold anything; it only feeds the report
            state.metrics, state.proxy = {}, None
            self.note(f"{received.name} could not be read back ({reason(e)}); its metrics and proxy set are left out")

    @property
    def public_layers(self) -> list[int]:
        """Layer indices of the public model (what per-layer metrics may be as long as)."""
        return sorted({int(k.split(".")[1]) for k in self.layout if k.startswith("layers.")})

    def note(self, text: str) -> None:
        """A line in the report's notes (cut to a readable length: it may quote a node)."""
        self.notes.append(clip(text))

    # -- collecting the experts -------------------------------------------------------------------
    @property
    def router_tuning_on(self) -> bool:
        """Whether router tuning is asked for: the run config's ``router-tuning``, else the spec's."""
        return bool(self.spec.router_tuning.enabled if self.s.router_tuning is None else self.s.router_tuning)

    @property
    def tunes_with_owners(self) -> bool:
        """Whether the merge will run router rounds with the owners' nodes (router tuning on, on
        the owners' data, of a token router: a posterior-routed merge is not tuned)."""
        return self.router_tuning_on and self.spec.router_tuning.data == "owners" and not self.recipe.needs_unigram

    def awaits_node(self, o: OwnerState) -> bool:
        """Whether owner ``o``'s SuperNode is still to be found in this run: it has not trained yet,
        or its expert was kept from an earlier run (``resume``) and the router rounds need its node."""
        if o.status == WAITING:
            return True
        return o.status == ACCEPTED and o.resumed and o.node_id is None and self.tunes_with_owners

    def collect(self) -> None:
        """Query every SuperNode that connects, send the spec to the expected owners not yet
        accepted, and take their replies as they come, until each owner is resolved; and, when
        the router rounds will need them, find the nodes of the owners whose experts were kept from
        an earlier run (until they answer or ``connect-timeout`` passes: a resumed owner that does
        not connect only sits the rounds out)."""
        self.phase = "collecting"
        self.progress()
        while any(o.status in (WAITING, TRAINING) for o in self.owners.values()) or (
            any(self.awaits_node(o) for o in self.owners.values()) and time.monotonic() < self.connect_deadline
        ):
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
        """Ask each newly connected SuperNode which owner it is (while any owner's node is awaited:
        :meth:`awaits_node`). With
        ``owner-keys``, a node whose key is bound to no expected owner is not asked at all."""
        if not any(self.awaits_node(o) for o in self.owners.values()):
            return
        if self.keys is None:
            new = [n for n in self.grid.get_node_ids() if n not in self.nodes]
        else:
            new = []
            for info in self.grid.get_nodes():
                if info.node_id in self.nodes:
                    continue
                if self.keys.owner(info.public_key) is None:
                    self.nodes[info.node_id] = None
                    self.note(f"SuperNode {info.node_id} holds a key bound to no expected owner (owner-keys); ignored")
                else:
                    new.append(info.node_id)
        if not new:
            return
        messages = [self.message(RecordDict({OWNER: ConfigRecord({"want": "name"})}), n, QUERY_MESSAGE) for n in new]
        for n, mid in zip(new, self.grid.push_messages(messages)):
            self.nodes[n] = None
            self.pending[mid] = ("query", n)

    def message(self, content: RecordDict, node: int, kind: str) -> Message:
        """A message of type ``kind`` to SuperNode ``node``, alive as long as the run waits for it."""
        ttl = self.s.train_timeout + self.s.connect_timeout + 60
        return Message(content, node, kind, group_id=f"flexmoe-{self.spec.sha256[:12]}", ttl=ttl)

    def on_query(self, reply: Message, node: int) -> None:
        """A SuperNode said who it is: send the spec if it is an owner still to train. Whatever
        the reply holds, the worst it earns the node is a note and no spec."""
        if reply.has_error():
            self.note(f"SuperNode {node} did not say which owner it is: {reply.error.reason}")
            return
        try:
            if reply.metadata.src_node_id != node:
                raise ReplyError(f"SuperNode {node}", "sender", node, reply.metadata.src_node_id)
            name = query_owner(reply.content, f"SuperNode {node}")
        except Exception as e:
            self.note(f"SuperNode {node} is not taken as an owner: {reason(e)}")
            return
        state = self.owners.get(name)
        if state is None:
            self.note(f"SuperNode {node} is owner {name!r}, who is not in expected-owners; ignored")
            return
        if self.keys is not None:
            bound = self.keys.owner(self.node_key(node))
            if bound != name:
                self.note(
                    f"SuperNode {node} says it is owner {name!r} but holds the key of {bound!r} (owner-keys); ignored"
                )
                return
        if name in self.nodes.values():
            self.note(f"SuperNode {node} is owner {name!r} again; another SuperNode answers for it, ignored")
            return
        if state.status != WAITING:
            if state.status == ACCEPTED and state.resumed:  # its node in this run, for router tuning
                self.nodes[node], state.node_id = name, node
            why = "its expert is already accepted" if state.status == ACCEPTED else f"it is {state.status}"
            self.note(f"SuperNode {node} is owner {name!r} again; not asked to train ({why})")
            return
        self.nodes[node] = name
        content = RecordDict(
            {
                SPEC: ConfigRecord({"json": self.spec.to_json(), "sha256": self.spec.sha256}),
                TRAIN: ConfigRecord({"seed": self.s.seed}),
            }
        )
        [mid] = list(self.grid.push_messages([self.message(content, node, TRAIN_MESSAGE)]))
        self.pending[mid] = ("train", node)
        state.status, state.node_id, state.sent_at = TRAINING, node, time.monotonic()
        say(f"owner {name!r} connected (SuperNode {node}); spec sent, training")
        self.progress()

    def node_key(self, node: int) -> bytes:
        """The public key the SuperLink holds for ``node`` (empty if it has none)."""
        return next((info.public_key for info in self.grid.get_nodes() if info.node_id == node), b"")

    def on_train(self, reply: Message, node: int) -> None:
        """An owner's expert came back: accepted if every check passes, else that owner is
        rejected with the reason, whatever the reply holds."""
        state = self.owners.get(self.nodes.get(node) or "")
        if state is None or state.status != TRAINING or state.node_id != node:
            return
        state.seconds_to_reply = time.monotonic() - state.sent_at
        if reply.has_error():
            self.resolve(state, FAILED, f"the owner's training failed or it went away: {reply.error.reason}")
            return
        try:
            if reply.metadata.src_node_id != node:
                raise ReplyError(state.name, "sender", f"SuperNode {node}", reply.metadata.src_node_id)
            self.accept(state, reply.content)
        except Exception as e:  # a reply can hold anything: its sender's rejection, never the run's end
            self.resolve(state, REJECTED, reason(e))

    def accept(self, state: OwnerState, content: RecordDict) -> None:
        """Validate a reply as an artifact file; keep it (atomically) only if every check passes.
        The records, the expert's declared layout (against the public model), the manifest, the
        metrics and the proxy selection are checked before a tensor is copied or a file written."""
        owner = state.name
        check_records(
            content,
            owner,
            required={EXPERT: ArrayRecord, MANIFEST: ConfigRecord},
            optional={METRICS: MetricRecord, PROXY: ConfigRecord},
        )
        metadata = manifest_to_metadata(content.config_records[MANIFEST], owner)
        metrics = train_metrics(content[METRICS], owner, len(self.public_layers)) if METRICS in content else {}
        selection = record_to_proxy(content[PROXY], owner) if PROXY in content else None
        tensors = arrays_to_tensors(content.array_records[EXPERT], owner, self.layout)
        incoming = self.artifacts_dir / ".incoming"
        incoming.mkdir(exist_ok=True)
        staged = incoming / f"{owner}.safetensors"
        try:
            save_file(tensors, str(staged), metadata=metadata)
            del tensors
            artifact = self.check_artifact(staged, owner)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        proxy = None
        if selection is not None:
            if self.public_docs is not None and selection.num_public != len(self.public_docs):
                self.note(
                    f"{owner!r}'s proxy selection indexes {selection.num_public} public documents, the "
                    f"coordinator's public data has {len(self.public_docs)}; proxy set not used"
                )
            else:
                proxy = selection.to_dict()
        final = self.artifacts_dir / f"{owner}.safetensors"
        state.metrics, state.proxy = metrics, proxy
        state.training_tokens = artifact.training_tokens
        state.privacy = artifact.privacy_summary()
        state.upload_bytes = record_bytes(*content.values())
        atomic_write_json(
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
            sort_keys=True,
        )
        os.replace(staged, final)  # the artifact's presence is what marks the owner accepted
        state.artifact, state.artifact_sha256 = str(final), file_sha256(final)
        self.resolve(state, ACCEPTED, None)

    def check_artifact(self, path: Path, owner: str) -> ExpertArtifact:
        """Every ExpertArtifact check, plus: the artifact is the sending owner's own, and it carries the
        statistics the spec's routing recipe needs (the posterior recipe: the owner's token counts,
        ``stats.unigram`` and ``stats.bigram`` in the spec's bucket count). The merge would refuse
        it otherwise, so it is refused here, with the reason, while the other owners' experts go on."""
        artifact = ExpertArtifact.load(
            path, fingerprint=self.spec.fingerprint, spec_sha256=self.spec.sha256, bounds=self.bounds
        )
        # Fit and plausibility (router rows, biases, weight scales, statistics): docs/trust.md.
        artifact.validate(self.public, fingerprint=self.spec.fingerprint, spec_sha256=self.spec.sha256)
        if artifact.owner != owner:
            raise ArtifactError(owner, "owner", owner, artifact.owner, hint="an owner may only send its own expert")
        self.check_counts(artifact)
        # The bucket count of its bigram counts (when it ships them) is the spec's: the merge needs
        # every owner's in the same buckets.
        artifact.check_token_statistics(self.public.config.vocab_size, self.spec.routing.bigram_buckets or None)
        recipe = self.recipe
        if lacks_statistics(artifact, recipe):
            needed = f"{statistics_needed(recipe)} (the spec's routing recipe {recipe.method!r} needs them)"
            hint = UNIGRAM_HINT if recipe.needs_unigram else STATISTICS_HINT
            raise ArtifactError(owner, "routing statistics", needed, "none", source=path, hint=hint)
        return artifact

    def check_counts(self, artifact: ExpertArtifact) -> None:
        """Token counts no owner following the spec can exceed: ``training_tokens`` (``max_steps``
        batches of ``batch_size`` rows of ``seq_len``) and ``stats_tokens`` (the routing recipe
        measures at most ``stats_tokens`` tokens, in whole rows of ``seq_len``). ``stats_tokens``
        weights an owner's covariance in the pooled one, so an inflated count would silence the
        other owners (or overflow)."""
        e, owner = self.spec.expert, artifact.owner
        bounds = {
            "training_tokens": e.max_steps * e.batch_size * e.seq_len,
            "stats_tokens": max(self.spec.routing.stats_tokens, e.seq_len),
        }
        for key, bound in bounds.items():
            text = artifact.metadata.get(key)
            if text is None:
                continue
            if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) <= bound):
                raise ArtifactError(
                    owner, f"metadata {key!r}", f"an integer of at most {bound} (what the spec's recipe implies)", text
                )

    def resolve(self, state: OwnerState, status: str, why: str | None) -> None:
        state.status, state.reason = status, clip(why) if why else None
        say(f"owner {state.name!r}: {status}" + (f" ({state.reason})" if why else ""))
        self.progress()

    # -- merging ------------------------------------------------------------------------------
    def merge(self, owners: list[str]):
        """FlexOlmo steps 3-5: the assembly pipeline every caller shares
        (:func:`flexmoe.assembly.merge_experts`: assemble ``[public, e_1 ... e_n]`` in
        expected-owners order, route by the spec's recipe, fold the biases for a transformers
        format), then router tuning if asked, and the export. Returns the model. Needs no Flower
        grid unless the spec tunes the routers with the owners.

        The posterior recipe (the default) takes the public counts from the spec's
        public-statistics file, else from the public data. Router tuning tunes token routers, so a
        posterior-routed model is not tuned; the report says so."""
        self.phase = "merging"
        self.progress()
        t = time.monotonic()
        merged = merge_experts(
            self.public,
            [self.artifacts_dir / f"{o}.safetensors" for o in owners],
            spec=self.spec,
            spec_path=self.s.spec,
            public_documents=self.public_docs,
            tokenizer=self.public_path,
            format=self.s.export_format,
            top_k=self.s.top_k or None,
        )
        model = merged.model
        self.summary["experts"] = list(moe_settings(model).owners)
        tokenizer = None
        if self.public_docs is not None:
            tokenizer = AutoTokenizer.from_pretrained(self.public_path)
        self.summary["routing_recipe"] = {
            k: v for k, v in merged.routing.items() if isinstance(v, (str, int, float, bool))
        }
        self.summary["merge_seconds"] = time.monotonic() - t
        tune = self.router_tuning_on
        if tune and merged.routing["method"] == "posterior":
            note = "router tuning tunes token routers; the posterior recipe was not tuned"
            self.summary["router_tuning"] = {"skipped": note}
            self.note(note)
        elif tune:
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
        # The pipeline's own export: routers it folded export exactly to a transformers format.
        requested = self.s.export_format
        merged.export(out, allow_approximate=self.s.allow_approximate)
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
        """Federated router tuning over this run's owners (:mod:`flexmoe.federation.router_rounds`)."""
        return router_rounds.tune_router_with_owners(self, model, owners, tokenizer)

    def proxy_texts(self, owner: str) -> list[str]:
        """The texts of ``owner``'s proxy selection (public documents)."""
        return ProxySelection.from_dict(self.owners[owner].proxy).texts(self.public_docs)

    def routing_usage(self, model, tokenizer, owners: list[str]) -> dict:
        """Top-1 routing shares of the merged model on public text and each owner's proxy set."""
        seq_len = self.spec.expert.seq_len
        domains = {"public": self.public_docs}
        domains.update({f"proxy:{o}": self.proxy_texts(o) for o in owners if self.owners[o].proxy is not None})
        usage = {}
        for name, docs in domains.items():
            try:
                r = perplexity(model, {name: docs}, tokenizer, seq_len=seq_len, max_tokens=32 * seq_len)
            except ValueError as e:  # too little text for one row
                self.note(f"routing usage on {name} not measured: {e}")
                continue
            usage[name] = {"perplexity": r["per_domain"][name], "top1_share": r["routing"][name]}
        return usage

    # -- bookkeeping --------------------------------------------------------------------------
    def progress(self) -> None:
        atomic_write_json(
            self.out / "progress.json",
            {
                "pid": os.getpid(),
                "run_id": self.run_id,
                "phase": self.phase,
                "updated": time.time(),
                "owners": {o.name: o.status for o in self.owners.values()},
            },
            sort_keys=True,
        )

    def finish(self, status: str) -> dict:
        """End the run as ``status``: write ``report.json`` and ``report.md``, return the report."""
        self.phase = status
        report = run_report(
            status,
            run_id=self.run_id,
            spec={
                "path": self.s.spec,
                "sha256": self.spec.sha256,
                "fingerprint": self.spec.fingerprint,
                "public_model": self.public_path,
            },
            settings=asdict(self.s),
            owners=self.owners,
            notes=self.notes,
            seconds=time.monotonic() - self.started,
            summary=self.summary,
        )
        if self.out.is_dir():
            write_report(self.out, report)
            self.progress()
        return report
