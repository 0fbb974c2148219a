"""`data.check_finite`: NaN/inf latents with `data.on_error=fail` are found when a step's loss goes non-finite
(`on_nan_loss`, the default: reads do not scan) or at read time (`eager`); `on_error=skip` always checks on
read. Either way the error names the file, bucket and sample."""

import numpy as np
import pytest

from megagen.data.format import DataError
from megagen.data.shard_format import parse_header
from megagen.data.shard_reader import ShardReader
from megagen.train import train
from tests.unit.data_helpers import TINY_BUCKET, local_data, synth_tiny, tiny_run_config

BUCKET = TINY_BUCKET


def _cfg(tmp_path, *overrides):
    return tiny_run_config(tmp_path, "data.loader=torch", *overrides)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return synth_tiny(tmp_path_factory.mktemp("clean") / "ds")


def _poison(src, dst, sample: int):
    """A copy of dataset `src` whose `sample` holds one NaN latent; returns the shard path."""
    import shutil

    shutil.copytree(src, dst)
    reader = ShardReader(dst)
    shard, local = reader._locate(BUCKET, sample)
    entry = parse_header(shard.path).tensors["latents"]
    per_sample = (entry.end - entry.start) // shard.info.samples
    with open(shard.path, "r+b") as fh:
        fh.seek(entry.start + local * per_sample + 6)
        fh.write(np.array([np.nan], dtype=np.float16).tobytes())
    return shard.path


def _first_step_with(cfg, sample: int) -> int:
    """1-based step whose batch draws `sample` (from the request plan)."""
    for req in local_data(cfg, cfg.train.steps).plan:
        if sample in req.sample_ids:
            return req.step + 1
    return 0


def test_nan_sample_fails_at_the_step_whose_loss_is_nan(clean, tmp_path):
    cfg = _cfg(tmp_path / "run", f"data.path={tmp_path / 'ds'}", "train.steps=6")
    ref = _cfg(tmp_path / "ref", f"data.path={clean}", "train.steps=6")
    sample = next(i for i in range(24) if 1 < _first_step_with(ref, i) <= 6)  # drawn after a clean step
    step = _first_step_with(ref, sample)
    path = _poison(clean, tmp_path / "ds", sample)
    records = []
    with pytest.raises(DataError) as err:
        from megagen.train.loop import Trainer

        trainer = Trainer(cfg)
        trainer.run(on_step_end=lambda t, s: records.append(s))
    msg = str(err.value)
    assert path in msg and f"sample {sample} of bucket {BUCKET}: latents hold NaN or inf" in msg, msg
    assert f"step {step}" in msg and records == list(range(1, step)), (msg, records)
    # eager: the same error at read time, before the step trains
    with pytest.raises(DataError, match=f"sample {sample} of bucket {BUCKET}: latents hold NaN or inf$"):
        train(
            _cfg(
                tmp_path / "eager", f"data.path={tmp_path / 'ds'}", "train.steps=6", "data.check_finite=eager"
            )
        )


def test_finite_data_losses_are_unchanged_by_the_check_mode(clean, tmp_path):
    lazy = train(_cfg(tmp_path / "a", f"data.path={clean}", "train.steps=3"))
    eager = train(_cfg(tmp_path / "b", f"data.path={clean}", "train.steps=3", "data.check_finite=eager"))
    assert lazy.losses == eager.losses and lazy.grad_norms == eager.grad_norms


def test_nonfinite_loss_with_finite_data_says_so(clean):
    from megagen.data.contract import MicroBatchRequest
    from megagen.data.pipeline import DataPipeline

    reader = ShardReader(clean, check_finite=False)
    data = DataPipeline(None, None, None, reader, lazy_finite=True)
    note = data.on_nonfinite_loss(3, [MicroBatchRequest(2, 0, BUCKET, (0, 1), (0, 1), 1)])
    assert note.startswith("the loss went non-finite at step 3 with finite data"), note
    assert DataPipeline(None, None, None, reader, lazy_finite=False).on_nonfinite_loss(3, []) == ""  # eager


def test_skip_still_checks_on_read(clean, tmp_path):
    for mode in ("on_nan_loss", "eager"):
        cfg = _cfg(tmp_path / mode, f"data.path={clean}", "data.on_error=skip", f"data.check_finite={mode}")
        data = local_data(cfg, 2)
        assert data.reader.check_finite and not data.lazy_finite
    data = local_data(_cfg(tmp_path / "fail", f"data.path={clean}"), 2)
    assert not data.reader.check_finite and data.lazy_finite
