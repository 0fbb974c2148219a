"""train.gc_every: Python's garbage collector runs at step boundaries, not inside a step."""

from __future__ import annotations

import gc

import pytest

from megagen.config import ConfigError, load_config
from megagen.train.step_gc import StepGC


def test_collects_only_after_every_nth_step_and_restores_the_collector():
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        with StepGC(3) as step_gc:
            assert not gc.isenabled()
            runs.clear()  # the collection on entry
            garbage = []
            for step in range(1, 8):
                for _ in range(3000):  # cycles: enough allocations to trigger automatic collections
                    node = {}
                    node["self"] = node
                    garbage.append(node)
                garbage.clear()
                step_gc.step_done(step)
                assert len(runs) == step // 3, (step, runs)
            assert runs == [2, 2]  # full collections, after steps 3 and 6
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)


def test_zero_leaves_the_automatic_collector_alone():
    with StepGC(0) as step_gc:
        assert gc.isenabled()
        step_gc.step_done(50)
    assert gc.isenabled()


def test_negative_interval_is_a_config_error():
    with pytest.raises(ConfigError, match="train.gc_every"):
        load_config(None, ["train.gc_every=-1"])
