"""Named text domains that every Python installation carries: public data for demos and tests.

FlexOlmo's evaluation (Table 1) needs a public corpus and several far-apart owner domains.
:func:`local_corpus` builds them from the Python standard library itself, so any machine can
reproduce a run offline: no download, nothing cached, the same documents on every machine with
the same CPython build. Five domains come by default, all read from parts of the standard
library that every distribution ships (their sizes: docs/demo.md)::

    domain          what
    stdlib_code     library modules as code only: docstrings and comments removed
    docstrings      the docstrings of those modules (API prose)
    comments        the ``#`` comments of those modules (terse notes on code)
    pydoc_topics    the language reference behind ``help()`` (``pydoc_data``)
    unicode_names   the Unicode character database: code point, character, name

"Library modules" are the modules named in ``sys.stdlib_module_names`` except the ones some
distributions split off (idlelib, tkinter, turtle, lib2to3, distutils, ensurepip) and every
``test``/``tests`` package. Building them tokenizes every module; a ``max_docs_per_domain`` cap
parses only the modules the sample needs.

One module file gives one document in each of the first three domains, so the three never
share text, and a held-out module is held out in all of them. Two more domains are built on
request (``domains=[...]``) because not every installation has them: ``stdlib_tests``
(the ``test`` package, which Debian, Ubuntu and Fedora ship separately) and ``licenses``
(licence texts found on this machine). Which licence texts a machine has depends on what is
installed, so the domain takes only texts on a pinned list of content hashes
(``flexmoe/data/_license_hashes.py``), wherever they are found: another package installed adds
nothing, and a listed text missing is warned about. CPython itself ships too little licence
text for an owner domain (its ``LICENSE.txt``: seven licences, about 14 K characters), so the
list also takes the system's and the installed packages' licences of the reference environment.

Every domain is split into training and validation documents by
:func:`flexmoe.data.documents.split_documents` (by content hash), so ``TextDataModule`` over
:func:`write_corpus`'s output with the same ``val_fraction`` and ``seed`` reproduces the split.

One module of about 500 lines: most of it is the tokenizer-level splitting of a source file into
code, docstrings and comments, which only this corpus needs.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import re
import site
import sys
import sysconfig
import tokenize
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.core.io import atomic_file
from flexmoe.data._license_hashes import LICENSE_SHA256
from flexmoe.data.documents import split_documents

DEFAULT_DOMAINS = ("stdlib_code", "docstrings", "comments", "pydoc_topics", "unicode_names")
EXTRA_DOMAINS = ("stdlib_tests", "licenses")

DESCRIPTIONS = {
    "stdlib_code": (
        "Python standard-library modules as code only (docstrings and comments removed); one module per document"
    ),
    "docstrings": (
        "docstrings of the standard-library modules (module, class and function documentation); one module per document"
    ),
    "comments": "'#' comments of the standard-library modules, one block per line group; one module per document",
    "pydoc_topics": "the Python language reference shipped for help() (pydoc_data.topics); one topic per document",
    "unicode_names": (
        "the Unicode character database: 'U+0041 A LATIN CAPITAL LETTER A'-style lines; "
        "one 256-code-point page per document"
    ),
    "stdlib_tests": "the standard library's test package (Lib/test), as written; one module per document",
    "licenses": (
        "software licence texts (system licences, Python's, packages'), deduplicated; "
        "only those on a pinned list of content hashes"
    ),
}

# Parts of the standard library that some distributions package separately (or that are
# another domain), left out so that the default domains are the same on every machine.
_OPTIONAL_MODULES = frozenset(
    {"idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "distutils", "ensurepip", "pydoc_data", "test"}
)
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Characters whose names are generated from the code point carry no text worth learning.
_ALGORITHMIC_NAMES = re.compile(
    r"^(CJK UNIFIED IDEOGRAPH|CJK COMPATIBILITY IDEOGRAPH|HANGUL SYLLABLE|TANGUT |KHITAN SMALL SCRIPT"
    r"|NUSHU CHARACTER|EGYPTIAN HIEROGLYPH-|CUNEIFORM SIGN)"
)
_CODING = re.compile(r"^[ \t\f]*#.*?coding[:=]")
_MANY_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n){3,}")  # three or more blank lines
_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)([.-].*)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Domain:
    """One named text domain, split by document into training and validation text."""

    name: str
    description: str
    source: str
    train: list[str] = field(repr=False)
    val: list[str] = field(repr=False)

    @property
    def documents(self) -> list[str]:
        return self.train + self.val

    def content_sha256(self) -> dict[str, str]:
        """``{"train": ..., "val": ...}``: sha256 over each split's documents in order (over every
        document's own sha256), so two runs can tell whether they used the same text."""
        out = {}
        for split, texts in (("train", self.train), ("val", self.val)):
            h = hashlib.sha256()
            for text in texts:
                h.update(hashlib.sha256(text.encode()).digest())
            out[split] = h.hexdigest()
        return out

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.train) + sum(len(d) for d in self.val)

    def __str__(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val documents, "
            f"{self.num_chars / 1000:.0f} K chars ({self.description})"
        )


def local_corpus(
    max_docs_per_domain: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    domains: Sequence[str] | None = None,
) -> dict[str, Domain]:
    """Named text domains read from this Python installation (see the module docstring).

    Args:
        max_docs_per_domain: keep at most this many documents per domain, a sample chosen by
            a hash of each document's name (module path, topic, page), so it is the same
            sample on every machine and only the modules needed are parsed. ``None``: all.
        val_fraction: share of each domain's documents held out for validation.
        seed: seeds the train/validation split (:func:`flexmoe.data.documents.split_documents`).
        domains: which domains, in this order; default :data:`DEFAULT_DOMAINS`. Also
            available: :data:`EXTRA_DOMAINS`, which depend on what this machine has installed.

    Returns ``{name: Domain}``. Deterministic: the same arguments give the same documents,
    in the same order, on every run with the same Python build.
    """
    names = list(DEFAULT_DOMAINS if domains is None else domains)
    unknown = [n for n in names if n not in DESCRIPTIONS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; available: {', '.join(DESCRIPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"domains lists a name twice: {names}")
    if max_docs_per_domain is not None and max_docs_per_domain < 2:
        raise ValueError(
            f"max_docs_per_domain must be at least 2 (one to train, one to validate), got {max_docs_per_domain}"
        )
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    cap = max_docs_per_domain
    docs: dict[str, list[tuple[str, str]]] = {}  # name -> [(key, text)]
    sources: dict[str, str] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    module_domains = [n for n in names if n in ("stdlib_code", "docstrings", "comments")]
    if module_domains:
        docs.update(_module_domains(_library_files(stdlib), stdlib, module_domains, cap))
        for n in module_domains:
            sources[n] = f"{stdlib} (Python {_python_version()})"
    for name in names:
        if name == "pydoc_topics":
            docs[name], sources[name] = _pydoc_topics(), f"pydoc_data.topics (Python {_python_version()})"
        elif name == "unicode_names":
            docs[name], sources[name] = _unicode_names(), f"unicodedata {unicodedata.unidata_version}"
        elif name == "stdlib_tests":
            docs[name], sources[name] = _test_modules(stdlib), str(stdlib / "test")
        elif name == "licenses":
            docs[name], sources[name] = _licenses(stdlib)
    out = {}
    for name in names:
        keyed = _sample(docs[name], cap)
        if len(keyed) < 2:
            raise ValueError(f"domain {name!r} has {len(keyed)} document(s) on this machine; a split needs two")
        texts = [text for _, text in keyed]
        train, val = split_documents(texts, val_fraction, seed)
        out[name] = Domain(
            name=name,
            description=DESCRIPTIONS[name],
            source=sources[name],
            train=[texts[i] for i in train],
            val=[texts[i] for i in val],
        )
    return out


def write_corpus(domains: dict[str, Domain] | Sequence[Domain], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write each domain as ``out_dir/<name>/{train,val}.jsonl`` (one ``{"text": ...}`` per line).

    Returns ``{name: out_dir/<name>}``. A folder so written is an ordinary data source:
    ``TextDataModule("out/<name>", tok, val_fraction=f, seed=s)`` reads both files and, with
    the ``val_fraction`` and ``seed`` the corpus was built with, holds out exactly its ``val``
    documents; ``out/<name>/train.jsonl`` alone is the training text only. Existing
    ``train.jsonl``/``val.jsonl`` files are replaced; nothing else in ``out_dir`` is touched.
    """
    items = list(domains.values()) if isinstance(domains, dict) else list(domains)
    root = Path(os.path.expanduser(os.fspath(out_dir)))
    paths = {}
    for domain in items:
        folder = root / domain.name
        folder.mkdir(parents=True, exist_ok=True)
        for split, texts in (("train", domain.train), ("val", domain.val)):
            with atomic_file(folder / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
        paths[domain.name] = folder
    return paths


def save_local_corpus(
    out: str,
    domains: list[str] | None = None,
    max_docs_per_domain: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Path]:
    """Build the local corpus and write it to a folder, one sub-folder per domain.

    Args:
        out: Output folder; each domain goes to ``OUT/<name>/{train,val}.jsonl``.
        domains: Domains to write (default: stdlib_code, docstrings, comments, pydoc_topics,
            unicode_names; also stdlib_tests and licenses where this machine has them).
        max_docs_per_domain: Keep at most this many documents per domain (default: all).
        val_fraction: Share of each domain's documents held out as ``val.jsonl``.
        seed: Seed of the by-document train/validation split.
    """
    corpus = local_corpus(max_docs_per_domain, val_fraction, seed, domains)
    paths = write_corpus(corpus, out)
    for domain in corpus.values():
        print(f"flexmoe: {domain} -> {paths[domain.name]}")
    return paths


# -- the standard library's modules ------------------------------------------------------------


def _python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _library_files(stdlib: Path) -> list[Path]:
    """The ``.py`` files of the standard-library modules every distribution ships, sorted."""
    names = set(sys.stdlib_module_names) - _OPTIONAL_MODULES
    files = []
    for entry in sorted(stdlib.iterdir(), key=lambda p: p.name):
        if entry.suffix == ".py" and entry.stem in names and entry.is_file():
            files.append(entry)
        elif entry.is_dir() and entry.name in names and (entry / "__init__.py").is_file():
            files.extend(_package_files(entry))
    return files


def _package_files(root: Path) -> Iterator[Path]:
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and entry.name not in _TEST_DIRS and entry.name != "__pycache__":
            yield from _package_files(entry)
        elif entry.suffix == ".py" and entry.is_file():
            yield entry


def _module_domains(files: list[Path], stdlib: Path, wanted: list[str], cap: int | None):
    """stdlib_code / docstrings / comments from one pass over each module's tokens."""
    out: dict[str, list[tuple[str, str]]] = {n: [] for n in wanted}
    # With a cap, parse modules in the order of a hash of their path and stop once every
    # domain has its documents; the sample does not depend on the machine's file order.
    order = sorted(files, key=lambda p: _hash(p.relative_to(stdlib).as_posix())) if cap else files
    for path in order:
        if cap and all(len(v) >= cap for v in out.values()):
            break
        parts = split_module(_read_source(path))
        if parts is None:
            continue
        key = path.relative_to(stdlib).as_posix()
        for name, text in zip(("stdlib_code", "docstrings", "comments"), parts):
            if name in out and text.strip() and not (cap and len(out[name]) >= cap):
                out[name].append((key, text))
    if cap:  # back to path order
        for docs in out.values():
            docs.sort()
    return out


def _read_source(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            encoding, _ = tokenize.detect_encoding(f.readline)
        return path.read_text(encoding=encoding).replace("\r\n", "\n")
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None


def split_module(source: str | None) -> tuple[str, str, str] | None:
    """``(code, docstrings, comments)`` of one Python module, or ``None`` if it does not tokenize.

    ``code`` is the source with every docstring and ``#`` comment removed (a body left empty
    gets ``...``, so the code still parses) and runs of more than two blank lines squeezed to two.
    ``docstrings`` are the module, class and function docstrings, cleaned as ``help()``
    shows them, separated by blank lines. ``comments`` are the comments as written, without
    indentation; comments on consecutive lines stay together as one block.
    """
    if source is None:
        return None
    lines = source.splitlines(keepends=True)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    drop: set[int] = set()  # 0-based lines to remove
    cut: dict[int, int] = {}  # 0-based line -> column where a trailing comment starts
    replace: dict[int, str] = {}  # 0-based line -> replacement (an emptied body's "...")
    docstrings: list[str] = []
    comments: list[tuple[int, str]] = []

    expect_doc = True  # at the start of the module, or right after a def/class header
    line_start = True
    header = False  # the current logical line opens a def/class block
    last_op = None
    pending = None  # (first row, last row, indent) of a docstring whose body may end after it
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        kind = tok.type
        if kind == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string
            if not (row <= 2 and (text.startswith("#!") or _CODING.match(text))):
                comments.append((row, text))
            if lines[row - 1][:col].strip():
                cut[row - 1] = min(col, cut.get(row - 1, col))
            else:
                drop.add(row - 1)
            i += 1
            continue
        if kind in (tokenize.NL, tokenize.ENCODING):
            i += 1
            continue
        if pending is not None and kind not in (tokenize.INDENT,):
            first, last, indent = pending
            if kind in (tokenize.DEDENT, tokenize.ENDMARKER) and indent:
                replace[first] = indent + "...\n"  # the docstring was the whole body
                drop.update(range(first + 1, last + 1))
            else:
                drop.update(range(first, last + 1))
            pending = None
        if kind == tokenize.INDENT:
            i += 1
            continue
        if kind in (tokenize.DEDENT, tokenize.ENDMARKER):
            i += 1
            continue
        if expect_doc and line_start and kind == tokenize.STRING:
            j = i
            while j < len(tokens) and tokens[j].type in (tokenize.STRING, tokenize.NL, tokenize.COMMENT):
                j += 1
            if j < len(tokens) and tokens[j].type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                strings = [t for t in tokens[i:j] if t.type == tokenize.STRING]
                value = _string_value(strings)
                if value is not None:
                    first, last = tok.start[0] - 1, strings[-1].end[0] - 1
                    if value.strip():
                        docstrings.append(inspect.cleandoc(value).strip())
                    comments.extend((t.start[0], t.string) for t in tokens[i:j] if t.type == tokenize.COMMENT)
                    pending = (first, last, lines[first][: tok.start[1]])
                    expect_doc = False
                    line_start = True
                    i = j + 1
                    continue
        if kind == tokenize.NEWLINE:
            expect_doc = header and last_op == ":"
            header, line_start, last_op = False, True, None
            i += 1
            continue
        if line_start:
            after = tokens[i + 1].string if i + 1 < len(tokens) else ""
            header = kind == tokenize.NAME and (
                tok.string in ("def", "class") or (tok.string == "async" and after == "def")
            )
        if line_start:
            expect_doc = False
        line_start = False
        last_op = tok.string if kind == tokenize.OP else None
        i += 1
    if pending is not None:
        drop.update(range(pending[0], pending[1] + 1))

    code_lines = []
    for n, line in enumerate(lines):
        if n in replace:
            code_lines.append(replace[n])
        elif n in drop:
            continue
        elif n in cut:
            code_lines.append(line[: cut[n]].rstrip() + "\n")
        else:
            code_lines.append(line)
    code = _MANY_BLANK_LINES.sub("\n\n\n", "".join(code_lines)).strip("\n")
    blocks: list[list[str]] = []
    previous = None
    for row, text in comments:
        if previous is None or row != previous + 1:
            blocks.append([])
        blocks[-1].append(text)
        previous = row
    comment_text = "\n\n".join("\n".join(block) for block in blocks)
    return code + "\n" if code else "", "\n\n".join(docstrings), comment_text


def _string_value(strings: list[tokenize.TokenInfo]) -> str | None:
    """The text of adjacent string literals, or ``None`` when one is bytes or an f-string."""
    values = []
    for token in strings:
        prefix = token.string[: len(token.string) - len(token.string.lstrip("rRbBuUfF"))].lower()
        if "b" in prefix or "f" in prefix:
            return None
        with warnings.catch_warnings():  # invalid escapes such as "\d" warn; their value is still defined
            warnings.simplefilter("ignore")
            try:
                values.append(ast.literal_eval(token.string))
            except (ValueError, SyntaxError):
                return None
    return "".join(values)


def _test_modules(stdlib: Path) -> list[tuple[str, str]]:
    root = stdlib / "test"
    if not (root / "__init__.py").is_file() or not any(root.glob("test_*.py")):
        raise ValueError(
            f"domain 'stdlib_tests' needs the standard library's test package, which {root} lacks "
            "(Debian/Ubuntu ship it as libpython3.X-testsuite, Fedora as python3-test)"
        )
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = _read_source(path)
        if text and text.strip():
            docs.append((path.relative_to(stdlib).as_posix(), text))
    return docs


# -- reference prose, the character database, licences ------------------------------------------


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # a megabyte of reference text: loaded only for this domain

    return [(name, text.strip() + "\n") for name, text in sorted(topics.items()) if text.strip()]


def _unicode_names() -> list[tuple[str, str]]:
    pages: dict[int, list[str]] = {}
    for cp in range(sys.maxunicode + 1):
        char = chr(cp)
        name = unicodedata.name(char, "")
        if not name or _ALGORITHMIC_NAMES.match(name):
            continue
        category = unicodedata.category(char)
        # Show the character itself unless it is invisible, combining or a space of its own.
        shown = char if category[0] not in "CMZ" else ""
        line = f"U+{cp:04X} {shown} {name}" if shown else f"U+{cp:04X} {name}"
        pages.setdefault(cp >> 8, []).append(line)
    return [(f"{page:04X}", "\n".join(lines) + "\n") for page, lines in sorted(pages.items())]


def _license_roots(stdlib: Path) -> list[Path]:
    """Where licence texts are looked for: the system's licences, CPython's, installed packages'."""
    roots = [Path("/usr/share/common-licenses"), stdlib]
    return roots + [Path(p) for p in {*site.getsitepackages(), site.getusersitepackages(), *sys.path}]


def _licenses(stdlib: Path) -> tuple[list[tuple[str, str]], str]:
    roots = _license_roots(stdlib)
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    found_in: set[str] = set()
    for root in sorted(set(roots), key=str):
        if not root.is_dir():
            continue
        if root.name == "common-licenses":
            candidates = sorted(p for p in root.iterdir() if p.is_file())
        elif root == stdlib:
            candidates = [p for p in (root / "LICENSE.txt",) if p.is_file()]
        else:
            candidates = sorted(
                p
                for info in root.glob("*.dist-info")
                for p in [*info.iterdir(), *(info / "licenses").rglob("*")]
                if p.is_file() and (_LICENSE_FILE.match(p.name) or p.parent.name == "licenses")
            )
        for path in candidates:
            try:
                text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
            except (OSError, UnicodeDecodeError):
                continue
            digest = _hash(" ".join(text.split()))  # same licence, different wrapping: one document
            if digest not in LICENSE_SHA256 or digest in seen:
                continue
            seen.add(digest)
            # Keyed by content, so the sample does not depend on where a text was installed.
            docs.append((digest, text + "\n"))
            found_in.add(str(root))
    if len(docs) < 2:
        raise ValueError("domain 'licenses' found fewer than two of its pinned licence texts on this machine")
    if len(docs) < len(LICENSE_SHA256):
        warnings.warn(
            f"domain 'licenses': {len(LICENSE_SHA256) - len(docs)} of its {len(LICENSE_SHA256)} pinned licence texts "
            "are not on this machine, so the domain differs from the reference one (compare the corpus hashes)",
            stacklevel=3,
        )
    docs.sort(key=lambda kv: _hash(kv[1]))  # by content: the order does not depend on where they were found
    return docs, ", ".join(sorted(found_in))


def _sample(keyed: list[tuple[str, str]], cap: int | None) -> list[tuple[str, str]]:
    """At most ``cap`` documents, chosen by a hash of their keys, kept in their order."""
    if cap is None or len(keyed) <= cap:
        return keyed
    chosen = set(sorted(range(len(keyed)), key=lambda i: _hash(keyed[i][0]))[:cap])
    return [kv for i, kv in enumerate(keyed) if i in chosen]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
