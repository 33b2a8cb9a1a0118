"""Shared by the federation tests: the public model, spec and owners' data (:func:`world`), and
one genuine owner reply from the real ClientApp (:func:`owner_reply`), each built once a session."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from flexmoe.core.hashing import fingerprint
from flexmoe.federation.client_app import app
from flexmoe.formats.load import load_public_model
from flexmoe.spec import ExpertRecipe, FederationSpec, ProxyBudget, RouterTuningRecipe, RoutingRecipe
from flexmoe.testing import license_texts
from flexmoe.testing.federation import message_to

CANARY = "zqxv-canary-7351 the owner's secret sentence that must never leave its machine"


@dataclass
class World:
    root: Path
    spec: Path
    public_model: Path
    public_data: Path
    data: dict[str, Path]
    canary: str = CANARY

    def run_config(self, out: Path, owners: str, **overrides) -> dict:
        return {
            "spec": str(self.spec),
            "expected-owners": owners,
            "out-dir": str(out),
            "public-data": str(self.public_data),
            "router-tuning": True,
            "allow-approximate": True,
            "connect-timeout": 300.0,
            "train-timeout": 300.0,
            "poll-interval": 1.0,
            **overrides,
        }

    def node(self, owner: str, data: str | None = None, **extra) -> dict:
        return {
            "owner": owner,
            "data-path": str(self.data[data or owner]),
            "work-dir": str(self.root / "owners" / owner),
            **extra,
        }


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def world(public_dir, tmp_path_factory) -> World:
    """The public model and spec, two owners' small corpora (licences, Python code) and the public corpus."""
    root = tmp_path_factory.mktemp("federation")
    spec = FederationSpec(
        public_model=str(public_dir),
        fingerprint=fingerprint(load_public_model(public_dir)),
        embedder=None,  # the hidden-state router init and TF-IDF proxy selection: no embedder to load
        expert=ExpertRecipe(max_steps=10, batch_size=4, seq_len=32, warmup_steps=2),
        # Federated router tuning: 2 Flower rounds of 2 local steps on each owner's text and the public data.
        router_tuning=RouterTuningRecipe(
            data="owners", rounds=2, max_steps=4, batch_size=4, seq_len=32, warmup_steps=1
        ),
        proxy=ProxyBudget(min_docs=3),
        # The token router: federated router tuning tunes token routers (the posterior recipe, the
        # default, is not tuned), and this run checks the tuning rounds and the FlexOlmo export.
        # Owners ship their bigram counts whatever the method; 2**10 buckets (not the default 2**20,
        # 4 MiB) keep this tiny model's uploads an expert's size.
        routing=RoutingRecipe(method="lda", bigram_buckets=2**10),
    )
    spec.save(root / "spec.json")
    licences = [t[:3000] for t in license_texts()]
    code = [p.read_text()[:3000] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]]
    data = {
        "licences": _write_jsonl(root / "data" / "licences" / "train.jsonl", licences[:8]).parent,
        "code": _write_jsonl(root / "data" / "code" / "train.jsonl", code[:12]).parent,
        "canary": _write_jsonl(root / "data" / "canary" / "train.jsonl", [CANARY * 20, *licences[:6]]).parent,
    }
    data.update(a=data["licences"], b=data["code"], c=data["licences"], d=data["code"])
    public = _write_jsonl(root / "data" / "public.jsonl", licences[8:] + code[12:])
    return World(root, root / "spec.json", Path(public_dir), public, data)


@pytest.fixture(scope="session")
def owner_reply(world, tmp_path_factory):
    """The real ClientApp ``train`` handler, called in this process, for an owner whose text
    holds a canary sentence."""
    spec = FederationSpec.load(world.spec)
    node_config = {
        "owner": "canary",
        "data-path": str(world.data["canary"]),
        "public-data": str(world.public_data),
        "share-proxy": True,
        "work-dir": str(tmp_path_factory.mktemp("canary-owner")),
    }
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    content = RecordDict(
        {"spec": ConfigRecord({"json": spec.to_json(), "sha256": spec.sha256}), "train": ConfigRecord({"seed": 0})}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXMOE_CACHE", str(tmp_path_factory.mktemp("cache")))
        reply = app(message_to(7, content, "train"), context)
    return reply, node_config, spec
