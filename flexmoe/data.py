"""One domain's text -> tokenised, packed sequences: the data owner's input (DESIGN.md step 2).

:class:`TextDataModule` reads an owner's local text, splits it into training and validation
documents, tokenises it with the public model's tokenizer and packs it into fixed-length
sequences, caching the result on disk. Nothing here leaves the owner's machine.

Sources (any mix, in the order given; each expanded in sorted path order)::

    notes.txt            a text file                   -> one document (see ``split_paragraphs``)
    corpus.jsonl[.gz]    one JSON object per line      -> one document per line's ``text_field``
    notes/               a folder, read recursively    -> its files as above; binary files skipped
    /data/**/*.md        a glob pattern                -> the files (and folders) it matches
    saved/               a ``datasets`` ``save_to_disk`` directory -> one document per row

Folders skip hidden entries (``.git``, ``.cache``) and files that are not UTF-8 text; a file
reached twice (overlapping sources, symlinks) is read once.

:func:`train_tokenizer` trains a small byte-level BPE tokenizer, for a public model pretrained
from scratch on local text (the demo, the tests).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

CACHE_FORMAT = "1"
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more blank (whitespace-only) lines
_ENCODE_BATCH = 256

Source = str | os.PathLike


# -- reading documents -----------------------------------------------------------------------


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
        raise ValueError(f"the data sources {shown} hold no text{why}")
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
        import datasets
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


# -- splitting, tokenising, packing ------------------------------------------------------------


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


def pack(token_ids: Iterable[Sequence[int]], eos_token_id: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Concatenate documents with ``eos_token_id`` after each and cut into rows of ``seq_len``.

    Returns the ``int32`` tensor [num_sequences, seq_len] and the number of tokens in the
    stream. The final partial row is dropped (at most ``seq_len - 1`` tokens): padding it
    would train on padding, as the model's labels are its inputs.
    """
    eos = np.array([eos_token_id], dtype=np.int32)
    parts = []
    for ids in token_ids:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    rows = len(stream) // seq_len
    return torch.from_numpy(stream[: rows * seq_len].reshape(rows, seq_len).copy()), len(stream)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what the tokenizer does (its serialised vocabulary and rules), not its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False) + type(tokenizer).__name__
    extra = json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "all_special_tokens", [])])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts``, no special tokens, no truncation (documents may be long)."""
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def _default_cache_dir() -> Path:
    root = os.environ.get("FLEXMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexmoe"
    )
    return Path(root) / "data"


# -- the datamodule --------------------------------------------------------------------------


class PackedSequences(Dataset):
    """Rows of a packed ``int32`` tensor as ``{"input_ids": LongTensor[seq_len]}``.

    Holds only the tensor, so it pickles cheaply into DataLoader workers.
    """

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i].long()}


class EpochShuffle(DistributedSampler):
    """The training order: a permutation seeded by ``seed + epoch``, dealt round-robin to ranks.

    One process and N processes see the same permutation, so ``devices=N`` with batch ``B/N``
    trains on the same sequences per step as one device with batch ``B``. Lightning calls
    ``set_epoch``; ``skip`` drops the first indices of the next pass only (a resumed epoch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class TextDataModule(L.LightningDataModule):
    """One owner's domain text as packed language-modelling batches for an expert.

    Args:
        sources: file(s), folder(s), glob pattern(s), JSONL file(s) or ``datasets``
            directories; see :func:`read_documents`.
        tokenizer: the public model's tokenizer, or a local directory or hub id for
            ``AutoTokenizer.from_pretrained``. It must have an EOS token.
        seq_len: tokens per training sequence.
        batch_size: sequences per batch.
        val_fraction: share of documents held out for validation (by document, see
            :func:`split_documents`); ``0`` holds out nothing.
        seed: seeds both the split and the shuffling of training sequences.
        text_field: the JSONL field / dataset column holding the text.
        split_paragraphs: cut plain-text files at blank lines; ``None`` does so only when the
            corpus is a single plain-text file (see :func:`read_documents`).
        cache_dir: where packed tensors are kept; default ``$FLEXMOE_CACHE/data``, else
            ``~/.cache/flexmoe/data``.
        num_workers, pin_memory: passed to both DataLoaders.

    Each document is tokenised without special tokens, followed by EOS, and the stream of each
    split is cut into ``seq_len`` rows; the final partial row is dropped. Batches are
    ``{"input_ids": LongTensor[B, seq_len]}``; the labels are the inputs (the model shifts).

    The packed tensors are cached in one safetensors file keyed by the sha256 of the document
    contents, the tokenizer's serialised form and the packing and split settings, so setting up
    again with the same inputs skips tokenisation and any change rebuilds it. Under DDP,
    Lightning runs :meth:`prepare_data` once per node, which writes the cache; :meth:`setup`
    then reads it on every rank (and builds it itself if it is missing).
    """

    def __init__(
        self,
        sources: list[str] | Source,
        tokenizer,
        *,
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 0,
        text_field: str = "text",
        split_paragraphs: bool | None = None,
        cache_dir: Source | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sources = sources
        self.seq_len, self.batch_size, self.val_fraction, self.seed = seq_len, batch_size, val_fraction, seed
        self.text_field, self.split_paragraphs = text_field, split_paragraphs
        self.cache_dir = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else _default_cache_dir()
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._resolved = _resolve(sources)  # a missing path or empty glob fails here, before any work
        self._tokenizer_arg = tokenizer
        self._tokenizer = None
        self._docs: list[str] | None = None
        self._split: tuple[list[int], list[int]] | None = None
        self._key: str | None = None
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._resume_batches = 0
        self.cache_hit: bool | None = None  # after setup: whether the packed data came from the cache

    # -- documents ----------------------------------------------------------------------
    def documents(self) -> list[str]:
        """All documents, in source order (for router-embedding init and proxy selection)."""
        if self._docs is None:
            self._docs = _read_entries(self._resolved, _show(self.sources), self.text_field, self.split_paragraphs)
        return self._docs

    def train_documents(self) -> list[str]:
        docs = self.documents()
        return [docs[i] for i in self._split_indices()[0]]

    def val_documents(self) -> list[str]:
        docs = self.documents()
        return [docs[i] for i in self._split_indices()[1]]

    def _split_indices(self) -> tuple[list[int], list[int]]:
        if self._split is None:
            self._split = split_documents(self.documents(), self.val_fraction, self.seed)
        return self._split

    # -- tokenizer and cache --------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use when given as a path or hub id."""
        if self._tokenizer is None:
            tok = self._tokenizer_arg
            if isinstance(tok, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(os.fspath(tok))
            if getattr(tok, "eos_token_id", None) is None:
                raise ValueError(
                    f"tokenizer {getattr(tok, 'name_or_path', '') or type(tok).__name__} has no EOS token, "
                    "which separates documents in packed sequences; set tokenizer.eos_token"
                )
            self._tokenizer = tok
        return self._tokenizer

    @property
    def cache_key(self) -> str:
        """sha256 of everything the packed tensors depend on."""
        if self._key is None:
            h = hashlib.sha256()
            settings = dict(
                format=CACHE_FORMAT,
                tokenizer=tokenizer_hash(self.tokenizer),
                seq_len=self.seq_len,
                val_fraction=self.val_fraction,
                seed=self.seed,
            )
            h.update(json.dumps(settings, sort_keys=True).encode())
            for doc in self.documents():
                data = doc.encode()
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
            self._key = h.hexdigest()
        return self._key

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.cache_key}.safetensors"

    def _build(self) -> dict[str, torch.Tensor]:
        docs, tok = self.documents(), self.tokenizer
        out, counts = {}, {}
        for name, idx in zip(("train", "val"), self._split_indices()):
            texts = [docs[i] for i in idx]
            batches = (_encode(tok, texts[i : i + _ENCODE_BATCH]) for i in range(0, len(texts), _ENCODE_BATCH))
            ids = (doc_ids for batch in batches for doc_ids in batch)
            out[name], counts[name] = pack(ids, tok.eos_token_id, self.seq_len)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": CACHE_FORMAT,
            "seq_len": str(self.seq_len),
            "train_documents": str(len(self._split_indices()[0])),
            "val_documents": str(len(self._split_indices()[1])),
            "train_stream_tokens": str(counts["train"]),
            "val_stream_tokens": str(counts["val"]),
        }
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(out, tmp, metadata=metadata)
            os.replace(tmp, self.cache_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        rank_zero_info(
            f"flexmoe.data: tokenised {len(docs)} documents into {out['train'].shape[0]} train and "
            f"{out['val'].shape[0]} validation sequences of {self.seq_len} tokens ({self.cache_path})"
        )
        return out

    # -- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Tokenise and cache, unless cached already (Lightning: once per node)."""
        if not self.cache_path.is_file():
            self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load the packed tensors from the cache (building them when missing)."""
        if self._train is not None:
            return
        path = self.cache_path
        self.cache_hit = path.is_file()
        tensors = load_file(path) if self.cache_hit else self._build()
        self._train, self._val = tensors["train"], tensors["val"]
        if self._train.shape[0] == 0:
            raise ValueError(
                f"the training documents hold fewer than seq_len={self.seq_len} tokens; "
                "add text or lower seq_len"
            )
        if self._val.shape[0] == 0 and self._split_indices()[1]:
            rank_zero_warn(
                f"the validation documents hold fewer than seq_len={self.seq_len} tokens, so validation is empty; "
                "raise val_fraction or lower seq_len"
            )

    def train_dataloader(self) -> DataLoader:
        data = PackedSequences(self._loaded("_train"))
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(data, num_replicas=world, rank=rank, seed=self.seed)
        sampler.skip, self._resume_batches = self._resume_batches * self.batch_size, 0
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, **self._loader_kwargs())

    def state_dict(self) -> dict:
        """Where training stands in the current epoch, so a resumed run sees the batches an
        uninterrupted one would (saved in every Lightning checkpoint)."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {"batches_done_in_epoch": int(done), "cache_key": self.cache_key}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_batches = int(state_dict.get("batches_done_in_epoch", 0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            PackedSequences(self._loaded("_val")), batch_size=self.batch_size, shuffle=False, **self._loader_kwargs()
        )

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers
        return dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)

    def _loaded(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError("TextDataModule has no data yet: call prepare_data() and setup() first")
        return value

    # -- sizes ----------------------------------------------------------------------------
    @property
    def train_rows(self) -> torch.Tensor:
        """The packed training sequences ``[N, seq_len]`` (owner side: for aggregate statistics
        such as :func:`flexmoe.routing.owner_statistics`; they never leave the machine)."""
        return self._loaded("_train")

    @property
    def num_train_sequences(self) -> int:
        return self._loaded("_train").shape[0]

    @property
    def num_train_tokens(self) -> int:
        """Tokens in the packed training sequences (what one epoch trains on)."""
        return self._loaded("_train").numel()

    @property
    def num_val_tokens(self) -> int:
        return self._loaded("_val").numel()


# -- a tokenizer for a public model trained from scratch ---------------------------------------


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>"),
):
    """Train a byte-level BPE tokenizer on ``texts`` as a ``transformers`` tokenizer.

    ``special_tokens`` are pad, bos, eos (ids 0, 1, 2 in that order), then any further
    special tokens. Byte-level means every string encodes, so ``vocab_size`` must leave room
    for the 256 byte symbols and the special tokens. No special token is added on encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be distinct pad, bos, eos (then any others), got {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for the {len(alphabet)} byte symbols and "
            f"{len(special_tokens)} special tokens; use at least {len(alphabet) + len(special_tokens)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    pad, bos, eos, *extra = special_tokens
    more = {"extra_special_tokens": extra} if extra else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, **more)


def local_corpus(*args, **kwargs):
    """Named text domains from this Python installation; see :func:`flexmoe.corpus.local_corpus`."""
    from flexmoe.corpus import local_corpus as build

    return build(*args, **kwargs)
