"""Parity of the wan spec: every mesh trains exactly like one process, including the across-heads QK
RMSNorm whose normalised width is split over tp (the engine's sharded norm, `parallel/sharded_norm.py`).

Same harness, live init and tolerances as test_parity.py (loss and grad norm within 1e-5 relative; every
parameter and gradient ‖a−b‖/‖b‖ ≤ 1e-5 after 3 steps), on the video tiny example's data shape, with
parallel.overlap auto (off on CPU) and on.
"""

from __future__ import annotations

import pytest

from tests.distributed.pool import WorkerError
from tests.distributed.test_parity import PADDED, WORST, assert_parity
from tests.distributed.test_spec_parity import reference

pytestmark = pytest.mark.slow

WAN = ["model.spec=wan"]
WAN_PADDED = [*WAN, *PADDED]  # 45 tokens: padded on every sharded mesh
NO_SP = "parallel.sequence_parallel=false"
CP2_TP2 = ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"]
TP2 = [*WAN, "parallel.tp=2"]

CASES = {
    "wan-fsdp2": (2, WAN, []),
    "wan-tp2": (2, WAN, ["parallel.tp=2", NO_SP]),
    "wan-tp2+sp": (2, WAN, ["parallel.tp=2"]),
    "wan-cp2-allgather": (2, WAN, ["parallel.cp=2"]),
    "wan-cp2-ulysses": (2, WAN, ["parallel.cp=2", "parallel.cp_kind=ulysses"]),
    "wan-fsdp2xtp2": (4, WAN, ["parallel.tp=2"]),
    "wan-fsdp2xtp2-no-sp": (4, WAN, ["parallel.tp=2", NO_SP]),
    "wan-cp2xtp2-allgather": (4, WAN, CP2_TP2),
    "wan-cp2xtp2-ulysses": (4, WAN, [*CP2_TP2, "parallel.cp_kind=ulysses"]),
    "wan-cp2xtp2-no-sp": (4, WAN, [*CP2_TP2, NO_SP]),
    "wan-cp2xtp2-padded": (4, WAN_PADDED, CP2_TP2),
    "wan-cp2xtp2-overlap": (4, WAN, [*CP2_TP2, "parallel.overlap=true"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_wan_mesh_matches_one_process(dist_pool, name):
    world, model, mesh = CASES[name]
    results = dist_pool(world).run("tests.distributed.cases_parity:run_training", overrides=[*model, *mesh])
    for rank, r in enumerate(results):
        assert r["losses"] == results[0]["losses"], f"rank {rank} logged a different loss than rank 0"
    assert_parity(results[0], reference(model), name)
    print(f"\nparity {name}: worst relative difference {WORST[name]:.2e}")


def test_parity_would_catch_norm_statistics_of_the_local_slice(dist_pool):
    """Without the all-reduce of the sums of squares each tp rank normalises by its slice: parity fails."""
    results = dist_pool(2).run(
        "tests.distributed.cases_wan:run_training_with_local_norm_statistics", overrides=TP2
    )
    with pytest.raises(AssertionError, match="beyond"):
        assert_parity(results[0], reference(WAN), "wan-tp2-local-norm")


def test_a_missing_sharded_norm_declaration_fails_loudly(dist_pool):
    """A plan that forgets `sharded_norms` cannot train silently wrong: the whole weight meets a q shard."""
    with pytest.raises(WorkerError, match="normalized_shape"):
        dist_pool(2).run("tests.distributed.cases_wan:run_training_without_sharded_norms", overrides=TP2)
