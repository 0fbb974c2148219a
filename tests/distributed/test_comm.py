"""parallel/comm.py: CommCounter sees every collective (ours, torch.distributed's, functional, DTensor,
FSDP2, in backward) with exact per-rank byte counts, on the right mesh axis."""

from __future__ import annotations

import math

import pytest
import torch

from megagen.parallel.comm import CommCounter, mesh_axis_groups

CASES = "tests.distributed.cases_comm"
F32 = 4


def _entry(nbytes: int, calls: int = 1) -> dict:
    return {"bytes": nbytes, "calls": calls}


def test_counter_without_collectives_is_empty():
    with CommCounter() as comm:
        torch.ones(3).sum()
    assert comm.summary() == {} and comm.bytes_by_axis() == {} and comm.total_bytes() == 0


def test_mesh_axis_groups_needs_named_axes():
    class Unnamed:
        mesh_dim_names = None

    with pytest.raises(ValueError, match="mesh_dim_names"):
        mesh_axis_groups(Unnamed())


@pytest.mark.slow
def test_each_collective_counted_exactly(dist_pool):
    results = dist_pool(4).run(f"{CASES}:each_collective")
    for rank, res in enumerate(results):
        p2p = {"send": _entry(11 * F32)} if rank % 2 == 0 else {"recv": _entry(11 * F32)}
        expected = {
            "tp": {"all_gather": _entry(120 + 24, 2), "all_reduce": _entry(56)},
            "dp": {"reduce_scatter": _entry(96), "all_to_all": _entry(192), "all_reduce": _entry(36)},
            "world": {"broadcast": _entry(40), **p2p},
            f"other:{res['other_name']}": {"all_reduce": _entry(8)},
        }
        assert res["summary"] == expected, f"rank {rank}"
        assert res["bytes_by_axis"] == {
            axis: sum(e["bytes"] for e in kinds.values()) for axis, kinds in expected.items()
        }
        assert res["ops"][:4] == [
            "_c10d_functional.all_gather_into_tensor",
            "_c10d_functional.reduce_scatter_tensor",
            "_c10d_functional.all_reduce",
            "_c10d_functional.all_to_all_single",
        ]
        assert res["after_reset"] == ({}, 0)
        assert not [w for w in res["warnings"] if "dispatch" in w.lower() or "mode" in w.lower()]


@pytest.mark.slow
def test_functional_collectives_and_dtensor_counted_once(dist_pool):
    for res in dist_pool(4).run(f"{CASES}:functional_and_dtensor"):
        # funcol output 2 x (4,3) + DTensor redistribute output 2 x (2,3), fp32; 2x2 flattened = world group,
        # registered as "dp_tp" (a registered axis wins over "world").
        assert res["summary"] == {
            "tp": {"all_gather": _entry(96 + 48, 2)},
            "dp_tp": {"all_reduce": _entry(8)},
        }
        assert res["ops"] == ["_c10d_functional.all_gather_into_tensor"] * 2 + ["c10d.allreduce_"]


@pytest.mark.slow
def test_collectives_in_backward_are_counted(dist_pool):
    for res in dist_pool(4).run(f"{CASES}:backward_collectives"):
        assert res["forward"] == {"tp": {"all_gather": _entry(2 * 3 * 4 * F32)}}
        assert res["backward"] == {"tp": {"reduce_scatter": _entry(3 * 8 * F32)}}
        assert res["grad_ok"]


def _fsdp_layer_bytes(shapes: list[tuple[int, ...]], world: int, itemsize: int) -> int:
    """FSDP2 pads each parameter's dim 0 up to a multiple of the shard world size (torch.chunk-style
    shards of ceil(dim0 / world) rows, all padded to shard 0's size); all-gather output and
    reduce-scatter input are the concatenation of every padded parameter of the layer."""
    return sum(math.ceil(s[0] / world) * world * math.prod(s[1:]) for s in shapes) * itemsize


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_closed_form(dist_pool, world, reshard):
    d_in, d_hidden, d_out = 5, 7, 3  # no dim 0 divides 2 or 4: every parameter is padded
    layer1 = _fsdp_layer_bytes([(d_hidden, d_in), (d_hidden,)], world, F32)
    layer2 = _fsdp_layer_bytes([(d_out, d_hidden), (d_out,)], world, F32)
    results = dist_pool(world).run(
        f"{CASES}:fsdp_step", dims=(d_in, d_hidden, d_out), reshard_after_forward=reshard
    )
    for res in results:
        kinds = [(kind, nbytes) for kind, _, nbytes, _ in res["records"]]
        ag = [b for k, b in kinds if k == "all_gather"]
        rs = [b for k, b in kinds if k == "reduce_scatter"]
        # forward gathers layer 1 then 2; with reshard_after_forward backward gathers again (2 first,
        # then 1 — prefetched before 2's reduce-scatter); gradients are reduce-scattered 2 then 1.
        assert ag == ([layer1, layer2, layer2, layer1] if reshard else [layer1, layer2])
        assert rs == [layer2, layer1]
        assert {axis for _, axis, _, _ in res["records"]} == {"dp_shard"}
        assert {op for *_, op in res["records"]} == {"c10d._allgather_base_", "c10d._reduce_scatter_base_"}


@pytest.mark.slow
def test_fsdp2_mixed_precision_bytes(dist_pool):
    """bf16 parameters, fp32 reduction: all-gathers move 2-byte elements, reduce-scatters 4-byte ones."""
    world = 2
    shapes1, shapes2 = [(7, 5), (7,)], [(3, 7), (3,)]
    (res, *_) = dist_pool(world).run(
        f"{CASES}:fsdp_step", dims=(5, 7, 3), reshard_after_forward=False, param_dtype="bfloat16"
    )

    def both(itemsize: int) -> int:
        return _fsdp_layer_bytes(shapes1, world, itemsize) + _fsdp_layer_bytes(shapes2, world, itemsize)

    expected = {"all_gather": _entry(both(2), 2), "reduce_scatter": _entry(both(4), 2)}
    assert res["summary"] == {"dp_shard": expected}
