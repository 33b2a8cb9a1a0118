"""The main job end to end: ``flexmoe demo --out DIR`` reproduces FlexOlmo's comparison table
(Shi et al., 2025, Table 1) on text found on this machine.

1. **Data.** :func:`flexmoe.data.corpus.local_corpus`: public data = ``stdlib_code`` + ``pydoc_topics``;
   one owner per ``docstrings``, ``comments``, ``unicode_names``, ``licenses`` (docs/routing.md's
   setting), written to ``DIR/data``.
2. **Public model.** :func:`flexmoe.training.pretrain.pretrain`: a small OLMo-2 with a byte-level BPE
   tokenizer, trained from scratch on the public text (``DIR/public``).
3. **Spec.** A :class:`~flexmoe.FederationSpec` with ``embedder=None`` (router rows from the
   public model's own mean MLP inputs: the fallback that needs no sentence embedder), the token
   router's recipe (``RoutingRecipe(method="lda")``, so the owners ship the MLP-input statistics
   it needs) and the public domain's token counts next to it.
4. **Federation.** flexmoe's Flower ``ClientApp`` (one virtual SuperNode per owner) and
   ``ServerApp`` (the coordinator) on Flower's simulation engine: each owner trains its expert on
   its own text and ships it with its routing statistics and proxy selection; the coordinator
   validates and keeps every expert, merges them with the spec's token routing recipe
   (:func:`flexmoe.routing.route`, biases folded so the model exports exactly), tunes the routers
   over further Flower rounds on each owner's own text (only router rows leave an owner), and
   exports a ``transformers`` FlexOlmo checkpoint (``DIR/federation/coordinator``; copied to
   ``DIR/model``): the ``flexolmo_token`` row.
5. **Methods**, each scored with :func:`flexmoe.evaluate.perplexity` on every domain's held-out
   documents: ``public``, ``expert:<owner>``, ``soup``, ``weighted_soup``, ``btm``,
   ``btm_top3_ema``, ``btx``, ``flexolmo_no_rt``, ``flexolmo_token``, ``flexolmo_published``,
   ``flexolmo`` (the library's default recipe, the posterior router, built from the accepted
   artifacts by the coordinator's assembly pipeline), ``unrestricted`` and the ``oracle``
   reference.
6. **Outputs** in ``DIR``: ``report.json``, ``report.md``, ``perplexity.png``, ``routing.png``,
   ``routing.json`` and ``model/`` (the ``flexolmo_token`` model as a ``transformers`` FlexOlmo
   checkpoint: those checkpoints hold a token router only). docs/demo.md explains the report.

Sizes come from :class:`DemoConfig` (``--settings.*`` or a YAML ``--config``); ``--fast`` is the
small preset CI runs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.unigram import write_public_statistics
from flexmoe.core.hashing import fingerprint
from flexmoe.core.surgery import decoder_layers, moe_blocks, set_top_k, upcycle
from flexmoe.data.corpus import Domain, local_corpus, write_corpus
from flexmoe.data.documents import read_documents
from flexmoe.data.packing import pack_domain, spread_rows
from flexmoe.data.statistics import packed_token_statistics
from flexmoe.experiments.report import findings, markdown_table, plot_perplexity, plot_routing, write_markdown
from flexmoe.owner.embed import router_embedding
from flexmoe.owner.proxy import ProxySelection
from flexmoe.spec import ExpertRecipe, FederationSpec, RouterTuningRecipe, RoutingRecipe

PUBLIC_DOMAINS = ("stdlib_code", "pydoc_topics")
OWNERS = ("docstrings", "comments", "unicode_names", "licenses")
PUBLIC = "public"
# The simulated owners run in Ray worker processes, which cannot see this process's variables:
# the run config travels as a JSON file named by this environment variable.
RUN_CONFIG_ENV = "FLEXMOE_DEMO_RUN_CONFIG"
MARKER = ".flexmoe-demo"
# The coordinator's export, and the format flexolmo_no_rt is rebuilt for (its routers folded alike).
EXPORT_FORMAT = "flexolmo"


@dataclass
class DemoConfig:
    """The sizes of a demo run: the defaults, or :meth:`fast`, the preset CI runs (docs/demo.md
    has the measured times of both).

    Args:
        docs_per_domain: documents per corpus domain (a fixed hash-chosen sample; 10% held out).
        vocab_size, hidden_size, num_layers, num_heads: the public OLMo-2 model and tokenizer.
        seq_len: tokens per sequence everywhere (training, router statistics, evaluation).
        pretrain_steps, pretrain_batch_size: public-model pretraining.
        expert_steps, expert_batch_size, expert_lr: each owner's expert, and each BTX dense
            expert (the same budget, fully fine-tuned).
        top_k: experts per token of the merged models (``flexolmo*``, ``btx``, ``unrestricted``).
        router_tuning_steps, router_tuning_rounds: the federated router tuning of ``flexolmo``:
            each participant's (every owner's, on its own text, and the coordinator's, on the
            public data) local steps in all, spread over that many Flower rounds.
        btx_finetune_steps: BTX's MoE fine-tuning after the mix, on the data the coordinator holds
            (the public data), as in FlexOlmo's comparison; the same on every owner's text pooled
            (the original BTX, which ignores privacy) is a diagnostic in the report.
        unrestricted_steps: the jointly trained MoE (default: as many sequences as all the
            owners' experts together).
        joint_batch_size, joint_lr: batch and learning rate of those two joint trainings.
        btm_top_k: domains kept per position by the BTM ensembles (BTM paper: 3).
        btm_prior_rows: held-out rows per domain that fit ``btm_top3_ema``'s cached prior (rows of
            the domain's validation documents that are not scored; BTM section 4.1).
        weighted_soup_prefix: tokens of each row that choose the weighted soup.
        eval_tokens: held-out tokens per domain (whole rows spread over the domain's documents).
        eval_batch_size: rows per forward pass in evaluation.
        seed: seeds the corpus split, every training run and the router initialisations.
    """

    docs_per_domain: int = 120
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 64
    pretrain_steps: int = 600
    pretrain_batch_size: int = 16
    expert_steps: int = 200
    expert_batch_size: int = 8
    expert_lr: float = 1e-3
    top_k: int = 4
    router_tuning_steps: int = 100
    router_tuning_rounds: int = 10
    btx_finetune_steps: int = 100
    unrestricted_steps: int = 400
    joint_batch_size: int = 16
    joint_lr: float = 1e-3
    btm_top_k: int = 3
    btm_prior_rows: int = 16
    weighted_soup_prefix: int = 16
    eval_tokens: int = 8192
    eval_batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        positive = [f.name for f in dataclasses.fields(self) if f.name != "seed"]
        bad = [f"{n}={getattr(self, n)}" for n in positive if not getattr(self, n) > 0]
        if bad:
            raise ValueError(f"DemoConfig: these settings must be > 0: {', '.join(bad)}")
        if self.docs_per_domain < 10:
            raise ValueError(
                f"DemoConfig.docs_per_domain={self.docs_per_domain}: at least 10, so every domain "
                "keeps a held-out document"
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"DemoConfig: hidden_size={self.hidden_size} must split into num_heads={self.num_heads} "
                "heads of even width (RoPE)"
            )
        if self.router_tuning_rounds > self.router_tuning_steps:
            raise ValueError(
                f"DemoConfig: router_tuning_rounds={self.router_tuning_rounds} is more than "
                f"router_tuning_steps={self.router_tuning_steps}; each round takes at least one step"
            )
        if self.top_k > len(OWNERS) + 1:
            raise ValueError(f"DemoConfig.top_k={self.top_k}: the merged model has {len(OWNERS) + 1} experts")
        if not 2 <= self.weighted_soup_prefix < self.seq_len:
            raise ValueError(f"DemoConfig.weighted_soup_prefix={self.weighted_soup_prefix} must be in [2, seq_len)")
        if self.eval_tokens < self.seq_len:
            raise ValueError(
                f"DemoConfig.eval_tokens={self.eval_tokens} is less than one row of seq_len={self.seq_len}"
            )
        if self.vocab_size < 259:
            raise ValueError(f"DemoConfig.vocab_size={self.vocab_size}: at least 259 (256 bytes + 3 special tokens)")

    @classmethod
    def fast(cls) -> DemoConfig:
        """The ``--fast`` preset (CI): every stage runs, on a much smaller model and corpus."""
        return cls(
            docs_per_domain=30,
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            pretrain_steps=120,
            expert_steps=40,
            router_tuning_steps=20,
            router_tuning_rounds=4,
            btx_finetune_steps=20,
            unrestricted_steps=60,
            joint_batch_size=8,
            eval_tokens=1024,
        )

    def overriding(self, settings: DemoConfig | None) -> DemoConfig:
        """This config with every field of ``settings`` that differs from the default sizes."""
        if settings is None:
            return self
        default = DemoConfig()
        changed = {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(self)
            if getattr(settings, f.name) != getattr(default, f.name)
        }
        return dataclasses.replace(self, **changed)


def default_threads() -> int:
    """Torch threads: half the cores, at most 4 (the models are tiny; more threads only wait)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# -- progress ---------------------------------------------------------------------------------------


class Stages:
    """Logs each stage with its wall time and this process's CPU time, and keeps both for the
    report. On a shared machine the CPU time (one torch thread) is what the stage would take on
    an idle core; the simulated owners' CPU time (Ray workers) is not in it."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []

    def log(self, msg: str) -> None:
        print(f"flexmoe demo [{time.perf_counter() - self.started:7.1f} s] {msg}", flush=True)

    def run(self, key: str, what: str, fn: Callable, /, *args, **kwargs):
        self.log(f"{what} ...")
        t, c = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.times[key] = round(time.perf_counter() - t, 1)
        self.cpu[key] = round(time.process_time() - c, 1)
        self.log(f"{what}: done in {self.times[key]:.1f} s (CPU {self.cpu[key]:.1f} s)")
        return result

    def machine(self) -> dict:
        return {
            "cpu_count": os.cpu_count(),
            "load_average_at_start": self.load,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if self.load else [],
            "main_process_cpu_s": self.cpu,
        }


def _progress_bar() -> bool:
    return sys.stderr.isatty()


# -- 1-3: data, public model, spec -----------------------------------------------------------------


def build_corpus(cfg: DemoConfig, data_dir: Path) -> dict:
    """``{domain: Domain}`` for ``public`` (the two public domains together) and every owner."""
    corpus = local_corpus(
        max_docs_per_domain=cfg.docs_per_domain, seed=cfg.seed, domains=list(PUBLIC_DOMAINS) + list(OWNERS)
    )
    parts = [corpus[d] for d in PUBLIC_DOMAINS]
    public = Domain(
        name=PUBLIC,
        description="public data: " + " + ".join(PUBLIC_DOMAINS),
        source="; ".join(p.source for p in parts),
        train=[t for p in parts for t in p.train],
        val=[t for p in parts for t in p.val],
    )
    domains = {PUBLIC: public, **{o: corpus[o] for o in OWNERS}}
    write_corpus(domains, data_dir)
    return {"domains": domains, "parts": {d: corpus[d] for d in PUBLIC_DOMAINS}}


def read_corpus(data_dir: Path, parts_val_docs: dict[str, int] | None) -> dict:
    """:func:`build_corpus`'s result read back from the files it wrote. The public validation
    documents are the parts' one after another; ``parts_val_docs`` (the report's
    ``settings.corpus.public.parts_val_docs``) says where each part ends."""
    if not parts_val_docs or list(parts_val_docs) != list(PUBLIC_DOMAINS):
        raise ValueError(
            f"the run's report does not say how its public validation text splits into {PUBLIC_DOMAINS} "
            "(settings.corpus.public.parts_val_docs; runs before it was recorded cannot be reopened)"
        )
    domains = {}
    for d in (PUBLIC, *OWNERS):
        split = {s: read_documents(str(data_dir / d / f"{s}.jsonl")) for s in ("train", "val")}
        domains[d] = Domain(name=d, description=d, source=str(data_dir / d), **split)
    val, parts, start = domains[PUBLIC].val, {}, 0
    if sum(parts_val_docs.values()) != len(val):
        raise ValueError(
            f"{data_dir / PUBLIC / 'val.jsonl'} holds {len(val)} documents, the report says "
            f"{sum(parts_val_docs.values())} ({parts_val_docs})"
        )
    for p, n in parts_val_docs.items():
        parts[p] = Domain(name=p, description=p, source=str(data_dir / PUBLIC), train=[], val=val[start : start + n])
        start += n
    return {"domains": domains, "parts": parts}


def pretrain_public(cfg: DemoConfig, data_dir: Path, out: Path) -> dict:
    from flexmoe.training.pretrain import REPORT, pretrain  # deferred: Lightning; keeps `flexmoe --help` fast

    pretrain(
        [str(data_dir / PUBLIC / "train.jsonl")],
        str(out),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        seq_len=cfg.seq_len,
        batch_size=cfg.pretrain_batch_size,
        max_steps=cfg.pretrain_steps,
        warmup_steps=max(1, cfg.pretrain_steps // 10),
        seed=cfg.seed,
        val_every=cfg.pretrain_steps,
        val_batches=8,
        accelerator="cpu",
        progress_bar=_progress_bar(),
    )
    return json.loads((out / REPORT).read_text())


def make_spec(cfg: DemoConfig, public_dir: Path, public_docs: list[str], path: Path):
    """The coordinator's spec: no sentence embedder (r_pub from the public model's own MLP inputs),
    the token router's recipe (LDA: the federation builds and tunes ``flexolmo_token``, and the
    owners ship the MLP-input statistics it needs besides their token counts), the demo's sizes
    for expert training and router tuning, and the public domain's token counts in a file next to
    it (as ``flexmoe spec --public-data`` writes), which the posterior router of ``flexolmo`` reads."""
    from transformers import AutoTokenizer  # deferred: transformers; keeps `flexmoe --help` fast

    from flexmoe.formats.load import load_public_model  # deferred: transformers; keeps `flexmoe --help` fast

    model = load_public_model(str(public_dir))
    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    rows = router_embedding(public_docs, model, embedder=None, tokenizer=tokenizer, seq_len=cfg.seq_len, seed=cfg.seed)
    routing = RoutingRecipe(method="lda")
    counts = packed_token_statistics(
        public_docs, tokenizer, cfg.seq_len, model.config.vocab_size, routing.bigram_buckets
    )
    spec = FederationSpec(
        public_model=str(public_dir),
        fingerprint=fingerprint(model),
        embedder=None,
        public_router_embedding=rows.tolist(),
        expert=ExpertRecipe(
            max_steps=cfg.expert_steps,
            batch_size=cfg.expert_batch_size,
            seq_len=cfg.seq_len,
            lr=cfg.expert_lr,
            warmup_steps=max(1, cfg.expert_steps // 10),
        ),
        router_tuning=RouterTuningRecipe(
            data="owners",
            rounds=cfg.router_tuning_rounds,
            max_steps=cfg.router_tuning_steps,
            seq_len=cfg.seq_len,
            warmup_steps=max(1, cfg.router_tuning_steps // 10),
        ),
        routing=routing,
        public_statistics=write_public_statistics(path, counts),
    )
    spec.save(path)
    return spec


# -- 4: the federation on Flower's simulation engine -----------------------------------------------


def _context(context):
    """The Flower context with the demo's run config (the legacy simulation API passes none)."""
    from flwr.app import Context  # deferred: Flower is heavy, needed only for the federation stage

    run_config = json.loads(Path(os.environ[RUN_CONFIG_ENV]).read_text())
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=run_config,
    )


def _owner_query(msg, context):
    from flexmoe.federation import client_app  # deferred: Flower + Lightning; keeps `flexmoe --help` fast

    return client_app.query(msg, _context(context))


def _owner_train(msg, context):
    from flexmoe.federation import client_app  # deferred: Flower + Lightning; keeps `flexmoe --help` fast

    return client_app.train(msg, _context(context))


def _owner_router_round(msg, context):
    from flexmoe.federation import client_app  # deferred: Flower + Lightning; keeps `flexmoe --help` fast

    return client_app.router_round(msg, _context(context))


def _coordinator(grid, context) -> None:
    from flexmoe.federation import server_app  # deferred: Flower + Lightning; keeps `flexmoe --help` fast

    server_app.main(grid, _context(context))


def simulation_apps():
    """flexmoe's owner ``ClientApp`` and coordinator ``ServerApp`` handlers, fed the demo's run config."""
    from flwr.clientapp import ClientApp  # deferred: Flower is heavy, needed only for the federation stage
    from flwr.serverapp import ServerApp  # deferred: Flower is heavy, needed only for the federation stage

    client, server = ClientApp(), ServerApp()
    client.query()(_owner_query)
    client.train()(_owner_train)
    client.train("router")(_owner_router_round)
    server.main()(_coordinator)
    return server, client


def run_federation(cfg: DemoConfig, out: Path, spec_path: Path, public_dir: Path, data_dir: Path, threads: int) -> dict:
    """One virtual SuperNode per owner, the coordinator as the ServerApp; returns its report."""
    from flwr.simulation import run_simulation  # deferred: Flower's simulation engine (Ray) is heavy

    out.mkdir(parents=True, exist_ok=True)
    run_config = {
        "spec": str(spec_path),
        "expected-owners": ",".join(OWNERS),
        "quorum": 0,
        "connect-timeout": 600.0,
        "train-timeout": 3600.0,
        "out-dir": str(out / "coordinator"),
        "public-model": str(public_dir),
        "public-data": str(data_dir / PUBLIC / "train.jsonl"),
        "top-k": cfg.top_k,
        # The spec leaves router tuning off (the library default); the `flexolmo` row is the full
        # flow, so the run config switches it on. FlexOlmo export: the folded router is exact.
        "router-tuning": True,
        "resume": False,
        "export-format": EXPORT_FORMAT,
        "allow-approximate": False,
        "seed": cfg.seed,
        "poll-interval": 0.5,
        "data-paths": ",".join(str(data_dir / o / "train.jsonl") for o in OWNERS),
        "share-proxy": True,
    }
    config_path = out / "run_config.json"
    config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": min(threads, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True},
    }
    previous = os.environ.get(RUN_CONFIG_ENV)
    os.environ[RUN_CONFIG_ENV] = str(config_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            server, client = simulation_apps()
            run_simulation(server, client, num_supernodes=len(OWNERS), backend_config=backend)
    finally:
        import ray  # deferred: Ray is heavy; loaded here only to shut down the simulation's workers

        if ray.is_initialized():
            ray.shutdown()  # a later run starts workers that see its own run config
        if previous is None:
            os.environ.pop(RUN_CONFIG_ENV, None)
        else:
            os.environ[RUN_CONFIG_ENV] = previous
    report_path = out / "coordinator" / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the federation ended without a coordinator report ({report_path}); see the log above")
    report = json.loads(report_path.read_text())
    if report.get("status") != "merged" or sorted(report.get("accepted", [])) != sorted(OWNERS):
        raise RuntimeError(
            f"the federation did not accept every owner's expert: status {report.get('status')!r}, "
            f"rejected {report.get('rejected')}, missing {report.get('missing')}; see {report_path}"
        )
    recipe, tuning = report.get("routing_recipe") or {}, report.get("router_tuning") or {}
    if recipe.get("method") != "lda" or "skipped" in tuning or report.get("export", {}).get("format") != "flexolmo":
        raise RuntimeError(
            f"the coordinator did not run the whole flow (routing {recipe}, router tuning {tuning}, "
            f"export {report.get('export')}); see {report_path}"
        )
    return report


# -- 5: the methods -------------------------------------------------------------------------------


class Models:
    """Builds every row's model from the public model, the accepted artifacts and the spec."""

    def __init__(self, public_dir: Path, artifacts: dict, cfg: DemoConfig, spec):
        self.public_dir, self.artifacts, self.cfg, self.spec = public_dir, artifacts, cfg, spec

    def public(self):
        from flexmoe.formats.load import load_public_model  # deferred: transformers; keeps `flexmoe --help` fast

        return load_public_model(str(self.public_dir)).eval()

    def merged(self, owners, top_k):
        """FlexOlmo's merge as published of ``owners``' experts (their trained router rows beside
        the spec's ``r_pub``): with one owner and ``top_k=2``, exactly that owner's own model."""
        from flexmoe.assembly import merge_experts  # deferred: transformers; keeps `flexmoe --help` fast

        arts = [self.artifacts[o] for o in owners]
        return merge_experts(self.public(), arts, spec=self.spec, routing="published", top_k=top_k).model

    def with_expert_mlp(self, owner: str):
        """The dense public model with every MLP replaced by ``owner``'s expert."""
        model = self.public()
        for L, layer in enumerate(decoder_layers(model)):
            layer.mlp.load_state_dict(self.artifacts[owner].layer(L)[0])
        return model.eval()

    def soup(self):
        """Dense public model whose MLPs are the uniform average of the owners' expert MLPs."""
        from flexmoe.merge import average  # deferred: transformers; keeps `flexmoe --help` fast

        return average([self.with_expert_mlp(o) for o in OWNERS]).eval()


class CausalWeightedSoup(nn.Module):
    """:class:`flexmoe.merge.WeightedSoup` scored on every token without peeking: the first
    ``prefix_len - 1`` predictions are the targets that choose the soup's weights, so they come
    from the uniform soup; from there on, each row's prefix-weighted soup."""

    def __init__(self, members, uniform: nn.Module, prefix_len: int):
        from flexmoe.merge import WeightedSoup  # deferred: transformers; keeps `flexmoe --help` fast

        super().__init__()
        self.soup, self.uniform, self.head = WeightedSoup(members, prefix_len=prefix_len), uniform, prefix_len - 1

    def forward(self, input_ids, **_):
        logits = self.soup(input_ids=input_ids).logits
        head = self.uniform(input_ids=input_ids[:, : self.head], use_cache=False).logits
        return SimpleNamespace(logits=torch.cat([head, logits[:, self.head :]], dim=1))


def _finetune(module, data, steps: int, seed: int) -> None:
    import lightning.pytorch as pl  # deferred: Lightning; keeps `flexmoe --help` fast

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=_progress_bar(),
    )
    trainer.fit(module, data)


def train_btx(cfg: DemoConfig, models: Models, data_dir: Path, stages: Stages):
    """BTX: dense copies of the public model fully fine-tuned on each owner's text (the expert step
    budget), mixed into one MoE (the public model kept as expert 0), then MoE-finetuned. Returns
    ``(btx, btx_pooled)``: the MoE fine-tuned on the data the coordinator holds (the public data),
    as FlexOlmo's comparison runs BTX where closed data cannot be pooled; and the same mix
    fine-tuned on every owner's text pooled with the public data (the original BTX: no privacy),
    the report's diagnostic. Either way, the dense experts saw only their owner's text."""
    from flexmoe.data.datamodule import TextDataModule  # deferred: Lightning; keeps `flexmoe --help` fast
    from flexmoe.merge import MoEFinetune, btx  # deferred: Lightning; keeps `flexmoe --help` fast
    from flexmoe.training.pretrain import PretrainModule  # deferred: Lightning; keeps `flexmoe --help` fast

    dense = []
    for owner in OWNERS:
        public = models.public()
        module = PretrainModule(
            public.config,
            lr=cfg.expert_lr,
            weight_decay=0.0,
            warmup_steps=max(1, cfg.expert_steps // 10),
            max_steps=cfg.expert_steps,
        )
        module.model.load_state_dict(public.state_dict())
        data = TextDataModule(
            str(data_dir / owner / "train.jsonl"),
            str(models.public_dir),
            seq_len=cfg.seq_len,
            batch_size=cfg.expert_batch_size,
            val_fraction=0.0,
            seed=cfg.seed,
        )
        stages.run(
            f"btx_dense_{owner}",
            f"BTX: fine-tuning a dense copy on {owner} ({cfg.expert_steps} steps)",
            _finetune,
            module,
            data,
            cfg.expert_steps,
            cfg.seed,
        )
        dense.append(module.model.eval())
    mixed = btx(dense, seed_model=models.public(), seed=cfg.seed, names=list(OWNERS))
    set_top_k(mixed, cfg.top_k)
    out = []
    for key, what, data in (
        ("btx_moe_finetune", "the public data", _union(cfg, models, data_dir, (PUBLIC,))),
        ("btx_pooled_moe_finetune", "all the data pooled", _union(cfg, models, data_dir)),
    ):
        model = copy.deepcopy(mixed)
        module = MoEFinetune(
            model,
            train="all",
            lr=cfg.joint_lr,
            warmup_steps=max(1, cfg.btx_finetune_steps // 10),
            max_steps=cfg.btx_finetune_steps,
        )
        stages.run(
            key,
            f"BTX: MoE fine-tuning on {what} ({cfg.btx_finetune_steps} steps)",
            _finetune,
            module,
            data,
            cfg.btx_finetune_steps,
            cfg.seed,
        )
        out.append(model.eval())
    return tuple(out)


def train_unrestricted(cfg: DemoConfig, models: Models, data_dir: Path):
    """The same MoE shape as FlexOlmo's (public + one expert per owner, ``top_k``), upcycled from the
    public model and trained jointly on all the data: experts and router, with BTX's
    load-balancing loss; attention and embeddings stay the public model's. Ignores privacy."""
    from flexmoe.merge import MoEFinetune  # deferred: Lightning; keeps `flexmoe --help` fast

    model = upcycle(models.public(), num_experts=len(OWNERS), top_k=cfg.top_k, owners=list(OWNERS))
    # Identical experts behind a zero router would get identical gradients forever: a small random
    # router (as BTX initialises its own) breaks the symmetry.
    g = torch.Generator().manual_seed(cfg.seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for block in moe_blocks(model):
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g) * std)
    module = MoEFinetune(
        model,
        train="moe",
        lr=cfg.joint_lr,
        warmup_steps=max(1, cfg.unrestricted_steps // 10),
        max_steps=cfg.unrestricted_steps,
    )
    _finetune(module, _union(cfg, models, data_dir), cfg.unrestricted_steps, cfg.seed)
    return model.eval()


def _union(cfg: DemoConfig, models: Models, data_dir: Path, domains: tuple[str, ...] = (PUBLIC, *OWNERS)):
    from flexmoe.data.datamodule import TextDataModule  # deferred: Lightning; keeps `flexmoe --help` fast

    sources = [str(data_dir / d / "train.jsonl") for d in domains]
    return TextDataModule(
        sources,
        str(models.public_dir),
        seq_len=cfg.seq_len,
        batch_size=cfg.joint_batch_size,
        val_fraction=0.0,
        seed=cfg.seed,
    )


def routed_without_tuning(
    cfg: DemoConfig, models: Models, spec, public_docs: list[str], tokenizer, exportable: bool = True
) -> tuple:
    """``flexolmo_no_rt``: the coordinator's merge before its router tuning, rebuilt from the
    accepted artifacts by the coordinator's own pipeline (:func:`flexmoe.assembly.merge_experts`:
    assemble, the spec's routing recipe on the same public rows, biases folded for the FlexOlmo
    export). ``exportable=False`` keeps the discriminant's biases (flexmoe-native routers): what
    the fold costs."""
    from flexmoe.assembly import merge_experts  # deferred: transformers; keeps `flexmoe --help` fast

    merged = merge_experts(
        models.public(),
        [models.artifacts[o] for o in OWNERS],
        spec=spec,
        public_documents=public_docs,
        tokenizer=tokenizer,
        format=EXPORT_FORMAT if exportable else "native",
        top_k=cfg.top_k,
    )
    return merged.model, merged.routing


def tune_on_proxies(
    cfg: DemoConfig, models: Models, spec, fed: dict, public_docs: list[str], tokenizer, merge: str = "lda"
):
    """A merge tuned as FlexOlmo publishes router tuning: by the coordinator alone, on the owners'
    proxy sets (public documents that resemble their text) and the public data; the same steps
    as one participant of the federated tuning. ``merge="published"``: FlexOlmo's merge as
    published (the owners' trained rows beside the spec's ``r_pub``), the ``flexolmo_published``
    row; ``"lda"``: ``flexolmo_no_rt``'s token router, the ``proxy_router_tuning`` diagnostic."""
    from flexmoe.training.router_tuning import tune_router  # deferred: Lightning; keeps `flexmoe --help` fast

    if merge == "published":
        model = models.merged(OWNERS, cfg.top_k)
    else:
        model, _ = routed_without_tuning(cfg, models, spec, public_docs, tokenizer)
    proxies = {
        o: ProxySelection.from_dict(fed["owners"][o]["proxy"]).texts(public_docs)
        for o in OWNERS
        if (fed["owners"].get(o) or {}).get("proxy")
    }
    recipe = dataclasses.replace(spec.router_tuning, data="proxy")
    tune_router(
        model,
        proxy_documents=proxies,
        public_documents=public_docs,
        tokenizer=tokenizer,
        recipe=recipe,
        seed=cfg.seed,
        trainer_kwargs={"enable_progress_bar": _progress_bar()},
    )
    return model.eval()


def routed_by_posterior(models: Models, spec, spec_path: Path, public_docs: list[str], tokenizer) -> tuple:
    """``flexolmo``: the library's default routing recipe (``RoutingRecipe()``, the posterior
    router) applied to the accepted artifacts by the coordinator's assembly pipeline
    (:func:`flexmoe.assembly.merge_experts`), with the public domain's token counts from the
    spec's statistics file and the owners' from their artifacts. Native format: a FlexOlmo
    checkpoint would carry the recipe's token router instead. Returns ``(model, routing summary)``."""
    from flexmoe.assembly import merge_experts  # deferred: transformers; keeps `flexmoe --help` fast

    recipe = RoutingRecipe()
    arts = [models.artifacts[o] for o in OWNERS]
    merged = merge_experts(
        models.public(),
        arts,
        spec=spec_path,
        routing=recipe,
        public_documents=public_docs,
        tokenizer=tokenizer,
        format="native",
    )
    return merged.model.eval(), {**recipe.settings(), **merged.routing}


def prior_rows(cfg: DemoConfig, corpus: dict, tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every domain's rows for BTM's cached prior: up to ``btm_prior_rows`` rows of its
    validation documents that :func:`eval_rows` does not score (the rows between the scored
    ones, spread evenly); the public domain takes half from each public part. A domain whose
    validation text is all scored falls back on rows of its training text, which its expert has
    seen. Returns ``(rows, {domain: "validation" or "training"})`` (the report records the latter)."""

    def unscored(docs, tokens, want):
        packed = pack_domain(docs, tokenizer, cfg.seq_len)
        index = torch.arange(packed.shape[0])[:, None].expand(-1, packed.shape[1])
        scored = spread_rows(index, tokens)[:, 0]  # which rows eval_rows scores
        keep = torch.ones(packed.shape[0], dtype=torch.bool)
        keep[scored] = False
        return spread_rows(packed[keep], want * cfg.seq_len) if keep.any() else packed[:0]

    share = cfg.eval_tokens // len(PUBLIC_DOMAINS)
    half = max(1, cfg.btm_prior_rows // len(PUBLIC_DOMAINS))
    out = {PUBLIC: torch.cat([unscored(corpus["parts"][d].val, share, half) for d in PUBLIC_DOMAINS])}
    out.update({o: unscored(corpus["domains"][o].val, cfg.eval_tokens, cfg.btm_prior_rows) for o in OWNERS})
    source = dict.fromkeys(out, "validation")
    for d, rows in out.items():
        if rows.shape[0] == 0:
            train = pack_domain(corpus["domains"][d].train, tokenizer, cfg.seq_len)
            out[d], source[d] = spread_rows(train, cfg.btm_prior_rows * cfg.seq_len), "training"
    return out, source


def btm_with_cached_prior(cfg: DemoConfig, members: list, rows: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``btm_top3_ema``: BTM as its paper prefers (section 4.1): top-``btm_top_k`` domains per
    position and the cached prior, an EMA (``ema_alpha`` 0.3) of the posteriors of held-out
    sequences of the evaluation domain, so one ensemble per evaluated domain. Returns
    ``({domain: ensemble}, {domain: fitted prior})``."""
    from flexmoe.merge import BTMEnsemble  # deferred: transformers; keeps `flexmoe --help` fast

    ensembles, priors = {}, {}
    for d, held_out in rows.items():
        ensembles[d] = BTMEnsemble(members, prior="ema", top_k=cfg.btm_top_k)
        priors[d] = [round(float(p), 4) for p in ensembles[d].fit_prior(held_out, batch_size=cfg.eval_batch_size)]
    return ensembles, priors


# -- evaluation -----------------------------------------------------------------------------------


def eval_rows(cfg: DemoConfig, corpus: dict, tokenizer) -> dict[str, torch.Tensor]:
    """Every domain's held-out rows: ``eval_tokens`` tokens as whole rows spread evenly over all of
    the domain's validation documents (the first rows alone can be one unrepresentative document);
    the public domain takes half from each public part."""

    def rows(docs, tokens):
        return spread_rows(pack_domain(docs, tokenizer, cfg.seq_len), tokens)

    share = cfg.eval_tokens // len(PUBLIC_DOMAINS)
    out = {PUBLIC: torch.cat([rows(corpus["parts"][d].val, share) for d in PUBLIC_DOMAINS])}
    out.update({o: rows(corpus["domains"][o].val, cfg.eval_tokens) for o in OWNERS})
    return out


class Table:
    """The rows of the evaluation table as they are measured."""

    def __init__(self, rows: dict[str, torch.Tensor], cfg: DemoConfig, stages: Stages):
        self.rows, self.cfg, self.stages = rows, cfg, stages
        self.methods: dict[str, dict] = {}
        self.routing: dict[str, dict] = {}
        self.diagnostics: dict[str, dict] = {}

    def score(self, name: str, model) -> None:
        from flexmoe.evaluate import perplexity  # deferred: transformers; keeps `flexmoe --help` fast

        r = self.stages.run(
            f"eval:{name}",
            f"evaluating {name}",
            perplexity,
            model,
            self.rows,
            batch_size=self.cfg.eval_batch_size,
            name=name,
        )
        self._keep(name, r)
        if "routing" in r:
            self.routing[name] = r["routing"]

    def diagnose(self, name: str, model) -> dict:
        """Score a model that is not a row of the table (kept in ``self.diagnostics``)."""
        from flexmoe.evaluate import perplexity  # deferred: transformers; keeps `flexmoe --help` fast

        r = self.stages.run(
            f"eval:{name}",
            f"evaluating {name} (diagnostic)",
            perplexity,
            model,
            self.rows,
            batch_size=self.cfg.eval_batch_size,
            name=name,
        )
        self.diagnostics[name] = {
            "per_domain": {d: float(v) for d, v in r["per_domain"].items()},
            "average": float(r["average"]),
        }
        if "routing" in r:
            self.routing[name] = r["routing"]
        return self.diagnostics[name]

    def oracle(self, models: dict, name: str = "oracle", what: str = "each domain through its own model") -> None:
        """Score ``{domain: model}``, each domain's rows through its own model: the oracle, or a
        method whose model depends on the evaluated domain (``btm_top3_ema``'s cached prior)."""
        from flexmoe.evaluate import oracle_perplexity  # deferred: transformers; keeps `flexmoe --help` fast

        r = self.stages.run(
            f"eval:{name}",
            f"evaluating {name} ({what})",
            oracle_perplexity,
            models,
            self.rows,
            batch_size=self.cfg.eval_batch_size,
        )
        self._keep(name, r)

    def _keep(self, name: str, r: dict) -> None:
        self.methods[name] = {
            "per_domain": {d: float(v) for d, v in r["per_domain"].items()},
            "average": float(r["average"]),
        }
        self.stages.log(
            f"{name:<24} average {r['average']:9.2f}  " + "  ".join(f"{d} {v:.1f}" for d, v in r["per_domain"].items())
        )


def accepted_artifacts(coordinator: Path, spec) -> dict:
    """Every owner's expert as the coordinator accepted it, loaded with the artifact checks
    against ``spec`` (fingerprint of the public model, spec hash)."""
    return {
        o: ExpertArtifact.load(
            coordinator / "artifacts" / f"{o}.safetensors", fingerprint=spec.fingerprint, spec_sha256=spec.sha256
        )
        for o in OWNERS
    }


@dataclass
class DemoRun:
    """A finished ``flexmoe demo --out DIR`` run, opened again to measure more on the same
    models and text (``benchmarks/router_tuning_data.py``, ``benchmarks/routing_diagnosis.py``):
    every accepted expert is loaded with the artifact checks against the run's spec, and the text
    is the run's own ``DIR/data`` (the machine's files may have changed since), so the held-out
    rows are the ones the report was measured on."""

    root: Path
    cfg: DemoConfig
    report: dict
    federation: dict
    spec: object
    corpus: dict
    tokenizer: object
    models: Models
    rows: dict[str, torch.Tensor]

    @classmethod
    def open(cls, out: str | os.PathLike) -> DemoRun:
        from transformers import AutoTokenizer  # deferred: transformers; keeps `flexmoe --help` fast

        root = Path(out)
        if not (root / "report.json").is_file():
            raise FileNotFoundError(f"{root} is not a finished flexmoe demo run (no report.json)")
        report = json.loads((root / "report.json").read_text())
        cfg = DemoConfig(**report["settings"]["config"])
        spec = FederationSpec.load(root / "spec.json")
        coordinator = root / "federation" / "coordinator"
        artifacts = accepted_artifacts(coordinator, spec)
        corpus = read_corpus(root / "data", report["settings"]["corpus"][PUBLIC].get("parts_val_docs"))
        tokenizer = AutoTokenizer.from_pretrained(root / "public")
        return cls(
            root,
            cfg,
            report,
            json.loads((coordinator / "report.json").read_text()),
            spec,
            corpus,
            tokenizer,
            Models(root / "public", artifacts, cfg, spec),
            eval_rows(cfg, corpus, tokenizer),
        )

    @property
    def public_docs(self) -> list[str]:
        return list(self.corpus["domains"][PUBLIC].train)

    def flexolmo_token(self):
        """The ``flexolmo_token`` row: the coordinator's exported model (the token router, tuned
        by the federation), loaded by flexmoe."""
        from flexmoe.formats.load import load  # deferred: transformers; keeps `flexmoe --help` fast

        return load(self.root / "federation" / "coordinator" / "model").eval()

    def flexolmo(self):
        """The ``flexolmo`` row: the default recipe's posterior router over the accepted
        artifacts, rebuilt by the assembly pipeline as the demo built it."""
        return routed_by_posterior(self.models, self.spec, self.root / "spec.json", self.public_docs, self.tokenizer)[0]


# -- 6: the report (flexmoe/experiments/report.py) ------------------------------------------------


def publish_model(source: Path, out: Path, model, rows: torch.Tensor) -> dict:
    """Copy the coordinator's FlexOlmo export to ``out`` and check that plain ``transformers``
    gives the logits flexmoe's model (the ``flexolmo`` row) gives."""
    from transformers import AutoModelForCausalLM  # deferred: transformers; keeps `flexmoe --help` fast

    shutil.copytree(source, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = rows[:4]
    with torch.inference_mode():
        diff = (hf(input_ids=batch).logits.float() - model(input_ids=batch, use_cache=False).logits.float()).abs().max()
    return {"dir": str(out), "from": str(source), "class": type(hf).__name__, "max_abs_logit_diff": float(diff)}


# -- the command ------------------------------------------------------------------------------------


def _prepare_out(out: str, overwrite: bool) -> Path:
    root = Path(os.path.expanduser(out)).resolve()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--out {root} is a file; give a directory for the demo's outputs")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise FileExistsError(f"--out {root} is not empty and holds no earlier demo run; choose a new directory")
        if not overwrite:
            raise FileExistsError(
                f"--out {root} holds an earlier demo run; pass --overwrite to replace it, or choose another directory"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("flexmoe demo output; `flexmoe demo --overwrite` may delete this directory\n")
    return root


def demo(
    out: str,
    fast: bool = False,
    settings: DemoConfig | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run FlexOlmo's whole flow and every comparison method, and write the report (the main job).

    Trains a public model on local text, runs the owners and the coordinator as Flower apps on
    the simulation engine (which merge with the token router and tune it), builds the merged
    model with the default routing recipe (the posterior router) from the accepted experts,
    trains the baselines (soups, BTM, BTX, an unrestricted MoE) and scores every one of them on
    each domain's held-out text. Writes ``OUT/report.json``, ``OUT/report.md``,
    ``OUT/perplexity.png``, ``OUT/routing.png`` and ``OUT/model`` (the token-routed model, which
    loads with ``transformers.AutoModelForCausalLM``). See docs/demo.md.

    Args:
        out: Output directory (new or empty, or an earlier demo's with ``--overwrite``).
        fast: The small preset (what CI runs) instead of the default sizes.
        settings: Sizes (``--settings.expert_steps 300``, or ``settings:`` in a ``--config`` YAML);
            with ``--fast``, the ones that differ from the default sizes override the fast preset.
        threads: Torch CPU threads (default: half the cores, at most 4); the simulated owners
            each get this many.
        overwrite: Replace an earlier demo's output in ``out``.

    Returns the report (``report.json``'s content).
    """
    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the training
        raise ImportError("flexmoe demo draws its figures with matplotlib: pip install matplotlib (or 'flexmoe[dev]')")
    cfg = (DemoConfig.fast() if fast else DemoConfig()).overriding(settings)
    threads = threads or default_threads()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    root = _prepare_out(out, overwrite)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    quiet = logging.getLogger("lightning.pytorch")
    previous_level = quiet.level
    quiet.setLevel(logging.WARNING)  # "GPU available: False ..." once per Trainer
    try:
        return _run(cfg, root, threads, fast)
    finally:
        torch.set_num_threads(previous_threads)
        quiet.setLevel(previous_level)


def _run(cfg: DemoConfig, root: Path, threads: int, fast: bool) -> dict:
    from transformers import AutoTokenizer  # deferred: transformers; keeps `flexmoe --help` fast

    from flexmoe.formats.load import load  # deferred: transformers; keeps `flexmoe --help` fast
    from flexmoe.merge import BTMEnsemble  # deferred: transformers; keeps `flexmoe --help` fast

    stages = Stages()
    stages.log(f"writing to {root}; {'fast preset' if fast else 'default sizes'}, {threads} torch thread(s)")
    data_dir, public_dir = root / "data", root / "public"
    corpus = stages.run("data", "building the local corpus", build_corpus, cfg, data_dir)
    domains = corpus["domains"]
    stages.log("; ".join(f"{d}: {len(x.train)} train / {len(x.val)} held-out docs" for d, x in domains.items()))
    pretrained = stages.run(
        "pretrain",
        f"pretraining the public model ({cfg.pretrain_steps} steps)",
        pretrain_public,
        cfg,
        data_dir,
        public_dir,
    )
    public_docs = list(domains[PUBLIC].train)  # what the coordinator reads from data/public/train.jsonl
    spec = stages.run(
        "spec",
        "writing the FederationSpec (no embedder; default routing recipe)",
        make_spec,
        cfg,
        public_dir,
        public_docs,
        root / "spec.json",
    )
    fed_dir = root / "federation"
    fed = stages.run(
        "federation",
        f"federation: {len(OWNERS)} owners (Flower ClientApps) and the coordinator "
        "(ServerApp) on the simulation engine",
        run_federation,
        cfg,
        fed_dir,
        root / "spec.json",
        public_dir,
        data_dir,
        threads,
    )
    coordinator = fed_dir / "coordinator"
    artifacts = accepted_artifacts(coordinator, spec)
    tuning = fed.get("router_tuning", {})
    stages.times["router_tuning"] = round(float(tuning.get("seconds", 0.0)), 1)  # inside the federation stage

    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    models = Models(public_dir, artifacts, cfg, spec)
    table = Table(eval_rows(cfg, corpus, tokenizer), cfg, stages)
    held_out, held_out_source = prior_rows(cfg, corpus, tokenizer)
    table.score("public", models.public())
    singles = {o: models.merged([o], 2) for o in OWNERS}
    for o in OWNERS:
        table.score(f"expert:{o}", singles[o])
    uniform = models.soup()
    table.score("soup", uniform)
    members = [models.with_expert_mlp(o) for o in OWNERS]
    table.score("weighted_soup", CausalWeightedSoup(members, uniform, cfg.weighted_soup_prefix))
    del members, uniform
    table.score("btm", BTMEnsemble([models.public(), *singles.values()], prior=None, top_k=cfg.btm_top_k))
    ensembles, fitted = btm_with_cached_prior(cfg, [models.public(), *singles.values()], held_out)
    btm_priors = {
        "fitted_prior": fitted,
        "prior_rows": {d: int(r.shape[0]) for d, r in held_out.items()},
        "prior_rows_from": held_out_source,
    }
    table.oracle(ensembles, "btm_top3_ema", f"BTM, top-{cfg.btm_top_k} domains, cached EMA prior per domain")
    del ensembles
    btx_model, btx_pooled = stages.run(
        "btx", "BTX (dense experts, mix, MoE fine-tuning)", train_btx, cfg, models, data_dir, stages
    )
    table.score("btx", btx_model)
    table.diagnose("btx_pooled_data", btx_pooled)
    del btx_model, btx_pooled
    no_rt, routing_summary = stages.run(
        "routing",
        "rebuilding the merge before router tuning (flexolmo_no_rt)",
        routed_without_tuning,
        cfg,
        models,
        spec,
        public_docs,
        tokenizer,
    )
    table.score("flexolmo_no_rt", no_rt)
    del no_rt
    native, _ = routed_without_tuning(cfg, models, spec, public_docs, tokenizer, exportable=False)
    table.diagnose("lda_with_biases", native)
    del native
    proxy_tuned = stages.run(
        "proxy_router_tuning",
        "FlexOlmo's published router tuning of the token router, on the proxy sets (diagnostic)",
        tune_on_proxies,
        cfg,
        models,
        spec,
        fed,
        public_docs,
        tokenizer,
    )
    table.diagnose("proxy_router_tuning", proxy_tuned)
    del proxy_tuned
    tuned = load(coordinator / "model").eval()  # the flexolmo_token row: the coordinator's export
    table.score("flexolmo_token", tuned)
    published = stages.run(
        "published_router_tuning",
        "FlexOlmo's merge and proxy router tuning as published (flexolmo_published)",
        tune_on_proxies,
        cfg,
        models,
        spec,
        fed,
        public_docs,
        tokenizer,
        merge="published",
    )
    table.score("flexolmo_published", published)
    del published
    posterior, posterior_summary = stages.run(
        "posterior",
        "merging with the default recipe, the posterior router (flexolmo)",
        routed_by_posterior,
        models,
        spec,
        root / "spec.json",
        public_docs,
        tokenizer,
    )
    table.score("flexolmo", posterior)
    posterior_kind = sorted({b.router.kind for b in moe_blocks(posterior)})
    del posterior
    flexolmo_summary = {
        "posterior": {**posterior_summary, "router_kind": posterior_kind},
        "routing": routing_summary,
        "coordinator_routing": fed.get("routing_recipe"),
        "router_tuning": tuning,
        "diagnostics": table.diagnostics,
    }
    unrestricted = stages.run(
        "unrestricted",
        f"unrestricted MoE trained on all the data ({cfg.unrestricted_steps} steps)",
        train_unrestricted,
        cfg,
        models,
        data_dir,
    )
    table.score("unrestricted", unrestricted)
    del unrestricted
    table.oracle({PUBLIC: models.public(), **singles})

    exported = stages.run(
        "export",
        "copying the coordinator's FlexOlmo export to model/ and checking it",
        publish_model,
        coordinator / "model",
        root / "model",
        tuned,
        table.rows[PUBLIC],
    )
    stages.times["total"] = round(time.perf_counter() - stages.started, 1)
    report = {
        "methods": table.methods,
        "settings": settings_record(
            cfg, threads, fast, corpus, pretrained, spec, fed, flexolmo_summary, exported, table.rows, btm_priors
        )
        | {"machine": stages.machine()},
        "wall_times": stages.times,
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "routing.json").write_text(json.dumps(table.routing, indent=1) + "\n")
    plot_perplexity(table.methods, root / "perplexity.png")
    shown = "flexolmo" if "flexolmo" in table.routing else "flexolmo_token"
    plot_routing(
        table.routing[shown], root / "routing.png", f"{shown}: top-1 expert share per held-out domain, per layer"
    )
    write_markdown(root / "report.md", report, table.routing, owners=OWNERS, public_domains=PUBLIC_DOMAINS)
    stages.log(f"wrote {root / 'report.md'} (total {stages.times['total'] / 60:.1f} min)")
    print("\n" + markdown_table(table.methods, list(table.rows)) + "\n", flush=True)
    for line in findings(table.methods, table.routing, report["settings"]["flexolmo"]):
        print("- " + line.replace("**", "").replace("`", ""), flush=True)
    return report


def settings_record(
    cfg, threads, fast, corpus, pretrained, spec, fed, flexolmo_summary, exported, rows, btm_priors=None
) -> dict:
    import flwr  # deferred: Flower is heavy; imported here only for its version
    import transformers  # deferred: transformers; keeps `flexmoe --help` fast

    domains = corpus["domains"]
    return {
        "config": dataclasses.asdict(cfg),
        "fast": fast,
        "threads": threads,
        "public_domains": list(PUBLIC_DOMAINS),
        "owners": list(OWNERS),
        "corpus": {
            d: {
                "train_docs": len(x.train),
                "val_docs": len(x.val),
                "eval_tokens": int(rows[d].numel()),
                "sha256": x.content_sha256(),
            }
            | ({"parts_val_docs": {p: len(corpus["parts"][p].val) for p in PUBLIC_DOMAINS}} if d == PUBLIC else {})
            for d, x in domains.items()
        },
        "public_model": {k: pretrained.get(k) for k in ("parameters", "train_tokens", "val_ppl_init", "val_ppl")},
        "embedder": None,
        "routing": dataclasses.asdict(spec.routing),
        "router_tuning": dataclasses.asdict(dataclasses.replace(spec.router_tuning, enabled=True)),
        "router_tuning_forced_by": "run config router-tuning=true (the spec's own default is off)",
        "flexolmo": flexolmo_summary,
        "btm": {"members": ["public", *(f"expert:{o}" for o in OWNERS)], "prior": "uniform", "top_k": cfg.btm_top_k},
        "btm_top3_ema": {
            "members": ["public", *(f"expert:{o}" for o in OWNERS)],
            "prior": "ema (alpha 0.3) per evaluated domain, fitted on its validation rows the table does not score",
            "top_k": cfg.btm_top_k,
            **(btm_priors or {}),
        },
        "federation": {
            "engine": "flwr.simulation.run_simulation (Ray)",
            "supernodes": len(OWNERS),
            "accepted": fed.get("accepted"),
            "status": fed.get("status"),
            "coordinator_report": "federation/coordinator/report.json",
        },
        "export": exported,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "flwr": flwr.__version__,
        },
    }
