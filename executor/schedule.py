"""The learning-rate schedule: linear warm-up from lr / warmup to lr, then cosine or linear decay
to lr x min_lr_ratio at the last step, or constant; one torch.optim.lr_scheduler.LambdaLR per
optimizer, stepped after every optimizer step, its state saved in checkpoints.

Cosine decay: Loshchilov & Hutter 2017 (SGDR, eq. 5, without restarts), as transformers'
get_cosine_schedule_with_warmup but ending at min_lr_ratio instead of 0 (the Llama 2 recipe: 10 %).
The warm-up counts from 1 (step 0 trains at lr / warmup, not at 0, unlike transformers').
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from planner.errors import InvalidRequest


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise InvalidRequest(f"unknown --lr-schedule {schedule!r}; use cosine, linear or constant")


def build_schedulers(optimizers: list[torch.optim.Optimizer], total_steps: int, warmup_steps: int, schedule: str,
                     min_lr_ratio: float) -> list[LambdaLR]:
    if not 0 <= min_lr_ratio <= 1:
        raise InvalidRequest(f"--min-lr-ratio must be between 0 and 1, got {min_lr_ratio}")
    if warmup_steps < 0:
        raise InvalidRequest(f"--warmup-steps must be 0 or more, got {warmup_steps}")
    factor = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                               min_lr_ratio=min_lr_ratio)
    factor(0)  # an unknown schedule name fails here, before training
    return [LambdaLR(optimizer, factor) for optimizer in optimizers]
