"""Parsing what another party wrote, with every bound checked before the work it limits.

Python's own parsers trust their input: ``json.loads`` recurses once per nesting level (a few
kilobytes of ``[`` raise ``RecursionError``) and turns a 5,000-digit number into a ``ValueError``
of its own; a YAML alias bomb is a few hundred bytes that expand into billions of nodes as soon
as anything walks the result; ``str.isdigit`` accepts ``'²'``, which ``int`` then refuses; ``$``
in a regular expression matches before a trailing newline. The helpers here are the strict
versions, and each refusal is an :class:`~flexmoe.core.errors.InputError` naming ``what`` was
being read:

* :func:`load_json` / :func:`read_json`: bounded size, nesting depth and number length, no
  ``NaN``/``Infinity``, no duplicate keys;
* :func:`load_yaml`: bounded size, depth and *expanded* node count (aliases counted once per use);
* :func:`parse_count`: an ASCII decimal integer within given bounds;
* :func:`regular_file`: a file inside a directory that is a plain file (not a FIFO, device or
  a link out of the directory), before anything opens it;
* :func:`shorten`: any text an outsider controls, cut to a readable length for a message.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import yaml

from flexmoe.core.errors import InputError

# Defaults sized for the configuration files flexmoe reads (flexmoe_config.json, a merge recipe,
# a shard index): the largest real one is far below each (docs/trust.md).
MAX_JSON_BYTES = 64 * 2**20
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 40
MAX_YAML_BYTES = 2**20
MAX_YAML_NODES = 100_000
MESSAGE_CHARS = 300

_DECIMAL = re.compile(r"[0-9]+")  # ASCII only, unlike str.isdigit and \d
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def shorten(text, limit: int = MESSAGE_CHARS) -> str:
    """``text`` (or its ``repr`` for a non-string) on one line and at most about ``limit``
    characters, saying how much was cut: an outsider's 20 MB owner name must not become a 20 MB
    error message."""
    s = text if isinstance(text, str) else repr(text)
    if len(s) > limit:
        s = f"{s[:limit]}... ({len(s) - limit} more characters)"
    return s.encode("unicode_escape").decode("ascii") if not s.isprintable() else s


def parse_count(value, *, what: str, minimum: int = 0, maximum: int) -> int:
    """``value`` (a string of ASCII decimal digits, or an ``int``) as an ``int`` in
    ``[minimum, maximum]``; an :class:`InputError` otherwise. ``maximum`` is required: every
    count another party declares is bounded by what the receiver expects before it is used."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{what}: expected an integer, got {shorten(value, 60)}")
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value) or len(value) > len(str(maximum)) + 1:
            raise InputError(f"{what}: expected a decimal integer (ASCII digits), got {shorten(value, 60)!r}")
        value = int(value)
    if not minimum <= value <= maximum:
        raise InputError(f"{what}: expected an integer in [{minimum}, {maximum}], got {shorten(str(value), 60)}")
    return value


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def _too_deep(raw: bytes, limit: int) -> bool:
    """Whether JSON ``raw`` nests deeper than ``limit``, without recursion: strings removed, the
    brackets kept, then the innermost pairs removed once per level (each pass in C, so a 16 MiB
    header takes well under a second); what is left after ``limit`` passes is checked by counting."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _INNERMOST.sub(b"", brackets)
    depth = 0
    for c in brackets:  # deeper than the limit, or unbalanced (which the parser reports)
        depth += 1 if c in _OPEN else -1
        if depth > 0:
            return True
    return False


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InputError(f"key {shorten(twice, 80)!r} appears twice")
    return out


def _int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_DIGITS + 1:
        raise InputError(f"a number of {len(digits)} digits (at most {MAX_NUMBER_DIGITS})")
    return int(digits)


def _float(text: str) -> float:
    if len(text) > 2 * MAX_NUMBER_DIGITS:
        raise InputError(f"a number of {len(text)} characters (at most {2 * MAX_NUMBER_DIGITS})")
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"a number out of range ({shorten(text, 40)})")
    return value


def _constant(name: str):
    raise InputError(f"{name} is not a JSON number")


def load_json(raw: bytes | str, *, what: str, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_JSON_BYTES):
    """Parse JSON from an untrusted source, refusing (with :class:`InputError`) more than
    ``max_bytes``, nesting deeper than ``max_depth``, numbers longer than ``MAX_NUMBER_DIGITS``
    digits, ``NaN``/``Infinity``, duplicate keys and anything that is not UTF-8 JSON."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > max_bytes:
        raise InputError(f"{what}: {len(raw)} bytes of JSON, at most {max_bytes} expected")
    if _too_deep(raw, max_depth):
        raise InputError(f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
        )
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{what}: not valid JSON ({shorten(str(e), 120)})") from None


def regular_file(directory: str | os.PathLike, name: str, *, what: str) -> Path:
    """``directory / name`` when it is a regular file inside ``directory`` (symbolic links are
    followed, but must stay inside); an :class:`InputError` for an absolute name, ``..``, a FIFO,
    a device, a directory or a missing file, checked before anything opens it (opening a FIFO
    blocks until someone writes to it)."""
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) or "\\" in name:
        raise InputError(f"{what}: {shorten(name, 120)!r} is not a file name relative to {directory}")
    root = Path(directory).resolve()
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise InputError(f"{what}: {shorten(name, 120)!r} points outside {directory}")
    try:
        mode = os.stat(target).st_mode
    except OSError as e:
        raise InputError(f"{what}: {shorten(name, 120)!r} in {directory}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what}: {shorten(name, 120)!r} in {directory} is not a regular file")
    return target


def read_json(directory: str | os.PathLike, name: str, *, what: str | None = None, **bounds):
    """Read JSON file ``name`` inside ``directory`` through :func:`regular_file` and
    :func:`load_json` (``bounds``: ``max_depth``, ``max_bytes``)."""
    what = what or f"{Path(directory) / name}"
    path = regular_file(directory, name, what=what)
    limit = bounds.get("max_bytes", MAX_JSON_BYTES)
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    return load_json(raw, what=what, **bounds)


def load_yaml(
    text: str,
    *,
    what: str,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_YAML_NODES,
    max_bytes: int = MAX_YAML_BYTES,
):
    """Parse YAML (the safe subset: no Python objects) from an untrusted source, refusing more
    than ``max_bytes``, nesting deeper than ``max_depth``, and a document that expands to more
    than ``max_nodes`` nodes when every alias is counted where it is used (an alias bomb is a few
    hundred bytes that expand to billions). Depth is checked on the event stream, before the
    recursive composer runs; the expanded count on the composed graph, before anything is built."""
    if len(text) > max_bytes:
        raise InputError(f"{what}: {len(text)} characters of YAML, at most {max_bytes} expected")
    try:
        depth = 0
        for events, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader), 1):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise InputError(f"{what}: YAML nested deeper than {max_depth} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            if events > max_nodes:
                raise InputError(f"{what}: more than {max_nodes} YAML nodes")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            size = _expanded_size(node, max_nodes)
            if size > max_nodes:
                raise InputError(
                    f"{what}: the YAML expands to more than {max_nodes} nodes (aliases counted each time they are used)"
                )
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise InputError(f"{what}: not valid YAML: {shorten(str(e), 200)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        if isinstance(e, InputError):
            raise
        # The safe constructor's own failures: a 5,000-digit int, a bad timestamp or base64.
        raise InputError(f"{what}: a YAML value cannot be read: {shorten(str(e), 200)}") from None


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in ``root`` with aliases expanded, computed on the shared graph (each node once,
    iteratively); stops counting past ``limit``. A cycle counts as past the limit."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            sizes[key] = min(total, limit + 1)
            continue
        if key in sizes:
            continue
        if key in on_path:
            return limit + 1  # a recursive alias: infinitely large when walked
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


MAX_OWNER_NAME = 128
# 1 to MAX_OWNER_NAME characters, none of them a path separator or a control character.
_OWNER_NAME = re.compile(rf"[^/\\\x00-\x1f\x7f]{{1,{MAX_OWNER_NAME}}}")


def valid_owner_name(name) -> bool:
    """Whether ``name`` can name an owner's expert: 1 to :data:`MAX_OWNER_NAME` printable
    characters without path separators, not ``.`` or ``..``, without surrounding whitespace. A name
    becomes a file name, a line of a report and an entry of ``flexmoe_config.json``, which
    ``flexmoe.load`` refuses to reopen otherwise; the one rule for names from any party."""
    return (
        isinstance(name, str)
        and _OWNER_NAME.fullmatch(name) is not None
        and name.isprintable()
        and name.strip() == name
        and name not in (".", "..")
    )
