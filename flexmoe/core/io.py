"""Atomic writes: a file or directory appears complete under its name, or not at all.

Everything flexmoe leaves for another process to read (artifacts, exports, reports, progress,
caches) is written to a hidden ``.<name>.partial-*`` sibling and renamed into place, so a crash
or a concurrent reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path of ``path`` for the block to write, renamed to ``path`` when the
    block completes (and removed if it fails). ``path``'s folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, not mkstemp: the file gets the permissions any new file gets (mkstemp's are 0600).
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
