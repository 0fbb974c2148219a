"""The trainer's one handle on parallelism: data slicing, sequence sharding, gradient sync, norms.

The training loop calls these hooks at fixed points; in a single process they are identities, and the
distributed runtime (built from the device mesh) implements the same interface.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from megagen.parallel.overlap_schedule import overlap_on


class LocalRuntime:
    """One process, no mesh: every hook is the identity."""

    world_size = 1
    rank = 0
    dp_rank = 0
    dp_size = 1
    is_logging_rank = True

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def parallelize(
        self, model: nn.Module, plan, parallel, recompute: str = "none", recompute_layers: int = -1
    ) -> nn.Module:
        """Recompute, compile and low-precision compute as `parallel` (the `cfg.parallel` section) and
        `train.recompute` / `train.recompute_layers` ask; no sharding in one process."""
        from megagen.parallel.recompute import apply_recompute

        apply_recompute(model, plan.blocks, recompute, layers=recompute_layers)
        if parallel.compile:
            for block in model.get_submodule(plan.blocks):
                block.compile(backend=parallel.compile_backend)
        from megagen.parallel.precision import autocast_forward

        autocast_forward(model, parallel.param_dtype, self.device)
        return model

    def shard_targets(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return target, None

    def finish_grads(self, model: nn.Module) -> None:
        """Complete gradients after the last backward of a step (nothing to do in one process)."""

    def set_grad_sync(self, model: nn.Module, last_micro: bool) -> None:
        """Called before each micro-batch: whether it is the step's last (gradients must be complete after
        it). Under FSDP, `parallel.grad_sync` decides whether earlier micro-batches reduce too."""

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def clip_grads(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Scale gradients so the global norm is at most `max_norm`; returns the norm before clipping."""
        norm = self.grad_norm(params)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        value = float(norm)
        return value if math.isfinite(value) else float("nan")

    def global_loss(self, local_sum: torch.Tensor) -> float:
        """The step's loss over all ranks, already normalised by the global token count."""
        return float(local_sum)

    def comm_counter(self):
        return None

    def collective_progress(self):
        """Per-group collective counts for the step watchdog (none in one process)."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work, so step timers measure the work and not its launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sum_over_sequence_shards(self, local_sum: torch.Tensor) -> float:
        """Sum a quantity computed on this rank's sequence shard over the shards (identity here)."""
        return float(local_sum)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedRuntime(LocalRuntime):
    """The runtime on a device mesh (torchrun / several processes): same hooks, real collectives."""

    def __init__(self, parallel, *, launch=None, flight_recorder: bool = False):
        """`parallel`: the `cfg.parallel` section. `launch`: a `preflight.LaunchCheck` every rank must agree
        on (None skips the check). `flight_recorder`: record collectives so the step watchdog can name the
        one a stuck rank waits for. `megagen.runtime_setup.distributed_runtime` fills these from a config."""
        import torch.distributed as dist

        from megagen.parallel.mesh import Mesh, ParallelDims, device_and_backend

        # FSDP2 warns that the root returns a view; nothing in megagen writes to the output in place.
        warnings.filterwarnings("ignore", message=r".*returned a view tensor.*")
        device, backend = device_and_backend(parallel.backend)
        self._owns_group = not dist.is_initialized()
        if not dist.is_initialized():
            if flight_recorder:
                from megagen.parallel.progress import enable_flight_recorder

                enable_flight_recorder()
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        super().__init__(device)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        p = parallel
        self.dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, self.world_size)
        self.mesh = Mesh(self.dims, device.type)
        self.dp_rank, self.dp_size = self.mesh.local_rank("dp"), self.dims.dp
        self.is_logging_rank = self.rank == 0
        self.sequence_parallel = p.sequence_parallel and self.dims.tp > 1
        self.grad_sync = p.grad_sync
        self.overlap = overlap_on(p.overlap, device.type)
        self.state = None
        self.partial_sum = None
        """`BucketedPartialSum` when `parallel.overlap` launches the engine's gradient sums in backward."""
        self.preflight = None
        if launch is not None:
            from megagen.parallel.preflight import preflight

            self.preflight = preflight(launch, self.mesh.axis_groups(), device)

    def parallelize(
        self, model: nn.Module, plan, parallel, recompute: str = "none", recompute_layers: int = -1
    ) -> nn.Module:
        from megagen.parallel.parallelize import parallelize

        self.state = parallelize(model, plan, self.mesh, parallel, recompute, recompute_layers)
        return model

    @property
    def loss_scale(self) -> float:
        """Undo FSDP's averaging where this torch cannot be told to sum (`grad_reduction` rule 3)."""
        from megagen.parallel.grad_reduction import fsdp_average_undo

        if self.state is None:
            return 1.0
        fsdp_ranks = self.dims.fsdp * self.dims.dp_replicate
        return fsdp_average_undo(fsdp_ranks, self.state.fsdp, self.state.grads_summed)

    def shard_targets(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.state.sharder.shard_targets(target)

    def set_grad_sync(self, model: nn.Module, last_micro: bool) -> None:
        from megagen.parallel.fsdp import set_gradient_sync

        set_gradient_sync(model, last_micro or self.grad_sync == "every_micro")
        if self.partial_sum is None and self.overlap and self.state.engine_sums:
            from megagen.parallel.grad_reduction import BucketedPartialSum

            # Made here, not in parallelize: the model is materialised (new parameters) in between. Under
            # FSDP the hooks sit on the sharded parameters; FSDP runs them after each unit's reduce-scatter.
            self.partial_sum = BucketedPartialSum(model, self.state.engine_sums, self.mesh.group)
        if self.partial_sum is not None:
            self.partial_sum.arm(last_micro)  # the engine sums accumulated gradients once, as sum_partial

    def finish_grads(self, model: nn.Module) -> None:
        """Sum the partial gradients FSDP does not sum, one all-reduce per axis (`grad_reduction` rule 2);
        with overlap, wait for the buckets backward launched."""
        if not self.state.engine_sums:
            return
        if self.partial_sum is not None:
            self.partial_sum.finish()
            return
        from megagen.parallel.grad_reduction import sum_partial

        sum_partial(model, self.state.engine_sums, self.mesh.group)

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The global grad norm, each distinct element counted once (`grad_reduction` rule 4)."""
        import torch.distributed as dist

        from megagen.parallel.comm import comm_axis
        from megagen.parallel.grad_reduction import grad_norm_squared

        total = grad_norm_squared(params, self.world_size, self.device)
        with comm_axis("world"):
            dist.all_reduce(total)
        return total.sqrt().float()

    def clip_grads(self, params: list[nn.Parameter], max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        norm = self.grad_norm(params)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    g.mul_(coef.to(g.dtype))
        value = float(norm)
        return value if math.isfinite(value) else float("nan")

    def global_loss(self, local_sum: torch.Tensor) -> float:
        """Sum over all ranks; tp ranks without SP computed the same tokens, so count them once."""
        import torch.distributed as dist

        from megagen.parallel.comm import comm_axis
        from megagen.parallel.grad_reduction import loss_copies

        total = local_sum.detach().clone().double()
        with comm_axis("world"):
            dist.all_reduce(total)
        return float(total) / loss_copies(self.dims.tp, self.sequence_parallel) / self.loss_scale

    def sum_over_sequence_shards(self, local_sum: torch.Tensor) -> float:
        """Every dp rank computed the same samples: sum over all ranks, then count each replica once."""
        import torch.distributed as dist

        from megagen.parallel.comm import comm_axis
        from megagen.parallel.grad_reduction import loss_copies

        total = local_sum.detach().clone().double()
        with comm_axis("world"):
            dist.all_reduce(total)
        return float(total) / (self.dims.dp * loss_copies(self.dims.tp, self.sequence_parallel))

    def comm_counter(self):
        """A collective counter keyed by mesh axis (FSDP's traffic is named by its process group)."""
        from megagen.parallel.comm import CommCounter

        return CommCounter(self.mesh.axis_groups(), keep_records=False)

    def collective_progress(self):
        """What this rank has issued per mesh axis and world, and what it waits for (see progress.py)."""
        import torch.distributed as dist

        from megagen.parallel.progress import CollectiveProgress

        return CollectiveProgress({**self.mesh.axis_groups(), "world": dist.group.WORLD})

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self._owns_group:
            dist.destroy_process_group()
