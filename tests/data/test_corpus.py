"""local_corpus: named, deterministic, held-out text domains from the Python installation."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tokenize
from collections import Counter
from pathlib import Path

import pytest

from flexmoe.data.corpus import DEFAULT_DOMAINS, local_corpus, split_module, write_corpus
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.tokenizer import train_tokenizer

CAP = 40


@pytest.fixture(scope="module")
def corpus():
    """The full default corpus, built once (10-20 s: it tokenizes ~500 modules)."""
    return local_corpus()


@pytest.fixture(scope="module")
def sample():
    return local_corpus(max_docs_per_domain=CAP)


def digest(domains) -> str:
    return hashlib.sha256(
        json.dumps({n: [d.description, d.train, d.val] for n, d in domains.items()}).encode()
    ).hexdigest()


@pytest.mark.slow
def test_five_named_domains_each_with_enough_text_and_a_held_out_split(corpus):
    assert list(corpus) == list(DEFAULT_DOMAINS) and len(corpus) >= 5
    for name, domain in corpus.items():
        assert domain.name == name and domain.description and domain.source
        assert len(domain.train) >= 50 and len(domain.val) >= 5, domain
        assert domain.num_chars >= 200_000, domain
        assert all(doc.strip() for doc in domain.documents)
        assert abs(len(domain.val) / len(domain.documents) - 0.1) < 0.02


@pytest.mark.slow
def test_train_and_validation_never_share_a_document_and_domains_share_none(corpus):
    seen: dict[str, str] = {}
    for name, domain in corpus.items():
        assert not set(domain.train) & set(domain.val), name
        for doc in set(domain.documents):
            assert seen.setdefault(doc, name) == name, f"a document is in both {seen[doc]} and {name}"


@pytest.mark.slow
def test_same_documents_in_another_process_with_another_hash_seed(sample):
    code = (
        "import hashlib, json; from flexmoe.data.corpus import local_corpus\n"
        f"c = local_corpus(max_docs_per_domain={CAP})\n"
        "print(hashlib.sha256(json.dumps({n: [d.description, d.train, d.val] for n, d in c.items()})"
        ".encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(sample)
    assert digest(local_corpus(max_docs_per_domain=CAP)) == digest(sample)


@pytest.mark.slow
def test_the_cap_samples_a_subset_and_the_seed_moves_the_split(corpus, sample):
    for name, domain in sample.items():
        assert len(domain.documents) == CAP
        assert set(domain.documents) <= set(corpus[name].documents)
    other = local_corpus(max_docs_per_domain=CAP, seed=1)
    assert {n: set(d.documents) for n, d in other.items()} == {n: set(d.documents) for n, d in sample.items()}
    assert any(set(other[n].val) != set(sample[n].val) for n in sample)


def _bag(text: str) -> Counter:
    return Counter(re.findall(r"\w+|[^\w\s]", text.lower()))


def _unit(counts: Counter) -> dict[str, float]:
    norm = math.sqrt(sum(v * v for v in counts.values()))
    return {k: v / norm for k, v in counts.items()}


def test_domains_are_far_apart(sample):
    """A bag-of-words nearest-centroid classifier trained on the training documents names the
    domain of held-out documents; pydoc prose and library code share little vocabulary."""
    centroids = {n: _unit(sum((_bag(doc) for doc in d.train), Counter())) for n, d in sample.items()}
    hits = total = 0
    for name, domain in sample.items():
        for doc in domain.val:
            v = _unit(_bag(doc))
            guess = max(centroids, key=lambda m: sum(v.get(k, 0.0) * w for k, w in centroids[m].items()))
            hits += guess == name
            total += 1
    assert hits / total >= 0.9
    words = {n: set(re.findall(r"[a-z_]\w+", " ".join(d.documents).lower())) for n, d in sample.items()}
    a, b = words["pydoc_topics"], words["stdlib_code"]
    assert len(a & b) / len(a | b) < 0.3


def test_stdlib_code_is_code_without_docstrings_or_comments(sample):
    for doc in sample["stdlib_code"].documents:
        tree = ast.parse(doc)  # still valid Python
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                assert ast.get_docstring(node) is None
        tokens = tokenize.generate_tokens(io.StringIO(doc).readline)
        assert not any(t.type == tokenize.COMMENT for t in tokens)


def test_split_module_separates_code_docstrings_and_comments():
    source = '''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""The module."""

# A block
# of two lines.
import sys
import os  # trailing


class A:
    """Only a docstring."""


async def f(x):
    r"""Raw \\d docstring.

        Indented detail.
    """
    s = "# not a comment"
    return x


def g(): "one line stays"
'''
    code, docstrings, comments = split_module(source)
    assert docstrings == "The module.\n\nOnly a docstring.\n\nRaw \\d docstring.\n\nIndented detail."
    assert comments == "# A block\n# of two lines.\n\n# trailing"
    assert code == (
        "import sys\nimport os\n\n\nclass A:\n    ...\n\n\n"
        'async def f(x):\n    s = "# not a comment"\n    return x\n\n\n'
        'def g(): "one line stays"\n'
    )
    ast.parse(code)
    assert split_module("def broken(:\n  '''") is None


def test_write_corpus_round_trips_through_text_data_module(sample, tmp_path):
    paths = write_corpus(sample, tmp_path / "corpus")
    assert sorted(paths) == sorted(sample)
    tokenizer = train_tokenizer(sample["pydoc_topics"].train, vocab_size=300)
    for name, domain in sample.items():
        folder = paths[name]
        assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl", "val.jsonl"]
        # The folder with the corpus's own val_fraction and seed: the same split.
        dm = TextDataModule(folder, tokenizer, val_fraction=0.1, seed=0, cache_dir=tmp_path / "cache")
        assert dm.train_documents() == domain.train and dm.val_documents() == domain.val
        # The training file alone: the training text only.
        only = TextDataModule(folder / "train.jsonl", tokenizer, val_fraction=0, cache_dir=tmp_path / "cache")
        assert only.documents() == domain.train
    dm = TextDataModule(
        paths["unicode_names"], tokenizer, seq_len=32, batch_size=2, val_fraction=0.1, cache_dir=tmp_path / "cache"
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown domain.*'wikipedia'"):
        local_corpus(domains=["wikipedia"])
    with pytest.raises(ValueError, match="at least 2"):
        local_corpus(max_docs_per_domain=1)
    with pytest.raises(ValueError, match="val_fraction"):
        local_corpus(val_fraction=1.0)


@pytest.mark.skipif(
    not (Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_grammar.py").is_file(),
    reason="this Python has no test package",
)
def test_extra_domains_when_this_machine_has_them():
    extra = local_corpus(max_docs_per_domain=10, domains=["stdlib_tests", "licenses"])
    assert all(2 <= len(d.documents) <= 10 for d in extra.values())
    assert any("def test" in doc for doc in extra["stdlib_tests"].documents)


def test_the_licences_domain_ignores_extra_packages(monkeypatch, tmp_path):
    """Two environments that differ only by an extra package (with its own licence, and a second
    copy of a pinned one elsewhere) build the same licences domain, document for document."""
    from flexmoe.data import corpus as corpus_module

    before = local_corpus(domains=["licenses"])["licenses"]
    site = tmp_path / "site-packages"
    info = site / "extra_package-1.0.dist-info"
    (info / "licenses").mkdir(parents=True)
    (info / "LICENSE").write_text("Extra Package Licence\n\n" + "Anyone may do anything with this extra package. " * 20)
    (info / "licenses" / "COPYING").write_text(before.train[0])  # a pinned text found in a second place
    roots = corpus_module._license_roots
    monkeypatch.setattr(corpus_module, "_license_roots", lambda stdlib: [site, *roots(stdlib)])
    assert site in corpus_module._license_roots(Path(sysconfig.get_paths()["stdlib"]))
    after = local_corpus(domains=["licenses"])["licenses"]
    assert after.train == before.train and after.val == before.val
    assert after.content_sha256() == before.content_sha256()
    assert not any("Extra Package Licence" in d for d in after.documents)


def test_content_hashes_tell_splits_apart():
    d = local_corpus(max_docs_per_domain=10, domains=["pydoc_topics"])["pydoc_topics"]
    h = d.content_sha256()
    assert set(h) == {"train", "val"} and h["train"] != h["val"] and len(h["train"]) == 64
    assert local_corpus(max_docs_per_domain=10, domains=["pydoc_topics"])["pydoc_topics"].content_sha256() == h
