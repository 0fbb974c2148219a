"""Mesh validation on every rank, and FSDP's memory division."""

from __future__ import annotations

import pytest

from megagen.config import ConfigError
from megagen.parallel.mesh import ParallelDims
from tests.distributed.torchrun import run_torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.tp=3"], "parallel.tp: 3 does not divide the 8 heads"),
        (["parallel.tp=2", "parallel.cp=3"], "world size 4 is not divisible by dp_replicate*cp*tp"),
        (["parallel.dp_shard=4", "parallel.tp=2"], "does not equal the world size 4"),
        (
            ["parallel.cp=4", "parallel.tp=4", "parallel.cp_kind=ulysses", "parallel.dp_shard=1"],
            "ulysses needs heads (8) divisible by cp*tp",
        ),
    ],
)
def test_bad_mesh_fails_on_every_rank(dist_pool, overrides, needle):
    messages = dist_pool(4).run("tests.distributed.cases_parity:mesh_error", overrides=overrides, timeout=60)
    assert len(messages) == 4
    for rank, msg in enumerate(messages):
        assert needle in msg, f"rank {rank}: {msg!r}"


def test_bad_mesh_under_torchrun_exits_nonzero_without_hanging(tmp_path):
    proc = run_torchrun(
        [
            "train",
            "examples/configs/video_tiny.yaml",
            "parallel.tp=2",
            "parallel.cp=3",
            f"run.dir={tmp_path}",
        ],
        timeout=120,
    )
    assert proc.returncode != 0
    assert "world size 2 is not divisible by dp_replicate*cp*tp" in proc.stderr


def test_dims_resolve():
    assert ParallelDims.resolve(1, -1, 2, 2, 8).dp_shard == 2
    assert ParallelDims.resolve(2, -1, 1, 1, 8).fsdp == 4
    with pytest.raises(ConfigError, match="parallel"):
        ParallelDims.resolve(1, 3, 1, 1, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_divides_param_and_optimizer_memory(dist_pool, world):
    from tests.distributed.cases_parity import state_bytes

    one = state_bytes([])
    per_rank = dist_pool(world).run("tests.distributed.cases_parity:state_bytes", overrides=[])
    # FSDP2 pads each parameter's dim 0 to a multiple of the world: at most (world-1) rows per param.
    for rank, got in enumerate(per_rank):
        for kind in ("params", "optimizer"):
            expected = one[kind] / world
            slack = 0.02 * expected
            assert abs(got[kind] - expected) <= slack, f"rank {rank} {kind}: {got[kind]} vs {expected}"
    assert sum(r["params"] for r in per_rank) >= one["params"]
