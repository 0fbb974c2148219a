"""`checkpoint.init_from` of a diffusers Wan directory on a mesh: bit for bit the one-process import, and
each rank reads only its own shards' elements (never a full-model copy)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.cases_wan_io import wan_from_diffusers

pytestmark = pytest.mark.slow

MESHES = {  # (world size, overrides)
    "fsdp2": (2, ["parallel.dp_shard=2"]),
    "tp2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "fsdp2xtp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),  # FSDP over tp shards: _StridedShard
}


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A random diffusers WanTransformer3DModel of wan/tiny's sizes, save_pretrained in two shards."""
    from megagen.specs.wan.spec import WAN_PRESETS
    from tests.unit.wan_reference import diffusers_wan

    torch.manual_seed(0)
    model = diffusers_wan(WAN_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("wan-diffusers") / "wan"
    model.save_pretrained(out, max_shard_size="200KB")
    return str(out)


@pytest.fixture(scope="module")
def one_process(diffusers_dir, tmp_path_factory):
    return wan_from_diffusers([], diffusers_dir, str(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("mesh", list(MESHES))
def test_diffusers_import_on_a_mesh_reads_only_slices(dist_pool, diffusers_dir, one_process, mesh, tmp_path):
    ref = one_process
    assert ref["missing"] == [] and ref["read"] == ref["local"] == ref["total"]
    world, overrides = MESHES[mesh]
    results = dist_pool(world).run(
        "tests.distributed.cases_wan_io:wan_from_diffusers",
        overrides=overrides,
        source=diffusers_dir,
        run_dir=str(tmp_path),
    )
    got = results[0]
    assert got["loaded"] == ref["loaded"]
    differ = [n for n, t in ref["params"].items() if not torch.equal(got["params"][n], t)]
    assert differ == [], f"{mesh}: differs from one process: {differ[:5]}"
    for rank, r in enumerate(results):
        assert r["read"] == r["local"], f"rank {rank} read {r['read']} elements for {r['local']} local"
    if mesh == "fsdp2":  # every tensor is split over the two ranks: together they read the model once
        assert sum(r["read"] for r in results) == ref["total"]
    else:  # tp replicates what it does not split (over 2 ranks): more than once, less than twice
        assert ref["total"] < sum(r["read"] for r in results) < 2 * ref["total"]
