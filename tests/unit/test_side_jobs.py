"""Side jobs (megagen/train/side_jobs.py): which run, in which order, and the start/before/after/close
contract the trainer keeps with them, also when a step or a start-up fails."""

from __future__ import annotations

import pytest

from megagen.config import load_config
from megagen.train import side_jobs as sj
from megagen.train.loop import Trainer
from megagen.train.nonfinite import NonFiniteStepError

EXAMPLE = "examples/configs/video_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(
        EXAMPLE, [f"run.dir={tmp_path}", "metrics.progress=none", "metrics.tensorboard=false", *overrides]
    )


class _Recorder(sj.SideJob):
    def __init__(self, calls: list, name: str = "rec", fail_start: bool = False):
        self.calls, self.name, self.fail_start = calls, name, fail_start

    def start(self):
        self.calls.append((self.name, "start"))
        if self.fail_start:
            raise RuntimeError("start failed")

    def before_step(self, step):
        self.calls.append((self.name, "before", step))

    def after_step(self, report):
        self.calls.append((self.name, "after", report.step, sorted(report.metrics)))

    def close(self):
        self.calls.append((self.name, "close"))


class _FakeTrainer:
    def __init__(self, cfg):
        from megagen.parallel.runtime import LocalRuntime

        self.cfg, self.runtime, self.spec, self.model = cfg, LocalRuntime(), None, None


def test_the_list_follows_the_settings_in_a_fixed_order(tmp_path):
    defaults = sj.side_jobs(_FakeTrainer(_cfg(tmp_path, "metrics.mfu=false")))
    assert [type(j) for j in defaults] == [sj.Watchdog, sj.CountSkips, sj.LogMetrics, sj.CollectGarbage]
    everything = _cfg(
        tmp_path, "metrics.profile_steps=1,2", "metrics.mfu=true", f"eval.path={tmp_path}", "eval.every=1"
    )
    jobs = sj.side_jobs(_FakeTrainer(everything), on_step_end=lambda t, s: None)
    assert [type(j) for j in jobs] == [
        sj.Profile,
        sj.Throughput,
        sj.Watchdog,
        sj.CountSkips,
        sj.Evaluate,
        sj.LogMetrics,
        sj.StepEndCallback,
        sj.CollectGarbage,
    ]  # CountCollectives joins only on a mesh (one process has no collective counter)
    quiet = sj.side_jobs(_FakeTrainer(_cfg(tmp_path, "metrics.mfu=false", "train.step_timeout_s=0")))
    assert sj.Watchdog not in [type(j) for j in quiet]


def _with_recorders(monkeypatch, calls, **kw):
    real = sj.side_jobs

    def listing(trainer, on_step_end=None):
        return [_Recorder(calls, "first"), *real(trainer, on_step_end), _Recorder(calls, "last", **kw)]

    monkeypatch.setattr("megagen.train.loop.side_jobs", listing)


def test_each_step_goes_through_every_job_in_order(tmp_path, monkeypatch):
    calls = []
    _with_recorders(monkeypatch, calls)
    trainer = Trainer(_cfg(tmp_path, "train.steps=2", "metrics.mfu=true"))
    seen = []
    result = trainer.run(on_step_end=lambda t, step: seen.append((step, len(t.history))))
    assert seen == [(1, 1), (2, 2)], "the callback runs after the step's record is written"
    mfu = ["hfu", "mfu", "peak_tflops", "tflops"]  # added by Throughput, which runs between the two

    def step(n):
        before = [("first", "before", n), ("last", "before", n)]
        return before + [("first", "after", n, []), ("last", "after", n, mfu)]

    starts, closes = [("first", "start"), ("last", "start")], [("last", "close"), ("first", "close")]
    assert calls == starts + step(1) + step(2) + closes
    assert len(result.losses) == 2 and [r["mfu"] for r in trainer.history]


def test_a_step_that_stops_the_run_still_closes_every_job(tmp_path, monkeypatch):
    calls = []
    _with_recorders(monkeypatch, calls)
    trainer = Trainer(_cfg(tmp_path, "train.steps=3", "train.nonfinite=stop"))
    monkeypatch.setattr(trainer.runtime, "global_loss", lambda loss: float("nan"))
    with pytest.raises(NonFiniteStepError, match="step 1"):
        trainer.run()
    assert calls == [
        ("first", "start"),
        ("last", "start"),
        ("first", "before", 1),
        ("last", "before", 1),
        ("last", "close"),
        ("first", "close"),
    ]
    assert trainer.history == []


def test_a_job_that_fails_to_start_closes_those_already_started(tmp_path, monkeypatch):
    calls = []
    _with_recorders(monkeypatch, calls, fail_start=True)
    trainer = Trainer(_cfg(tmp_path, "train.steps=1"))
    with pytest.raises(RuntimeError, match="start failed"):
        trainer.run()
    assert calls == [("first", "start"), ("last", "start"), ("first", "close")]
