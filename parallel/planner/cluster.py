"""Cluster descriptions: device peak, achievable efficiencies, memory, and link bandwidths per GPU.

Shipped presets live in `clusters/*.yaml` beside this file; every number there cites its source. A cluster
file written by `megagen plan --calibrate` holds numbers measured on the spot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

PRESETS_DIR = Path(__file__).parent / "clusters"


@dataclass(frozen=True)
class Cluster:
    name: str
    device: str
    peak_flops: float
    """Dense peak FLOP/s of one device in the compute dtype (from megagen.metrics.peak for GPUs)."""
    dtype: str
    matmul_efficiency: float
    """Fraction of peak large GEMMs achieve (published GEMM benchmarks or --calibrate)."""
    attention_efficiency: float
    """Fraction of peak fused attention (forward+backward) achieves."""
    memory_gb: float
    gpus_per_node: int
    intra_node_gbps: float
    """Achievable collective bus bandwidth per GPU inside a node, GB/s."""
    inter_node_gbps: float
    """Achievable bus bandwidth per GPU across nodes, GB/s."""
    intra_node_latency_us: float
    inter_node_latency_us: float
    memory_reserved_gb: float = 4.0
    """Memory not available to the model: CUDA context, allocator fragmentation, NCCL buffers."""
    hbm_gbps: float = 0.0
    """Achievable device-memory bandwidth, GB/s (elementwise kernels are bound by it); 0 = ignore."""

    @property
    def device_type(self) -> str:
        """torch's device type for this cluster ("cpu" or "cuda"): what the engine's chunking rules see."""
        return "cpu" if self.device.strip().lower() == "cpu" else "cuda"

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def load_cluster(name_or_path: str) -> Cluster:
    """A shipped preset (`h100`, `h200`, `a100`, `b200`, `cpu`) or a YAML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ValueError(f"--cluster: {name_or_path!r} is neither a file nor a preset ({', '.join(presets)})")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if "peak_tflops" in data:
        data["peak_flops"] = float(data.pop("peak_tflops")) * 1e12
    data.pop("sources", None)
    return Cluster(**data)
