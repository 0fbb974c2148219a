"""The device mesh: one object owns its construction, validation and every derived mesh.

Axes outermost → innermost: `dp_replicate, dp_shard, cp, tp` (tp innermost = inside a node). Derived:
`dp` (ranks sharing a dp index get the same batch) and `dp_shard_cp` (parameters are identical over cp,
so FSDP shards over dp_shard × cp). "axis" names a mesh axis; "dim" is a tensor dimension.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megagen.errors import ConfigError

AXES = ("dp_replicate", "dp_shard", "cp", "tp")


class MeshError(ConfigError):
    """Mesh sizes that cannot work with this world; names the config keys involved."""


@dataclass(frozen=True)
class ParallelDims:
    """Resolved axis sizes (dp_shard = -1 already replaced by the rest of the world)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, cp: int, tp: int, world_size: int) -> ParallelDims:
        """Fill `dp_shard=-1` and check that the sizes multiply to the world size."""
        for key, size in (("parallel.dp_replicate", dp_replicate), ("parallel.cp", cp), ("parallel.tp", tp)):
            if size < 1:
                raise MeshError(key, f"got {size}; must be >= 1")
        others = dp_replicate * cp * tp
        if dp_shard == -1:
            if world_size % others:
                raise MeshError(
                    "parallel",
                    f"world size {world_size} is not divisible by dp_replicate*cp*tp = "
                    f"{dp_replicate}*{cp}*{tp} = {others}",
                )
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise MeshError("parallel.dp_shard", f"got {dp_shard}; use a positive size or -1")
        if dp_replicate * dp_shard * cp * tp != world_size:
            raise MeshError(
                "parallel",
                f"dp_replicate*dp_shard*cp*tp = {dp_replicate}*{dp_shard}*{cp}*{tp} = "
                f"{dp_replicate * dp_shard * cp * tp} does not equal the world size {world_size}",
            )
        return cls(dp_replicate, dp_shard, cp, tp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Size of the FSDP shard group (dp_shard × cp)."""
        return self.dp_shard * self.cp

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}


def device_and_backend(choice: str = "auto") -> tuple[torch.device, str]:
    """nccl + the local CUDA device when GPUs exist, else gloo + cpu (or what the config forces)."""
    use_cuda = torch.cuda.is_available() if choice == "auto" else choice == "nccl"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(
            "parallel.backend", "nccl needs a CUDA GPU and this machine has none usable; use gloo or auto"
        )
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


class Mesh:
    """The world DeviceMesh and its derived meshes / process groups."""

    def __init__(self, dims: ParallelDims, device_type: str):
        self.dims = dims
        self.device_type = device_type
        self.world = init_device_mesh(device_type, tuple(dims.sizes().values()), mesh_dim_names=AXES)
        self.dp = self.world["dp_replicate", "dp_shard"]._flatten("dp")
        self.dp_shard_cp = self.world["dp_shard", "cp"]._flatten("dp_shard_cp")

    def __getitem__(self, axis: str) -> DeviceMesh:
        if axis == "dp":
            return self.dp
        if axis == "dp_shard_cp":
            return self.dp_shard_cp
        return self.world[axis]

    def group(self, axis: str) -> dist.ProcessGroup:
        return self[axis].get_group()

    def local_rank(self, axis: str) -> int:
        return self[axis].get_local_rank()

    def axis_groups(self) -> dict[str, dist.ProcessGroup]:
        """Every named axis (and derived mesh) → its process group, for communication accounting.

        Where two axes share a group, the first name wins: FSDP's (unscoped) collectives are on
        dp_shard_cp / dp_replicate; the engine names the axis of its own collectives explicitly.
        """
        names = ("dp_shard_cp", "dp_replicate", "dp_shard", "cp", "tp", "dp")
        return {n: self.group(n) for n in names}

    def fsdp_mesh(self) -> DeviceMesh:
        """1-D dp_shard×cp mesh, or 2-D (dp_replicate, dp_shard×cp) for HSDP."""
        if self.dims.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard_cp"]
        return self.dp_shard_cp
