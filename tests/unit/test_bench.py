"""`megagen bench` output and the MFU arithmetic."""

import json

import pytest
import torch

from megagen.cli import main
from megagen.metrics.peak import GPU_PEAKS_TFLOPS, Peak, gpu_key, measure_matmul_flops, mfu

FIELDS = (
    "tokens_per_s_per_device",
    "samples_per_s_per_device",
    "tflops_per_device",
    "mfu",
    "hfu",
    "peak_memory_gb",
    "data_wait_share",
    "comm_share",
    "exposed_comm_s",
    "step_time_s",
)


def test_bench_json_has_every_field(capsys):
    assert main(["bench", "examples/configs/video_tiny.yaml", "--json", "--steps", "3", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in FIELDS:
        assert key in result, key
    # MFU is achieved FLOP/s over the peak (on CPU a matmul rate measured in this run)
    assert result["mfu"] > 0
    assert result["mfu"] == pytest.approx(result["tflops_per_device"] / result["peak_tflops"], rel=1e-6)
    assert result["hfu"] == pytest.approx(result["mfu"])  # no recompute in this config


def test_mfu_of_a_timed_matmul_is_at_most_one():
    """Feed MFU a measured time of the same matmul the peak was measured on: it cannot exceed 1."""
    m = k = n = 256
    peak = Peak(measure_matmul_flops(m, k, n), "cpu", "fp32", "measured")
    a, b = torch.randn(m, k), torch.randn(k, n)
    import time

    t0 = time.perf_counter()
    a @ b
    seconds = time.perf_counter() - t0
    # the peak is the fastest of many repeats, so one repeat can only beat it by timer noise
    assert mfu(2 * m * k * n, seconds, 1, peak) <= 1.05
    assert mfu(1e12, 1.0, 2, Peak(1e12, "x", "bf16", "t")) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, peak)


def test_gpu_names_map_to_the_peak_table():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_key("NVIDIA H200") == "H200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_key("Tesla T4") is None
    assert GPU_PEAKS_TFLOPS["H100 SXM"]["bf16"] == pytest.approx(989.4)
