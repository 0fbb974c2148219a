"""Meta-device construction: the initial weights do not depend on the mesh, and no rank holds the model.

Every rank builds and initialises the model on the meta device, parallelises it there and materialises
only its own shards, each from its parameter's full value replayed on the CPU (`megagen/train/build.py`).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.cases_meta_init import DEEP, initial_weights

pytestmark = pytest.mark.slow

QK = "model.qk_norm=true"
MESHES = {
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "fsdp2": (2, []),
    "cp2": (2, ["parallel.cp=2"]),
    "cp2xtp2": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"]),
    "fsdp2xtp2": (4, ["parallel.tp=2"]),  # FSDP over the tp shards' dim 0: _StridedShard placements
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "fsdp2xcp2xtp2": (8, ["parallel.dp_shard=2", "parallel.cp=2", "parallel.tp=2"]),
}
MODELS = {
    "video": [QK, "model.init=live"],
    "upsampler": ["model.spec=upsampler"],  # zero input columns: a write to a view of one parameter
    "audio": ["model.spec=audio", QK],
}
_references: dict[str, dict] = {}


def reference(model: str) -> dict[str, torch.Tensor]:
    if model not in _references:
        _references[model] = initial_weights(MODELS[model])["tensors"]
    return _references[model]


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("model", list(MODELS))
def test_initial_weights_equal_one_process_bitwise(dist_pool, model, mesh):
    world, overrides = MESHES[mesh]
    got = dist_pool(world).run(
        "tests.distributed.cases_meta_init:initial_weights", overrides=[*MODELS[model], *overrides]
    )[0]
    ref = reference(model)
    assert got["tensors"].keys() == ref.keys()
    sharded = [n for n, p in got["placements"].items() if "Shard" in p]
    assert sharded, f"{mesh}: nothing was sharded"
    differ = [n for n, t in ref.items() if not torch.equal(got["tensors"][n], t)]
    assert differ == [], f"{model} on {mesh}: initial values differ from one process: {differ[:5]}"


@pytest.mark.parametrize("mesh", ["fsdp4", "fsdp2xtp2"])
def test_build_peak_is_a_shard_plus_the_largest_parameter(dist_pool, mesh):
    """The issue's budget is shard of (params + grads + optimizer state) + the largest parameter + 10%;
    while building there are no gradients or optimizer state yet, so the build alone must stay within
    1.1 × (this rank's shards + the largest full parameter) — a quarter of the full model plus 13.5 MiB
    here, where holding the full model (774 MiB) on any rank fails it."""
    overrides = [] if mesh == "fsdp4" else ["parallel.tp=2"]
    results = dist_pool(4).run("tests.distributed.cases_meta_init:build_peak", overrides=[*DEEP, *overrides])
    for rank, r in enumerate(results):
        budget = 1.1 * (r["shard"] + r["largest"])
        assert r["model"] > 3 * budget  # the test can tell a full-model build from a sharded one
        mib = {k: round(v / 2**20, 1) for k, v in r.items()}
        assert r["peak"] <= budget, f"rank {rank}: build peak {mib} exceeds 1.1 × (shard + largest)"
        print(f"\n{mesh} rank {rank}: build peak, shard, model (MiB): {mib}")


# ------------------------------------------------------------------------------------------------ init_from
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tests.distributed.cases_meta_init import make_sources

    return make_sources(str(tmp_path_factory.mktemp("init-from-sources")))


INIT_FROM = {
    # same model from an export: every tensor read per rank; upsampler from a video checkpoint (DCP) and
    # from its export: patch_embed grows (zero new input columns), the rest is loaded
    "video-from-safetensors": ([QK], "safetensors"),
    "upsampler-from-dcp": (["model.spec=upsampler", QK], "dcp"),
    "upsampler-from-safetensors": (["model.spec=upsampler", QK], "safetensors"),
}
_init_from_refs: dict[str, dict] = {}


@pytest.mark.parametrize("mesh", ["fsdp2xtp2", "cp2xtp2"])
@pytest.mark.parametrize("case", list(INIT_FROM))
def test_init_from_on_a_mesh_equals_one_process(dist_pool, sources, case, mesh):
    """`checkpoint.init_from` loads into the sharded, meta-built model: bit for bit the one-process
    result, and from a safetensors file each rank reads exactly its own shards' elements."""
    from tests.distributed.cases_meta_init import init_from_weights

    model, kind = INIT_FROM[case]
    if case not in _init_from_refs:
        _init_from_refs[case] = init_from_weights(model, sources[kind])
    ref = _init_from_refs[case]
    world, overrides = MESHES[mesh]
    results = dist_pool(world).run(
        "tests.distributed.cases_meta_init:init_from_weights",
        overrides=[*model, *overrides],
        source=sources[kind],
    )
    got = results[0]
    assert got["loaded"] == ref["loaded"] and got["grown"] == ref["grown"]
    assert ("patch_embed.weight" in got["grown"]) == case.startswith("upsampler")
    differ = [n for n, t in ref["params"].items() if not torch.equal(got["params"][n], t)]
    assert differ == [], f"{case} on {mesh}: differs from one process: {differ[:5]}"
    if kind == "safetensors":
        for rank, r in enumerate(results):
            assert r["read"] == r["local"], f"rank {rank} read {r['read']} elements for {r['local']} local"
        assert ref["read"] == ref["local"]
