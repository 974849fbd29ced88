"""Compute time of one micro-batch on one device: FLOPs over (peak × efficiency) for matmuls and
attention, bytes over (HBM bandwidth × efficiency) for memory-bound ops.

A GEMM's efficiency rises with its size: eff(x) = eff_max · x / (x + x_half), x its FLOPs — the
saturating shape of measured cuBLAS throughput vs problem size; eff_max and x_half are fitted
per hardware and dtype (calibration profile).

Backward costs 2× forward for trained linears (grad input + grad weight; Narayanan et al. 2021
§3.5) and 1× for frozen ones (grad input only); FlashAttention's backward ~2.5× its forward
(Dao 2023, FlashAttention-2 §3: 5 matmuls vs 2), a profile parameter; materialised attention
scores (eager, Megatron's fused softmax) 2× (4 batched GEMMs vs 2).

Context parallelism: a rank computes seq_len / cp tokens of every sequence; with torch's head-tail
load balancing (each rank holds chunks i and 2·cp - 1 - i, _HeadTailLoadBalancer) every rank does
1/cp of the causal attention. Expert parallelism: each of a rank's num_experts / ep experts runs
its grouped GEMMs (gate_up, then down, each at the efficiency of its own per-expert size:
expert_gemm_efficiency) on the tokens routed to it from all ep ranks (tokens·k·ep / num_experts),
and the busiest rank sets the pace: its expert work is the mean times the profile's imbalance
factor. An MoE block also costs host time beyond a dense layer's launches (router, permutation,
the dispatcher's bookkeeping and its device-to-host sync of the per-expert counts: Megatron-Core
token_dispatcher.py, torchtitan's all_to_all_single split sizes): the profile's moe overhead_factor
times the layer's launch overhead, per MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context, Regime
from planner.cost.summary import Matmul, PartSummary

FP32 = 4
BF16_BYTES = 2
FLOAT8_BYTES = 1
# Bytes one bitsandbytes NF4 dequantization moves per weight (bitsandbytes/functional.py
# dequantize_4bit, csrc kDequantizeBlockwise; bitsandbytes/autograd/_functions.py MatMul4Bit calls
# it in forward and again in backward for the input gradient): read the packed 4-bit codes (0.5 B),
# write the weight in the compute dtype (2 B); per 64-weight block read its fp32 absmax (4 B), which
# double quantization first rebuilds (read its 8-bit code, write fp32, then `absmax += offset`
# reads and writes fp32: 1 + 4 + 8 B).
NF4_BLOCK = 64
NF4_DEQUANT_BYTES_PER_PARAM = 0.5 + BF16_BYTES + (4 + 1 + 4 + 8) / NF4_BLOCK


@dataclass
class PartTimes:
    """Seconds per micro-batch for one part (a layer or an end)."""

    forward: np.ndarray
    backward: np.ndarray
    recompute: np.ndarray  # extra forward work under the candidate's recompute policy


def gemm_efficiency(flops: np.ndarray, eff_max: float, half_flops: float) -> np.ndarray:
    return eff_max * flops / (flops + half_flops)


def part_times(ctx: Context, part: PartSummary, c: Candidates, loss_vocab: int = 0) -> PartTimes:
    w, spec = ctx.workload, ctx.spec
    tokens = c.micro_batch_size * w.seq_len // c.cp  # this rank's share of the micro-batch
    t = c.tp
    imbalance = np.where(c.ep > 1, ctx.profile.expert_imbalance(), 1.0) if spec.is_moe else 1.0
    sp_div = np.where(c.sequence_parallel, t, 1)
    mm = ctx.compute_params
    fwd_mm, bwd_mm, selective_mm = (np.zeros(len(c), float) for _ in range(3))
    cast_fwd, cast_bwd = np.zeros(len(c), float), np.zeros(len(c), float)  # bytes
    for matmul in part.matmuls:
        shard = np.where(matmul.tp_split, t, 1)
        flops = matmul.flops_per_token * tokens / shard
        # a routed expert sees tokens·k/E tokens (from each of the ep ranks); its GEMM is that much smaller
        experts = matmul.name == "experts"
        gemm_tokens = tokens * matmul.tokens_factor / (spec.num_experts if experts else 1) * (c.ep if experts else 1)
        peak, params = (ctx.float8_peak_flops, ctx.float8_params) if matmul.float8 else (ctx.compute_peak_flops, mm)
        if experts:
            seconds = flops / (peak * expert_gemm_efficiency(matmul, spec.gated_mlp, gemm_tokens * imbalance / shard,
                                                             params)) * imbalance
        else:
            size = 2 * gemm_tokens * matmul.in_features * matmul.out_features / shard
            seconds = flops / (peak * gemm_efficiency(size, params.matmul_efficiency_max, params.matmul_half_flops))
        fwd_mm += seconds
        selective_mm += seconds * matmul.recomputed_selective
        bwd_mm += seconds * (2.0 if matmul.trainable else 1.0)
        if matmul.float8:
            local = spec.num_experts / c.ep if experts else 1  # a grouped GEMM casts every local expert's rows and weights
            cast_bytes = float8_cast_bytes(matmul, gemm_tokens * local, shard, w.compile, local)
            forward_bytes, backward_bytes = (matmul.share * b for b in cast_bytes)  # a mixed stack's share
            cast_fwd += forward_bytes
            cast_bwd += backward_bytes
            selective_mm += forward_bytes * matmul.recomputed_selective / ctx.memory_bytes_per_s
        if matmul.quantized:  # one memory-bound pass per use: forward, grad-input, recomputed forward
            dequant_s = nf4_dequant_bytes(matmul, spec.num_experts / c.ep if experts else 1, shard) / ctx.memory_bytes_per_s
            fwd_mm += dequant_s
            bwd_mm += dequant_s
            selective_mm += dequant_s * matmul.recomputed_selective
    fwd_attn, bwd_attn = _attention_seconds(ctx, part.attention_flops_per_token_seq * tokens * w.seq_len / t)
    io = part.io_bytes.evaluate(tokens, w.seq_len, t, sp_div)
    io = io + loss_io_bytes_per_token(ctx, loss_vocab) * tokens / t
    if w.compile:  # inductor fuses chains of elementwise ops: fewer round trips through HBM
        io = io * mm.compiled_io_factor
    fwd_mem = io / ctx.memory_bytes_per_s
    # host-side cost of launching the part's kernels: about twice as many in backward; fused under compile
    overhead = mm.layer_overhead_s * (mm.compiled_io_factor if w.compile else 1.0) * (1.0 if part.matmuls else 0.0)
    overhead = overhead * (1.0 + ctx.profile.moe_overhead_factor() * moe_share(part))
    forward = fwd_mm + fwd_attn + fwd_mem + cast_fwd / ctx.memory_bytes_per_s + overhead
    backward = bwd_mm + bwd_attn + 2 * fwd_mem + cast_bwd / ctx.memory_bytes_per_s + 2 * overhead
    recompute = np.select([c.recompute == 2, c.recompute == 1], [forward, selective_mm + fwd_mem + overhead], 0.0)
    return PartTimes(forward, backward, recompute)


def expert_gemm_efficiency(matmul: Matmul, gated: bool, tokens_per_expert: np.ndarray, params) -> np.ndarray:
    """Efficiency of the routed experts' grouped GEMMs (Megatron-Core TEGroupedLinear / grouped_gemm,
    torchtitan torch._grouped_mm): every local expert multiplies its own `tokens_per_expert` rows
    (the rank's tokens x top-k x ep / experts, x the busiest rank's imbalance; the expert-TP split
    of the width is folded into them) by its weights, in two GEMMs, gate_up (hidden -> (m-1)·i) and down
    (i -> hidden), each at the size-dependent efficiency of its own per-expert size: fine-grained
    experts (small i) and few tokens per expert make small, slow GEMMs. The FLOP-weighted harmonic
    mean of the two, so that FLOPs / (peak · this) is the sum of their times."""
    parts = 3 if gated else 2
    width = matmul.out_features / parts  # i, the expert's intermediate size
    up_flops = 2 * tokens_per_expert * matmul.in_features * (parts - 1) * width
    down_flops = 2 * tokens_per_expert * width * matmul.in_features
    eff = (gemm_efficiency(up_flops, params.matmul_efficiency_max, params.matmul_half_flops),
           gemm_efficiency(down_flops, params.matmul_efficiency_max, params.matmul_half_flops))
    return (up_flops + down_flops) / (up_flops / eff[0] + down_flops / eff[1])


def moe_share(part: PartSummary) -> np.ndarray | float:
    """The share of a part's layers that are MoE layers (1 for a uniform MoE stack, 0 for dense; per
    candidate for a pipeline stage's mean layer)."""
    return sum((m.share for m in part.matmuls if m.name == "experts"), 0.0)


def float8_cast_bytes(matmul: Matmul, tokens: np.ndarray, shard: np.ndarray, compiled: bool,
                      copies: np.ndarray | float = 1) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) memory traffic of casting a float8 linear's operands with tensorwise
    scaling, as torchao's roofline counts it (torchao/testing/training/roofline_utils.py,
    get_float8_mem_sympy): the input and the output's gradient each take an amax pass over their
    bf16 values (fused into the op that produced them under torch.compile) and one cast that reads
    bf16 and writes both float8 layouts (row- and column-major, for the two GEMMs that use them);
    the weight takes an amax pass and one cast per GEMM that uses it (forward, then backward's
    grad-input). The TP-split side of the GEMM is the local shard; `copies` weights of that shape
    (a rank's local experts, cast together by a grouped GEMM)."""
    in_shard = np.where(matmul.row_parallel, shard, 1)
    out_shard = np.where(matmul.row_parallel, 1, shard)
    inputs = tokens * matmul.in_features / in_shard
    grad_outputs = tokens * matmul.out_features / out_shard
    weights = copies * matmul.in_features * matmul.out_features / shard
    activation_cast = (0 if compiled else BF16_BYTES) + BF16_BYTES + 2 * FLOAT8_BYTES
    weight_cast = BF16_BYTES + FLOAT8_BYTES
    forward = inputs * activation_cast + weights * (BF16_BYTES + weight_cast)  # the weight's amax pass, then its cast
    return forward, grad_outputs * activation_cast + weights * weight_cast


def nf4_dequant_bytes(matmul: Matmul, copies: np.ndarray | float, shard: np.ndarray) -> np.ndarray:
    """Memory traffic of dequantizing one NF4 base linear once (QLoRA): every weight of the rank's
    shard (each of its local experts), NF4_DEQUANT_BYTES_PER_PARAM apiece; a mixed stack's share."""
    return matmul.share * copies * matmul.in_features * matmul.out_features / shard * NF4_DEQUANT_BYTES_PER_PARAM


def _attention_seconds(ctx: Context, full_flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) attention of one micro-batch. Flash kernels skip the masked half of a
    causal sequence (profile `causal_fraction`) at their own fitted efficiency, and their backward
    recomputes the scores (profile `backward_factor`). Materialised scores (eager, fused-softmax)
    are two batched GEMMs over every (query, key) pair, at a GEMM's efficiency for their size, and
    four in backward; their softmax's memory traffic is in the part's io bytes."""
    if ctx.workload.attention == "sdpa":
        flops = full_flops * ctx.profile.attention("causal_fraction")
        forward = flops / (ctx.compute_peak_flops * ctx.compute_params.attention_efficiency)
        return forward, ctx.profile.attention("backward_factor") * forward
    mm = ctx.compute_params
    per_gemm = np.maximum(full_flops / 2, 1.0)  # parts without attention: 0 s, not 0/0
    efficiency = gemm_efficiency(per_gemm, mm.matmul_efficiency_max, mm.matmul_half_flops)
    forward = full_flops / (ctx.compute_peak_flops * efficiency)
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
    App. B: 6N + 12·L·H·Q·T). Routed experts count their top k: an implementation that runs every
    expert on every token (transformers' Llama 4) does work the model does not need."""
    total = 0.0
    top_k = ctx.spec.experts_per_token
    for part, count in ((regime.layer, ctx.spec.num_layers), (regime.embedding, 1), (regime.head, 1)):
        for matmul in part.matmuls:
            useful = top_k / matmul.tokens_factor if matmul.name == "experts" and matmul.tokens_factor > top_k else 1.0
            total += count * matmul.flops_per_token * useful * (3.0 if matmul.trainable else 2.0)
        total += count * 3 * part.attention_flops_per_token_seq * ctx.workload.seq_len
    return total
