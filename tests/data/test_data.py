"""TextDataModule: every source kind, packing, the by-document split, the cache, loaders, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from flexmoe.data import packing
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.documents import read_documents, split_documents
from flexmoe.data.tokenizer import train_tokenizer
from flexmoe.testing import LICENSES, license_texts


@pytest.fixture(scope="module")
def tokenizer(public_dir):
    return AutoTokenizer.from_pretrained(public_dir)


@pytest.fixture
def count_encode(monkeypatch):
    """Counts tokenizer calls made while packing."""
    calls = []
    real = packing._encode

    def counting(tok, texts):
        calls.append(len(texts))
        return real(tok, texts)

    monkeypatch.setattr(packing, "_encode", counting)
    return calls


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def paragraphs_file(tmp_path, n=6):
    text = "\n\n".join(f"Paragraph {i} says something about topic {i}.\nIt has a second line." for i in range(n))
    return write(tmp_path / "one.txt", text + "\n")


def datamodule(sources, tokenizer, tmp_path, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("batch_size", 4)
    return TextDataModule(sources, tokenizer, cache_dir=tmp_path / "cache", **kw)


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def expected_stream(tokenizer, docs):
    out = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


# -- the tokenizer helper ----------------------------------------------------------------------


def test_train_tokenizer_byte_level_bpe_with_special_ids():
    texts = license_texts()
    tok = train_tokenizer(texts, vocab_size=300)
    assert len(tok) == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    sample = "Ünïcödé and the GNU General Public License ✓"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sample  # byte level: any string round-trips
    assert len(ids) < len(sample.encode())  # and the merges compress
    extra = train_tokenizer(texts[:2], vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<sep>"])
    assert extra.convert_tokens_to_ids("<sep>") == 3 and extra.tokenize("a<sep>b") == ["a", "<sep>", "b"]
    with pytest.raises(ValueError, match="byte symbols"):
        train_tokenizer(texts, vocab_size=200)


# -- what a document is -----------------------------------------------------------------------


def test_single_plain_file_is_split_at_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", "first para\nline two\n\n\n  second para\n \t\nthird\n\n")
    assert read_documents(path) == ["first para\nline two", "  second para", "third"]
    assert read_documents(path, split_paragraphs=False) == ["first para\nline two\n\n\n  second para\n \t\nthird\n\n"]


def test_folder_is_recursive_sorted_and_skips_binary_and_hidden(tmp_path):
    root = tmp_path / "notes"
    write(root / "b.txt", "bee\n\nsecond paragraph of b")
    write(root / "a" / "z.md", "zed")
    write(root / "a" / "crlf.txt", "windows\r\nline ends\r\n")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    write(root / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(root / ".hidden.txt", "secret")
    write(root / "empty.txt", "  \n")
    docs = read_documents(root)
    # one document per file (no paragraph split for a folder of files), in sorted path order
    assert docs == ["windows\nline ends\n", "zed", "bee\n\nsecond paragraph of b"]
    assert len(read_documents(root, split_paragraphs=True)) == 4


def test_glob_pattern(tmp_path):
    write(tmp_path / "d" / "x.txt", "ex")
    write(tmp_path / "d" / "deeper" / "y.txt", "why")
    write(tmp_path / "d" / "deeper" / "skip.md", "markdown")
    assert read_documents(str(tmp_path / "d" / "**" / "*.txt")) == ["why", "ex"]


def test_jsonl_records_with_configurable_field(tmp_path):
    lines = [json.dumps({"body": "first record\n\nstill first"}), "", json.dumps({"body": "second", "id": 2})]
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    assert read_documents(path, text_field="body") == ["first record\n\nstill first", "second"]
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_documents([gz], text_field="body") == ["first record\n\nstill first", "second"]


def test_datasets_directory(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    texts = license_texts()[:4]
    ds = datasets.Dataset.from_dict({"content": texts, "n": list(range(4))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_documents(tmp_path / "ds", text_field="content") == texts
    datasets.DatasetDict({"train": ds.select([0, 1]), "extra": ds.select([2, 3])}).save_to_disk(str(tmp_path / "dd"))
    assert read_documents(tmp_path / "dd", text_field="content") == texts[2:] + texts[:2]  # splits in name order
    # inside a folder, a dataset directory is one source, not a pile of arrow files
    write(tmp_path / "mixed" / "a.txt", "plain")
    ds.save_to_disk(str(tmp_path / "mixed" / "z_ds"))
    assert read_documents(tmp_path / "mixed", text_field="content") == ["plain"] + texts
    with pytest.raises(ValueError, match="no column 'text'"):
        read_documents(tmp_path / "ds")
    dm = ready(datamodule(tmp_path / "ds", tokenizer, tmp_path, text_field="content", val_fraction=0.25))
    assert dm.documents() == texts and len(dm.val_documents()) == 1 and dm.num_train_sequences > 0


def test_mixed_sources_in_order_without_duplicates(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    j = write(tmp_path / "j.jsonl", json.dumps({"text": "jay"}) + "\n")
    assert read_documents([j, tmp_path, a]) == ["jay", "alpha"]


# -- errors: one clear sentence before any work ---------------------------------------------------


def test_bad_inputs_fail_clearly(tmp_path):
    # a missing source fails at construction, before the tokenizer is even looked at
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(tmp_path / "nope.txt", tokenizer="/no/such/tokenizer")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        TextDataModule(str(tmp_path / "**" / "*.nothing"), tokenizer="/no/such/tokenizer")
    with pytest.raises(ValueError, match="no data sources"):
        read_documents([])
    write(tmp_path / "bin" / "blob.bin", b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"hold no text \(1 binary"):
        read_documents(tmp_path / "bin")
    with pytest.raises(ValueError, match="hold no text"):
        read_documents(write(tmp_path / "blank.txt", "\n\n  \n"))
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_documents(tmp_path / "bin" / "blob.bin")
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_documents(bad)
    missing = write(tmp_path / "missing.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl, line 3: expected a JSON object with a 'text' field"):
        read_documents(missing)
    with pytest.raises(ValueError, match=r"line 1: field 'text' is int"):
        read_documents(write(tmp_path / "int.jsonl", '{"text": 3}\n'))


def test_bad_settings_and_tokenizers(tmp_path, tokenizer):
    path = paragraphs_file(tmp_path)
    for kw, msg in [({"seq_len": 1}, "seq_len"), ({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch")]:
        with pytest.raises(ValueError, match=msg):
            datamodule(path, tokenizer, tmp_path, **kw)
    no_eos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        ready(datamodule(path, no_eos, tmp_path))
    with pytest.raises(ValueError, match="fewer than seq_len=4096"):
        ready(datamodule(path, tokenizer, tmp_path, seq_len=4096))
    with pytest.raises(RuntimeError, match="setup"):
        datamodule(path, tokenizer, tmp_path).train_dataloader()


# -- packing and the split -----------------------------------------------------------------------


def test_packed_sequences_are_the_documents_joined_by_eos(tmp_path, tokenizer):
    dm = ready(datamodule(paragraphs_file(tmp_path, n=12), tokenizer, tmp_path, seq_len=16, val_fraction=0.2))
    for docs, packed in ((dm.train_documents(), dm._train), (dm.val_documents(), dm._val)):
        stream = expected_stream(tokenizer, docs)
        rows = len(stream) // 16
        assert packed.shape == (rows, 16)
        assert packed.flatten().tolist() == stream[: rows * 16]  # remainder (< seq_len tokens) dropped
    assert (dm._train == tokenizer.eos_token_id).sum() >= len(dm.train_documents()) - 1
    assert dm.num_train_tokens == dm._train.numel() == dm.num_train_sequences * 16
    assert dm.num_val_tokens == dm._val.numel() > 0


def test_every_packing_is_the_same_stream_and_refuses_a_tokenizer_without_eos(tmp_path, tokenizer):
    """Training rows, evaluation rows and router-tuning rows of the same documents are one stream,
    documents joined by EOS; none of them joins documents with another token when there is no EOS."""
    docs = license_texts()[:6]
    stream = expected_stream(tokenizer, docs)
    rows = len(stream) // 16
    packed, n = packing.tokenize_and_pack(docs, tokenizer, 16)
    assert n == len(stream) and packed.dtype == torch.int32
    assert packed.flatten().tolist() == stream[: rows * 16]
    assert torch.equal(packing.pack_domain(docs, tokenizer, 16), packed.long())
    assert torch.equal(packing.pack_documents(docs, tokenizer, 16), packed.long())
    assert packing.pack_documents(docs[:1], tokenizer, 16, max_documents=1).shape[0] <= rows
    no_eos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_eos.eos_token = None
    for pack in (packing.pack_domain, packing.pack_documents):
        with pytest.raises(ValueError, match="no EOS token"):
            pack(docs, no_eos, 16)


def test_split_is_by_document_deterministic_and_stable(tmp_path, tokenizer):
    docs = license_texts()
    train, val = split_documents(docs, 0.2, seed=0)
    assert (train, val) == split_documents(docs, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(docs))) and not set(train) & set(val)
    # the licences include symlinked copies: a text and its copy land on the same side
    for i in val:
        assert all(j in val for j, d in enumerate(docs) if d == docs[i])
    assert split_documents(["a", "b"], 0.01)[1] != [] and split_documents(["a", "b"], 0.9)[0] != []
    assert split_documents(["a", "b"], 0.0) == ([0, 1], []) and split_documents(["a"], 0.5) == ([0], [])
    assert split_documents(["same"] * 3, 0.5) == ([0, 1, 2], [])  # never hold out every copy of the only text
    dm = datamodule(LICENSES, tokenizer, tmp_path, val_fraction=0.2)
    assert not set(dm.train_documents()) & set(dm.val_documents())
    assert sorted(dm.train_documents() + dm.val_documents()) == sorted(dm.documents())


def test_split_depends_on_each_text_not_on_order(tmp_path):
    docs = [f"document number {i}" for i in range(50)]
    _, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 5
    reordered = docs[::-1]
    _, val_reordered = split_documents(reordered, 0.1, seed=3)
    assert {docs[i] for i in val} == {reordered[i] for i in val_reordered}
    assert split_documents(docs, 0.1, seed=3) != split_documents(docs, 0.1, seed=4)


# -- the cache ----------------------------------------------------------------------------------


def test_cache_hit_skips_tokenising_and_changes_rebuild(tmp_path, tokenizer, public_dir, count_encode):
    folder = tmp_path / "corpus"
    for i, text in enumerate(license_texts()[:5]):
        write(folder / f"{i}.txt", text)
    first = ready(datamodule(folder, tokenizer, tmp_path, val_fraction=0.2))
    assert first.cache_hit is True and count_encode  # prepare_data built it, setup read it
    assert first.cache_path.is_file() and [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]
    with safe_open(first.cache_path, "pt") as f:  # plain safetensors, no pickle
        assert set(f.keys()) == {"train", "val"} and f.metadata()["seq_len"] == "32"

    count_encode.clear()
    # same content and tokenizer, loaded from its directory this time: the key is content, not names
    again = ready(datamodule(folder, str(public_dir), tmp_path, val_fraction=0.2))
    assert again.cache_key == first.cache_key and again.cache_hit and not count_encode
    assert torch.equal(again._train, first._train) and torch.equal(again._val, first._val)

    text = license_texts()[3]
    write(folder / "3.txt", text.replace("a", "e", 1))  # one letter, same length
    changed = ready(datamodule(folder, tokenizer, tmp_path, val_fraction=0.2))
    assert changed.cache_key != first.cache_key and count_encode

    count_encode.clear()
    other_tok = train_tokenizer(license_texts(), vocab_size=400)
    ready(datamodule(folder, other_tok, tmp_path, val_fraction=0.2))
    assert count_encode
    for kw in ({"seq_len": 24}, {"val_fraction": 0.4}, {"seed": 1}):
        assert datamodule(folder, tokenizer, tmp_path, **{"val_fraction": 0.2, **kw}).cache_key != changed.cache_key
    # batch size and loader settings are not part of the key
    assert datamodule(folder, tokenizer, tmp_path, val_fraction=0.2, batch_size=2).cache_key == changed.cache_key


def test_ddp_ranks_read_what_prepare_data_wrote(tmp_path, tokenizer, count_encode):
    path = paragraphs_file(tmp_path, n=20)
    datamodule(path, tokenizer, tmp_path).prepare_data()  # rank 0
    assert count_encode
    count_encode.clear()
    other_rank = datamodule(path, tokenizer, tmp_path)  # a fresh process: only setup() runs
    other_rank.setup("fit")
    assert other_rank.cache_hit and not count_encode and other_rank.num_train_sequences > 0
    # setup() without prepare_data() still works: it builds the cache itself
    alone = datamodule(path, tokenizer, tmp_path / "elsewhere")
    alone.setup("fit")
    assert alone.cache_hit is False and count_encode and alone.cache_path.is_file()


def test_default_cache_dir_honours_flexmoe_cache(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path / "fc"))
    dm = TextDataModule(paragraphs_file(tmp_path), tokenizer, seq_len=8)
    assert dm.cache_path.parent == tmp_path / "fc" / "data"
    monkeypatch.delenv("FLEXMOE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = TextDataModule(paragraphs_file(tmp_path), tokenizer).cache_dir
    assert default == tmp_path / "home" / ".cache" / "flexmoe" / "data"


# -- loaders ------------------------------------------------------------------------------------


def test_dataloaders_shuffle_seeded_and_work_with_workers(tmp_path, tokenizer):
    dm = ready(datamodule(LICENSES, tokenizer, tmp_path, seq_len=64, batch_size=8, val_fraction=0.2))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids"} and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].shape == (8, 64)
    twin = ready(datamodule(LICENSES, tokenizer, tmp_path, seq_len=64, batch_size=8, val_fraction=0.2))
    assert torch.equal(next(iter(twin.train_dataloader()))["input_ids"], batch["input_ids"])
    assert not torch.equal(batch["input_ids"], dm._train[:8].long())  # shuffled
    val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm._val.long())  # in order

    workers = datamodule(LICENSES, tokenizer, tmp_path, seq_len=64, batch_size=64, num_workers=2, val_fraction=0.2)
    ready(workers)
    seen = torch.cat([b["input_ids"] for b in workers.train_dataloader()])
    assert seen.shape == dm._train.shape
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dm._train.long().tolist()))


def test_lightning_trainer_drives_the_datamodule(tmp_path, tokenizer):
    import lightning as L

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tokenizer), 8)
            self.out = torch.nn.Linear(8, len(tokenizer))
            self.seen = 0

        def loss(self, ids):
            logits = self.out(self.emb(ids[:, :-1]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

        def training_step(self, batch, _):
            self.seen += batch["input_ids"].numel()
            return self.loss(batch["input_ids"])

        def validation_step(self, batch, _):
            self.log("val_loss", self.loss(batch["input_ids"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = datamodule(paragraphs_file(tmp_path, n=40), tokenizer, tmp_path, seq_len=16, val_fraction=0.2)
    model = TinyLM()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert model.seen == dm.num_train_tokens and "val_loss" in trainer.callback_metrics
