"""The DeviceMesh of a Plan: dims (pp, dp, cp, tp) with TP innermost, then CP, DP and PP
(Megatron's order, so that tensor-parallel peers are neighbouring ranks, i.e. the same node;
torchtitan's ParallelDims puts cp between data and tensor parallelism the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.layout import RANK_ORDER
from planner.plan import ParallelConfig

MESH_DIMS = RANK_ORDER  # the Plan's rank order (planner/layout.py), outermost first


@dataclass(frozen=True)
class Topology:
    mesh: DeviceMesh
    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    config: ParallelConfig
    cp_rank: int = 0

    @cached_property  # flattened once: each _flatten makes its process group
    def dp_mesh(self) -> DeviceMesh:
        """The ranks that shard (FSDP2) or replicate (DDP) the parameters and average gradients:
        dp, or dp x cp flattened with context parallelism (torchtitan's dp_shard_cp mesh: cp ranks
        hold the same weights and each sees part of every sequence)."""
        if self.config.cp == 1:
            return self.mesh["dp"]
        return self.mesh["dp", "cp"]._flatten("dp_cp")

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.mesh["cp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh["pp"].get_group()

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.config.pp - 1

    @property
    def logs_loss(self) -> bool:
        """The ranks whose losses add up to the global loss: last stage, first TP rank (every cp
        rank holds the loss of its part of the sequence)."""
        return self.is_last_stage and self.tp_rank == 0


def coordinates(rank: int, config: ParallelConfig) -> tuple[int, int, int, int]:
    """(pp, dp, cp, tp) of a global rank: rank = ((pp * dp_size + dp) * cp_size + cp) * tp_size + tp."""
    tp_rank = rank % config.tp
    cp_rank = (rank // config.tp) % config.cp
    dp_rank = (rank // (config.tp * config.cp)) % config.dp
    pp_rank = rank // (config.tp * config.cp * config.dp)
    return pp_rank, dp_rank, cp_rank, tp_rank


def build_mesh(device_type: str, dims: dict[str, int]) -> DeviceMesh:
    """The DeviceMesh over all ranks with dims `dims` (name: size, outermost first): consecutive
    ranks differ in the last dim first (init_device_mesh lays the ranks out row-major)."""
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def plan_dims(config: ParallelConfig) -> dict[str, int]:
    """The Plan's mesh dims: MESH_DIMS (pp, dp, cp, tp) with their degrees."""
    return {dim: getattr(config, dim) for dim in MESH_DIMS}


def build_topology(config: ParallelConfig, device: torch.device) -> Topology:
    mesh = build_mesh(device.type, plan_dims(config))
    rank = dist.get_rank()
    pp_rank, dp_rank, cp_rank, tp_rank = coordinates(rank, config)
    assert list(mesh.get_coordinate()) == [pp_rank, dp_rank, cp_rank, tp_rank], (mesh.get_coordinate(), rank)
    return Topology(mesh, rank, pp_rank, dp_rank, tp_rank, config, cp_rank)
