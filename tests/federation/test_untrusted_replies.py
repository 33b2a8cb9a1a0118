"""Nothing a node sends can crash the coordinator, exhaust it, or poison the merged model (issue 17).

Each attack class of the issue meets the real :class:`Coordinator` with real Flower messages: a
bad reply costs its node a note or its owner a rejection (with the reason in the report), and the
run goes on. Most tests drive the coordinator in process through :class:`FakeGrid` (Flower's
``Grid`` calls the coordinator makes, answered by a function per node); one runs real
SuperLink/SuperNode processes with a node that claims another owner's name and an owner that
poisons the router rounds. Property-based tests (hypothesis) generate the replies.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.core.errors import InputError
from flexmoe.federation.coordinator import Coordinator
from flexmoe.federation.identity import OwnerKeys
from flexmoe.federation.records import EXPERT, MANIFEST, METRICS, OWNER, PROXY, QUERY_MESSAGE, ROUTERS, STYPE
from flexmoe.federation.report import ACCEPTED, REJECTED, TRAINING, WAITING, OwnerState, render, run_report
from flexmoe.federation.router_rounds import change_bounds, owner_change, robust_aggregate
from flexmoe.federation.settings import CoordinatorSettings
from flexmoe.spec import RouterTuningRecipe
from flexmoe.testing.faults import app_with_faults, poison_routers
from flexmoe.testing.federation import Deployment, make_supernode_key
from flexmoe.training.router_tuning import aggregate_router_rows

APP = Path(__file__).resolve().parents[2] / "examples" / "federation"
RUN_TIMEOUT = 480.0  # seconds; generous for a loaded 2-core machine


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The run this process serves, as a ServerApp process knows it (Flower stamps it on every
    message the coordinator builds)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# -- an in-process grid ---------------------------------------------------------------------------


class FakeGrid:
    """The ``Grid`` calls the coordinator makes, in process: ``nodes`` maps a node id to a
    function ``(message) -> Message | RecordDict`` (a RecordDict is sent as the reply from that
    node), ``keys`` a node id to its public key as the SuperLink reports it."""

    def __init__(self, nodes: dict, keys: dict | None = None):
        self.nodes, self.keys, self.replies = nodes, keys or {}, []

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.nodes]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self.nodes[m.metadata.dst_node_id](m)
            self.replies.append(reply if isinstance(reply, Message) else Message(reply, reply_to=m))
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        ids = set(ids)
        out = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in out]
        return out


def _from(node: int, content: RecordDict, msg: Message) -> Message:
    """A reply to ``msg`` that claims to come from ``node``."""
    metadata = Metadata(
        run_id=msg.metadata.run_id,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=msg.metadata.message_id,
        group_id=msg.metadata.group_id,
        created_at=time.time(),
        ttl=60,
        message_type=msg.metadata.message_type,
    )
    return Message(content, metadata=metadata)


def _owner(name) -> RecordDict:
    return RecordDict({OWNER: ConfigRecord({"name": name, "share-proxy": False})})


def _coordinator(world, out: Path, grid=None, **overrides) -> Coordinator:
    config = {"router_tuning": False, "connect_timeout": 30.0, "train_timeout": 30.0, "poll_interval": 0.01}
    settings = CoordinatorSettings(
        spec=str(world.spec),
        expected_owners=["canary"],
        out_dir=str(out),
        public_data=str(world.public_data),
        **{**config, **overrides},
    )
    c = Coordinator(grid, settings)
    c.start()
    c.prepare()
    return c


@pytest.fixture(scope="module")
def prepared(world, tmp_path_factory):
    """One coordinator with the public model loaded, reset for each reply (hypothesis)."""
    return _coordinator(world, tmp_path_factory.mktemp("prepared"))


def _train(c: Coordinator, content: RecordDict, node: int = 7) -> OwnerState:
    """``content`` as owner canary's reply to its ``train`` message, through :meth:`Coordinator.on_train`."""
    state = c.owners["canary"] = OwnerState("canary", status=TRAINING, node_id=node, sent_at=time.monotonic())
    c.nodes = {node: "canary"}
    for p in c.artifacts_dir.glob("*.safetensors"):
        p.unlink()
    request = Message(RecordDict(), node, "train")
    request.metadata.__dict__["_message_id"] = "m"
    c.on_train(Message(content, reply_to=request), node)
    return state


def _with(content: RecordDict, **records) -> RecordDict:
    out = RecordDict(dict(content))
    for name, record in records.items():
        if record is None:
            del out[name]
        else:
            out[name] = record
    return out


def _rendered(c: Coordinator) -> str:
    report = c.finish("merged")
    json.dumps(report, default=str)
    return render(report)


# -- the collect loop: any node, any query reply ---------------------------------------------------


def test_a_node_without_an_owner_record_or_with_a_wrong_name_costs_only_a_note(owner_reply, world, tmp_path):
    """Query replies without the ``owner`` record, with a 20 MB name, a list for a name, or sent
    in another node's name: each node gets a note and no spec; the genuine owner is accepted."""
    reply, _, _ = owner_reply
    genuine = reply.content

    def honest(msg):
        return _owner("canary") if msg.metadata.message_type == "query" else genuine

    nodes = {
        1: lambda m: RecordDict({"who": ConfigRecord({"name": "canary"})}),  # no owner record
        2: lambda m: _owner("x" * 20_000_000),
        3: lambda m: RecordDict({OWNER: ConfigRecord({"name": ["canary"]})}),
        4: lambda m: _from(9, _owner("canary"), m),  # claims to be another node
        5: lambda m: RecordDict({OWNER: ArrayRecord({})}),
        6: honest,
    }
    c = _coordinator(world, tmp_path, grid=FakeGrid(nodes))
    c.collect()
    assert c.owners["canary"].status == ACCEPTED and c.owners["canary"].node_id == 6
    notes = "\n".join(c.notes)
    for node in (1, 2, 3, 4, 5):
        assert f"SuperNode {node} is not taken as an owner" in notes
    assert "(20000000 long)" in notes and max(len(n) for n in c.notes) < 2000  # the 20 MB name is cut short
    assert "| canary | accepted |" in _rendered(c)


def test_a_node_cannot_answer_for_an_owner_whose_key_it_does_not_hold(owner_reply, world, tmp_path):
    """With owner-keys, a node presenting another key is not even asked who it is, and a node with
    the owner's key that names another owner is ignored; only the key holder trains."""
    reply, _, _ = owner_reply
    keys = {name: make_supernode_key(tmp_path / "keys", name)[1] for name in ("canary", "mallory")}

    def pem(name):
        from cryptography.hazmat.primitives import serialization

        return public_key_to_bytes(serialization.load_ssh_public_key(keys[name].read_bytes()))

    asked = []

    def node(name, claims):
        def answer(msg):
            asked.append((name, msg.metadata.message_type))
            return _owner(claims) if msg.metadata.message_type == "query" else reply.content

        return answer

    grid = FakeGrid(
        {1: node("mallory", "canary"), 2: node("canary", "canary")}, keys={1: pem("mallory"), 2: pem("canary")}
    )
    c = _coordinator(world, tmp_path / "out", grid=grid, owner_keys={"canary": str(keys["canary"])})
    c.collect()
    assert c.owners["canary"].status == ACCEPTED and c.owners["canary"].node_id == 2
    assert ("mallory", "query") not in asked and ("mallory", "train") not in asked
    assert any("SuperNode 1 holds a key bound to no expected owner" in n for n in c.notes)

    # The owner's own node naming someone else is not taken either.
    grid = FakeGrid({2: node("canary", "bob")}, keys={2: pem("canary")})
    c = _coordinator(
        world, tmp_path / "out2", grid=grid, owner_keys={"canary": str(keys["canary"])}, connect_timeout=0.5
    )
    c.collect()
    assert c.owners["canary"].status == "missing"
    assert any("'bob', who is not in expected-owners" in n for n in c.notes)


def test_owner_keys_bind_every_expected_owner_to_one_readable_key(tmp_path):
    a, b = (make_supernode_key(tmp_path, n)[1] for n in "ab")
    keys = OwnerKeys({"a": str(a), "b": str(b)}, ["a", "b"])
    from cryptography.hazmat.primitives import serialization

    assert keys.owner(public_key_to_bytes(serialization.load_ssh_public_key(b.read_bytes()))) == "b"
    assert keys.owner(b"") is None and keys.owner(b"not a key") is None
    with pytest.raises(InputError, match="same key"):
        OwnerKeys({"a": str(a), "b": str(a)}, ["a", "b"])
    with pytest.raises(InputError, match="missing"):
        OwnerKeys({"a": str(a)}, ["a", "b"])
    (tmp_path / "junk.pub").write_text("ssh-ed25519 nonsense")
    with pytest.raises(InputError, match="not a public key"):
        OwnerKeys({"a": str(tmp_path / "junk.pub")}, ["a"])
    with pytest.raises(ValueError, match="owner-keys"):
        CoordinatorSettings.from_run_config({"spec": "s", "expected-owners": "a,b", "owner-keys": f"a={a}"})
    s = CoordinatorSettings.from_run_config({"spec": "s", "expected-owners": "a,b", "owner-keys": f"a={a}, b={b}"})
    assert s.owner_keys == {"a": str(a), "b": str(b)}


# -- a train reply: rejected with its reason, never a crash -----------------------------------------


def _arrays(content, **changes) -> ArrayRecord:
    arrays = dict(content[EXPERT].items())
    for name, array in changes.items():
        if array is None:
            arrays.pop(name.replace("__", "."), None)
        else:
            arrays[name.replace("__", ".")] = array
    return ArrayRecord(arrays)


def _manifest(content, **fields) -> ConfigRecord:
    return ConfigRecord({**dict(content[MANIFEST]), **fields})


ATTACKS = {
    "no expert record": (lambda c: _with(c, expert=None), "missing ['expert']"),
    "expert as a config record": (lambda c: _with(c, expert=ConfigRecord({"x": 1})), "record 'expert'"),
    "a record besides the expert": (lambda c: _with(c, notes=ConfigRecord({"text": "t"})), "expected only"),
    "a tensor the layout has no place for": (
        lambda c: _with(
            c,
            expert=_arrays(c, layers__0__router__public_embedding=None, extra=Array("float32", (1,), STYPE, b"\0" * 4)),
        ),
        "tensor names",
    ),
    "a declared shape the public model does not imply": (
        lambda c: _with(c, expert=_arrays(c, layers__0__router__embedding=Array("float32", (10**9,), STYPE, b""))),
        "shape of layers.0.router.embedding",
    ),
    "an integer dtype": (
        lambda c: _with(c, expert=_arrays(c, layers__0__router__bias=Array("int32", (1,), STYPE, b"\0" * 4))),
        "dtype of tensor layers.0.router.bias",
    ),
    "a manifest number": (lambda c: _with(c, manifest=_manifest(c, num_layers=2)), "manifest field 'num_layers'"),
    "a 20 MB owner name": (lambda c: _with(c, manifest=_manifest(c, owner="x" * 20_000_000)), "4096 characters"),
    "a list where a metric number belongs": (
        lambda c: _with(c, metrics=MetricRecord({**dict(c[METRICS]), "train-loss": [1.0, 2.0]})),
        "metric 'train-loss'",
    ),
    "a number where the per-layer shares belong": (
        lambda c: _with(c, metrics=MetricRecord({**dict(c[METRICS]), "router-top1-own": 0.5})),
        "metric 'router-top1-own'",
    ),
    "a share above 1": (
        lambda c: _with(c, metrics=MetricRecord({**dict(c[METRICS]), "router-top1-own": [7.0, 0.1]})),
        "metric 'router-top1-own'",
    ),
    "metrics as a config record": (lambda c: _with(c, metrics=ConfigRecord({"train-loss": "low"})), "record 'metrics'"),
    "an overflowing statistic": (
        lambda c: _with(c, manifest=_manifest(c, stats_tokens=str(10**21))),
        "metadata 'stats_tokens'",
    ),
    "a Unicode digit for a count": (lambda c: _with(c, manifest=_manifest(c, stats_tokens="²")), "stats_tokens"),
    "more training tokens than the spec trains on": (
        lambda c: _with(c, manifest=_manifest(c, training_tokens=str(10**12))),
        "metadata 'training_tokens'",
    ),
    "a proxy selection of strings": (
        lambda c: _with(c, proxy=ConfigRecord({**dict(c[PROXY]), "indices": ["0", "1"]})),
        "proxy field 'indices'",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_bad_train_reply_rejects_its_owner_with_the_reason(owner_reply, prepared, attack):
    reply, _, _ = owner_reply
    build, why = ATTACKS[attack]
    state = _train(prepared, build(reply.content))
    assert state.status == REJECTED, state
    assert why in state.reason and len(state.reason) < 2000
    assert not list(prepared.artifacts_dir.glob("*.safetensors"))
    assert not list((prepared.artifacts_dir / ".incoming").glob("*"))
    md = _rendered(prepared)
    assert "| canary | rejected |" in md
    # The genuine reply still passes.
    assert _train(prepared, reply.content).status == ACCEPTED


def test_a_reply_from_another_node_than_the_one_asked_is_rejected(owner_reply, prepared):
    reply, _, _ = owner_reply
    request = Message(RecordDict(), 7, "train")
    request.metadata.__dict__["_message_id"] = "m"
    state = prepared.owners["canary"] = OwnerState("canary", status=TRAINING, node_id=7, sent_at=time.monotonic())
    prepared.nodes = {7: "canary"}
    prepared.on_train(_from(8, reply.content, request), 7)
    assert state.status == REJECTED and "sender" in state.reason


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_refusing_a_512_mib_reply_costs_no_copy_of_it(owner_reply, prepared):
    """A reply declaring a 512 MiB tensor (Flower already holds its bytes) is refused on its
    declared shape: the coordinator's memory grows by far less than the tensor, and nothing is written."""
    reply, _, _ = owner_reply
    name = next(k for k in reply.content[EXPERT] if ".expert." in k)
    huge = Array("float32", (2**27,), STYPE, bytes(2**29))
    content = _with(reply.content, expert=_arrays(reply.content, **{name.replace(".", "__"): huge}))
    before, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        state = _train(prepared, content)
    finally:
        done.set()
        watcher.join()
    assert state.status == REJECTED and f"shape of {name}" in state.reason
    print(f"resident memory while refusing a 512 MiB reply: +{(peak[0] - before) / 2**20:.1f} MiB")
    assert peak[0] - before < 64 * 2**20, (peak[0] - before) / 2**20
    assert not list((prepared.artifacts_dir / ".incoming").glob("*"))


# Replies generated: records dropped or retyped, metrics and manifest values of any type, declared
# shapes and dtypes changed. Each must end as accepted or rejected-with-a-reason, and render.
_metric_value = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=4),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
)
_config_value = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.binary(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
)


@st.composite
def _mutations(draw):
    return {
        "drop": draw(st.sets(st.sampled_from([EXPERT, MANIFEST, METRICS, PROXY]), max_size=2)),
        "metrics": draw(
            st.dictionaries(
                st.sampled_from(["train-loss", "router-top1-own", "steps", "x" * 70, "new"]), _metric_value, max_size=3
            )
        ),
        "manifest": draw(
            st.dictionaries(
                st.sampled_from(["owner", "stats_tokens", "num_layers", "dtype", "hidden_size", "training_tokens"]),
                _config_value,
                max_size=2,
            )
        ),
        "proxy": draw(
            st.dictionaries(
                st.sampled_from(["indices", "scores", "budget", "num-public", "version"]), _config_value, max_size=2
            )
        ),
        "shape": draw(st.none() | st.lists(st.integers(-2, 2**40), max_size=3)),
        "dtype": draw(st.none() | st.sampled_from(["float64", "int8", "bfloat16", "float16", ""])),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=_mutations())
def test_any_mutated_train_reply_is_accepted_or_rejected_never_a_crash(owner_reply, prepared, m):
    reply, _, _ = owner_reply
    content = RecordDict(dict(reply.content))
    if m["metrics"]:
        content[METRICS] = MetricRecord({**dict(content[METRICS]), **m["metrics"]})
    if m["manifest"]:
        content[MANIFEST] = ConfigRecord({**dict(content[MANIFEST]), **m["manifest"]})
    if m["proxy"]:
        content[PROXY] = ConfigRecord({**dict(content[PROXY]), **m["proxy"]})
    if m["shape"] is not None or m["dtype"] is not None:
        name = "layers.0.router.embedding"
        a = content[EXPERT][name]
        shape = tuple(m["shape"]) if m["shape"] is not None else a.shape
        arrays = dict(content[EXPERT].items())
        arrays[name] = Array(m["dtype"] if m["dtype"] is not None else a.dtype, shape, STYPE, a.data)
        content[EXPERT] = ArrayRecord(arrays)
    for name in m["drop"]:
        del content[name]
    state = _train(prepared, content)
    assert state.status in (ACCEPTED, REJECTED)
    assert (state.status == ACCEPTED) == (prepared.artifacts_dir / "canary.safetensors").is_file()
    assert state.status == ACCEPTED or state.reason
    _rendered(prepared)


@settings(max_examples=200, deadline=None)
@given(
    metrics=st.dictionaries(
        st.text(max_size=20),
        st.recursive(
            st.none() | st.floats() | st.integers() | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
            max_leaves=8,
        ),
        max_size=5,
    ),
    proxy=st.none()
    | st.dictionaries(
        st.sampled_from(["indices", "scores"]), st.none() | st.integers() | st.lists(st.integers(), max_size=3)
    ),
    reason=st.none() | st.text(max_size=50),
    tokens=st.none() | st.integers() | st.text(max_size=5),
)
def test_the_report_renders_whatever_an_owner_put_in_it(metrics, proxy, reason, tokens):
    owners = {
        "a": OwnerState("a", status=REJECTED, reason=reason, metrics=metrics, proxy=proxy, training_tokens=tokens)
    }
    report = run_report(
        "merged",
        run_id=1,
        spec={"path": "s", "sha256": "0" * 64, "fingerprint": "1" * 64, "public_model": "p"},
        settings={"quorum": 0},
        owners=owners,
        notes=["a note | with a pipe\nand a newline"],
        seconds=1.0,
        summary={},
    )
    md = render(report)
    assert "| a | rejected |" in md


def test_the_report_shows_each_owners_differential_privacy():
    """The coordinator sees the epsilon an owner's artifact records (and what it ships exact)."""
    owners = {
        "a": OwnerState("a", status="accepted", privacy="DP epsilon 3 at delta 1e-05 (prv) over expert"),
        "b": OwnerState("b", status="accepted", privacy="no differential privacy"),
    }
    spec = {"path": "s", "sha256": "0" * 64, "fingerprint": "1" * 64, "public_model": "p"}
    report = run_report(
        "merged", run_id=1, spec=spec, settings={"quorum": 0}, owners=owners, notes=[], seconds=1.0, summary={}
    )
    md = render(report)
    assert report["owners"]["a"]["privacy"].startswith("DP epsilon 3")
    assert "| DP epsilon 3 at delta 1e-05 (prv) over expert |" in md and "| no differential privacy |" in md


# -- resume --------------------------------------------------------------------------------------


def test_resume_sets_aside_a_kept_expert_that_now_fails_and_a_malformed_received_file(owner_reply, world, tmp_path):
    """An expert accepted by an earlier run whose statistic overflows is renamed ``.invalid`` and
    its owner asked again; a kept ``received/<owner>.json`` with metrics of the wrong type is
    left out of the report, not rendered into a crash."""
    from safetensors.torch import save_file

    from flexmoe.federation.records import read_artifact_file

    reply, node_config, _ = owner_reply
    tensors, metadata = read_artifact_file(Path(node_config["work-dir"]) / "canary.safetensors")
    (tmp_path / "artifacts").mkdir(parents=True)
    save_file(
        tensors, str(tmp_path / "artifacts" / "canary.safetensors"), metadata={**metadata, "stats_tokens": str(10**21)}
    )
    c = _coordinator(world, tmp_path, resume=True)
    assert c.owners["canary"].status == WAITING
    assert (tmp_path / "artifacts" / "canary.safetensors.invalid").is_file()
    assert any("stats_tokens" in n and "asking 'canary' again" in n for n in c.notes)

    save_file(tensors, str(tmp_path / "artifacts" / "canary.safetensors"), metadata=metadata)
    (tmp_path / "received").mkdir(exist_ok=True)
    (tmp_path / "received" / "canary.json").write_text(json.dumps({"metrics": {"router-top1-own": 0.5}, "proxy": [1]}))
    c = _coordinator(world, tmp_path, resume=True)
    assert c.owners["canary"].status == ACCEPTED and c.owners["canary"].metrics == {}
    assert any("could not be read back" in n for n in c.notes)
    assert "| canary | accepted (kept from an earlier run) |" in _rendered(c)


def test_resume_finds_the_nodes_of_kept_owners_for_the_router_rounds(owner_reply, world, tmp_path):
    """Every expert was kept from an earlier run, so nobody trains; the router rounds still need
    the owners' nodes, so the coordinator keeps asking newly connected SuperNodes who they are
    (until they answer or connect-timeout passes), but sends no one the spec."""
    from safetensors.torch import save_file

    from flexmoe.federation.records import read_artifact_file

    _, node_config, _ = owner_reply
    tensors, metadata = read_artifact_file(Path(node_config["work-dir"]) / "canary.safetensors")
    (tmp_path / "artifacts").mkdir(parents=True)
    save_file(tensors, str(tmp_path / "artifacts" / "canary.safetensors"), metadata=metadata)
    asked = []
    grid = FakeGrid({5: lambda m: asked.append(m.metadata.message_type) or _owner("canary")})
    c = _coordinator(world, tmp_path, grid=grid, resume=True, router_tuning=True)
    assert c.tunes_with_owners and c.owners["canary"].status == ACCEPTED and c.owners["canary"].resumed
    c.collect()
    assert c.owners["canary"].node_id == 5 and c.nodes == {5: "canary"}
    assert asked == [QUERY_MESSAGE]  # asked who it is, never to train again

    # Without router rounds with the owners, nobody is asked anything.
    asked.clear()
    c = _coordinator(world, tmp_path, grid=grid, resume=True, router_tuning=False)
    c.collect()
    assert asked == [] and c.owners["canary"].node_id is None


# -- router rounds: only its own row, clipped, aggregated robustly ----------------------------------


def _rows(layers=2, experts=4, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for L in range(layers):
        out[f"layers.{L}.router.weight"] = torch.randn(experts, hidden, generator=g)
        out[f"layers.{L}.router.bias"] = torch.randn(experts, generator=g).clamp(max=0)
    return out


RECIPE = RouterTuningRecipe(data="owners", rounds=2, max_steps=4, lr=2e-3)


def test_an_owner_may_change_only_its_own_row_and_bias_and_r0():
    start = _rows()
    bounds = change_bounds(start, RECIPE)
    rows = {k: v.clone() for k, v in start.items()}
    rows["layers.1.router.weight"][2] += 1e-4  # owner 1 touches owner 2's row
    with pytest.raises(Exception, match=r"rows of layers.1.router.weight.*changes to rows \[2\]"):
        owner_change(start, rows, 1, "a", bounds)
    rows = {k: v.clone() for k, v in start.items()}
    rows["layers.0.router.bias"][0] = -5.0  # the public expert's bias is no owner's
    with pytest.raises(Exception, match="rows of layers.0.router.bias"):
        owner_change(start, rows, 1, "a", bounds)
    # The issue's attack: another's row at -1e30 and its own at 3e38 is refused outright ...
    with pytest.raises(Exception, match="changes to rows"):
        owner_change(start, poison_routers(start, 1), 1, "a", bounds)
    # ... and its own row at 3e38 alone (and r_0 at -1e30) is clipped to the bound.
    rows = {k: v.clone() for k, v in start.items()}
    for L in range(2):
        rows[f"layers.{L}.router.weight"][1] = 3e38
        rows[f"layers.{L}.router.weight"][0] = -1e30
    change = owner_change(start, rows, 1, "a", bounds)
    for name, d in change.items():
        norms = d.reshape(len(d), -1).norm(dim=1)
        assert torch.isfinite(d).all() and (norms <= bounds[name] * (1 + 1e-5)).all()


def test_the_issue_attack_leaves_the_aggregate_finite_and_the_victim_untouched():
    start, public = _rows(seed=0), _rows(seed=1)
    public = {k: start[k] + 1e-3 * (v - start[k]) for k, v in public.items()}
    bounds = change_bounds(start, RECIPE)
    honest = {k: v.clone() for k, v in start.items()}
    for k in honest:
        if k.endswith("weight"):
            honest[k][2] += 1e-3
    changes = {2: owner_change(start, honest, 2, "b", bounds)}
    without = robust_aggregate(start, public, changes)
    attack = {k: v.clone() for k, v in start.items()}
    for k in attack:
        if k.endswith("weight"):
            attack[k][1], attack[k][0] = 3e38, -1e30
    changes[1] = owner_change(start, attack, 1, "a", bounds)
    out = robust_aggregate(start, public, changes)
    for name, t in out.items():
        assert torch.isfinite(t).all()
        if name.endswith("weight"):  # owner b's row is what b and the public data made it
            torch.testing.assert_close(t[2], without[name][2])


_finite = st.floats(-1e30, 1e30, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), server_lr=st.none() | st.floats(0.1, 4), scale=st.floats(1e-6, 1e-2))
def test_honest_replies_aggregate_as_the_mean_of_their_changes(seed, server_lr, scale):
    """With one owner (so at most two sources a row), owners that change only their rows within
    the bound aggregate exactly as start + server_lr * mean(change) over the participants."""
    start = _rows(experts=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    public = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in start.items()}
    owner = {k: v.clone() for k, v in start.items()}
    for k, v in owner.items():
        if k.endswith("weight"):
            v += scale * torch.randn(v.shape, generator=g) / 10
    change = owner_change(start, owner, 1, "a", change_bounds(start, RECIPE))
    ours = robust_aggregate(start, public, {1: change}, server_lr=server_lr)
    reference = aggregate_router_rows(start, [public, owner], server_lr=server_lr)
    for name in start:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(bad=st.lists(_finite, min_size=8, max_size=8), seed=st.integers(0, 2**16))
def test_a_minority_on_r0_cannot_move_it_outside_the_honest_range(bad, seed):
    """Three owners and the public data move r_0; one owner sends any finite r_0 it likes. Each
    coordinate of the aggregate change stays within the range the honest sources span (scaled)."""
    start = _rows(experts=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    bounds = change_bounds(start, RECIPE)
    public = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    changes, honest = {}, [public]
    for j in (1, 2, 3):
        rows = {k: v.clone() for k, v in start.items()}
        for k in rows:
            if k.endswith("weight"):
                rows[k][0] += torch.tensor(bad) if j == 3 else 1e-3 * torch.randn(rows[k].shape[1], generator=g)
        changes[j] = owner_change(start, rows, j, f"o{j}", bounds)
        if j != 3:
            honest.append(rows)
    out = robust_aggregate(start, public, changes)
    n = 4  # sources of r_0, and participants
    for name, t in out.items():
        if not name.endswith("weight"):
            continue
        d = torch.stack([h[name][0] - start[name][0] for h in honest])
        lo, hi = d.min(dim=0).values * n, d.max(dim=0).values * n
        got = t[0] - start[name][0]
        assert ((got >= lo - 1e-6) & (got <= hi + 1e-6)).all()
        assert torch.isfinite(t).all()


def test_router_rounds_clip_a_huge_own_row_and_refuse_a_list_metric(owner_reply, world, tmp_path):
    """Federated router tuning in process, the real rounds against a scripted owner: round 0 it
    sets its own row to 3e38 and r_0 to -1e30 (rows it may change: clipped to the bound), round 1
    it answers with a list for a metric (refused: it sits out, and with no other owner the tuning
    stops). The merged model's logits stay finite and the report renders."""
    from flexmoe.federation.records import arrays_to_tensors, tensors_to_arrays

    reply, _, _ = owner_reply
    answers = iter(["huge", "list-metric"])
    starts = []

    def canary(msg):
        kind = msg.metadata.message_type
        if kind == "query":
            return _owner("canary")
        if kind == "train":
            return reply.content
        start = arrays_to_tensors(msg.content[ROUTERS], "coordinator")
        starts.append(start)
        if next(answers) == "list-metric":
            return RecordDict({ROUTERS: tensors_to_arrays(start), METRICS: MetricRecord({"loss-last": [1.0, 2.0]})})
        rows = {k: v.clone() for k, v in start.items()}
        for v in rows.values():
            if v.dim() == 2:
                v[1], v[0] = 3e38, -1e30
        return RecordDict({ROUTERS: tensors_to_arrays(rows), METRICS: MetricRecord({"loss-last": 1.0})})

    c = _coordinator(world, tmp_path, grid=FakeGrid({3: canary}), router_tuning=True)
    c.collect()
    assert c.owners["canary"].status == ACCEPTED
    model = c.merge(["canary"])
    notes = "\n".join(c.notes)
    assert [r["owners"] for r in c.summary["router_tuning"]["rounds"]] == [["canary"]]
    assert "round 1: owner 'canary' sat out" in notes and "metric 'loss-last'" in notes
    assert "stopped at round 1" in notes
    # Round 0's aggregate moved canary's row by its public change plus at most the clipping bound.
    bounds = change_bounds(starts[0], world_spec(world).router_tuning)
    for name, after in starts[1].items():  # the routers round 1 started from: round 0's aggregate
        if after.dim() == 2:
            moved = (after[1] - starts[0][name][1]).norm()
            assert torch.isfinite(after).all() and moved < 10 * bounds[name][1], (name, moved)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 200, (1, 16))).logits).all()
    assert "| canary | accepted |" in _rendered(c)


def world_spec(world):
    from flexmoe.spec import FederationSpec

    return FederationSpec.load(world.spec)


# -- real processes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_deployment_survives_an_impostor_and_a_router_poisoner(world, tmp_path):
    """Real SuperLink and SuperNodes, SuperNode authentication on and owner-keys set. ``mallory``
    (its own registered key) says it is owner ``a`` and connects first; ``b`` trains honestly, then
    answers every router round with a's row at -1e30 and its own at 3e38. The run completes:
    a's expert is a's, mallory is ignored with a note, b sits out the rounds, and the exported
    model's logits are finite."""
    out = tmp_path / "coordinator"
    faulty_app = app_with_faults(APP, tmp_path / "app")
    with Deployment(tmp_path / "deployment", tls=True, auth=True) as d:
        d.start_superlink()
        d.start_supernode("mallory", world.node("a", data="b"))
        d.start_supernode("a", world.node("a"))
        d.start_supernode("b", world.node("b", **{"fault-injection": "poison-routers"}))
        keys = f"a={d.keys['a']},b={d.keys['b']}"
        run_id = d.run(faulty_app, world.run_config(out, "a,b", **{"owner-keys": keys}))
        run = d.wait(run_id, RUN_TIMEOUT, until=(out / "report.json").is_file)
        log = d.log(run_id) if run["status"] != "finished:completed" else ""
        trained_mallory = d.logs["supernode-mallory"].read_text().count("Receiving: train message")
    assert run["status"] == "finished:completed", (run, log[-4000:])
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == ["a", "b"] and trained_mallory == 0
    notes = "\n".join(report["notes"])
    assert "holds a key bound to no expected owner" in notes
    assert "owner 'b' sat out" in notes and "changes to rows" in notes
    assert [r["owners"] for r in report["router_tuning"]["rounds"]] == [["a"], ["a"]]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        assert torch.isfinite(hf(torch.randint(3, 200, (1, 16))).logits).all()
    assert not math.isnan(report["seconds"])
