"""Per-rank bodies of tests/distributed/test_sp_pipeline.py: `run_in_pieces` on a small token-wise body
(a column- then row-parallel pair of GEMMs) against the plain gather → body → reduce-scatter path, and a
token-wise region through `apply_tensor_parallel`."""

from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from megagen.parallel import sp_pipeline, tp_overlap_schedule
from megagen.parallel.mappings import gather_along, reduce_scatter_along_dim
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.parallel.tensor_parallel import apply_tensor_parallel


def _weights(rank: int, dim: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # this rank's column / row shards
    w1 = torch.randn(hidden, dim, generator=g, dtype=torch.float64)
    w2 = torch.randn(dim, hidden, generator=g, dtype=torch.float64)
    return w1.requires_grad_(), w2.requires_grad_()


def _body(w1, w2, seen: list, events: list | None):
    def body(inputs: dict) -> torch.Tensor:
        h = torch.tanh(inputs["x"] @ w1.T)
        if events is not None:
            i = len(seen)
            h.register_hook(lambda g: events.append(("backward", i)) or g)
            events.append(("forward", i))
        seen.append(inputs["x"].shape)
        return h @ w2.T

    return body


class _Watch:
    """Counts the collectives issued but not yet waited at each compute event."""

    def __init__(self):
        self.pending: set[int] = set()
        self.events: list = []

    def issuing(self, real):
        def issue(*args):
            out = real(*args)
            self.pending.add(id(out))
            return out

        return issue

    def wait(self, t):
        self.pending.discard(id(t))
        return t_wait(t)

    def log(self):
        watch = self

        class Log(list):
            def append(self, item):
                super().append((*item, len(watch.pending)))

        return Log()


t_wait = sp_pipeline._wait_tp


def pieces_vs_plain(batch: int, tokens_local: int, pieces: int) -> dict:
    """Output and gradients of both paths (float64), plus the collectives in flight at each piece's
    forward and backward compute."""
    rank, group = dist.get_rank(), dist.group.WORLD
    dim, hidden = 8, 12
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, tokens_local, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w2 = _weights(rank, dim, hidden)
    grad_out = torch.randn(batch, tokens_local, dim, generator=g, dtype=torch.float64)

    full = _body(w1, w2, [], None)({"x": gather_along(x, 1, group)})
    plain = reduce_scatter_along_dim(full, 1, group)
    plain_grads = torch.autograd.grad(plain, (x, w1, w2), grad_out)

    watch, seen = _Watch(), []
    events = watch.log()
    with (
        mock.patch.object(sp_pipeline, "_gather_rows", watch.issuing(sp_pipeline._gather_rows)),
        mock.patch.object(sp_pipeline, "_scatter_rows", watch.issuing(sp_pipeline._scatter_rows)),
        mock.patch.object(sp_pipeline, "_wait_tp", watch.wait),
    ):
        piped = sp_pipeline.run_in_pieces(_body(w1, w2, seen, events), {"x": x}, pieces, group)
        piped_grads = torch.autograd.grad(piped, (x, w1, w2), grad_out)
        in_flight_after = len(watch.pending)
    return {
        "out_diff": float((piped - plain).detach().abs().max()),
        "grad_diffs": [float((a - b).abs().max()) for a, b in zip(piped_grads, plain_grads)],
        "piece_shapes": [tuple(s) for s in seen],
        "events": list(events),
        "in_flight_after": in_flight_after,
    }


class _Mlp(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, scale_output: bool = False, rowwise: int = 1):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=True)
        self.w4 = nn.Linear(dim, dim, bias=False) if rowwise == 2 else None
        self.scale_output = scale_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w2(torch.tanh(self.w1(x)))
        return 2 * y if self.scale_output else y


class _Net(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = _Mlp(**kwargs)

    def forward(self, x):
        return self.mlp(x)


def _plan(rowwise: int) -> ParallelPlan:
    rows = ("mlp.w2", "mlp.w4") if rowwise == 2 else ("mlp.w2",)
    return ParallelPlan(
        blocks="", colwise=("mlp.w1",), rowwise=rows, regions={"mlp": TPRegion(token_wise=True)}
    )


def region_errors() -> dict:
    """What a misdeclared token-wise region raises: at set-up (two rowwise linears) and on its first call
    (it does not return its rowwise linear's output as is)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    out = {}
    try:
        apply_tensor_parallel(_Net(rowwise=2), _plan(2), mesh, sequence_parallel=True, overlap=True)
    except ValueError as exc:
        out["setup"] = str(exc)
    net = _Net(scale_output=True)
    apply_tensor_parallel(net, _plan(1), mesh, sequence_parallel=True, overlap=True)
    with mock.patch.object(tp_overlap_schedule, "MIN_PIECE_ELEMENTS", 1):
        try:
            net(torch.randn(2, 4, 8))
        except RuntimeError as exc:
            out["call"] = str(exc)
    return out


def region_on_and_off() -> dict:
    """A token-wise region with a rowwise bias, through `apply_tensor_parallel` with overlap on and off."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    results = {}
    for overlap in (False, True):
        net = _Net()
        apply_tensor_parallel(net, _plan(1), mesh, sequence_parallel=True, overlap=overlap)
        xi = x.clone().requires_grad_()
        with mock.patch.object(tp_overlap_schedule, "MIN_PIECE_ELEMENTS", 1):
            y = net(xi)
        y.square().sum().backward()
        results[overlap] = (y.detach(), xi.grad, net.mlp.w2.bias.grad, repr(net.mlp))
    (y0, g0, b0, _), (y1, g1, b1, text) = results[False], results[True]
    return {
        "out": float((y1 - y0).abs().max()),
        "grad": float((g1 - g0).abs().max()),
        "bias_grad": float((b1 - b0).abs().max()),
        "repr": text,
    }


def local_first_vs_plain(batch: int, tokens_local: int) -> dict:
    """q/k/v-like column-parallel linears on the gathered input, local-first against the plain gather:
    outputs and gradients, and the collectives in flight at each GEMM."""
    from megagen.parallel.sp_local_first import gather_local_first, release
    from megagen.parallel.tensor_parallel import ColumnParallelLinear

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    group = mesh.get_group()
    torch.manual_seed(0)
    linears = [ColumnParallelLinear(nn.Linear(8, 12).double(), mesh) for _ in range(3)]
    x = torch.randn(batch, tokens_local, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    x = x.double().requires_grad_()
    params = [x, *(p for lin in linears for p in lin.parameters())]

    plain = [lin(gather_along(x, 1, group)) for lin in linears]
    plain_grads = torch.autograd.grad(sum(o.square().sum() for o in plain), params)

    watch = _Watch()
    in_flight: list[int] = []
    for lin in linears:
        real = lin.gemm
        lin.gemm = lambda *a, real=real, **k: in_flight.append(len(watch.pending)) or real(*a, **k)
    with (
        mock.patch.object(sp_pipeline, "_gather_rows", watch.issuing(sp_pipeline._gather_rows)),
        mock.patch.object(sp_pipeline, "_scatter_rows", watch.issuing(sp_pipeline._scatter_rows)),
        mock.patch.object(sp_pipeline, "_wait_tp", watch.wait),
    ):
        gathered = gather_local_first(x, linears, group)
        outs = [lin(gathered) for lin in linears]
        release(linears, "test")
        grads = torch.autograd.grad(sum(o.square().sum() for o in outs), params)
    return {
        "out_diff": max(float((a - b).detach().abs().max()) for a, b in zip(outs, plain)),
        "grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads, plain_grads)),
        "in_flight": in_flight,
        "in_flight_after": len(watch.pending),
    }


class _CrossMix(nn.Module):
    """Token-wise with a replicated context: each token's query scaled by the mean projected context."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) * self.k(context).mean(1, keepdim=True))


def context_projected_once() -> dict:
    """GEMM calls of the context projection per region call, in pieces, and the result against overlap off."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    plan = ParallelPlan(
        blocks="",
        colwise=("mix.q", "mix.k"),
        rowwise=("mix.o",),
        regions={"mix": TPRegion(seq_args=("x",), replicated_args=("context",), token_wise=True)},
    )
    g = torch.Generator().manual_seed(dist.get_rank())
    x, context = (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(9)),
    )
    outs, calls = {}, []
    for overlap in (False, True):
        torch.manual_seed(0)
        net = nn.Module()
        net.mix = _CrossMix()
        apply_tensor_parallel(net, plan, mesh, sequence_parallel=True, overlap=overlap)
        real = net.mix.k.gemm
        net.mix.k.gemm = lambda *a, real=real, flag=overlap, **k: calls.append(flag) or real(*a, **k)
        with mock.patch.object(tp_overlap_schedule, "MIN_PIECE_ELEMENTS", 1):
            outs[overlap] = net.mix(x, context=context)
    return {"k_calls_on": calls.count(True), "diff": float((outs[True] - outs[False]).detach().abs().max())}
