"""Gradient clipping by the global norm over every trainable parameter of the model, whatever the
layout (torchtitan's `dist_utils.clip_grad_norm_`):

- DDP / ZeRO-1: gradients are all-reduced before the step, so the local norm is the global one;
- DDP / ZeRO-1 with TP: torch's TP + DDP recipe (`_pre_dp_module_transform`) turns the DTensor
  parameters into local shards that keep their DTensor spec as `_st_info`; their gradients are
  seen as DTensors of that spec again, so sharded pieces are summed over the tp group;
- FSDP2 and TP: gradients are DTensors; torch's norm of a DTensor is a partial result that
  `full_tensor()` reduces over the DTensor's mesh (sharded pieces summed, replicated ones counted once);
- PP: each rank holds its stages' gradients only, so the squared norms are summed over the pp group.
- EP: the experts' gradients are DTensors sharded over the ep mesh (with FSDP2, over the (edp, ep)
  mesh): each expert is counted once across the ep group, and once per edp replica, which holds the
  same reduced gradient (executor/expert_parallel.py; tests/executor/test_expert_parallel.py compares
  the norms with the single-process run's).

Parameters are grouped by kind (plain tensors, and DTensors per mesh and placements) because
torch's foreach norm cannot mix them (TP without sequence parallelism leaves the norms plain).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

NORM_TYPE = 2.0


def _grad(param: torch.Tensor) -> torch.Tensor | None:
    """The parameter's gradient, as the DTensor it is a shard of when TP + DDP localized the parameter."""
    spec = getattr(param, "_st_info", None)  # torch/distributed/tensor/parallel/ddp.py::_localize_dtensor
    if param.grad is None or spec is None:
        return param.grad
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(param.grad, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def _groups(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The parameters that have a gradient, grouped by the gradient's kind."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        grad = _grad(param)
        if grad is not None:
            groups[(grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None].append(param)
    return list(groups.values())


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor], device: torch.device, pp_group=None) -> torch.Tensor:
    """The 2-norm of all gradients of the model (every rank gets the same fp32 0-dim tensor)."""
    from torch.distributed.tensor import DTensor

    squared = torch.zeros((), dtype=torch.float32, device=device)
    for group in _groups(params):
        norm = torch.nn.utils.get_total_norm([_grad(p) for p in group], NORM_TYPE)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=pp_group)
    return squared.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, device: torch.device,
                    pp_group=None) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most `max_norm` (0: measure only);
    returns the norm before clipping."""
    total = global_grad_norm(params, device, pp_group)
    if max_norm > 0:
        for group in _groups(params):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
