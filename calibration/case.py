"""A measured run as calibration sees it (Case: a published case or a stored run), the planner
Request it becomes, and the floors any claim must clear: its FLOP/s as a share of the devices'
peak, and the memory its own configuration certainly holds. Below cases.py (which adapts the
published rows, using these floors) and validate.py (which predicts and compares). Pure Python: no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from planner.api import Request, predict
from planner.errors import PlannerError
from planner.graph import count_params, numerics_for
from planner.hardware import load_hardware
from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload


@dataclass
class Case:
    id: str
    source: str
    model: str
    spec: ModelSpec | None = None
    hardware: str | None = None
    devices: int = 0
    devices_per_node: int | None = None
    workload: Workload | None = None
    config: ParallelConfig | None = None
    tokens_per_s_per_device: float | None = None
    memory_bytes: float | None = None
    memory_kind: str = "reserved"  # reserved | allocated (what the source's number counts)
    memory_upper_bound_bytes: float | None = None
    tflops_per_device: float | None = None  # as published (may count recomputation)
    claimed_tokens_per_s_per_device: float | None = None  # what the source claims, plausible or not
    excluded: str | None = None
    assumptions: list[str] = field(default_factory=list)
    framework: str = ""
    # bitsandbytes' paged optimizers keep their states in CUDA managed memory, which the driver
    # evicts to host memory when the device runs short: a run that ran held at most the rest
    paged_optimizer: bool = False

    @property
    def usable(self) -> bool:
        return self.excluded is None and self.spec is not None and self.config is not None

    @property
    def publication(self) -> str:
        """The publication a case comes from (its document, without table / row / commit detail):
        what leave-one-source-out holds out together and what errors are grouped by."""
        return re.split(r" — | \(|, '", self.source)[0].strip()

    @property
    def hardware_name(self) -> str:
        return getattr(self.hardware, "name", self.hardware) or "?"


def request_for(case: Case, calibration: str | None = None) -> Request:
    return Request(model=case.spec, gpu=case.hardware, gpus=case.devices, gpus_per_node=case.devices_per_node,
                   workload=case.workload, calibration=calibration)


def memory_floor_bytes(case: Case) -> float | None:
    """Bytes a single-device run certainly holds at the end of its forward pass, whatever the
    framework: the weights as stored (the planner's parameter bytes: bf16, NF4, fp32 masters),
    every layer's input (each recompute policy keeps at least that until backward, unless it is
    offloaded to the host) and the model's output logits (all of torchtune's chunks are alive
    together). A claimed peak below it did not come from the configuration stated. Sharded runs
    are not checked. None when the case cannot be predicted."""
    if case.spec is None or case.workload is None or case.config is None or case.devices != 1:
        return None
    try:
        weights = predict(request_for(case), case.config)["memory"]["breakdown"]["params"]
    except PlannerError:
        return None
    w, spec = case.workload, case.spec
    numerics = numerics_for(w, params_sharded=False)  # the dtypes of the residual stream and logits
    tokens = case.config.micro_batch_size * w.seq_len
    layer_inputs = 0 if w.activation_offload else spec.num_layers * tokens * spec.hidden_size * numerics.residual_bytes
    logits = tokens * spec.vocab_size * (4 if w.fp32_logits else numerics.compute_bytes)
    return float(weights + layer_inputs + logits)


def fraction_of_peak(case: Case, flops_per_param: float) -> float:
    """The share of the devices' peak (bf16, else their highest) that the claimed tokens/s needs at
    `flops_per_param` FLOPs per parameter per token (6: forward and backward, Kaplan et al. 2020)."""
    peak_flops = load_hardware(case.hardware).peak_flops
    peak = peak_flops.get("bf16") or max(peak_flops.values())
    return flops_per_param * count_params(case.spec) * (case.claimed_tokens_per_s_per_device or 0.0) / peak
