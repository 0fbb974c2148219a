"""The planner's byte and memory predictions equal what the engine measures, for every parity mesh.

Where FSDP shards and a step accumulates micro-batches, both gradient-sync schedules run
(`parallel.grad_sync`): every_micro reduce-scatters each micro-batch, last_micro (FSDP2 no-sync) holds
unsharded gradients until the last one, and the gradient bytes held at the peak must match too.
"""

from __future__ import annotations

import pytest

from megagen.config import load_config
from megagen.parallel.planner.comm_cost import communication
from megagen.parallel.planner.memory import state_memory
from megagen.planning import plan_point_for_config, workload_for_config
from tests.distributed.cases_parity import BASE, EXAMPLE
from tests.distributed.test_parity import MESHES

pytestmark = pytest.mark.slow

HSDP_ACCUM = ["parallel.dp_replicate=2", "parallel.dp_shard=2", "train.global_batch_size=16"]
WAN = ["model.spec=wan"]  # sharded QK norms (all-reduced sums of squares) and rotary tables gathered under SP
MORE = {
    2: {
        "wan-tp2+sp": [*WAN, "parallel.tp=2"],
        "wan-tp2": [*WAN, "parallel.tp=2", "parallel.sequence_parallel=false"],
    },
    4: {
        "hsdp2x2-accum2": HSDP_ACCUM,
        "wan-cp2xtp2": [*WAN, "parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
        "wan-fsdp2xtp2-recompute": [*WAN, "parallel.tp=2", "train.recompute=full"],
    },
}  # the parity hsdp2x2 mesh runs one micro-batch per step


def _shards_and_accumulates(world: int, overrides: list[str]) -> bool:
    plan = plan_point_for_config(load_config(EXAMPLE, [*BASE, *overrides]), world, "cpu")
    return plan.fsdp * plan.dp_replicate > 1 and plan.accumulation > 1


CASES = []
for world in sorted(MESHES):
    for name, overrides in {**MESHES[world], **MORE.get(world, {})}.items():
        if _shards_and_accumulates(world, overrides):
            for sync in ("last_micro", "every_micro"):
                CASES.append((world, f"{name}-{sync}", [*overrides, f"parallel.grad_sync={sync}"]))
        else:
            CASES.append((world, name, overrides))


@pytest.mark.parametrize("world, name, overrides", CASES, ids=[c[1] for c in CASES])
def test_predicted_bytes_and_memory_equal_measured(dist_pool, world, name, overrides):
    measured = dist_pool(world).run("tests.distributed.cases_parity:comm_and_state", overrides=overrides)[0]
    cfg = load_config(EXAMPLE, [*BASE, *overrides])
    work = workload_for_config(cfg)
    plan = plan_point_for_config(cfg, world, "cpu")
    assert communication(work, plan) == measured["comm"], name
    params, grads, optim = state_memory(work, plan)
    assert (params, grads, optim) == (measured["params"], measured["grad_peak"], measured["optimizer"]), name


def test_the_grad_sync_cases_differ_in_traffic_and_memory():
    """Both schedules are exercised where they differ: more reduce-scatters, fewer gradient bytes."""
    synced = [c for c in CASES if c[1].endswith("-every_micro")]
    assert len(synced) >= 10
    world, _, overrides = synced[0]
    every = load_config(EXAMPLE, [*BASE, *overrides])
    last = load_config(EXAMPLE, [*BASE, *overrides[:-1], "parallel.grad_sync=last_micro"])
    work = workload_for_config(every)
    p_every, p_last = plan_point_for_config(every, world, "cpu"), plan_point_for_config(last, world, "cpu")
    rs = [communication(work, p)["dp_shard_cp"]["reduce_scatter"]["calls"] for p in (p_every, p_last)]
    assert rs[0] == p_every.accumulation * rs[1]
    assert state_memory(work, p_every)[1] < state_memory(work, p_last)[1]
