"""One candidate parallel layout and schedule (`PlanPoint`) and the facts every cost model reads off it."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class PlanPoint:
    """One parallel layout and schedule to cost."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    cp_kind: str = "allgather_kv"
    sequence_parallel: bool = True
    micro_batch: int = 1
    accumulation: int = 1
    recompute: str = "none"
    recompute_layers: int = -1
    """With recompute=full: how many blocks recompute (-1 = all)."""
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    grad_sync: str = "last_micro"
    """FSDP with accumulation: reduce every micro-batch (every_micro) or keep unsharded gradients until the
    last (last_micro, FSDP2 no-sync)."""
    overlap: bool = False
    """parallel.overlap: every overlap the engine has (planner/overlap_model.py); CP collectives stacked (one
    K/V all-gather, one q/k/v all-to-all)."""

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def grad_syncs(self) -> int:
        """Gradient reductions (FSDP reduce-scatter / HSDP all-reduce per unit) per optimizer step."""
        return self.accumulation if self.grad_sync == "every_micro" else 1

    @property
    def holds_unsharded_grads(self) -> bool:
        """FSDP no-sync: micro-batches before the last keep each unit's full (tp-local) gradient."""
        return self.grad_sync == "last_micro" and self.accumulation > 1 and uses_fsdp(self)

    def recomputed_blocks(self, layers: int) -> int:
        if self.recompute != "full":
            return 0
        return layers if self.recompute_layers < 0 else min(layers, self.recompute_layers)

    def label(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sp else ''}", f"cp{self.cp}"]
        if self.cp > 1:
            parts[-1] += "-ag" if self.cp_kind == "allgather_kv" else "-uly"
        parts.append(f"fsdp{self.dp_shard}")
        if self.dp_replicate > 1:
            parts.append(f"rep{self.dp_replicate}")
        parts.append(f"mb{self.micro_batch}")
        rc = self.recompute
        if rc == "full" and self.recompute_layers >= 0:
            rc = f"full{self.recompute_layers}"
        parts.append(f"rc:{rc}")
        if self.accumulation > 1 and uses_fsdp(self):
            parts.append("sync:every" if self.grad_sync == "every_micro" else "sync:last")
        if self.overlap:
            parts.append("overlap")
        return " ".join(parts)


def uses_fsdp(plan: PlanPoint) -> bool:
    """Whether FSDP shards or replicates anything (it is applied only then)."""
    return plan.fsdp * plan.dp_replicate > 1


def padded_tokens(tokens: int, plan: PlanPoint) -> int:
    """The sequence padded to a multiple of its shard count (cp, times tp under SP), as the engine pads."""
    shards = plan.cp * (plan.tp if plan.sp else 1)
    return -(-tokens // shards) * shards
