"""Peak FLOP/s of the device MFU is measured against.

GPU peaks are dense (no 2:4 sparsity) tensor-core rates from the vendors' datasheets; on a CPU there is no
meaningful datasheet number for PyTorch, so the peak is *measured* (fp32 matmul at the model's sizes) and
labelled as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense TFLOP/s. Sources: NVIDIA H100 datasheet (SXM5 / PCIe, 2023), H200 datasheet (2024; same SM count and
# clocks as H100 SXM), A100 datasheet (2020, SXM4 80GB), B200 in the DGX B200 / HGX B200 datasheet (2024,
# per GPU). The datasheets quote fp8/bf16 "with sparsity": the dense numbers are half of those.
GPU_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9, "fp32": 66.9, "tf32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.2, "tf32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp8": 1670.5, "fp32": 60.0, "tf32": 417.5},
    "H200": {"bf16": 989.4, "fp8": 1978.9, "fp32": 66.9, "tf32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 19.5, "tf32": 156.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0, "fp32": 75.0, "tf32": 1100.0},
}


@dataclass(frozen=True)
class Peak:
    """FLOP/s of one device and where the number came from."""

    flops: float
    device: str
    dtype: str
    source: str


def gpu_key(name: str) -> str | None:
    """Map a `torch.cuda.get_device_name()` string to a row of the table."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        if "NVL" in n:
            return "H100 NVL"
        return "H100 SXM"
    if "A100" in n:
        return "A100"
    if "B200" in n:
        return "B200"
    return None


def measure_matmul_flops(
    m: int, k: int, n: int, dtype=torch.float32, device="cpu", seconds: float = 0.3
) -> float:
    """Best sustained FLOP/s of an (m×k)·(k×n) matmul on `device` (synchronised; fastest repeat)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / min(times)


def device_peak(
    device: torch.device, dtype: str, matmul_shape: tuple[int, int, int] = (512, 512, 512)
) -> Peak:
    """The table's peak for a known GPU; otherwise the measured matmul rate at `matmul_shape`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = gpu_key(name)
        if key is not None and dtype in GPU_PEAKS_TFLOPS[key]:
            return Peak(GPU_PEAKS_TFLOPS[key][dtype] * 1e12, name, dtype, f"datasheet ({key}, dense)")
        flops = measure_matmul_flops(
            *matmul_shape, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device
        )
        return Peak(flops, name, dtype, "measured matmul (GPU not in the table)")
    flops = measure_matmul_flops(*matmul_shape)
    return Peak(
        flops, "cpu", "fp32", f"measured fp32 matmul {matmul_shape[0]}x{matmul_shape[1]}x{matmul_shape[2]}"
    )


def mfu(model_flops: float, seconds: float, devices: int, peak: Peak) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per device over the peak.

    The peak is the device's maximum rate, so for any honest time this is at most 1; a value above 1 means
    the FLOP count or the timer is wrong, and is reported as such rather than clipped.
    """
    if seconds <= 0 or devices <= 0:
        raise ValueError("mfu needs a positive time and device count")
    return model_flops / seconds / devices / peak.flops
