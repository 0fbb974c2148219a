"""The planner's byte and memory predictions equal what the engine measures, for every parity mesh."""

from __future__ import annotations

import pytest

from megagen.config import load_config
from megagen.parallel.planner.cost import communication, state_memory
from megagen.planning import plan_point_for_config, workload_for_config
from tests.distributed.cases_parity import BASE, EXAMPLE
from tests.distributed.test_parity import MESHES

pytestmark = pytest.mark.slow

CASES = [(world, name, overrides) for world, meshes in MESHES.items() for name, overrides in meshes.items()]


@pytest.mark.parametrize("world, name, overrides", CASES, ids=[c[1] for c in CASES])
def test_predicted_bytes_and_state_memory_equal_measured(dist_pool, world, name, overrides):
    measured = dist_pool(world).run("tests.distributed.cases_parity:comm_and_state", overrides=overrides)[0]
    cfg = load_config(EXAMPLE, [*BASE, *overrides])
    work = workload_for_config(cfg)
    plan = plan_point_for_config(cfg, world)
    assert communication(work, plan) == measured["comm"], name
    params, _grads, optim = state_memory(work, plan)
    assert (params, optim) == (measured["params"], measured["optimizer"]), name
