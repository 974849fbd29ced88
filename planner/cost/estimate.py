"""Evaluate candidates: memory and step time with their breakdowns (never a bare float).

Step time of 1F1B over p stages with m micro-batches, the slowest stage setting the pace:
  m·(forward + backward + recompute + exposed TP comm)   [compute, recompute, tp_comm]
  + m·(exposed ring attention, MoE all-to-alls)          [cp_comm, ep_comm] (planner/cost/cpep.py)
  + fill/drain of the other stages                       [pp_bubble]
  + exposed pipeline sends                               [pp_comm]
  + exposed data-parallel / ZeRO collectives             [dp_comm]
  + the optimizer step and host offload traffic          [optimizer, offload]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.cost import comm
from planner.cost.candidates import Candidates
from planner.cost.compute import FLOAT8_BYTES, model_flops_per_token, part_times
from planner.cost.cpep import cp_seconds, ep_seconds
from planner.cost.context import ROLES, Context, Regime, StageLayout, stage_layout
from planner.cost.memory import CATEGORIES, memory_breakdown, reduce_bytes, stage_params
from planner.cost.moments import MOMENTS
from planner.cost.offload import host_step_seconds, offload_seconds
from planner.cost.schedule import pipeline_seconds
from planner.cost.stages import role_layers

DDP_BUCKET_BYTES = 25 * 2**20
TIME_CATEGORIES = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_bubble", "pp_comm", "dp_comm",
                   "optimizer", "offload")
# Bytes an optimizer step reads and writes per parameter (torch.optim implementations):
# AdamW reads p, g, m, v and writes p, m, v (28 B in fp32); foreach / for-loop also write and read
# the sqrt(v) temporary (+8 B); 8-bit AdamW keeps 1-byte moments; SGD without momentum reads p, g, writes p.
OPTIMIZER_STEP_BYTES = {("adamw", "fused"): 28.0, ("adamw", "foreach"): 36.0, ("adamw", "forloop"): 36.0,
                        ("adamw8bit", "*"): 16.0, ("sgd", "*"): 12.0}


@dataclass
class Estimates:
    candidates: Candidates
    memory: dict[str, np.ndarray]
    time: dict[str, np.ndarray]
    step_s: np.ndarray
    tokens_per_s: np.ndarray
    mfu: np.ndarray
    fits: np.ndarray
    host_fits: np.ndarray
    fits_with_margin: np.ndarray

    def prediction(self, ctx: Context, i: int) -> dict[str, Any]:
        """The INTERFACE.md prediction object for candidate i."""
        config = self.candidates.config(i)
        devices = ctx.cluster.num_devices
        reason = None
        if not self.fits[i]:
            reason = (f"needs {self.memory['reserved'][i] / 2**30:.1f} GiB per device, "
                      f"{ctx.hardware.name} has {ctx.hardware.memory_bytes / 2**30:.1f} GiB")
        elif not self.host_fits[i]:
            reason = (f"offload needs {self.memory['host'][i] * ctx.cluster.devices_per_node / 2**30:.0f} GiB of host "
                      f"memory per node, the node has {ctx.hardware.host_memory_bytes_per_node / 2**30:.0f} GiB")
        uncalibrated = ctx.uncalibrated
        memory_range = _range(ctx.profile.log_interval("memory", ctx.hardware.vendor, uncalibrated),
                              self.memory["reserved"][i])
        tps_range = _range(ctx.profile.log_interval("throughput", uncalibrated=uncalibrated), self.tokens_per_s[i])
        return {
            "fits": bool(self.fits[i] and self.host_fits[i]),
            "fits_with_margin": bool(self.fits_with_margin[i] and self.host_fits[i]),
            "reason": reason,
            "config": {**config.to_dict(), "optimizer_impl": ctx.workload.optimizer_impl},
            "memory": {
                "peak_bytes": int(self.memory["reserved"][i]),
                "allocated_peak_bytes": int(self.memory["allocated"][i]),
                "capacity_bytes": int(ctx.hardware.memory_bytes),
                "peak_bytes_range": memory_range and [int(v) for v in memory_range],
                "memory_margin": ctx.memory_margin,
                "peak_phase": "optimizer-step" if self.memory["in_step"][i] else "forward-backward",
                "peak_at": MOMENTS[int(self.memory["peak_moment"][i])],
                "moments": {m: int(self.memory[f"moment:{m}"][i]) for m in MOMENTS},
                "host_bytes_per_device": int(self.memory["host"][i]),
                "breakdown": {k: int(self.memory[k][i]) for k in (*CATEGORIES, "overhead")},
            },
            "time": {
                "step_s": float(self.step_s[i]),
                "tokens_per_s": float(self.tokens_per_s[i]),
                "tokens_per_s_range": tps_range,
                "tokens_per_s_per_device": float(self.tokens_per_s[i] / devices),
                "mfu": float(self.mfu[i]),
                "breakdown": {k: float(self.time[k][i]) for k in TIME_CATEGORIES},
            },
        }


def _range(log_interval: tuple[float, float] | None, value: float) -> list[float] | None:
    """An ~80 % interval: value × exp(quantiles of log(measured / predicted)) (calibration/crossval.py)."""
    if log_interval is None:
        return None
    return [float(value * np.exp(log_interval[0])), float(value * np.exp(log_interval[1]))]


def evaluate(ctx: Context, c: Candidates) -> Estimates:
    """Cost every candidate; the two numerics regimes (autocast / parameters in the compute dtype)
    are evaluated separately and merged."""
    sharded = c.zero >= 2
    parts = []
    for flag in (False, True):
        index = np.nonzero(sharded == flag)[0]
        if len(index):
            parts.append((index, _evaluate_regime(ctx, flag, c.take(index))))
    n = len(c)
    merged_memory = {k: np.zeros(n, dtype=parts[0][1][0][k].dtype) for k in parts[0][1][0]}
    merged_time = {k: np.zeros(n) for k in TIME_CATEGORIES}
    for index, (memory, time) in parts:
        for k in merged_memory:
            merged_memory[k][index] = memory[k]
        for k in merged_time:
            merged_time[k][index] = time[k]
    step = sum(merged_time[k] for k in TIME_CATEGORIES)
    tokens_per_s = ctx.workload.tokens_per_step / step
    flops = model_flops_per_token(ctx, ctx.regime(False))
    mfu = flops * tokens_per_s / (ctx.cluster.num_devices * ctx.mfu_peak_flops)
    # invariants, not user errors: inputs are bounded and finite where they enter (planner/validity.py)
    assert np.all(np.isfinite(step) & (step > 0)), f"step time not finite and positive: {step[~(step > 0)][:3]}"
    assert np.all((mfu > 0) & (mfu <= 1)), f"MFU outside (0, 1]: {mfu[~((mfu > 0) & (mfu <= 1))][:3]}"
    assert np.all(np.isfinite(merged_memory["reserved"])), "a memory prediction that is not finite"
    fits = merged_memory["reserved"] <= ctx.hardware.memory_bytes
    host_fits = merged_memory["host"] * ctx.cluster.devices_per_node <= ctx.hardware.host_memory_bytes_per_node
    with_margin = merged_memory["reserved"] * (1 + ctx.memory_margin) <= ctx.hardware.memory_bytes
    return Estimates(c, merged_memory, merged_time, step, tokens_per_s, mfu, fits, host_fits, with_margin)


def _evaluate_regime(ctx: Context, params_sharded: bool, c: Candidates):
    layout = stage_layout(ctx.spec.num_layers, c)
    memory = memory_breakdown(ctx, ctx.memory_regime(params_sharded), c, layout)
    return memory, step_time(ctx, ctx.regime(params_sharded), c, layout)


def step_time(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout) -> dict[str, np.ndarray]:
    layer = part_times(ctx, regime.layer, c)
    # a stack of several kinds of layer: each stage role runs its own mix (planner/cost/stages.py)
    by_role = {role: layer if part is regime.layer else part_times(ctx, part, c)
               for role, part in role_layers(regime, layout, ctx.spec.num_layers).items()}
    emb = part_times(ctx, regime.embedding, c)
    head = part_times(ctx, regime.head, c, loss_vocab=ctx.spec.vocab_size)
    tp_layer = _tp_seconds(ctx, regime, c)
    m = c.num_micro_batches
    full = c.recompute == 2  # re-runs the forward's ring attention and all-to-alls
    ring = cp_seconds(ctx, regime, c)
    cp_work = ring["forward_work"] + ring["backward_work"]
    cp_layer = ring["forward_comm"] * (1 + full) + ring["backward_comm"]
    ep_layer = ep_seconds(ctx, regime, c) * (4 + 2 * full)

    def stage(role: str) -> dict[str, np.ndarray]:
        n = layout.layers[role]
        e, h = layout.has_embedding[role], layout.has_head[role]
        mine = by_role[role]
        work = {"compute": n * (mine.forward + mine.backward) + e * (emb.forward + emb.backward)
                + h * (head.forward + head.backward) + n * cp_work,
                "recompute": n * (mine.recompute + full * ring["forward_work"]),
                "tp_comm": (n + e + h) * tp_layer * _tp_recompute_factor(c),
                "cp_comm": n * cp_layer, "ep_comm": n * ep_layer}
        work["total"] = work["compute"] + work["recompute"] + work["tp_comm"] + work["cp_comm"] + work["ep_comm"]
        return work

    stages = {role: stage(role) for role in ROLES}
    slowest = stages["first"]
    for role in ("middle", "last"):
        wins = layout.exists[role] & (stages[role]["total"] > slowest["total"])
        slowest = {k: np.where(wins, stages[role][k], slowest[k]) for k in slowest}
    per_layer_total = (layer.forward + layer.backward + layer.recompute + tp_layer + cp_work + cp_layer + ep_layer
                       + full * ring["forward_work"])
    stage_sum = (ctx.spec.num_layers * per_layer_total + emb.forward + emb.backward + head.forward
                 + head.backward + 2 * tp_layer)
    steady, bubble = pipeline_seconds(stage_sum, slowest["total"], m, c.vpp)
    times = {k: m * slowest[k] for k in ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm")}
    times["pp_bubble"] = np.where(c.pp > 1, bubble, 0.0)
    times["pp_comm"] = _pp_seconds(ctx, regime, c)
    worst = _largest_stage_params(ctx, regime, c, layout)
    times["dp_comm"] = _dp_seconds(ctx, regime, c, layout, worst, slowest)
    times["optimizer"], times["offload"] = _optimizer_seconds(ctx, regime, c, worst, slowest)
    return times


def _tp_recompute_factor(c: Candidates) -> np.ndarray:
    """TP traffic with recomputation over without. Full recomputation re-runs the forward's
    collectives (half of the layer's). Selective (torchtitan's per-op policy,
    distributed/activation_checkpoint.py) saves reduce-scatter outputs but not all-gathers or
    all-reduces, so the recompute pass gathers again (a quarter of the layer's traffic under
    sequence parallelism) or all-reduces again (half of it without)."""
    selective = np.where(c.sequence_parallel, 1.25, 1.5)
    return np.select([c.recompute == 2, c.recompute == 1], [1.5, selective], 1.0)


def _tp_seconds(ctx: Context, regime: Regime, c: Candidates) -> np.ndarray:
    """Megatron TP: per layer two all-reduces of the activations forward and two backward
    (Shoeybi et al. 2019 §3); sequence parallelism swaps each for an all-gather + reduce-scatter
    of the same volume (Korthikanti et al. 2022 §4.2.2). Exposed unless overlapped.
    Float8 TP casts before it gathers (torchao float8_tensor_parallel.py: PrepareFloat8ModuleInput
    and Float8ColwiseParallel forward, Float8RowwiseParallel's output gradient; torchtitan's
    apply_tp with tensorwise float8): the all-gathers move float8, the reduce-scatters bf16."""
    element_bytes = regime.numerics.compute_bytes
    if ctx.workload.precision == "fp8":
        element_bytes = np.where(c.sequence_parallel, (FLOAT8_BYTES + element_bytes) / 2, element_bytes)
    nbytes = element_bytes * ctx.spec.hidden_size * c.micro_batch_size * ctx.workload.seq_len / c.cp
    bandwidth, latency = comm.link_bandwidth(ctx.cluster, ctx.profile, c.tp, c.tp)
    four = 4 * comm.collective_seconds("all_reduce", nbytes, c.tp, bandwidth, latency)
    return _exposed(ctx, four, ctx.profile.overlap("tp") * four)


def _pp_seconds(ctx: Context, regime: Regime, c: Candidates) -> np.ndarray:
    """Activation sends between stages (the residual stream: hc_mult streams under DeepSeek-V4's
    hyper-connections): forward and backward per micro-batch and per virtual stage
    (interleaved 1F1B: every micro-batch crosses each rank's vpp model chunks, so a rank sends
    2 x vpp times per micro-batch; Megatron-Core pipeline_parallel/schedules.py
    forward_backward_pipelining_with_interleaving sends after every chunk's forward and backward).
    The fill and drain ones (pp - 1 hops each way) sit on the critical path, steady-state ones are
    partly hidden."""
    nbytes = (regime.numerics.compute_bytes * ctx.spec.residual_width * c.micro_batch_size * ctx.workload.seq_len
              / c.cp / np.where(c.sequence_parallel, c.tp, 1))
    span = c.tp * c.data_ranks * c.pp
    bandwidth, latency = comm.link_bandwidth(ctx.cluster, ctx.profile, span)
    one = comm.p2p_seconds(nbytes, bandwidth, latency)
    steady = 2 * c.num_micro_batches * c.vpp * one
    exposed = 2 * (c.pp - 1) * one + _exposed(ctx, steady, ctx.profile.overlap("pp") * steady)
    return np.where(c.pp > 1, exposed, 0.0)


def _exposed(ctx: Context, comm_s: np.ndarray, hideable_s: np.ndarray) -> np.ndarray:
    """Collective seconds on the critical path: what compute cannot hide (at most `hideable_s`),
    plus the price of what it does hide. NCCL runs a collective as kernels on the GPU's SMs (one
    block per channel, up to 32 channels), which the overlapped compute then lacks."""
    hidden = np.minimum(comm_s, hideable_s)
    return comm_s - hidden + ctx.profile.hidden_comm_cost() * hidden


def _dp_seconds(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, worst: dict[str, np.ndarray],
                slowest) -> np.ndarray:
    """ZeRO 0/1: one all-reduce of the gradients per step (DDP no_sync while accumulating), hidden
    behind the last backward. ZeRO 2/3 (FSDP2): per micro-batch a reduce-scatter of the gradients
    (fp32 with fp32 master weights, else bf16) and one (2) or two (3) all-gathers of compute-dtype
    parameters, hidden behind compute. The group is dp x cp (context-parallel ranks reduce their
    gradients too: torchtitan's dp_shard_cp). Expert gradients, 1/ep of them per rank, are reduced
    over the dp x cp / ep expert-data-parallel ranks; this counts them over dp x cp (the ring's
    volume differs by (n-1)/n only)."""
    group = c.data_ranks
    bandwidth, latency = comm.link_bandwidth(ctx.cluster, ctx.profile, c.tp * group, group)
    grad_bytes = reduce_bytes(ctx.workload) * worst["trainable"]
    param_bytes = regime.numerics.compute_bytes * (worst["trainable"] + worst["frozen"]) + worst["quantized"] * 0.5
    # DDP all-reduces 25 MB buckets (torch DDP bucket_cap_mb); FSDP2 gathers and scatters per unit
    # (each decoder layer, the root, and the embedding and head when sharded on their own)
    buckets = np.maximum(1, np.ceil(grad_bytes / DDP_BUCKET_BYTES))
    units = np.maximum(layout.layers["first"], layout.layers["last"]) + 1 + 2 * c.shard_ends
    all_reduce = comm.collective_seconds("all_reduce", grad_bytes, group, bandwidth, latency, buckets)
    scatter = comm.collective_seconds("reduce_scatter", grad_bytes, group, bandwidth, latency, units)
    gather = comm.collective_seconds("all_gather", param_bytes, group, bandwidth, latency, units)
    m = c.num_micro_batches
    per_micro_compute = slowest["total"]
    backward_share = per_micro_compute * 2 / 3
    zero01 = _exposed(ctx, all_reduce, ctx.profile.overlap("dp") * backward_share)
    per_micro = scatter + np.where(c.zero == 3, 2, 1) * gather
    zero23 = m * _exposed(ctx, per_micro, ctx.profile.overlap("zero") * per_micro_compute)
    return np.where(c.zero >= 2, zero23, zero01)


def _largest_stage_params(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout) -> dict[str, np.ndarray]:
    best = None
    for role in ROLES:
        p = stage_params(ctx, regime, c, layout, role)
        total = np.where(layout.exists[role], p["trainable"] + p["frozen"] + p["quantized"], -1)
        if best is None:
            best, best_total = p, total
            continue
        wins = total > best_total
        best = {k: np.where(wins, p[k], best[k]) for k in best}
        best_total = np.maximum(total, best_total)
    return best


def _optimizer_seconds(ctx: Context, regime: Regime, c: Candidates, worst: dict[str, np.ndarray], slowest):
    """Optimizer step: memory-bound over the local (sharded) parameters on the device; offloaded,
    the host's step and the PCIe traffic (planner/cost/offload.py)."""
    w = ctx.workload
    sharded = c.zero >= 1  # over dp x cp: the whole layer's share (experts included); else this rank's
    local = np.where(sharded, worst["trainable_full"], worst["trainable"]) / np.where(sharded, c.data_ranks, 1)
    per_param = OPTIMIZER_STEP_BYTES.get((w.optimizer, w.optimizer_impl), OPTIMIZER_STEP_BYTES.get((w.optimizer, "*"), 36.0))
    on_device = local * per_param / ctx.memory_bytes_per_s
    on_host = host_step_seconds(ctx, c, local, per_param)
    offload = offload_seconds(ctx, regime, c, worst, local, c.num_micro_batches * slowest["total"])
    optimizer = np.where(c.offload == 0, on_device, on_host)
    return optimizer, np.where(c.offload == 0, 0.0, offload)


def tokens_per_second(ctx: Context, c: Candidates) -> np.ndarray:
    """Throughput of the whole job only (no memory): what calibration fits evaluate many times."""
    step = np.zeros(len(c))
    sharded = c.zero >= 2
    for flag in (False, True):
        index = np.nonzero(sharded == flag)[0]
        if len(index):
            part = c.take(index)
            times = step_time(ctx, ctx.regime(flag), part, stage_layout(ctx.spec.num_layers, part))
            step[index] = sum(times[k] for k in TIME_CATEGORIES)
    return ctx.workload.tokens_per_step / step
