"""Token counts released with DP: each row's contribution bounded, noise calibrated, and the result
still counts by the loaders' rules."""

import pytest
import torch

from flexmoe.artifacts.unigram import statistics_problem, statistics_tensors
from flexmoe.data.private_statistics import (
    accountant_epsilon,
    clipped_token_counts,
    noise_threshold,
    private_token_statistics,
    row_norms,
    statistics_noise_multiplier,
)
from flexmoe.data.statistics import token_statistics
from flexmoe.modeling.domain_posterior import bigram_bucket

VOCAB, BUCKETS = 50, 64


@pytest.fixture
def rows():
    return torch.randint(0, VOCAB, (40, 16), generator=torch.Generator().manual_seed(0))


def test_row_norms_are_the_norms_of_each_rows_count_vector(rows):
    for i in (0, 7):
        r = rows[i]
        u = torch.bincount(r, minlength=VOCAB).double()
        b = torch.bincount(bigram_bucket(r[:-1], r[1:], BUCKETS), minlength=BUCKETS).double()
        assert row_norms(rows, VOCAB, BUCKETS)[i] == pytest.approx(float(torch.cat([u, b]).norm()))


def test_one_row_moves_the_clipped_counts_by_at_most_the_clip(rows):
    """The Gaussian mechanism's sensitivity: adding or removing any one row changes the query by at
    most ``clip`` in L2, whatever the row (here: the same token 16 times, the worst case)."""
    worst = torch.full((1, 16), 3)
    for extra in (rows[:1], worst):
        with_row = clipped_token_counts(torch.cat([rows, extra]), VOCAB, BUCKETS, clip=2.0)
        without = clipped_token_counts(rows, VOCAB, BUCKETS, clip=2.0)
        moved = torch.cat([with_row.unigram - without.unigram, with_row.bigram - without.bigram]).norm()
        assert float(moved) <= 2.0 + 1e-5
    exact = clipped_token_counts(rows, VOCAB, BUCKETS, clip=1e6)  # a clip above every row: the plain counts
    plain = token_statistics(rows, VOCAB, BUCKETS)
    assert torch.equal(exact.unigram, plain.unigram) and torch.equal(exact.bigram, plain.bigram)


def test_released_counts_keep_the_loaders_rules(rows):
    released = private_token_statistics(
        rows, VOCAB, BUCKETS, noise_multiplier=0.5, clip=4.0, generator=torch.Generator().manual_seed(1)
    )
    tensors, totals = statistics_tensors(released)
    assert statistics_problem(tensors, totals, VOCAB, BUCKETS) is None  # non-negative, integral, totals agree
    assert float(released.bigram.sum()) <= float(released.unigram.sum())
    # Almost no noise and a clip above every row: the exact counts come back.
    exact = private_token_statistics(rows, VOCAB, BUCKETS, noise_multiplier=1e-9, clip=1e3)
    plain = token_statistics(rows, VOCAB, BUCKETS)
    assert torch.equal(exact.unigram, plain.unigram) and torch.equal(exact.bigram, plain.bigram)


def test_empty_entries_stay_empty_above_the_noise_threshold():
    rows = torch.zeros((50, 8), dtype=torch.long)  # one token only: every other entry is pure noise
    g = torch.Generator().manual_seed(2)
    released = private_token_statistics(rows, 2**12, 0, noise_multiplier=1.0, clip=8.0, generator=g)
    assert int((released.unigram[1:] > 0).sum()) <= 5  # about one false entry per tensor, not 2,048
    assert released.unigram[0] > 0
    assert noise_threshold(2048) == pytest.approx(3.30, abs=0.01)


def test_the_noise_meets_the_stated_epsilon():
    sigma = statistics_noise_multiplier(2.0, 1e-5, "rdp")
    assert accountant_epsilon([(sigma, 1.0, 1)], 1e-5, "rdp") == pytest.approx(2.0, rel=0.02)
    assert statistics_noise_multiplier(1.0, 1e-5, "rdp") > sigma  # less epsilon, more noise
