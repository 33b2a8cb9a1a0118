"""One domain's text -> tokenised, packed sequences: the data owner's input (docs/design.md).

:class:`TextDataModule` reads an owner's local text, splits it into training and validation
documents, tokenises it with the public model's tokenizer and packs it into fixed-length
sequences, caching the result on disk. Nothing here leaves the owner's machine. The sources it
reads are :func:`flexmoe.data.documents.read_documents`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoTokenizer

from flexmoe.core.io import atomic_file
from flexmoe.data.documents import Source, _read_entries, _resolve, _show, split_documents
from flexmoe.data.packing import eos_token_id, tokenize_and_pack, tokenizer_hash

CACHE_FORMAT = "1"


# -- the cache ------------------------------------------------------------------------------


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
                tok = AutoTokenizer.from_pretrained(os.fspath(tok))
            eos_token_id(tok)  # refuse a tokenizer without EOS now, not when packing
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
            out[name], counts[name] = tokenize_and_pack([docs[i] for i in idx], tok, self.seq_len)
        metadata = {
            "format": CACHE_FORMAT,
            "seq_len": str(self.seq_len),
            "train_documents": str(len(self._split_indices()[0])),
            "val_documents": str(len(self._split_indices()[1])),
            "train_stream_tokens": str(counts["train"]),
            "val_stream_tokens": str(counts["val"]),
        }
        with atomic_file(self.cache_path) as tmp:  # other ranks may be reading the cache
            save_file(out, str(tmp), metadata=metadata)
        rank_zero_info(
            f"flexmoe.data.datamodule: tokenised {len(docs)} documents into {out['train'].shape[0]} train and "
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
                f"the training documents hold fewer than seq_len={self.seq_len} tokens; add text or lower seq_len"
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
