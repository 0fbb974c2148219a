"""Worker-side cases: train a parity case with the CP overlap forced on or off.

The `parallel.overlap` schema key lands separately, so the flag is forced here by wrapping the class that
parallelize.py builds, not by a config override.
"""

from __future__ import annotations

from unittest import mock

from megagen.parallel.context_parallel import ContextParallelAttention
from tests.distributed.cases_parity import run_training


def run_with_overlap(overrides: list[str], overlap: bool) -> dict:
    def build(inner, kind, group, _overlap=True):
        return ContextParallelAttention(inner, kind, group, overlap)

    with mock.patch("megagen.parallel.parallelize.ContextParallelAttention", build):
        return run_training(overrides, run_dir=f"/tmp/megagen-cp-overlap-{int(overlap)}")
