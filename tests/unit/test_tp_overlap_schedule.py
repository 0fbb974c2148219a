"""The SP overlap rules (piece count, local-first): pure functions shared by the engine and the planner."""

from __future__ import annotations

from megagen.parallel.tp_overlap_schedule import MAX_PIECES, MIN_PIECE_ELEMENTS, local_first_pays, sp_pieces


def test_one_piece_without_tensor_parallelism():
    assert sp_pieces(8192, 4096, 1) == 1


def test_large_shards_get_the_most_pieces():
    assert sp_pieces(8192, 4096, 8) == MAX_PIECES


def test_pieces_divide_the_local_tokens():
    assert sp_pieces(8190, 4096, 8) == 3  # 4 does not divide 8190, 3 does
    assert sp_pieces(8191, 4096, 8) == 1  # prime: nothing divides


def test_small_messages_are_not_split():
    tokens = MIN_PIECE_ELEMENTS // (2 * 64)  # exactly one minimal message when gathered whole
    assert sp_pieces(tokens, 64, 2) == 1
    assert sp_pieces(2 * tokens, 64, 2) == 2


def test_every_count_divides_and_respects_the_floor():
    for tokens in range(1, 300):
        for tp in (2, 4):
            c = sp_pieces(tokens, 512, tp)
            assert 1 <= c <= MAX_PIECES and tokens % c == 0
            assert c == 1 or (tokens // c) * tp * 512 >= MIN_PIECE_ELEMENTS


def test_local_first_needs_tensor_parallelism_and_a_real_message():
    assert not local_first_pays(8192, 4096, 1)
    assert local_first_pays(8192, 4096, 2)
    assert not local_first_pays(32, 64, 2)  # the tiny test model: 4K elements, latency-bound
    assert local_first_pays(MIN_PIECE_ELEMENTS // 128, 64, 2)
