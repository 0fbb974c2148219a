"""One plan's whole prediction: bytes, memory, FLOPs, and step time with the overlaps the engine performs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.comm_cost import collective_seconds, communication
from megagen.parallel.planner.compute_cost import elementwise_seconds, flops_per_rank, recomputed_flops
from megagen.parallel.planner.cost import activation_bytes
from megagen.parallel.planner.memory import fsdp_buffer_bytes, state_memory
from megagen.parallel.planner.overlap_model import exposure
from megagen.parallel.planner.plan_point import PlanPoint
from megagen.parallel.planner.workload import Workload


@dataclass
class Cost:
    """Everything the planner predicts for one plan."""

    comm: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """{axis: {kind: {"bytes": int, "calls": int}}} for one optimizer step on rank 0."""
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: float = 0.0
    transient_bytes: float = 0.0
    model_flops_per_rank: float = 0.0
    hardware_flops_per_rank: float = 0.0
    compute_s: float = 0.0
    comm_s: dict[str, float] = field(default_factory=dict)
    exposed_comm_s: float = 0.0
    exposed_by_axis: dict[str, float] = field(default_factory=dict)
    """Seconds per axis not hidden behind compute (overlap_model.py says what hides where)."""
    overlap_chunks: dict[str, int] = field(default_factory=dict)
    """Chunk counts of the pipelined overlaps (rule name → pieces), as the engine runs them."""
    step_s: float = 0.0
    duplicated_activation_bytes: float = 0.0

    @property
    def peak_memory_bytes(self) -> float:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.transient_bytes
        )

    def bytes_by_axis(self) -> dict[str, int]:
        return {a: sum(v["bytes"] for v in kinds.values()) for a, kinds in self.comm.items()}


def step_cost(work: Workload, plan: PlanPoint, cluster: Cluster) -> Cost:
    """Bytes, memory, FLOPs and predicted step time of one optimizer step."""
    cost = Cost()
    cost.param_bytes, cost.grad_bytes, cost.optimizer_bytes = state_memory(work, plan)
    cost.activation_bytes, cost.duplicated_activation_bytes = activation_bytes(work, plan)
    cost.transient_bytes = fsdp_buffer_bytes(work, plan)
    mm, attn, model = flops_per_rank(work, plan)
    re_mm, re_attn = recomputed_flops(work, plan)
    cost.model_flops_per_rank = model
    cost.hardware_flops_per_rank = model + re_mm + re_attn
    eff_mm = cluster.peak_flops * cluster.matmul_efficiency
    eff_attn = cluster.peak_flops * cluster.attention_efficiency
    cost.compute_s = (
        (mm + re_mm) / eff_mm + (attn + re_attn) / eff_attn + elementwise_seconds(work, plan, cluster)
    )
    _add_communication(cost, work, plan, cluster)
    return cost


def step_cost_with_overlap(work: Workload, plan: PlanPoint, cluster: Cluster, same_but_overlap: Cost) -> Cost:
    """`step_cost(work, plan, cluster)` from the cost of the same plan with the other `overlap` setting:
    memory and FLOPs do not depend on it, so only traffic and time are redone (the search costs both)."""
    cost = replace(same_but_overlap, comm={}, comm_s={}, exposed_by_axis={}, overlap_chunks={})
    _add_communication(cost, work, plan, cluster)
    return cost


def _add_communication(cost: Cost, work: Workload, plan: PlanPoint, cluster: Cluster) -> None:
    """Traffic per axis, its seconds, what hides behind `cost.compute_s`, and the step time."""
    cost.comm = communication(work, plan)
    for axis, kinds in cost.comm.items():
        cost.comm_s[axis] = sum(
            collective_seconds(kind, v["bytes"], v["calls"], axis, plan, cluster) for kind, v in kinds.items()
        )
    seen = exposure(work, plan, cluster, cost.comm_s, cost.compute_s)
    cost.exposed_by_axis, cost.overlap_chunks = seen.by_axis, seen.chunks
    cost.exposed_comm_s = seen.total_s
    cost.step_s = cost.compute_s + seen.total_s
