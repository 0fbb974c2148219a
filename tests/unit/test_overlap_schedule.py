"""The Ulysses head-chunk rule the planner and the engine share (parallel/overlap_schedule.py)."""

from megagen.parallel.overlap_schedule import MAX_HEAD_CHUNKS, ulysses_head_chunks


def test_no_pipelining_without_cp_or_with_few_heads():
    assert ulysses_head_chunks(8, 1, 4096, 64) == 1
    assert ulysses_head_chunks(2, 2, 4096, 64) == 1  # one head per rank: nothing to split
    assert ulysses_head_chunks(3, 2, 4096, 64) == 1  # heads do not split over cp


def test_tiny_messages_stay_one_all_to_all():
    assert ulysses_head_chunks(8, 2, 16, 64) == 1


def test_large_messages_pipeline_in_groups_that_split_over_cp():
    chunks = ulysses_head_chunks(16, 2, 4096, 64)
    assert 1 < chunks <= MAX_HEAD_CHUNKS
    assert (16 // 2) % chunks == 0
    assert ulysses_head_chunks(12, 2, 4096, 64) == 3  # 6 heads per rank: 4 does not divide, 3 does


def test_cpu_keeps_one_stacked_all_to_all():
    """gloo's all-to-all runs on the cores attention uses: no head groups on CPU, whatever the size."""
    assert ulysses_head_chunks(16, 2, 4096, 64, "cuda") > 1
    assert ulysses_head_chunks(16, 2, 4096, 64, "cpu") == 1
