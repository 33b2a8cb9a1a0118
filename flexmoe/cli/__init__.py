"""The ``flexmoe`` command: the top floor, which imports the rest and is imported by nothing.

:data:`COMMANDS` maps each command to the typed function behind it (most in
:mod:`flexmoe.cli.commands`), imported only when that command runs, so ``flexmoe assemble`` does
not pay for Lightning. :func:`main` builds the command's jsonargparse parser, accepts the
spellings people type (:func:`normalize_argv`) and turns bad input into one line on stderr and
exit status 1.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
import types
import typing

from jsonargparse import auto_cli

from flexmoe import __version__
from flexmoe.core.errors import InputError

# The one error line: long enough for a path, a field and both values, short enough to read. The
# values may come from another party's file (a 20 MB owner name must not become a 20 MB line).
ERROR_CHARS = 800

# Commands whose first argument may be given without its option name: `flexmoe merge RECIPE.yaml`.
POSITIONAL: dict[str, str] = {"merge": "--recipe", "inspect": "--file"}

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
    "inspect": "flexmoe.cli.inspect_artifact:inspect",
    "tune-router": "flexmoe.cli.commands:tune_router",
    "demo": "flexmoe.experiments.demo:demo",
    "plan": "flexmoe.cli.plan:plan",
}


def command(name: str) -> typing.Callable[..., None]:
    """The function behind command ``name`` (its module imported now)."""
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
            if tok in POSITIONAL and rest and not rest[0].startswith("-"):
                rest = [POSITIONAL[tok], *rest]  # `flexmoe merge RECIPE.yaml --out DIR`, `flexmoe inspect FILE`
            return argv[: i + 1] + normalize_options(rest, _option_kinds(command(tok)))
    return normalize_options(argv, {})


def normalize_options(argv: list[str], kinds: dict[str, str]) -> list[str]:
    """Rewrite the spellings people type into jsonargparse's, given each option's kind
    (``{name: "list" | "bool" | "other"}``, :func:`_option_kinds`).

    Why a shim: jsonargparse (checked with 4.53) generates the options from a function's
    parameters and accepts only its own syntax, with no setting for these spellings: an option is
    named exactly as its parameter (``--top_k``; there are no dashed aliases), a list takes one
    JSON/YAML value (``--experts '[a, b]'``, or ``--experts+ a`` to append one item; not
    ``nargs="+"``), and a bool takes its value (``--normalize true``; a bare flag is refused). So:

    * ``--top-k 2`` -> ``--top_k 2`` (dashes in option names become underscores);
    * ``--experts a b`` -> ``--experts '["a", "b"]'`` for list options (a single value that
      starts with ``[`` is left to jsonargparse, as is the append form ``--experts+ a``);
    * ``--normalize`` with no value -> ``--normalize=true`` for bool options;
    * a list option given several times (``--model a --model b``) collects all the values.

    Everything else passes through unchanged, so jsonargparse's own syntax keeps working.
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flexmoe`` command.

    Bad input -- an :class:`~flexmoe.core.errors.InputError` (``ArtifactError`` is one) or an
    ``OSError`` (a missing or unwritable path) -- prints one line for the person who made the
    mistake and exits with status 1. Any other exception is a bug and keeps its traceback.
    ``FLEXMOE_DEBUG=1`` shows the traceback of bad input too. The line is cut to
    :data:`ERROR_CHARS` characters. SIGTERM ends the command as Ctrl-C does, so that what it was
    writing is removed (:mod:`flexmoe.core.io`) instead of left half-written.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = None
    try:
        if argv[:1] == ["train-expert"]:
            # LightningCLI owns this command's parser: every Trainer option is available. Imported
            # here so that the other commands do not pay for importing Lightning.
            from flexmoe.cli.train_expert import train_expert_cli

            return train_expert_cli(argv[1:])
        previous = _terminate_cleanly()
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
    except Exception as e:
        bad = _bad_input(e)
        if bad is None or os.environ.get("FLEXMOE_DEBUG"):
            raise
        print(f"flexmoe: error: {error_line(bad)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def error_line(e: BaseException, limit: int = ERROR_CHARS) -> str:
    """``e``'s message as one line of at most about ``limit`` characters, saying how much was cut."""
    text = " ".join((str(e) or type(e).__name__).split())
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters; FLEXMOE_DEBUG=1 shows all)"
    return text


def _terminate_cleanly():
    """Turn SIGTERM (``kill``, a job scheduler's time limit) into ``SystemExit``, so that the
    ``finally`` and ``except`` blocks that remove partial output run; Python's default ends the
    process without them. Only from the main thread and where no handler is set (``train-expert``
    leaves SIGTERM to Lightning). Returns the handler to restore, or ``None``."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        return None


def _bad_input(e: BaseException | None) -> BaseException | None:
    """``e``, or the exception it was raised from, when that is bad input. jsonargparse raises a
    ``ValueError`` of its own from what a recipe's validation raised (``--routing.covariance x``)."""
    while e is not None:
        if isinstance(e, (InputError, OSError)):
            return e
        e = e.__cause__
    return None
