"""`train.fp8=true` under tensor parallelism: every TP linear runs its shard's GEMM on the FP8 path with
the amax reduced over its tp group; without TP the block linears run FP8 with a rank-local amax; plain
`nn.Linear` layers (no FP8 backend of their own) stay in the torch path. On CPU TE is a recorder
(cases_fp8.py); the numerics of FP8 under TP are checked on GPUs by tests/gpu/run_checks.sh (fp8tp)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TP_MESHES = [
    (2, "tp2+sp", ["parallel.tp=2"]),
    (2, "tp2", ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    (4, "fsdp2xtp2", ["parallel.tp=2"]),
    (4, "cp2xtp2", ["parallel.cp=2", "parallel.tp=2"]),
]


def _plain_linears_stay_in_torch(paths: dict) -> None:
    plain = {n: p for n, p in paths.items() if not p["own_gemm"]}
    assert plain, "the model's plain nn.Linear layers (patch embedding, timestep MLP) were expected"
    assert all(p["fp8"] is None for p in plain.values())


@pytest.mark.parametrize("world, name, overrides", TP_MESHES, ids=[m[1] for m in TP_MESHES])
def test_tp_linears_take_the_fp8_gemm_with_the_tp_amax_group(dist_pool, world, name, overrides):
    results = dist_pool(world).run("tests.distributed.cases_fp8:gemm_paths", overrides=overrides)
    for rank, r in enumerate(results):
        paths, tp_ranks = r["paths"], r["tp_ranks"]
        assert rank in tp_ranks and len(tp_ranks) == 2
        col = {n: p for n, p in paths.items() if p["type"] == "ColumnParallelLinear"}
        row = {n: p for n, p in paths.items() if p["type"] == "RowParallelLinear"}
        assert col and row, paths
        for n, p in {**col, **row}.items():
            assert p["own_gemm"], f"{n}: the TP wrapper lost the replaced layer's GEMM"
            assert p["fp8"] is not None, f"rank {rank}: {n} ({p['type']}) did not run the FP8 GEMM"
            assert p["fp8"][1] == tp_ranks, f"rank {rank}: {n} reduced its amax over {p['fp8'][1]}"
        # the GEMM runs on this rank's shard: column = out_features / tp, row = in_features / tp
        q = next(p for n, p in col.items() if n.endswith(".attn.q"))
        o = next(p for n, p in row.items() if n.endswith(".attn.o"))
        assert q["fp8"][0][0] * 2 == o["fp8"][0][0] and o["fp8"][0][1] * 2 == q["fp8"][0][1]
        _plain_linears_stay_in_torch(paths)


def test_without_tp_block_linears_take_the_fp8_gemm_with_a_local_amax(dist_pool):
    for r in dist_pool(2).run("tests.distributed.cases_fp8:gemm_paths", overrides=[]):
        own = {n: p for n, p in r["paths"].items() if p["own_gemm"]}
        assert own and all(p["type"] == "Linear" for p in own.values())
        assert all(p["fp8"] is not None and p["fp8"][1] is None for p in own.values()), own
        _plain_linears_stay_in_torch(r["paths"])
