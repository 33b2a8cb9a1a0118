"""TODO docstring."""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
import typing

# name -> "module:function"; a command's module is imported only when that command runs,
# so `flexmoe assemble` does not pay for importing Lightning.
COMMANDS: dict[str, str] = {
    "spec": "flexmoe.cli.commands:spec",
    "pretrain": "flexmoe.training.pretrain:pretrain",
    "eval": "flexmoe.cli.commands:evaluate",
    "assemble": "flexmoe.cli.commands:assemble",
    "export": "flexmoe.cli.commands:export",
    "add-expert": "flexmoe.cli.commands:add_expert",
    "opt-out": "flexmoe.cli.commands:opt_out",
    "merge": "flexmoe.cli.commands:merge",
    "tune-router": "flexmoe.cli.commands:tune_router",
    "demo": "flexmoe.experiments.demo:demo",
}


def command(name: str) -> typing.Callable[..., None]:
    import importlib

    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _option_kinds(fn: typing.Callable) -> dict[str, str]:
    """``{parameter: "list" | "bool" | "other"}`` from a command's type hints."""
    hints = typing.get_type_hints(fn)
    kinds = {}
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # Optional[X] and X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else []
        hint = args[0] if len(args) == 1 else hint
        kinds[name] = "list" if typing.get_origin(hint) is list else "bool" if hint is bool else "other"
    return kinds


def normalize_argv(argv: list[str]) -> list[str]:
    """Rewrite the usual command-line spellings into jsonargparse's (see :func:`normalize_options`),
    using the option kinds of the command named in ``argv``."""
    for i, tok in enumerate(argv):
        if tok in COMMANDS:
            rest = argv[i + 1 :]
            if tok == "merge" and rest and not rest[0].startswith("-"):
                rest = ["--recipe", *rest]  # `flexmoe merge RECIPE.yaml --out DIR`
            return argv[: i + 1] + normalize_options(rest, _option_kinds(command(tok)))
    return normalize_options(argv, {})


def normalize_options(argv: list[str], kinds: dict[str, str]) -> list[str]:
    """Rewrite options, given ``{name: "list" | "bool" | "other"}``:

    * ``--top-k 2`` -> ``--top_k 2`` (dashes in option names become underscores);
    * ``--experts a b`` -> ``--experts '["a", "b"]'`` for list options (a single value that
      starts with ``[`` is left to jsonargparse, as is the append form ``--experts+ a``);
    * ``--normalize`` with no value -> ``--normalize=true`` for bool options;
    * a list option given several times (``--model a --model b``) collects all the values.
    """
    out: list[str] = []
    lists: dict[str, list[str]] = {}  # list options, emitted once at the end
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        kind = kinds.get(name, "other")
        if eq or kind == "other":
            out.append(f"--{name}{eq}{value}")
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--") and (kind == "list" or not values):
            values.append(argv[i])
            i += 1
        if kind == "bool":
            out += [f"--{name}", values[0]] if values else [f"--{name}=true"]
        elif len(values) == 1 and values[0].lstrip().startswith("["):
            out += [f"--{name}", values[0]]
        elif values:
            lists.setdefault(name, []).extend(values)
        else:
            out.append(f"--{name}")  # jsonargparse reports the missing value
    for name, values in lists.items():
        out += [f"--{name}", json.dumps(values)]
    return out


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])  # str(KeyError) would wrap the message in quotes
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flexmoe`` command."""
    from jsonargparse import auto_cli

    from flexmoe import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train-expert"]:
            # LightningCLI owns this command's parser: every Trainer option is available.
            from flexmoe.cli.train_expert import train_expert_cli

            return train_expert_cli(argv[1:])
        # Build only the parser of the command asked for (all of them for `flexmoe --help`).
        names = [a for a in argv[:1] if a in COMMANDS] or list(COMMANDS)
        auto_cli(
            {name: command(name) for name in names},
            args=normalize_argv(argv),
            as_positional=False,
            prog="flexmoe",
            description="FlexOlmo-style mixtures of experts. The owner's training run is `flexmoe train-expert` "
            "(a LightningCLI: `flexmoe train-expert --help`).",
            version=__version__,
        )
    except (ValueError, KeyError, IndexError, OSError) as e:
        # Bad input (ArtifactError is a ValueError): one line for the person who made the
        # mistake, not a traceback. FLEXMOE_DEBUG=1 shows the traceback.
        if os.environ.get("FLEXMOE_DEBUG"):
            raise
        print(f"flexmoe: error: {_message(e)}", file=sys.stderr)
        sys.exit(1)
