"""Compute time of one micro-batch on one device: FLOPs over (peak × efficiency) for matmuls and
attention, bytes over (HBM bandwidth × efficiency) for memory-bound ops.

A GEMM's efficiency rises with its size: eff(x) = eff_max · x / (x + x_half), x its FLOPs — the
saturating shape of measured cuBLAS throughput vs problem size; eff_max and x_half are fitted
per hardware and dtype (calibration profile).

Backward costs 2× forward for trained linears (grad input + grad weight; Narayanan et al. 2021
§3.5) and 1× for frozen ones (grad input only); FlashAttention's backward ~2.5× its forward
(Dao 2023, FlashAttention-2 §3: 5 matmuls vs 2), a profile parameter; materialised attention
scores (eager, Megatron's fused softmax) 2× (4 batched GEMMs vs 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context, Regime
from planner.cost.summary import PartSummary

FP32 = 4


@dataclass
class PartTimes:
    """Seconds per micro-batch for one part (a layer or an end)."""

    forward: np.ndarray
    backward: np.ndarray
    recompute: np.ndarray  # extra forward work under the candidate's recompute policy
    memory_bound_forward: np.ndarray


def gemm_efficiency(flops: np.ndarray, eff_max: float, half_flops: float) -> np.ndarray:
    return eff_max * flops / (flops + half_flops)


def part_times(ctx: Context, part: PartSummary, c: Candidates, loss_vocab: int = 0) -> PartTimes:
    w, spec = ctx.workload, ctx.spec
    tokens = c.micro_batch_size * w.seq_len
    t = c.tp
    sp_div = np.where(c.sequence_parallel, t, 1)
    mm = ctx.matmul_params
    fwd_mm = np.zeros(len(c), float)
    bwd_mm = np.zeros(len(c), float)
    selective_mm = np.zeros(len(c), float)
    for matmul in part.matmuls:
        shard = np.where(matmul.tp_split, t, 1)
        flops = matmul.flops_per_token * tokens / shard
        # a routed expert sees tokens·k/E tokens; its GEMM is that much smaller
        gemm_tokens = tokens * matmul.tokens_factor / (spec.num_experts if matmul.name == "experts" else 1)
        size = 2 * gemm_tokens * matmul.in_features * matmul.out_features / shard
        seconds = flops / (ctx.matmul_peak_flops * gemm_efficiency(size, mm.matmul_efficiency_max, mm.matmul_half_flops))
        fwd_mm += seconds
        selective_mm += seconds * matmul.recomputed_selective
        bwd_mm += seconds * (2.0 if matmul.trainable else 1.0)
    fwd_attn, bwd_attn = _attention_seconds(ctx, part.attention_flops_per_token_seq * tokens * w.seq_len / t)
    io = part.io_bytes.evaluate(tokens, w.seq_len, t, sp_div)
    io = io + loss_io_bytes_per_token(ctx, loss_vocab) * tokens / t
    if w.compile:  # inductor fuses chains of elementwise ops: fewer round trips through HBM
        io = io * mm.compiled_io_factor
    fwd_mem = io / (ctx.hardware.hbm_bandwidth_bytes_per_s * mm.memory_efficiency)
    # host-side cost of launching the part's kernels: about twice as many in backward; fused under compile
    overhead = mm.layer_overhead_s * (mm.compiled_io_factor if w.compile else 1.0) * (1.0 if part.matmuls else 0.0)
    forward = fwd_mm + fwd_attn + fwd_mem + overhead
    backward = bwd_mm + bwd_attn + 2 * fwd_mem + 2 * overhead
    recompute = np.select([c.recompute == 2, c.recompute == 1], [forward, selective_mm + fwd_mem + overhead], 0.0)
    return PartTimes(forward, backward, recompute, fwd_mem)


def _attention_seconds(ctx: Context, full_flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) attention of one micro-batch. Flash kernels skip the masked half of a
    causal sequence (profile `causal_fraction`) at their own fitted efficiency, and their backward
    recomputes the scores (profile `backward_factor`). Materialised scores (eager, fused-softmax)
    are two batched GEMMs over every (query, key) pair, at a GEMM's efficiency for their size, and
    four in backward; their softmax's memory traffic is in the part's io bytes."""
    if ctx.workload.attention == "sdpa":
        flops = full_flops * ctx.profile.attention("causal_fraction")
        forward = flops / (ctx.attention_peak_flops * ctx.attention_params.attention_efficiency)
        return forward, ctx.profile.attention("backward_factor") * forward
    mm = ctx.matmul_params
    per_gemm = np.maximum(full_flops / 2, 1.0)  # parts without attention: 0 s, not 0/0
    forward = full_flops / (ctx.matmul_peak_flops * gemm_efficiency(per_gemm, mm.matmul_efficiency_max, mm.matmul_half_flops))
    return forward, 2.0 * forward


def loss_io_bytes_per_token(ctx: Context, vocab: int) -> float:
    """Memory traffic of the loss on logits, forward and backward (transformers ForCausalLMLoss):
    write logits, read+write the fp32 upcast, read+write log_softmax, and in backward write the
    nll gradient, read it with the saved output, write the input gradient and its cast."""
    if not vocab:
        return 0.0
    cb = 2 if ctx.workload.precision != "fp32" else FP32
    return (cb + (cb + FP32) + 2 * FP32 + FP32 + 2 * FP32 + FP32 + (FP32 + cb)) * vocab


def model_flops_per_token(ctx: Context, regime: Regime) -> float:
    """FLOPs a training step needs per token, no recomputation: 2 per weight forward, 4 more backward
    for trained weights (2 for frozen), and attention non-causal as in PaLM (Chowdhery et al. 2022,
    App. B: 6N + 12·L·H·Q·T)."""
    total = 0.0
    for part, count in ((regime.layer, ctx.spec.num_layers), (regime.embedding, 1), (regime.head, 1)):
        for matmul in part.matmuls:
            total += count * matmul.flops_per_token * (3.0 if matmul.trainable else 2.0)
        total += count * 3 * part.attention_flops_per_token_seq * ctx.workload.seq_len
    return total
