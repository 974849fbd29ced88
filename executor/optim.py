"""The optimizer the Plan names, exactly: torch AdamW with the Plan's implementation (foreach,
fused, or the for-loop), plain SGD (no momentum: no state, as the planner counts it), bitsandbytes
8-bit AdamW; wrapped in ZeroRedundancyOptimizer for ZeRO-1, or one optimizer per parameter
stepped from its post-accumulate-grad hook (optimizer_in_backward, torchtune's recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from planner.plan import ParallelConfig
from planner.specs import Workload

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, also the Hugging Face Trainer's
ADAM_EPS = 1e-8


@dataclass
class Optimizers:
    """What the training loop steps: one optimizer, or per-parameter ones run inside backward."""

    main: torch.optim.Optimizer | None
    in_backward: list[torch.optim.Optimizer] = field(default_factory=list)
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = field(default_factory=list)  # executor/schedule.py

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.main] if self.main is not None else self.in_backward

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for optimizer in self.all for group in optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.all[0].param_groups[0]["lr"])

    def step(self) -> None:
        """The optimizer step (unless it ran inside backward), then the schedule's."""
        if self.main is not None:
            self.main.step()
            self.main.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()

    def extra_state(self) -> dict:
        """What a checkpoint keeps besides the optimizer state: the schedule's position."""
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_extra_state(self, state: dict) -> None:
        for scheduler, saved in zip(self.schedulers, state.get("schedulers", [])):
            scheduler.load_state_dict(saved)
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr

    @property
    def is_zero1(self) -> bool:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return isinstance(self.main, ZeroRedundancyOptimizer)


def optimizer_class_and_options(workload: Workload, lr: float, weight_decay: float) -> tuple[type, dict]:
    if workload.optimizer == "sgd":
        impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}
        return torch.optim.SGD, {"lr": lr, "momentum": 0.0, "weight_decay": weight_decay, **impl[workload.optimizer_impl]}
    if workload.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit, {"lr": lr, "betas": ADAM_BETAS, "eps": ADAM_EPS, "weight_decay": weight_decay}
    impl = {"foreach": {"foreach": True, "fused": False}, "fused": {"fused": True},
            "forloop": {"foreach": False, "fused": False}}[workload.optimizer_impl]
    return torch.optim.AdamW, {"lr": lr, "betas": ADAM_BETAS, "eps": ADAM_EPS, "weight_decay": weight_decay, **impl}


def build_optimizers(params: list[nn.Parameter], workload: Workload, config: ParallelConfig, dp_group,
                     lr: float, weight_decay: float) -> Optimizers:
    cls, options = optimizer_class_and_options(workload, lr, weight_decay)
    if workload.optimizer_in_backward:
        return Optimizers(None, _in_backward(params, cls, options))
    groups = parameter_groups(params)
    if config.zero == 1 and config.dp * config.cp > 1:  # over one rank ZeRO-1 is the plain optimizer
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return Optimizers(ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=dp_group, **options))
    return Optimizers(cls(groups, **options))


def parameter_groups(params: list[nn.Parameter]) -> list[dict]:
    """DTensor (tensor-parallel) and plain parameters in separate groups: the foreach and fused
    kernels run per group and refuse to mix the two kinds."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    return [{"params": group} for group in (sharded, plain) if group]


def _in_backward(params: list[nn.Parameter], cls: type, options: dict) -> list[torch.optim.Optimizer]:
    """Step and free each gradient as soon as it is accumulated (PyTorch tutorial
    'How to save memory by fusing the optimizer step into the backward pass')."""
    optimizers = []
    for param in params:
        optimizer = cls([param], **options)

        def hook(p: torch.Tensor, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        param.register_post_accumulate_grad_hook(hook)
        optimizers.append(optimizer)
    return optimizers
