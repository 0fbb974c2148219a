"""torch.compile per block (`parallel.compile`) trains exactly like eager: tp2 and fsdp2 on 2 gloo ranks.

Each compiled mesh is compared with the eager one-process reference of the parity suite, with its
tolerances (loss and grad norm 1e-5 relative; every param and grad ‖a−b‖/‖b‖ ≤ 1e-5). The backend is
`aot_eager` (dynamo + AOTAutograd, no code generation) so CI stays within its time budget; `inductor` is
the default and is checked on a GPU by tests/gpu/run_checks.sh.
"""

from __future__ import annotations

import pytest

from tests.distributed.test_parity import WORST, assert_parity, reference

pytestmark = pytest.mark.slow

MESHES = {
    "compiled-tp2": ["parallel.tp=2", "parallel.sequence_parallel=false"],
    "compiled-fsdp2": [],
}


@pytest.mark.parametrize("name", list(MESHES))
def test_compiled_mesh_matches_eager(dist_pool, name):
    results = dist_pool(2).run("tests.distributed.cases_compile:run_compiled", overrides=MESHES[name])
    for rank, r in enumerate(results):
        assert r["frames_compiled"] > 0, f"rank {rank}: nothing was compiled — the test would be vacuous"
        assert r["losses"] == results[0]["losses"], f"rank {rank} logged a different loss than rank 0"
    assert_parity(results[0], reference(MESHES[name]), name)
    print(f"\nparity {name}: worst relative difference {WORST[name]:.2e}")
