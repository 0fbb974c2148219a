"""Per-rank bodies of tests/distributed/test_comm.py (run through the worker pool)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from megagen.parallel.collectives import (
    all_gather_along,
    all_reduce_sum,
    all_to_all_along,
    reduce_scatter_along,
)
from megagen.parallel.comm import CommCounter, mesh_axis_groups


def _mesh_2x2():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def each_collective() -> dict:
    """One of each collective on a 2x2 (dp, tp) mesh, every payload a distinct size; returns summaries."""
    mesh = _mesh_2x2()
    dp, tp = mesh.get_group("dp"), mesh.get_group("tp")
    rank = dist.get_rank()
    other = dist.new_group(list(range(dist.get_world_size())))  # registered under no axis
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CommCounter(mesh_axis_groups(mesh)) as comm:
            all_gather_along(torch.ones(3, 5), 1, tp)  # output 2*3*5*4 = 120
            reduce_scatter_along(torch.ones(4, 6), 0, dp)  # input 4*6*4 = 96
            all_reduce_sum(torch.ones(7, dtype=torch.float64), tp)  # 7*8 = 56
            all_to_all_along(torch.ones(4, 6, 2), 0, 1, dp)  # input 48*4 = 192
            dist.broadcast(torch.ones(5, dtype=torch.int64), src=0)  # world: 40
            dist.all_gather([torch.empty(3) for _ in range(2)], torch.ones(3), group=tp)  # list form: 24
            work = dist.all_reduce(torch.ones(9), group=dp, async_op=True)  # async: counted once, 36
            work.wait()
            dist.all_reduce(torch.ones(2, dtype=torch.int32), group=other)  # other:<name>, 8
            if rank % 2 == 0:  # point-to-point on the world group: 11 floats
                dist.send(torch.ones(11), rank + 1)
            else:
                dist.recv(torch.empty(11), rank - 1)
        out["summary"] = comm.summary()
        out["bytes_by_axis"] = comm.bytes_by_axis()
        out["ops"] = [r.op for r in comm.records]
        out["other_name"] = other.group_name
        comm.reset()
        out["after_reset"] = (comm.summary(), len(comm.records))
    out["warnings"] = [str(w.message) for w in caught]
    return out


def functional_and_dtensor() -> dict:
    """Functional collectives and DTensor redistribution are counted once each, on the right axis."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh_2x2()
    flat = mesh["dp", "tp"]._flatten("dp_tp")
    d = distribute_tensor(torch.ones(4, 3), mesh["tp"], [Shard(0)])  # outside the counter (it scatters)
    with CommCounter(mesh_axis_groups(mesh, {"dp_tp": flat})) as comm:
        y = (
            funcol.all_gather_single(torch.ones(4, 3), 0, mesh.get_group("tp"))
            if hasattr(funcol, "all_gather_single")
            else funcol.all_gather_tensor(torch.ones(4, 3), 0, mesh.get_group("tp"))
        )
        y = y + 1  # waits
        d.redistribute(mesh["tp"], [Replicate()]).to_local()  # all-gather of 2 x (2,3) fp32 = 48 bytes
        dist.all_reduce(torch.ones(2), group=flat.get_group())
    return {"summary": comm.summary(), "ops": [r.op for r in comm.records]}


class _GatherForwardScatterBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, 1, ctx.group), None


def backward_collectives() -> dict:
    """Collectives issued by the autograd engine in `loss.backward()` are seen by the counter."""
    mesh = _mesh_2x2()
    tp = mesh.get_group("tp")
    rank_tp = mesh.get_local_rank("tp")
    x = torch.full((3, 4), float(rank_tp + 1), requires_grad=True)
    with CommCounter(mesh_axis_groups(mesh)) as comm:
        y = _GatherForwardScatterBackward.apply(x, tp)  # (3, 8)
        forward = comm.summary()
        comm.reset()
        weight = torch.arange(8, dtype=torch.float32)
        (y * weight).sum().backward()
        backward = comm.summary()
    # d loss / d x on tp rank r = sum over the 2 tp ranks of weight[r*4:(r+1)*4]
    expected = 2 * weight[rank_tp * 4 : (rank_tp + 1) * 4].expand(3, 4)
    return {"forward": forward, "backward": backward, "grad_ok": torch.equal(x.grad, expected)}


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out))


def fsdp_step(dims=(5, 7, 3), reshard_after_forward: bool = True, param_dtype: str | None = None) -> dict:
    """FSDP2 on a 2-layer MLP over a 1-D mesh of all ranks; one forward + backward under the counter."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    model = _mlp(*dims)
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype) if param_dtype else None, reduce_dtype=torch.float32
    )
    for layer in model:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    x = torch.randn(2, dims[0])
    with CommCounter(mesh_axis_groups(mesh)) as comm:
        model(x).float().sum().backward()
    return {
        "summary": comm.summary(),
        "records": [(r.kind, r.axis, r.bytes, r.op) for r in comm.records],
    }
