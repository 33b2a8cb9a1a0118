"""Fixtures shared by the tests: token ids and a saved tiny public model (builders in flexmoe.testing)."""

from __future__ import annotations

import lightning.pytorch  # noqa: F401  (see below)
import pytest
import torch

from flexmoe.testing import VOCAB, license_texts, tiny_model, train_tiny_tokenizer

# Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads
# that wait for each other make steps many times slower.
torch.set_num_threads(1)

# Lightning attaches its console log handler to the sys.stderr of the moment it is first imported;
# importing it here, before any test captures stderr, keeps that handler on the real stream (a
# handler bound to a test's closed capture buffer prints "--- Logging error ---" tracebacks).


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def public_dir(tmp_path_factory):
    """A saved tiny OLMo-2 public model with its own tokenizer (ids: pad 0, bos 1, eos 2)."""
    path = tmp_path_factory.mktemp("public")
    tokenizer = train_tiny_tokenizer(license_texts(), vocab_size=VOCAB * 3)
    model = tiny_model("olmo2", vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
