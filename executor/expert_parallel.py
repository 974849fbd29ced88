"""Expert parallelism (ep): each MoE layer's routed experts sharded over ep ranks carved out of
dp, tokens exchanged with all-to-alls, as torchtitan does (torchtitan/distributed/expert_parallel.py:
ExpertParallel shards the experts' 3-D weights Shard(0) on the ep mesh; its token dispatch is an
all_to_all_single of the per-expert counts, then of the tokens sorted by expert, and the combine
the reverse all-to-all).

The mechanism is transformers' own (transformers/distributed/expert_parallel.py, 5.x): the model
config's `base_model_ep_plan` names the experts module `ep_dispatch_experts` and its 3-D weights
`grouped_gemm` (Shard(0) on the ep mesh, `num_experts` set to the local count), and
`apply_expert_parallelism` installs `AllToAllEP`, the same dispatch/combine as torchtitan's, with
autograd through the token all-to-alls (`all_to_all_single_autograd`). Both run on gloo.

What this module adds is the data parallelism around it (torchtitan's parallelize_llama):
- the mesh (pp, edp, ep, tp): ep innermost inside dp, so the ep ranks of a group are neighbouring
  dp ranks and dp = edp x ep; dense parts stay data-parallel over all of dp;
- the expert gradients are reduced over the expert-data-parallel group (edp, the ranks holding the
  same experts) only: by hand after DDP (which ignores them), or by FSDP2 on the edp mesh (ZeRO 2/3,
  `fully_shard(experts, mesh=edp)` before the layers', as torchtitan does);
- either way divided by dp, not edp: each rank's loss is scaled by dp / global tokens
  (executor/loss.py items_per_rank), and an expert's gradient already sums the ep group's tokens
  (torchtitan: `set_gradient_divide_factor(fsdp_gradient_divide_factor)`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from executor.mesh import build_mesh
from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.specs import Workload

EP_MESH_DIMS = ("pp", "edp", "ep", "tp")  # outermost first; edp x ep = the Plan's dp (ep innermost)
DISPATCH_STYLE = "ep_dispatch_experts"  # transformers' style of the experts module (its ep plan)


@dataclass(frozen=True)
class ExpertParallel:
    """The expert-parallel part of a prepared model: its mesh and the experts it sharded."""

    mesh: DeviceMesh
    modules: tuple[nn.Module, ...]  # the experts modules (one per MoE layer)
    dp: int

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def edp_mesh(self) -> DeviceMesh:
        return self.mesh["edp"]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for module in self.modules for p in module.parameters()]

    def parameter_names(self, model: nn.Module) -> list[str]:
        """The experts' parameter names in `model` (what DDP must leave alone)."""
        ids = {id(p) for p in self.params}
        return [name for name, p in model.named_parameters() if id(p) in ids]

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """With DDP (ZeRO 0): sum each expert gradient over the edp group, divided by dp (the
        module docstring). FSDP2 reduces them itself; then this does nothing."""
        from torch.distributed.tensor import DTensor

        group = self.edp_mesh.get_group()
        for param in self.params:
            grad = param.grad
            if grad is None or _fsdp_managed(param):
                continue
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            if self.edp_mesh.size() > 1:
                dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            local.div_(self.dp)


def _fsdp_managed(param: nn.Parameter) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) and param.device_mesh.ndim > 1


def expert_dims(config: ParallelConfig, data_ranks: int) -> dict[str, int]:
    """EP_MESH_DIMS with their sizes: the `data_ranks` data-parallel ranks (the Plan's dp; dp x cp
    in the oracle, calibration/fake_model.py) split as edp x ep, ep innermost."""
    return dict(zip(EP_MESH_DIMS, (config.pp, data_ranks // config.ep, config.ep, config.tp)))


def build_ep_mesh(config: ParallelConfig, device: torch.device) -> DeviceMesh:
    """(pp, edp, ep, tp) over the same ranks as executor/mesh.py's (pp, dp, tp): rank =
    ((pp * edp_size + edp) * ep_size + ep) * tp_size + tp, so dp_rank = edp * ep_size + ep."""
    if config.dp % config.ep:
        raise InvalidRequest(f"--ep {config.ep} does not divide dp {config.dp}; plan with an ep that divides dp")
    return build_mesh(device.type, expert_dims(config, config.dp))


def expert_plan(model: nn.Module) -> dict[str, str]:
    """The model's transformers ep plan with each `*` replaced by the layer numbers it matches, one
    entry per parameter or module that exists (dense layers of a partly-MoE model match nothing)."""
    plan = dict(getattr(model, "ep_plan", None) or {})
    if DISPATCH_STYLE not in plan.values():
        raise InvalidRequest(f"{type(model).__name__} has no transformers ep plan with {DISPATCH_STYLE}; plan with --ep 1")
    patterns = [(re.compile(re.escape(key).replace(r"\*", r"\d+")), style) for key, style in plan.items()]
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
    expanded = {name: style for name in names for pattern, style in patterns if pattern.fullmatch(name)}
    # parameters first: transformers' `apply_expert_parallelism` shards them before hooking their module
    return dict(sorted(expanded.items(), key=lambda item: item[1] == DISPATCH_STYLE))


def apply_expert_parallel(model: nn.Module, config: ParallelConfig, device: torch.device) -> ExpertParallel:
    """Shard the routed experts over the ep ranks (every rank built the same full model from the
    same seed: each keeps its own slice, no communication) and install the all-to-all dispatch."""
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    mesh = build_ep_mesh(config, device)
    plan = expert_plan(model)
    apply_expert_parallelism(model, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    modules = tuple(model.get_submodule(name) for name, style in plan.items() if style == DISPATCH_STYLE)
    return ExpertParallel(mesh, modules, config.dp)


def ignore_in_ddp(model: nn.Module, experts: ExpertParallel) -> None:
    """DDP all-reduces over all of dp: the experts (different on each ep rank) are left out of it
    and reduced over edp by `ExpertParallel.reduce_gradients`."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts.parameter_names(model))


def apply_expert_fsdp(experts: ExpertParallel, config: ParallelConfig, workload: Workload) -> None:
    """ZeRO 2/3: each experts module its own FSDP2 unit over the edp mesh (before the layers, which
    then leave its parameters alone), gradients divided by dp (torchtitan's parallelize_llama)."""
    from torch.distributed.fsdp import fully_shard

    from executor.parallelize import mixed_precision_policy

    for module in experts.modules:
        fully_shard(module, mesh=experts.edp_mesh, reshard_after_forward=config.zero == 3,
                    mp_policy=mixed_precision_policy(workload))
        module.set_gradient_divide_factor(float(experts.dp))
        # gloo has no PREMUL_SUM: sum, then divide; not over one rank (edp 1), where FSDP2 runs no
        # collective and sum-then-divide gave wrong gradients accumulated over micro-batches
        if experts.edp_mesh.device_type == "cpu" and experts.edp_mesh.size() > 1:
            module.set_force_sum_reduction_for_comms(True)
