"""Worker-side wan cases that break the sharded norm on purpose, to show the parity test notices."""

from __future__ import annotations

import dataclasses
from unittest import mock

from tests.distributed.cases_parity import run_training


def run_training_with_local_norm_statistics(overrides: list[str]) -> dict:
    """`run_training` with the sharded norm's all-reduce of the sums of squares left out: each tp rank then
    normalises q and k by the root-mean-square of its own slice of the width only."""
    with mock.patch("megagen.parallel.sharded_norm.sum_over_ranks", lambda x, group, axis="tp": x):
        return run_training(overrides)


def run_training_without_sharded_norms(overrides: list[str]) -> dict:
    """`run_training` with the wan plan declaring no sharded norm (the weight then stays whole)."""
    from megagen.specs.wan.spec import WanSpec

    plan_of = WanSpec.parallel_plan

    def without(self, cfg):
        return dataclasses.replace(plan_of(self, cfg), sharded_norms=())

    with mock.patch.object(WanSpec, "parallel_plan", without):
        return run_training(overrides)
