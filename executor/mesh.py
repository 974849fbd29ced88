"""The DeviceMesh of a Plan: dims (pp, dp, tp) with TP innermost, then DP, then PP (Megatron's
order, so that tensor-parallel peers are neighbouring ranks, i.e. the same node)."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

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
        """One rank per data-parallel replica contributes the loss: last stage, first TP rank."""
        return self.is_last_stage and self.tp_rank == 0


def coordinates(rank: int, config: ParallelConfig) -> tuple[int, int, int]:
    """(pp, dp, tp) of a global rank: rank = (pp * dp_size + dp) * tp_size + tp."""
    tp_rank = rank % config.tp
    dp_rank = (rank // config.tp) % config.dp
    pp_rank = rank // (config.tp * config.dp)
    return pp_rank, dp_rank, tp_rank


def build_topology(config: ParallelConfig, device: torch.device) -> Topology:
    mesh = init_device_mesh(device.type, (config.pp, config.dp, config.tp), mesh_dim_names=MESH_DIMS)
    rank = dist.get_rank()
    pp_rank, dp_rank, tp_rank = coordinates(rank, config)
    assert list(mesh.get_coordinate()) == [pp_rank, dp_rank, tp_rank], (mesh.get_coordinate(), rank)
    return Topology(mesh, rank, pp_rank, dp_rank, tp_rank, config)
