"""Iterative parameter mixing over data owners: rounds of FedAvg (McMahan et al., 2017, Algorithm 1)
of one dense model -- the baseline FlexOlmo is compared against when data stays private.

Every round the ServerApp sends the global model to every owner's SuperNode; each trains it with
Lightning for ``local-steps`` steps on its own text (:func:`train_locally`, the causal-LM step of
:class:`flexmoe.training.pretrain.PretrainModule`) and replies with its weights and ``num-examples``, the
number of training sequences it holds; Flower's own :class:`flwr.serverapp.strategy.FedAvg`
averages the replies weighted by ``num-examples``, ``θ ← Σ_k n_k θ_k / Σ_k n_k``. It is iterative
parameter mixing (McDonald et al. 2010) with owners as the shards. Unlike FlexOlmo, the owners must
all take part in every round, and the result is one dense model nobody can opt out of.

    flwr run examples/fedavg --run-config demo_out/fedavg/run_config.toml --federation-config "num-supernodes=2"

Apps: ``flexmoe.federation.fedavg:server_app`` and ``flexmoe.federation.fedavg:client_app``
(:func:`make_server_app` / :func:`make_client_app` build them with settings given in Python, for
``flwr.simulation.run_simulation``, which has no run config).

Where an owner's data is: a real SuperNode names it in its node config
(``flower-supernode --node-config 'data-path="/data/notes"'``); in the simulation engine (whose
node config holds only ``partition-id``) the run config's ``data-paths`` lists one path per
SuperNode. The server writes ``out-dir``: ``model/`` (the final global model, a ``transformers``
directory with the tokenizer), ``rounds/round-R/`` (the global model after each round, when
``save-rounds``) and ``report.json`` (per-round client training loss, held-out loss).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning.pytorch as pl
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from flexmoe.core.io import atomic_write_json
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.packing import pack_domain
from flexmoe.evaluate import domain_nll
from flexmoe.federation.settings import as_bool
from flexmoe.training.pretrain import PretrainModule

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key (its default)


@dataclass
class FedAvgSettings:
    """The run config of the FedAvg app (``[tool.flwr.app.config]``; keys with dashes).

    Args:
        model: the starting dense model, a ``transformers`` directory with its tokenizer that
            the server and every owner can read (or a hub id).
        num_rounds: FedAvg rounds.
        local_steps: optimizer steps each owner takes per round.
        lr: AdamW learning rate of the local steps (constant; the optimizer starts afresh every
            round, as FedAvg's clients do).
        batch_size, seq_len: local batches of ``batch_size`` packed sequences of ``seq_len`` tokens.
        seed: local training in round ``R`` is seeded with ``seed + R``.
        min_nodes: owners that must be connected, and all of them train every round.
        eval_data: held-out text (anything :func:`flexmoe.data.documents.read_documents` reads) on which
            the server measures the global model's loss before training and after every round
            (``""``: none).
        eval_max_tokens: evaluate on at most this many held-out tokens.
        out_dir: where the server writes the result (see the module docstring).
        save_rounds: also keep the global model of every round.
    """

    model: str
    num_rounds: int = 3
    local_steps: int = 20
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    min_nodes: int = 2
    eval_data: str = ""
    eval_max_tokens: int = 65536
    out_dir: str = "fedavg_out"
    save_rounds: bool = False

    def __post_init__(self):
        if not self.model:
            raise ValueError('FedAvg needs a starting model: set model = "DIR" in the run config')
        for name in ("num_rounds", "local_steps", "batch_size", "min_nodes", "eval_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"run config '{name.replace('_', '-')}' must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"run config 'seq-len' must be >= 2 tokens, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"run config 'lr' must be positive, got {self.lr}")

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> FedAvgSettings:
        """From a Flower run config (dashed keys); unknown keys other than ``data-paths`` are refused."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known) - {"data-paths"})
        if unknown:
            raise ValueError(f"unknown FedAvg run config key(s) {unknown}; known: {sorted(known)} and data-paths")
        kwargs = {}
        for key, value in run_config.items():
            if key in known:
                kind = known[key].type  # a string: this module has `from __future__ import annotations`
                try:
                    kwargs[known[key].name] = as_bool(value, key) if kind == "bool" else _TYPES[kind](value)
                except ValueError as e:
                    raise ValueError(f"run config '{key}' must be {kind}, got {value!r}") from e
        return cls(**kwargs)

    def train_config(self) -> ConfigRecord:
        """What every owner needs to train a round (FedAvg adds ``server-round``)."""
        return ConfigRecord(
            {
                "model": self.model,
                "local-steps": self.local_steps,
                "lr": float(self.lr),
                "batch-size": self.batch_size,
                "seq-len": self.seq_len,
                "seed": self.seed,
            }
        )


_TYPES = {"str": str, "int": int, "float": float}


# -- owner side ------------------------------------------------------------------------------------


def train_locally(
    model: str,
    state: Mapping,
    data: str | os.PathLike,
    *,
    local_steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
) -> tuple[dict, int, float]:
    """One owner's round: load ``state`` into the model of ``model`` (a directory or hub id, which
    also gives the tokenizer), train it for ``local_steps`` AdamW steps on ``data`` in a Lightning
    ``Trainer``, and return ``(state dict, training sequences held, last training loss)``.
    Deterministic for a given ``seed`` on a given machine."""
    pl.seed_everything(seed, verbose=False)
    with no_init_weights():  # every weight is overwritten by `state` right away
        module = PretrainModule(
            AutoConfig.from_pretrained(model),
            lr=lr,
            weight_decay=0.0,
            warmup_steps=0,
            min_lr_ratio=1.0,
            max_steps=local_steps,
        )
    module.model.load_state_dict(dict(state))
    module.model.tie_weights()
    data_module = TextDataModule(
        str(data), tokenizer=model, seq_len=seq_len, batch_size=batch_size, val_fraction=0.0, seed=seed
    )
    trainer = pl.Trainer(
        max_steps=local_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        devices=1,
    )
    trainer.fit(module, data_module)
    examples = len(trainer.train_dataloader.dataset)
    loss = float(trainer.callback_metrics["train/loss"])
    return _transportable(module.model.state_dict()), examples, loss


def _transportable(state: Mapping) -> dict:
    # Arrays travel as NumPy arrays: float32 (NumPy has no bfloat16), detached, on the CPU.
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu() for k, v in state.items()}


def _data_path(context: Context, data_paths: Sequence[str] | None) -> str:
    node = dict(context.node_config)
    if "data-path" in node:
        return str(node["data-path"])
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no data: start it with --node-config 'data-path=\"PATH\"'")
    if data_paths is None:
        data_paths = [p.strip() for p in str(context.run_config.get("data-paths", "")).split(",") if p.strip()]
    i = int(node["partition-id"])
    if i >= len(data_paths):
        raise ValueError(
            f"simulation: SuperNode {i} has no data; the run config 'data-paths' must list one path "
            f"per SuperNode, got {len(data_paths)}"
        )
    return str(data_paths[i])


def make_client_app(data_paths: Sequence[str] | None = None) -> ClientApp:
    """The owner's ``ClientApp``. ``data_paths``: in the simulation engine, the data of SuperNode
    ``i`` (instead of the run config's ``data-paths``); a node config ``data-path`` always wins."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this owner's data; reply with it and its data size."""
        cfg = msg.content[CONFIG]
        state, examples, loss = train_locally(
            str(cfg["model"]),
            msg.content[ARRAYS].to_torch_state_dict(),
            _data_path(context, data_paths),
            local_steps=int(cfg["local-steps"]),
            lr=float(cfg["lr"]),
            batch_size=int(cfg["batch-size"]),
            seq_len=int(cfg["seq-len"]),
            seed=int(cfg["seed"]) + int(cfg["server-round"]),
        )
        reply = RecordDict(
            {ARRAYS: ArrayRecord(state), METRICS: MetricRecord({NUM_EXAMPLES: examples, "train-loss": loss})}
        )
        return Message(reply, reply_to=msg)

    return app


# -- server side -----------------------------------------------------------------------------------


def run_fedavg(grid: Grid, s: FedAvgSettings) -> dict:
    """Run ``s.num_rounds`` rounds of Flower's ``FedAvg`` on ``grid``; write ``s.out_dir``; return the report."""
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    rows = _eval_rows(s, tokenizer) if s.eval_data else None
    report = {"settings": asdict(s), "rounds": {}}

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Called by FedAvg.start before round 1 (the starting model) and after every round.
        model.load_state_dict(arrays.to_torch_state_dict())
        if s.save_rounds and server_round > 0:
            _save(model, tokenizer, out / "rounds" / f"round-{server_round}")
        if rows is None:
            return None
        loss = _mean_loss(model, rows)
        report["rounds"].setdefault(str(server_round), {})["eval-loss"] = loss
        return MetricRecord({"eval-loss": loss})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=s.min_nodes,
        min_available_nodes=s.min_nodes,
        weighted_by_key=NUM_EXAMPLES,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(_transportable(model.state_dict())),
        num_rounds=s.num_rounds,
        train_config=s.train_config(),
        evaluate_fn=after_round,
    )
    if len(result.arrays) == 0:
        raise RuntimeError(
            f"FedAvg produced no model: no owner replied in any of the {s.num_rounds} rounds; see the SuperNodes' logs"
        )
    for r, metrics in result.train_metrics_clientapp.items():
        report["rounds"].setdefault(str(r), {})["train-loss"] = float(metrics["train-loss"])
    model.load_state_dict(result.arrays.to_torch_state_dict())
    _save(model, tokenizer, out / "model")
    atomic_write_json(out / "report.json", report)
    return report


def _eval_rows(s: FedAvgSettings, tokenizer):
    return pack_domain(s.eval_data, tokenizer, seq_len=s.seq_len, max_tokens=s.eval_max_tokens)


def _mean_loss(model, rows) -> float:
    r = domain_nll(model, rows)
    return r["nll_sum"] / r["predicted_tokens"] if r["predicted_tokens"] else math.nan


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_server_app(settings: FedAvgSettings | None = None) -> ServerApp:
    """The coordinator's ``ServerApp``; ``settings`` (default: read from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedavg(grid, settings or FedAvgSettings.from_run_config(context.run_config))

    return app


client_app = make_client_app()
server_app = make_server_app()
