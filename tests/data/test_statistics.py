"""unigram_counts: one count for owners and coordinator, over the public model's vocabulary."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexmoe.data.statistics import unigram_counts


@given(docs=st.lists(st.lists(st.integers(0, 19), max_size=30), max_size=8))
def test_documents_and_their_packed_rows_count_alike(docs):
    counts = unigram_counts(docs, 20)
    flat = [t for d in docs for t in d]
    assert counts.dtype == torch.float32 and counts.shape == (20,)
    assert counts.tolist() == [float(flat.count(t)) for t in range(20)]
    assert torch.equal(unigram_counts(torch.tensor(flat, dtype=torch.int32).reshape(-1, 1), 20), counts)


@pytest.mark.parametrize("bad", [-1, 20])
def test_an_id_outside_the_vocabulary_is_refused(bad):
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        unigram_counts(torch.tensor([[0, bad]]), 20)
