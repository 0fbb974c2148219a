"""The single-process training loop: learning, determinism, accumulation, metrics files."""

import json
import statistics

import pytest
import torch

from megagen.config import ConfigError, load_config
from megagen.train import train

EXAMPLE = "examples/configs/video_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(
        EXAMPLE, [f"run.dir={tmp_path}", "metrics.progress=none", "metrics.tensorboard=false", *overrides]
    )


def test_loss_falls_on_learnable_synthetic_data(tmp_path):
    result = train(_cfg(tmp_path, "train.steps=200"))
    first, last = statistics.mean(result.losses[:10]), statistics.mean(result.losses[-10:])
    assert last < 0.8 * first, (first, last)


def test_runs_are_deterministic(tmp_path):
    a = train(_cfg(tmp_path / "a", "train.steps=3"))
    b = train(_cfg(tmp_path / "b", "train.steps=3"))
    assert a.losses == b.losses and a.grad_norms == b.grad_norms


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    whole = train(_cfg(tmp_path / "a", "train.steps=3", "train.micro_batch_size=8"))
    accum = train(_cfg(tmp_path / "b", "train.steps=3", "train.micro_batch_size=2"))
    for x, y in zip(whole.losses + whole.grad_norms, accum.losses + accum.grad_norms):
        assert x == pytest.approx(y, rel=1e-5)
    for (name, p), q in zip(whole.model.named_parameters(), accum.model.parameters()):
        assert torch.linalg.vector_norm(p - q) <= 1e-5 * torch.linalg.vector_norm(p), name


def test_accumulation_must_divide(tmp_path):
    from megagen.data.sampler import SyntheticSampler

    sampler = SyntheticSampler(global_batch=8, micro_batch=4)
    assert sampler.accumulation("synthetic", 2) == 1
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        sampler.accumulation("synthetic", 3)


def test_metrics_jsonl_and_tensorboard(tmp_path):
    cfg = load_config(EXAMPLE, ["train.steps=5", f"run.dir={tmp_path}", "metrics.progress=none"])
    train(cfg)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    record = json.loads(lines[-1])
    for key in (
        "step",
        "loss",
        "grad_norm",
        "lr",
        "samples_per_s",
        "tokens_per_s",
        "step_time_s",
        "max_mem_gb",
    ):
        assert key in record
    assert record["step"] == 5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").is_file()


def test_on_error_skip_counts_a_corrupt_sample_and_trains_on(tmp_path):
    """A NaN latent in a shard: skip mode logs it, counts it in the metrics and keeps training."""
    import numpy as np

    from megagen.data.shard_format import parse_header
    from megagen.data.synth import synth

    out = tmp_path / "ds"
    synth(out, preset="video_tiny", samples=24, seed=0, buckets="t4_h8_w8")
    shard = next(out.glob("t4_h8_w8/*.safetensors"))
    header = parse_header(str(shard))
    entry = header.tensors["latents"]
    with open(shard, "r+b") as fh:  # every latent of the shard becomes NaN: whatever is drawn is skipped
        fh.seek(entry.start)
        fh.write(np.full((entry.end - entry.start) // 2, np.nan, dtype=np.float16).tobytes())
    cfg = _cfg(
        tmp_path / "run",
        f"data.path={out}",
        "data.on_error=skip",
        "data.loader=torch",
        "data.num_workers=0",
        "train.steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    )
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_samples"] == 8
    assert all(np.isfinite(result.losses))
    cfg.data.on_error = "fail"
    cfg.run.overwrite = True  # the same run.dir again, deliberately
    with pytest.raises(Exception, match="shard-00000"):
        train(cfg)


def test_resumed_metrics_log_every_step_once(tmp_path):
    from megagen.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, 5, tensorboard=False, progress="none")
    for step in range(1, 5):  # steps 1-4 logged, then the job dies; the checkpoint was at step 2
        first.log(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss"')  # a line cut short by the crash
    second = MetricsLogger(tmp_path, 5, tensorboard=False, progress="none", resume=True, resume_step=2)
    for step in range(3, 6):
        second.log(step, {"loss": float(step)})
    second.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_bf16_param_dtype_without_fsdp_computes_in_bf16_with_fp32_masters():
    """`parallel.param_dtype=bf16` in one process: the forward runs in bf16 (autocast), parameters and
    gradients stay fp32, the loss is fp32 and close to the fp32 run's."""
    import torch

    from megagen.config import load_config
    from megagen.specs import get_spec
    from megagen.train.loop import Trainer

    losses = {}
    for dtype in ("fp32", "bf16"):
        cfg = load_config(
            "examples/configs/video_tiny.yaml",
            [
                f"parallel.param_dtype={dtype}",
                "train.steps=1",
                "train.global_batch_size=2",
                "train.micro_batch_size=2",
                "metrics.tensorboard=false",
                "metrics.jsonl=false",
                "metrics.progress=none",
                "run.dir=/tmp/megagen-bf16-test",
            ],
        )
        trainer = Trainer(cfg)
        spec = get_spec(cfg.model.spec)
        batch = {k: torch.randn(2, *s) for k, s in spec.sample_shapes(cfg).items()}
        out = trainer.model(**spec.model_inputs(batch, batch["latents"], torch.full((2,), 0.5), None))
        assert out.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        result = trainer.run()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        losses[dtype] = result.losses[0]
    assert losses["bf16"] == __import__("pytest").approx(losses["fp32"], rel=2e-2)
