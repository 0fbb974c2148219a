"""Per-rank bodies of tests/distributed/test_overlap.py (run through the worker pool)."""

from __future__ import annotations

import warnings
from unittest import mock

import torch.distributed as dist

from megagen.parallel import grad_reduction
from megagen.train import train
from megagen.train.gather import full_tensors
from tests.distributed.cases_parity import config, run_training


def _train(overrides: list[str], run_dir: str) -> dict:
    from megagen.runtime_setup import distributed_runtime

    cfg = config(overrides, run_dir)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    runtime = distributed_runtime(cfg)
    result = train(cfg, runtime, capture_grads=True)
    params = full_tensors(list(result.model.named_parameters()))
    partial_sum = runtime.partial_sum
    out = {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "buckets": None if partial_sum is None else len(partial_sum.buckets),
        "launched_in_backward": None if partial_sum is None else partial_sum.launched_in_backward,
    }
    if dist.get_rank() == 0:
        out.update(params=params, grads=result.last_grads)
    return out


def overlap_on_and_off(overrides: list[str], bucket_bytes: int) -> dict:
    """The same training with `parallel.overlap` false then true (small buckets, so there are several)."""
    with mock.patch.object(grad_reduction, "BUCKET_BYTES", bucket_bytes):
        return {
            flag: _train([*overrides, f"parallel.overlap={flag}"], f"/tmp/megagen-overlap-{flag}")
            for flag in ("false", "true")
        }


def tp_pipelined(overrides: list[str], overlap: bool) -> dict:
    """A parity run with `parallel.overlap` set; the message floor is lowered so the tiny model's regions
    really overlap (token-wise ones in pieces, self-attention local-first), and those calls are counted."""
    from megagen.parallel import region_overlap, tp_overlap_schedule

    pieces: list[int] = []
    local_first: list[int] = []
    real_pieces, real_local_first = region_overlap.run_in_pieces, region_overlap.gather_local_first

    def counting_pieces(body, inputs, count, group):
        pieces.append(count)
        return real_pieces(body, inputs, count, group)

    def counting_local_first(x, linears, group):
        local_first.append(len(linears))
        return real_local_first(x, linears, group)

    with (
        mock.patch.object(tp_overlap_schedule, "MIN_PIECE_ELEMENTS", 1),
        mock.patch.object(region_overlap, "run_in_pieces", counting_pieces),
        mock.patch.object(region_overlap, "gather_local_first", counting_local_first),
    ):
        out = run_training(
            [*overrides, f"parallel.overlap={str(overlap).lower()}"], f"/tmp/megagen-tp-{overlap}"
        )
    out["pieces"] = sorted(set(pieces))
    out["pipelined_calls"] = len(pieces)
    out["local_first_linears"] = sorted(set(local_first))
    return out
