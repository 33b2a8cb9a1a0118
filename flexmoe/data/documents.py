"""Reading an owner's text into documents, and the train/validation split.

Sources (any mix, in the order given; each expanded in sorted path order)::

    notes.txt            a text file                   -> one document (see ``split_paragraphs``)
    corpus.jsonl[.gz]    one JSON object per line      -> one document per line's ``text_field``
    notes/               a folder, read recursively    -> its files as above; binary files skipped
    /data/**/*.md        a glob pattern                -> the files (and folders) it matches
    saved/               a ``datasets`` ``save_to_disk`` directory -> one document per row

Folders skip hidden entries (``.git``, ``.cache``) and files that are not UTF-8 text; a file
reached twice (overlapping sources, symlinks) is read once. :func:`split_documents` decides the
split by each document's content, so the same text lands on the same side wherever it sits.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from flexmoe.core.errors import InputError

Source = str | os.PathLike


_GLOB_CHARS = re.compile(r"[*?\[]")


_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more blank (whitespace-only) lines


def read_documents(
    sources: Source | Sequence[Source], *, text_field: str = "text", split_paragraphs: bool | None = None
) -> list[str]:
    """The raw documents of ``sources``, in a deterministic order (see the module docstring).

    A document is one plain-text file, one JSONL record or one dataset row; documents that
    are empty or whitespace only are dropped. ``split_paragraphs`` cuts plain-text files into
    one document per block of text between blank lines: ``None`` (the default) does so only
    when the whole corpus is a single plain-text file (one big file is otherwise a single
    document, which no train/validation split could divide); ``True`` always; ``False`` never.
    JSONL records and dataset rows are never split.

    Raises ``FileNotFoundError`` for a missing path or a glob that matches nothing and
    ``ValueError`` for an unreadable explicit file, a bad JSONL line, or an empty corpus.
    """
    return _read_entries(_resolve(sources), _show(sources), text_field, split_paragraphs)


def _read_entries(entries, shown: str, text_field: str, split_paragraphs: bool | None) -> list[str]:
    single_file = len(entries) == 1 and entries[0][0] in ("text", "maybe-text")
    split = single_file if split_paragraphs is None else bool(split_paragraphs)
    docs: list[str] = []
    skipped = 0
    for kind, path in entries:
        if kind == "jsonl":
            docs.extend(_read_jsonl(path, text_field))
        elif kind == "dataset":
            docs.extend(_read_dataset(path, text_field))
        else:
            text = _read_text(path, strict=kind == "text")
            if text is None:
                skipped += 1
            elif split:
                docs.extend(split_into_paragraphs(text))
            else:
                docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        why = f" ({skipped} binary or non-UTF-8 file(s) skipped)" if skipped else ""
        raise InputError(f"the data sources {shown} hold no text{why}")
    return docs


def split_into_paragraphs(text: str) -> list[str]:
    """Blocks of ``text`` separated by one or more blank lines, trailing whitespace removed."""
    blocks = (block.rstrip() for block in _BLANK_LINES.split(text))
    return [block.lstrip("\n") for block in blocks if block.strip()]


def _resolve(sources) -> list[tuple[str, Path]]:
    """Expand ``sources`` into ``(kind, path)`` with kind in text / maybe-text / jsonl / dataset."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("no data sources given: pass a file, folder, glob pattern or dataset directory")
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()

    def add(kind, path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append((kind, path))

    for src in sources:
        path = Path(os.path.expanduser(os.fspath(src)))
        if path.exists():
            matches, explicit = [path], True
        elif _GLOB_CHARS.search(str(path)):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
            if not matches:
                raise FileNotFoundError(f"data source pattern {os.fspath(src)!r} matches no file")
            explicit = False
        else:
            raise FileNotFoundError(f"data source {os.fspath(src)!r} does not exist")
        for match in matches:
            if match.is_dir():
                for kind, file in _walk(match):
                    add(kind, file)
            elif match.is_file():
                kind = "jsonl" if _is_jsonl(match) else ("text" if explicit else "maybe-text")
                add(kind, match)
    return out


def _walk(root: Path):
    """Files under ``root`` in sorted order, skipping hidden entries; dataset dirs are leaves."""
    if _is_dataset_dir(root):
        yield "dataset", root
        return
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield ("jsonl" if _is_jsonl(entry) else "maybe-text"), entry


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _is_dataset_dir(path: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_text(path: Path, strict: bool) -> str | None:
    """The file as text with ``\\n`` line ends, or ``None`` when it is binary (unless ``strict``)."""
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if strict:
            raise ValueError(f"data source {str(path)!r} is not a UTF-8 text file (byte {e.start}: {e.reason})") from e
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8-sig") as f:
        try:
            lines = list(f)
        except (UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{path}: cannot be read as UTF-8 JSON lines ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}, line {n}: expected a JSON object with a {field!r} field")
        if not isinstance(record[field], str):
            raise ValueError(f"{path}, line {n}: field {field!r} is {type(record[field]).__name__}, not a string")
        docs.append(record[field])
    return docs


def _read_dataset(path: Path, field: str) -> list[str]:
    try:
        import datasets  # deferred: HF datasets is optional, needed only for a datasets directory
    except ImportError as e:
        raise ImportError(
            f"{path} is a Hugging Face datasets directory; reading it needs the datasets package (pip install datasets)"
        ) from e
    loaded = datasets.load_from_disk(str(path))
    # A DatasetDict contributes all its splits, in name order: our own split decides validation.
    parts = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    docs = []
    for part in parts:
        if field not in part.column_names:
            raise ValueError(f"dataset {path} has no column {field!r} (columns: {part.column_names}); set text_field")
        for i, value in enumerate(part[field]):
            if not isinstance(value, str):
                raise ValueError(f"dataset {path}, row {i}: column {field!r} is {type(value).__name__}, not a string")
            docs.append(value)
    return docs


def _show(sources) -> str:
    if isinstance(sources, (str, os.PathLike)):
        return repr(os.fspath(sources))
    return repr([os.fspath(s) for s in sources])


def split_documents(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of training and validation documents, decided by each document's content.

    Documents are ranked by ``sha256(seed, text)``; the first ``round(val_fraction * n)``
    distinct texts (at least one when ``n >= 2`` and ``val_fraction > 0``) are validation.
    A document's rank depends only on its text and the seed, not on where it sits in the
    corpus, and copies of one text always land on the same side, so validation text never
    leaks into training. At least one training document always remains.
    """
    n = len(docs)
    target = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        groups.setdefault(hashlib.sha256(f"{seed}\0{doc}".encode()).hexdigest(), []).append(i)
    val: list[int] = []
    for key in sorted(groups):
        if len(val) >= target:
            break
        if len(val) + len(groups[key]) < n:  # never take the last training document
            val.extend(groups[key])
    held = set(val)
    return [i for i in range(n) if i not in held], sorted(val)
