"""``flexmoe train-expert``: an owner's training run as a ``LightningCLI``.

The one command that is not a plain function in :mod:`flexmoe.cli.commands`: Lightning builds its
parser, so every ``Trainer`` and ``TextDataModule`` option is there. The spec fixes the recipe
and the callbacks that make a valid expert are always attached.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from flexmoe.cli import normalize_options
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.documents import read_documents
from flexmoe.spec import FederationSpec
from flexmoe.training.expert import ExpertModule, expert_callbacks


def train_expert_cli(args: list[str] | None = None) -> None:
    """``flexmoe train-expert``: one owner's training run from the command line.

    Built on :class:`~lightning.pytorch.cli.LightningCLI`, so every ``Trainer`` and
    ``TextDataModule`` option is available as ``--trainer.*`` / ``--data.*`` or from
    ``--config cfg.yaml``. The spec fixes the public model, the sequence length and batch size
    (``--data.*`` options other than those stay free), and the callbacks that make an expert
    valid are always attached.

    Memory (docs/scale.md): ``--model.precision bf16-mixed`` and
    ``--model.activation_checkpointing true`` override the spec's recipe; the Trainer's precision
    follows the module's unless ``--trainer.precision`` is given. ``--fsdp`` shards the model,
    frozen public weights included, over ``--trainer.devices`` devices with FSDP2 (GPUs, or CPU
    processes with ``--trainer.accelerator cpu``; :meth:`~flexmoe.training.expert.ExpertModule.fsdp_strategy`).
    """

    class ExpertCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_argument("--spec", type=str, required=True, help="FederationSpec JSON from the coordinator")
            parser.add_argument("--owner", type=str, required=True, help="this owner's name")
            parser.add_argument("--out", type=str, required=True, help="where to write the expert artifact")
            parser.add_argument("--max_steps", type=int | None, default=None, help="default: the spec's recipe")
            parser.add_argument(
                "--public_data", type=list[str] | None, default=None, help="public corpus to select the proxy set from"
            )
            parser.add_argument(
                "--fsdp", type=bool, default=False, help="shard the model over the devices with FSDP2 (several devices)"
            )
            parser.link_arguments("spec", "model.spec")
            parser.link_arguments("owner", "model.owner")
            parser.link_arguments("spec", "model.public_model", compute_fn=_spec_public_model)
            parser.link_arguments("spec", "data.tokenizer", compute_fn=_spec_public_model)
            parser.link_arguments("spec", "data.seq_len", compute_fn=lambda s: FederationSpec.load(s).expert.seq_len)
            parser.link_arguments(
                "spec", "data.batch_size", compute_fn=lambda s: FederationSpec.load(s).expert.batch_size
            )

        def before_instantiate_classes(self):
            cfg = self.config
            spec = FederationSpec.load(cfg.spec)
            out = Path(cfg.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
                raise PermissionError(f"cannot write the expert artifact to {out}")
            cfg.trainer.max_steps = cfg.max_steps or (
                cfg.trainer.max_steps if cfg.trainer.max_steps not in (None, -1) else spec.expert.max_steps
            )
            self._spec = spec

        def instantiate_trainer(self, **kwargs):
            # The Trainer runs the precision the module holds its weights for, and FSDP as the
            # module configures it (its units follow what is frozen).
            if self.config.trainer.precision is None:
                kwargs.setdefault("precision", self.model.precision)
            if self.config.fsdp:
                kwargs.setdefault("strategy", self.model.fsdp_strategy())
            return super().instantiate_trainer(**kwargs)

        def after_instantiate_classes(self):
            cfg = self.config
            public_docs = None
            if cfg.public_data:
                public_docs = read_documents(cfg.public_data)
            self.trainer.callbacks.extend(expert_callbacks(self._spec, cfg.out, public_docs))

    argv = _expert_argv(sys.argv[1:] if args is None else list(args))
    cli = ExpertCLI(
        _module_class(argv),
        TextDataModule,
        args=argv,
        run=False,
        save_config_callback=None,
        trainer_defaults={"gradient_clip_val": None, "log_every_n_steps": 10},
        seed_everything_default=0,
        parser_kwargs={"prog": "flexmoe train-expert", "description": train_expert_cli.__doc__.split("\n\n")[0]},
    )
    cli.trainer.fit(cli.model, cli.datamodule)


def _expert_argv(argv: list[str]) -> list[str]:
    """Accept ``--data A B`` (the owner's text), several ``--public-data`` paths and dashed
    option names (``--max-steps``). LightningCLI's own ``--data`` is the datamodule group, so
    ``--data PATH...`` is shorthand for ``--data.sources '[PATH, ...]'``."""
    argv = normalize_options(argv, {"data": "list", "public_data": "list"})
    return ["--data.sources" if a == "--data" else a for a in argv]


def _module_class(argv: list[str]) -> type[ExpertModule]:
    """:class:`ExpertModule`, or :class:`flexmoe.lora.LoraExpertModule` when the spec named by
    ``--spec`` sets ``expert.lora_rank`` (a LoRA-sized expert)."""
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--spec"), None)
    spec = spec or next((a.split("=", 1)[1] for a in argv if a.startswith("--spec=")), None)
    if spec and Path(spec).is_file() and FederationSpec.load(spec).expert.lora_rank:
        from flexmoe.training.lora_expert import LoraExpertModule  # peft: an optional dependency

        return LoraExpertModule
    return ExpertModule


def _spec_public_model(path: str) -> str:
    return FederationSpec.load(path).public_model
