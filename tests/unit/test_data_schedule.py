"""The O(1) pieces of the data plan: the per-index epoch permutation and the stratified bucket schedule."""

import pickle
from collections import Counter

import numpy as np
import pytest

from megagen.data.permutation import IndexPermutation
from megagen.data.schedule import BLOCK, BucketSchedule, integer_weights


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 21, 96, 1000, 4096, 4097, 65537])
def test_index_permutation_is_a_bijection(n):
    order = IndexPermutation(n, key=11)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert order.tolist() == IndexPermutation(n, key=11)(np.arange(n)).tolist()  # a function of (n, key)


def test_index_permutation_depends_on_its_key_and_shuffles():
    a = IndexPermutation(1000, key=1)(np.arange(1000))
    b = IndexPermutation(1000, key=2)(np.arange(1000))
    assert (a == b).mean() < 0.05
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.15  # not the identity, nor a near-identity
    assert (a == np.arange(1000)).sum() < 20


def test_index_permutation_of_a_huge_bucket_needs_no_array():
    n = 10**12
    perm = IndexPermutation(n, key=5)
    idx = np.arange(n - 2000, n)  # the last indices, where cycle walking matters most
    out = perm(idx)
    assert len(set(out.tolist())) == 2000 and out.min() >= 0 and out.max() < n
    with pytest.raises(IndexError):
        perm([n])


def test_integer_weights_are_exact_ratios():
    assert integer_weights([6, 4, 2]) == [3, 2, 1]
    assert integer_weights([0.25, 0.5, 0]) == [1, 2, 0]
    w = integer_weights([0.1, 0.2, 0.7])
    assert [x / sum(w) for x in w] == pytest.approx([0.1, 0.2, 0.7], rel=1e-15)
    with pytest.raises(ValueError):
        integer_weights([0, 0])


WEIGHTS = [[6, 5, 5], [0.1, 0.2, 0.7, 0.0], [1, 1000], [3, 1, 4, 1, 5]]


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_block_start_counts_equal_the_steps_before_them(weights):
    """Each block's counts come from a jump (no walk over earlier steps): they must equal the sum of what
    the earlier blocks drew, near step 0 and 10^9 blocks out."""
    schedule = BucketSchedule(weights, list(range(len(weights))), seed=3)
    for first in (0, 10**9):
        counts = list(schedule.block(first).start_counts)
        for j in range(first, first + 200):
            block = schedule.block(j)
            assert list(block.start_counts) == counts, j
            for b in block.buckets:
                counts[b] += 1
            for o, b in enumerate(block.buckets):  # draw() numbers a bucket's draws in step order
                assert schedule.draw(j * BLOCK + o) == (b, block.start_counts[b] + block.buckets[:o].count(b))


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_every_window_holds_each_buckets_share(weights):
    schedule = BucketSchedule(weights, list(range(len(weights))), seed=1)
    w = integer_weights(weights)
    slack = 2 * BLOCK + 2 * len(w) + 2
    for start, length in [(0, 10**4), (12345, 777), (10**12, 5000), (0, 10**15)]:
        before, after = schedule.counts_before(start), schedule.counts_before(start + length)
        for b, share in enumerate(w):
            got = after[b] - before[b]
            assert abs(got - length * share / sum(w)) <= slack, (start, length, b)
            if share == 0:
                assert got == 0


def test_bucket_order_is_seeded_and_random_within_blocks():
    a = BucketSchedule([1, 1, 1], [7, 8, 9], seed=0)
    b = BucketSchedule([1, 1, 1], [7, 8, 9], seed=1)
    steps = range(10 * BLOCK)
    seq_a = [a.bucket_of_step(s) for s in steps]
    assert seq_a != [b.bucket_of_step(s) for s in steps]
    runs = Counter(x == y for x, y in zip(seq_a, seq_a[1:]))
    assert runs[True] > 0.2 * len(seq_a)  # repeats occur, as in a random order (a round robin has none)


def test_schedule_pickles_without_its_cache():
    schedule = BucketSchedule([2, 3], [1, 2], seed=4)
    schedule.block(5)
    copy = pickle.loads(pickle.dumps(schedule))
    assert copy.block.cache_info().currsize == 0
    assert [copy.bucket_of_step(s) for s in range(500)] == [schedule.bucket_of_step(s) for s in range(500)]
