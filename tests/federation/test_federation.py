"""The Flower federation (docs/federation.md): owners' ClientApps and the coordinator's ServerApp.

The end-to-end tests start a real ``flower-superlink`` and real ``flower-supernode`` processes on
loopback (:mod:`flexmoe.testing.federation`), submit the app in examples/federation with ``flwr run``,
and read the run's final status with ``flwr ls`` (``flwr run`` returns as soon as the run is
submitted, and would exit 0 even if the ServerApp failed). The public model is the tiny OLMo-2
of ``conftest.public_dir``; owners train 10 steps.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import content_sha256, file_sha256
from flexmoe.federation.client_app import app, reply_content
from flexmoe.federation.coordinator import Coordinator, OwnerState
from flexmoe.federation.records import (
    EXPERT,
    MANIFEST,
    METRICS,
    PROXY,
    REPLY_RECORDS,
    ROUND,
    ROUTERS,
    ReplyError,
    arrays_to_tensors,
    read_artifact_file,
    tensors_to_arrays,
)
from flexmoe.federation.router_rounds import change_bounds, owner_change
from flexmoe.federation.settings import CoordinatorSettings, OwnerSettings
from flexmoe.federation.task import OwnerResult
from flexmoe.formats.load import load_public_model
from flexmoe.testing.faults import app_with_faults, inject_fault
from flexmoe.testing.federation import Deployment, message_to, wait_for

APP = Path(__file__).resolve().parents[2] / "examples" / "federation"
RUN_TIMEOUT = 480.0  # seconds; generous for a loaded 2-core machine


def _state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


# -- end to end, real processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_run(world, tmp_path_factory):
    """Owners a and b are good, c sends an expert trained on another public model (fault
    injection: the example app with flexmoe.testing.faults' ClientApp), d's SuperNode is killed
    (SIGKILL) while it trains; quorum 2."""
    root = tmp_path_factory.mktemp("crash_run")
    out = root / "coordinator"
    faulty_app = app_with_faults(APP, root / "app")
    with Deployment(root / "deployment") as d:
        d.start_superlink()
        d.start_supernode("a", world.node("a"))
        d.start_supernode("b", world.node("b", **{"public-data": str(world.public_data), "share-proxy": True}))
        d.start_supernode("c", world.node("c", **{"fault-injection": "wrong-fingerprint"}))
        d.start_supernode("d", world.node("d"))
        run_id = d.run(faulty_app, world.run_config(out, "a,b,c,d", quorum=2))
        wait_for(lambda: "Receiving: train message" in d.logs["supernode-d"].read_text(), 300, "d to receive the spec")
        time.sleep(3)  # d's ClientApp is starting its training
        d.kill("supernode-d", signal.SIGKILL)
        run = d.wait(run_id, RUN_TIMEOUT, until=(out / "report.json").is_file)
        log = d.log(run_id) if run["status"] != "finished:completed" else ""
        router_rounds_a = d.logs["supernode-a"].read_text().count("Receiving: train.router message")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return {"run": run, "log": log, "out": out, "report": report, "router_rounds_a": router_rounds_a}


@pytest.mark.slow
def test_federation_merges_the_good_experts_and_reports_the_corrupt_and_the_crashed_owner(crash_run, world):
    run, report, out = crash_run["run"], crash_run["report"], crash_run["out"]
    assert run["status"] == "finished:completed", (run, crash_run["log"][-4000:])
    assert report["status"] == "merged"
    assert report["accepted"] == ["a", "b"]
    # (b) the corrupt expert is rejected with the field and the expected and found values
    assert set(report["rejected"]) == {"c"}
    assert "fingerprint" in report["rejected"]["c"] and "0" * 64 in report["rejected"]["c"]
    # (a) the killed SuperNode's owner is named as missing, with why
    assert set(report["missing"]) == {"d"}
    assert report["owners"]["d"]["status"] == "failed" and report["missing"]["d"]
    md = (out / "report.md").read_text()
    for owner in "abcd":
        assert f"| {owner} | " in md
    assert (
        "router tuning: federated, on the owners' own text and the public data: 2 round(s) of 2 local steps; "
        "owners in the last round: a, b" in md
    )
    # Accepted artifacts are kept, rejected ones are not; only b allowed its proxy selection out.
    assert sorted(p.name for p in (out / "artifacts").glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    assert report["owners"]["a"]["proxy"] is None and len(report["owners"]["b"]["proxy"]["indices"]) == 3
    assert report["owners"]["a"]["training_tokens"] == 10 * 4 * 32
    # Federated router tuning: a and b (the accepted owners still connected) took part in both rounds; each
    # received the experts once (kept in its work dir, checked by hash) and the routers every round.
    tuning = report["router_tuning"]
    assert tuning["data"] == "owners" and tuning["steps"] == 4
    assert [r["owners"] for r in tuning["rounds"]] == [["a", "b"], ["a", "b"]]
    kept = sorted(
        f"{content_sha256(*read_artifact_file(out / 'artifacts' / f'{o}.safetensors'))}.safetensors" for o in "ab"
    )
    for owner in "ab":
        assert sorted(p.name for p in (world.root / "owners" / owner / "router-tuning").iterdir()) == kept
    assert crash_run["router_rounds_a"] == 2

    # The export is a transformers FlexOlmo model whose experts are exactly [public, a, b].
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(hf).__name__ == "FlexOlmoForCausalLM" and hf.config.num_experts == 3
    public = load_public_model(world.public_model)
    state, inter = hf.state_dict(), public.config.intermediate_size
    for j, owner in enumerate(["a", "b"], start=1):  # transformers fuses experts: gate rows, then up rows
        tensors, _ = read_artifact_file(out / "artifacts" / f"{owner}.safetensors")
        gate_up = state["model.layers.0.mlp.experts.gate_up_proj"][j]
        torch.testing.assert_close(gate_up[:inter], tensors["layers.0.expert.gate_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(gate_up[inter:], tensors["layers.0.expert.up_proj.weight"], rtol=0, atol=0)
    with torch.no_grad():
        ids = torch.randint(3, public.config.vocab_size, (1, 16))
        assert torch.isfinite(hf(ids).logits).all()
    # An owner sends its expert, not a model: far fewer bytes than a full-model (FedAvg) upload.
    full_model = sum(p.numel() * p.element_size() for p in public.parameters())
    assert 0 < report["owners"]["a"]["upload_bytes"] < full_model / 2


@pytest.mark.slow
def test_tls_and_supernode_auth_resume_after_the_coordinator_is_killed(crash_run, world, tmp_path):
    """(c) The coordinator dies after accepting a's expert; a rerun with resume=true keeps it,
    trains only b, and merges exactly the model an uninterrupted run merges. Over TLS, with
    SuperNode authentication on."""
    out = tmp_path / "coordinator"
    with Deployment(tmp_path / "deployment", tls=True, auth=True) as d:
        d.start_superlink()
        d.start_supernode("a", world.node("a"))
        first = d.run(APP, world.run_config(out, "a,b"))
        progress = out / "progress.json"
        wait_for(
            lambda: progress.is_file() and json.loads(progress.read_text())["owners"]["a"] == "accepted",
            300,
            "a's expert to be accepted",
        )
        artifact = out / "artifacts" / "a.safetensors"
        kept = file_sha256(artifact), artifact.stat().st_mtime_ns
        os.kill(json.loads(progress.read_text())["pid"], signal.SIGKILL)  # the coordinator crashes

        d.start_supernode("b", world.node("b", **{"public-data": str(world.public_data), "share-proxy": True}))
        second = d.run(APP, world.run_config(out, "a,b", resume=True))
        run = d.wait(
            second, RUN_TIMEOUT, until=lambda: json.loads(progress.read_text())["phase"] in ("merged", "failed")
        )
        log = d.log(second) if run["status"] != "finished:completed" else ""
        assert d.status(first)["status"] != "finished:completed"
        trained_a = d.logs["supernode-a"].read_text().count("Receiving: train message")
    assert run["status"] == "finished:completed", (run, log[-4000:])
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == ["a", "b"]
    assert report["owners"]["a"]["resumed"] and not report["owners"]["b"]["resumed"]
    assert (file_sha256(artifact), artifact.stat().st_mtime_ns) == kept  # a's expert was not retrained or rewritten
    assert trained_a == 1
    # The same merged model as the uninterrupted run with the same owners, data and seed.
    resumed, uninterrupted = _state_dict(out / "model"), _state_dict(crash_run["out"] / "model")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)


# -- one owner's reply, in process ------------------------------------------------------------


def test_a_reply_carries_no_local_text_or_token_ids(owner_reply, world):
    from transformers import AutoTokenizer

    reply, node_config, _ = owner_reply
    content = reply.content
    assert set(content.keys()) <= REPLY_RECORDS and {EXPERT, MANIFEST, METRICS} <= set(content.keys())
    # The expert: exactly the artifact's tensors, floating point only (token ids would be integers).
    tensors, metadata = read_artifact_file(Path(node_config["work-dir"]) / "canary.safetensors")
    assert set(content[EXPERT].keys()) == set(tensors)
    assert {a.dtype for a in content[EXPERT].values()} <= {"float32", "float16", "bfloat16"}
    # The manifest: the artifact's metadata and nothing else; no local path or text.
    assert dict(content[MANIFEST]) == metadata
    # The proxy selection: ids and scores of public documents only.
    proxy = dict(content[PROXY])
    assert set(proxy) == {"version", "budget", "num-public", "indices", "scores"}
    public_docs = world.public_data.read_text().splitlines()
    assert proxy["num-public"] == len(public_docs) and all(0 <= i < len(public_docs) for i in proxy["indices"])
    # Metrics are numbers.
    assert all(isinstance(v, (int, float, list)) for v in content[METRICS].values())

    # Nowhere in the serialised reply: the local text, its data path, or its token ids (as
    # int32 or int64, the widths a packed dataset or a tensor would use).
    wire = b"".join(r.deflate() for r in content.values()) + b"".join(a.data for a in content[EXPERT].values())
    assert world.canary.encode() not in wire and world.canary[:24].encode() not in wire
    assert node_config["data-path"].encode() not in wire
    ids = AutoTokenizer.from_pretrained(world.public_model)(world.canary, add_special_tokens=False)["input_ids"][:8]
    for fmt in ("<%di", "<%dq"):
        assert struct.pack(fmt % len(ids), *ids) not in wire


def _router_message(spec, start, sha: str, experts=None) -> Message:
    """A ``train.router`` message as the coordinator sends it: round 0 of a merge of the canary's expert."""
    content = RecordDict(
        {
            "spec": ConfigRecord({"json": spec.to_json(), "sha256": spec.sha256}),
            ROUND: ConfigRecord({"round": 0, "owners": "canary", "sha256": sha, "seed": 0}),
            ROUTERS: tensors_to_arrays(start),
        }
    )
    if experts is not None:
        content[f"{EXPERT}:canary"], content[f"{MANIFEST}:canary"] = (
            tensors_to_arrays(experts[0]),
            ConfigRecord(experts[1]),
        )
    return message_to(7, content, "train.router", message_id="r1")


def test_an_owner_tunes_the_routers_on_its_text_and_sends_back_only_routers(owner_reply, world, tmp_path):
    """The real ``train.router`` handler, in process: experts are checked (hash, then every artifact
    check) before use and kept for later rounds; only the routers and metrics go back."""
    import flexmoe
    from flexmoe.training.router_tuning import check_router_rows, router_rows

    _, node_config, spec = owner_reply
    tensors, metadata = read_artifact_file(Path(node_config["work-dir"]) / "canary.safetensors")
    sha = content_sha256(tensors, metadata)
    model = flexmoe.assemble(
        load_public_model(world.public_model), [Path(node_config["work-dir"]) / "canary.safetensors"]
    )
    start = router_rows(model)
    context = Context(
        run_id=1, node_id=7, node_config={**node_config, "work-dir": str(tmp_path)}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ValueError, match="must send it again"):  # nothing kept yet, nothing sent
        app(_router_message(spec, start, sha), context)
    with pytest.raises(ArtifactError, match="announced another expert"):
        app(_router_message(spec, start, "0" * 64, (tensors, metadata)), context)
    with pytest.raises(ValueError, match="not sha256 hex digests"):  # hashes name files: no path can ride along
        app(_router_message(spec, start, "../../escape", (tensors, metadata)), context)
    bad = {k: v.clone() for k, v in tensors.items()}
    bad["layers.0.expert.down_proj.weight"].view(-1)[0] = float("nan")  # announced honestly, still refused
    with pytest.raises(ArtifactError, match="values of layers.0.expert.down_proj.weight"):
        app(_router_message(spec, start, content_sha256(bad, metadata), (bad, metadata)), context)

    first = app(_router_message(spec, start, sha, (tensors, metadata)), context)
    assert set(first.content.keys()) == {ROUTERS, METRICS}
    rows = arrays_to_tensors(first.content[ROUTERS], "canary")
    check_router_rows(rows, model, "canary")
    assert not torch.equal(rows["layers.0.router.weight"], start["layers.0.router.weight"])
    assert torch.equal(rows["layers.0.router.bias"], start["layers.0.router.bias"])  # biases do not train
    # Only its own row and r_0 changed, each by less than the clipping bound: honest steps are never clipped.
    bounds = change_bounds(start, spec.router_tuning)
    change = owner_change(start, rows, 1, "canary", bounds)
    for name in start:
        torch.testing.assert_close(change[name], rows[name] - start[name], rtol=0, atol=0)
        moved = (rows[name] - start[name]).reshape(len(start[name]), -1).norm(dim=1)
        assert (moved <= bounds[name] / 2).all(), (name, moved, bounds[name])  # within the bound without its margin
    assert first.content[METRICS]["steps"] == spec.router_tuning.local_steps
    again = app(_router_message(spec, start, sha), context)  # the expert kept from the first round
    torch.testing.assert_close(arrays_to_tensors(again.content[ROUTERS], "canary"), rows, rtol=0, atol=0)


@pytest.fixture
def coordinator(world, tmp_path):
    settings = CoordinatorSettings(
        spec=str(world.spec),
        expected_owners=["canary"],
        out_dir=str(tmp_path),
        public_data=str(world.public_data),
        router_tuning=False,
    )
    c = Coordinator(None, settings)
    c.start()
    c.prepare()
    return c


@pytest.mark.parametrize(
    "fault, field",
    [
        ("nan", "values of layers.0.expert.down_proj.weight"),
        ("wrong-shape", "shape of layers.0.expert.down_proj.weight"),
        ("wrong-fingerprint", "fingerprint"),
    ],
)
def test_the_coordinator_rejects_a_corrupt_expert_and_names_why(owner_reply, coordinator, fault, field):
    reply, node_config, _ = owner_reply
    s = OwnerSettings.from_configs(node_config, {})
    content = inject_fault(
        reply_content(OwnerResult(Path(node_config["work-dir"]) / "canary.safetensors", None), s), fault
    )
    with pytest.raises(ArtifactError, match="canary") as e:
        coordinator.accept(OwnerState("canary"), content)
    assert e.value.field == field
    assert not list((coordinator.artifacts_dir).glob("*.safetensors"))
    # The genuine reply passes the same checks and is kept at once.
    state = OwnerState("canary")
    coordinator.accept(state, reply.content)
    assert state.status == "accepted" and (coordinator.artifacts_dir / "canary.safetensors").is_file()


def test_the_coordinator_rejects_anything_sent_besides_the_expert(owner_reply, coordinator):
    reply, _, _ = owner_reply
    content = RecordDict(dict(reply.content))
    content["notes"] = ConfigRecord({"text": "some local text"})
    with pytest.raises(ReplyError, match="records: expected only"):
        coordinator.accept(OwnerState("canary"), content)


def test_the_coordinator_merges_routes_and_exports_an_exact_transformers_model(owner_reply, coordinator):
    """Router tuning off: assemble, the spec's routing recipe (LDA from the owner's statistics,
    biases folded into the rows), export. transformers reproduces the merged model's logits."""
    from transformers import AutoModelForCausalLM

    reply, _, _ = owner_reply
    coordinator.accept(coordinator.owners["canary"], reply.content)
    merged = coordinator.merge(["canary"]).eval()
    summary = coordinator.summary
    assert summary["router_tuning"] == {"skipped": "run config router-tuning=false"}
    assert summary["routing_recipe"]["method"] == "lda" and summary["routing_recipe"]["folded"]
    assert summary["export"]["format"] == "flexolmo" and summary["experts"] == ["public", "canary"]
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(coordinator.out / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged(ids).logits, rtol=0, atol=1e-4)


# -- settings ---------------------------------------------------------------------------------


def test_the_example_app_config_is_valid_coordinator_and_simulation_settings():
    try:
        import tomllib
    except ImportError:  # Python 3.10; Flower depends on tomli
        import tomli as tomllib

    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["components"] == {
        "serverapp": "flexmoe.federation.server_app:app",
        "clientapp": "flexmoe.federation.client_app:app",
    }
    settings = CoordinatorSettings.from_run_config(config["config"])
    assert settings.expected_owners == ["code", "unicode"] and settings.required == 2
    # In the simulation engine, virtual SuperNode i is the i-th expected owner, with the i-th data path.
    owner = OwnerSettings.from_configs({"partition-id": 1, "num-partitions": 2}, config["config"])
    assert owner.owner == "unicode" and owner.data_path.endswith("unicode_names") and owner.share_proxy
    with pytest.raises(ValueError, match="quorum"):
        CoordinatorSettings.from_run_config({**config["config"], "quorum": 3})
    with pytest.raises(ValueError, match="owner name"):
        OwnerSettings.from_configs({"data-path": "x"}, {})
