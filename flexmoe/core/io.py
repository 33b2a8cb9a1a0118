"""Atomic writes: a file or directory appears complete under its name, or not at all.

Everything flexmoe leaves for another process to read (artifacts, exports, reports, progress,
caches) is written to a hidden ``.<name>.partial-<host>-<pid>-<random>`` sibling and renamed into
place, so a crash or a concurrent reader never sees half of it. A write that fails removes its
sibling; one that cannot (the process was killed: SIGKILL, the OOM killer, a power cut) leaves
it, and the next write of the same name removes every sibling left by a process of this machine
that is no longer running. Siblings of live processes and of other machines (a shared
filesystem) are left alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{12}")


def _partial_name(name: str) -> str:
    return f".{name}.partial-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the partial siblings of ``path`` that a killed flexmoe process of this machine
    left behind (files or directories); return what was removed. Runs before every atomic write
    of ``path``, so an interrupted command is cleaned up by the next one."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = _PARTIAL.fullmatch(p.name)
        if m is None or m["name"] != path.name or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path of ``path`` for the block to write, renamed to ``path`` when the
    block completes (and removed if it fails). ``path``'s folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    # A unique name, not mkstemp: the file gets the permissions any new file gets (mkstemp's are 0600).
    tmp = path.with_name(_partial_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike, data, *, indent: int | None = 2, sort_keys: bool = False, **kwargs
) -> Path:
    """Write ``data`` as JSON (and a final newline) to ``path`` atomically; ``kwargs`` go to
    :func:`json.dumps` (``default=str``, ``ensure_ascii=False``). Returns ``path``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, **kwargs) + "\n")


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``out_dir``, renamed to it when the block completes (and removed
    if it fails). ``out_dir`` must not exist yet, or be an empty directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; choose a new path or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.with_name(_partial_name(out_dir.name))
    tmp.mkdir(mode=0o700)  # private while incomplete, as mkdtemp made it
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
