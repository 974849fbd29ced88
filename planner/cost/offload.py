"""Host offload time: the optimizer step on the host CPU and the parameters and gradients that
cross PCIe.

Optimizer offload (ZeRO-Offload, Ren et al. 2021 §4): per step the gradients go to the host
(fp32 with fp32 masters), the host runs the optimizer, the updated parameters come back in the
compute dtype. Parameter offload (FSDP2 CPUOffloadPolicy; DeepSpeed ZeRO-3 offload_param): every
micro-batch streams the rank's parameter shard to the device in forward and again in backward (the
backward's gather also serves recomputation) and moves the gradients back; trained parameters
cross as stored on the host (fp32 masters), frozen ones in the compute dtype, NF4 ones (QLoRA) as
NF4 — 0.5 B a weight, not nothing.

The host side is shared by the node's GPUs: its cores and its memory bandwidth are divided by the
devices per node. The host step is the slower of its memory traffic (bandwidth) and its
arithmetic (cores x a measured per-core Adam rate; planner/presets/host_adam.json): DeepSpeed's
CPU Adam for ZeRO-Offload, torch's AdamW on CPU tensors (fused, or the for-loop) for FSDP2's offload. A PCIe transfer also
reads or writes host memory once: its rate is the slower of the device's link and its share of
host memory bandwidth.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context, Regime
from planner.cost.memory import NF4_BYTES_PER_PARAM, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS

FP32 = 4
HOST_ADAM_FILE = Path(__file__).resolve().parents[1] / "presets" / "host_adam.json"


@cache
def host_adam_rates() -> dict[str, float]:
    """Adam parameters updated per second per host core, by implementation (measured, with sources)."""
    data = json.loads(HOST_ADAM_FILE.read_text())
    return {name: float(entry["params_per_s_per_core"]) for name, entry in data["implementations"].items()}


def host_cores_per_device(ctx: Context) -> float:
    return ctx.hardware.host_cpu_cores_per_node / ctx.cluster.devices_per_node


def host_memory_bytes_per_s(ctx: Context) -> float:
    """This device's share of the node's host memory bandwidth, at the profile's memory efficiency."""
    hw = ctx.hardware
    return hw.host_memory_bandwidth_bytes_per_s * ctx.compute_params.memory_efficiency / ctx.cluster.devices_per_node


def pcie_seconds(ctx: Context, nbytes: np.ndarray) -> np.ndarray:
    link = ctx.profile.link("pcie")
    rate = min(ctx.hardware.pcie_bandwidth_bytes_per_s * link.efficiency, host_memory_bytes_per_s(ctx))
    return nbytes / rate + link.latency_s


def host_step_seconds(ctx: Context, c: Candidates, params: np.ndarray, step_bytes_per_param: float) -> np.ndarray:
    """The optimizer step on the host over `params` local parameters: memory- or core-bound."""
    memory_s = params * step_bytes_per_param / host_memory_bytes_per_s(ctx)
    rates = host_adam_rates()
    # ZeRO-Offload steps with DeepSpeed's CPU Adam; FSDP2's offload with torch's AdamW on CPU tensors,
    # fused when asked for, else the for-loop (torch takes foreach only for CUDA tensors)
    torch_rate = rates["torch_adamw_cpu_fused" if ctx.workload.optimizer_impl == "fused" else "torch_adamw_cpu"]
    rate = np.where(c.offload == OFFLOAD_OPTIMIZER, rates["deepspeed_cpu_adam"], torch_rate)
    if ctx.workload.optimizer == "sgd":
        rate = rate * 3  # a third of Adam's arithmetic per parameter (no moments)
    compute_s = params / (rate * host_cores_per_device(ctx))
    return np.maximum(memory_s, compute_s)


def streamed_bytes(ctx: Context, regime: Regime, c: Candidates, worst: dict[str, np.ndarray],
                   local_trainable: np.ndarray) -> dict[str, np.ndarray]:
    """PCIe bytes per step: `step` (optimizer offload: gradients out, parameters back) and
    `micro_batch` (parameter offload, each micro-batch)."""
    cb = regime.numerics.compute_bytes
    master = FP32 if ctx.workload.master_dtype == "fp32" else cb
    fsdp = c.zero >= 2
    ranks = np.where(fsdp, c.data_ranks, 1)

    def shard(key: str) -> np.ndarray:
        return np.where(fsdp, worst[f"{key}_full"], worst[key]) / ranks

    per_micro = (shard("trainable") * (2 * master + master)  # gathered in forward and backward; its gradient back
                 + shard("frozen") * 2 * cb + shard("quantized") * 2 * NF4_BYTES_PER_PARAM)
    return {"step": local_trainable * (master + cb), "micro_batch": per_micro}


def offload_seconds(ctx: Context, regime: Regime, c: Candidates, worst: dict[str, np.ndarray],
                    local_trainable: np.ndarray, compute_s: np.ndarray) -> np.ndarray:
    """Exposed PCIe time of offload per step. A share (profile overlap `offload`) of the traffic is
    prefetched behind compute, never more than the step's compute."""
    moved = streamed_bytes(ctx, regime, c, worst, local_trainable)
    step = pcie_seconds(ctx, moved["step"])
    params = c.num_micro_batches * pcie_seconds(ctx, moved["micro_batch"])
    traffic = np.select([c.offload == OFFLOAD_OPTIMIZER, c.offload == OFFLOAD_PARAMS], [step, params], 0.0)
    hidden = np.minimum(ctx.profile.overlap("offload") * traffic, compute_s)
    return traffic - hidden
