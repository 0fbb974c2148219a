"""Per-rank bodies of tests/distributed/test_sp_pipeline.py: `run_in_pieces` on a small token-wise body
(a column- then row-parallel pair of GEMMs) against the plain gather → body → reduce-scatter path."""

from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist

from megagen.parallel import sp_pipeline
from megagen.parallel.mappings import gather_along, reduce_scatter_along_dim


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
