"""Parity: every mesh trains exactly like one process (loss, grad norm, every param and grad).

Tolerances (DESIGN.md): loss and grad norm within 1e-5 relative; each tensor ‖a−b‖/‖b‖ ≤ 1e-5.
One worker pool per world size runs all of its meshes.
"""

from __future__ import annotations

import pytest

from tests.distributed.cases_parity import run_training
from tests.norms import rel_diff

pytestmark = pytest.mark.slow

TOL = 1e-5
PADDED = ["data.latent_frames=3", "data.latent_height=6", "data.latent_width=10"]  # 45 tokens

MESHES = {
    2: {
        "fsdp2": [],
        "tp2": ["parallel.tp=2", "parallel.sequence_parallel=false"],
        "tp2+sp": ["parallel.tp=2"],
        "cp2-allgather": ["parallel.cp=2"],
        "cp2-ulysses": ["parallel.cp=2", "parallel.cp_kind=ulysses"],
        "tp2+sp-full-recompute-first-block": [
            "parallel.tp=2",
            "train.recompute=full",
            "train.recompute_layers=1",
        ],
    },
    4: {
        "fsdp2xtp2": ["parallel.tp=2"],
        "fsdp2xcp2": ["parallel.cp=2"],
        "cp2xtp2-allgather": ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
        "cp2xtp2-ulysses": ["parallel.cp=2", "parallel.tp=2", "parallel.cp_kind=ulysses"],
        "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
        "cp2xtp2-padded": ["parallel.cp=2", "parallel.tp=2", *PADDED],
        "cp2xtp2-ulysses-padded-recompute": [
            "parallel.cp=2",
            "parallel.tp=2",
            "parallel.cp_kind=ulysses",
            "train.recompute=selective",
            *PADDED,
        ],
    },
    8: {
        "fsdp2xcp2xtp2": ["parallel.dp_shard=2", "parallel.cp=2", "parallel.tp=2"],
        "fsdp2xcp2xtp2-ulysses-padded": [
            "parallel.dp_shard=2",
            "parallel.cp=2",
            "parallel.tp=2",
            "parallel.cp_kind=ulysses",
            *PADDED,
        ],
    },
}
CASES = [(world, name, overrides) for world, meshes in MESHES.items() for name, overrides in meshes.items()]

_reference_cache: dict[tuple, dict] = {}
WORST: dict[str, float] = {}


def reference(padded: bool) -> dict:
    """The one-process run (computed once per data shape in the test process)."""
    key = (padded,)
    if key not in _reference_cache:
        _reference_cache[key] = run_training(PADDED if padded else [], run_dir="/tmp/megagen-parity-ref")
    return _reference_cache[key]


def assert_parity(got: dict, ref: dict, name: str) -> None:
    worst = 0.0
    for kind in ("losses", "grad_norms"):
        for step, (a, b) in enumerate(zip(got[kind], ref[kind])):
            rel = abs(a - b) / abs(b)
            worst = max(worst, rel)
            assert rel <= TOL, f"{name}: {kind}[{step}] {a} vs {b} (rel {rel:.2e})"
    for kind in ("params", "grads"):
        assert got[kind].keys() == ref[kind].keys(), f"{name}: {kind} names differ"
        for pname, b in ref[kind].items():
            a = got[kind][pname]
            assert a.shape == b.shape, f"{name}: {kind} {pname} shape {a.shape} vs {b.shape}"
            rel = rel_diff(a, b)
            worst = max(worst, rel)
            assert rel <= TOL, f"{name}: {kind} {pname} rel diff {rel:.2e}"
    WORST[name] = worst


@pytest.mark.parametrize("world, name, overrides", CASES, ids=[c[1] for c in CASES])
def test_mesh_matches_one_process(dist_pool, world, name, overrides):
    results = dist_pool(world).run("tests.distributed.cases_parity:run_training", overrides=overrides)
    ref = reference(padded=any(o in PADDED for o in overrides))
    for rank, r in enumerate(results):
        assert r["losses"] == results[0]["losses"], f"rank {rank} logged a different loss than rank 0"
    assert_parity(results[0], ref, name)
    print(f"\nparity {name}: worst relative difference {WORST[name]:.2e}")


def test_parity_would_catch_a_wrong_gradient():
    """The comparison is not vacuous: a 1e-4 perturbation of one gradient fails it."""
    ref = reference(padded=False)
    bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ref.items()}
    name = next(iter(bad["grads"]))
    bad["grads"][name] = bad["grads"][name] * (1 + 1e-4)
    with pytest.raises(AssertionError, match="grads"):
        assert_parity(bad, ref, "perturbed")
