"""How a tensor-parallel region overlaps its SP collectives under parallel.overlap: pieces, or local first.

Why a rule at all: with c pieces, only the first piece's all-gather and the last piece's reduce-scatter
stay exposed (1/c of the traffic); the rest hides behind the other pieces' GEMMs. More pieces hide more
but each collective gets smaller, and a collective small enough to be latency-bound costs about as much
as a large one. The engine (`parallel/sp_pipeline.py`) and the planner's cost model both call `sp_pieces`,
so they agree on the chunking.

Rule (`sp_pieces`, token-wise regions): the most pieces, at most `MAX_PIECES`, that divide the local
token count evenly and leave each piece's gathered message (tokens_local / c rows from each of the tp
ranks, `dim` features) at least `MIN_PIECE_ELEMENTS` elements; 1 (no pipelining) when tp is 1 or no
count qualifies.
Rule (`local_first_pays`, other regions such as self-attention, `parallel/sp_local_first.py`): the
whole gathered input is at least `MIN_PIECE_ELEMENTS` elements, so splitting each column-parallel GEMM
into local and remote rows hides a gather that is not mere latency.
"""

from __future__ import annotations

MAX_PIECES = 4
"""Beyond 4 pieces the exposed share (1/c) shrinks by under 5 points per extra piece."""
MIN_PIECE_ELEMENTS = 1 << 14
"""Smallest gathered piece worth its own collective (64 KiB in fp32): below it a collective's fixed cost
(tens of µs on gloo over loopback, ~10 µs on NCCL) outweighs its transfer. At Movie Gen sizes every
region clears it many times over; it only keeps tiny models on the plain path. The video benchmark
model (width 64, 1K tokens over tp=2) still gets 4 pieces."""


def sp_pieces(tokens_local: int, dim: int, tp: int) -> int:
    """Pieces for a region whose rank-local input is (·, tokens_local, dim) sharded over `tp` ranks."""
    if tp <= 1 or tokens_local <= 1:
        return 1
    for pieces in range(min(MAX_PIECES, tokens_local), 1, -1):
        if tokens_local % pieces == 0 and (tokens_local // pieces) * tp * dim >= MIN_PIECE_ELEMENTS:
            return pieces
    return 1


def local_first_pays(tokens_local: int, dim: int, tp: int) -> bool:
    """Whether a non-token-wise region with rank-local input (·, tokens_local, dim) runs local-first."""
    return tp > 1 and tokens_local * tp * dim >= MIN_PIECE_ELEMENTS
