"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464), the linear-attention mixer of
Qwen3-Next and Qwen3.5 (`layer_types` linear_attention), as transformers builds it
(modeling_qwen3_next.py, Qwen3NextGatedDeltaNet):

  in_proj_qkvz: hidden -> q, k (key heads x key dim each), v, z (value heads x value dim each)
  in_proj_ba:   hidden -> b, a (one per value head): beta = sigmoid(b), decay g from a, A_log, dt_bias
  conv1d:       depthwise causal convolution (kernel linear_conv_kernel_dim, no bias) over q, k, v, then silu
  the gated delta rule, chunked (flash-linear-attention chunk_gated_delta_rule, chunks of 64), q and
  k at the key heads (the kernel serves the value heads from them); RMSNormGated(value dim) of its
  output with z; out_proj.

Its FLOPs grow linearly with the sequence: per token and value head, the chunkwise form spends
about 4·C·(d_k + d_v) on the intra-chunk products (QKᵀ, KKᵀ for the WY/UT transform, their
products with V) and 6·d_k·d_v on the state (reading it for the output and for the delta, and
updating it), C = 64 (the paper's §3.3 chunkwise algorithm).

What a GPU keeps for backward is what the CUDA kernels save, not transformers' torch fallbacks
(torch_chunk_gated_delta_rule keeps every chunk's intermediates; the oracle swaps in stand-ins
that save what the kernels save, calibration/gpu_kernels.py): causal-conv1d fuses the silu and
keeps its input (the concatenated q, k, v); fla's ChunkGatedDeltaRuleFunction keeps the
l2-normalised q and k with their fp32 rstd, a contiguous copy of v, the fp32 chunk-local cumsum
of g, beta and the solved intra-chunk matrix A (C per token and value head, in k's dtype), and
recomputes the chunk states in backward. Around it (modeling_qwen3_next.py): the decay
g = -exp(A_log) * softplus(a.float() + dt_bias) keeps two fp32 values per value head, and
RMSNormGated multiplies the weighted normalised output (kept) by silu of the fp32 gate (both
fp32 tensors kept).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.ops import FP32_BYTES, Op, Saved

# `b` below is planner/graph.py's _BlockBuilder (graph imports this module, so it is not named here)
BlockBuilder = Any

CHUNK = 64  # flash-linear-attention's chunk size for chunk_gated_delta_rule


def gated_deltanet(b: BlockBuilder) -> None:
    """Adds one Gated DeltaNet mixer to the block builder `b`."""
    s, c = b.spec, b.n.compute_bytes
    hv, dk, dv = s.linear_value_heads, s.linear_key_head_dim, s.linear_value_head_dim
    key_dim, value_dim = s.linear_key_heads * dk, hv * dv
    conv_dim = 2 * key_dim + value_dim
    x = b.attn_in
    start = b.last
    b.linear("in_proj_qkvz", s.hidden_size, 2 * key_dim + 2 * value_dim, False, x, column=True, after=start)
    b.linear("in_proj_ba", s.hidden_size, 2 * hv, False, x, column=True, after=start)
    b.last = ["in_proj_qkvz", "in_proj_ba"]
    kernel = s.linear_conv_kernel
    # the fused convolution and silu keep the concatenated input; the decay keeps softplus's fp32 input and
    # output per value head; A_log and dt_bias ride along
    b.add(Op("conv1d", "elementwise", params=conv_dim * kernel + 2 * hv, flops_per_token=2 * kernel * conv_dim,
             io_bytes_per_token=4 * c * conv_dim, out_bytes_per_token=c * conv_dim,
             saved=(Saved("conv1d.in", c * conv_dim), Saved("decay.softplus", 2 * FP32_BYTES * hv)),
             grads=(Saved("conv1d.grad", 3 * c * conv_dim),),
             param_dims=((conv_dim, conv_dim * kernel), (hv, hv), (hv, hv))))
    per_head_flops = 4 * CHUNK * (dk + dv) + 6 * dk * dv
    hk = s.linear_key_heads
    saved = (Saved("delta.q", c * key_dim), Saved("delta.k", c * key_dim), Saved("delta.v", c * value_dim),
             Saved("delta.g_beta", (FP32_BYTES + c) * hv), Saved("delta.A", c * CHUNK * hv),
             Saved("delta.rstd", 2 * FP32_BYTES * hk))
    b.add(Op("delta_rule", "matmul", gemm=(CHUNK, hv * (dk + dv)), flops_per_token=hv * per_head_flops,
             io_bytes_per_token=c * (2 * hv * dk + 2 * value_dim), out_bytes_per_token=c * value_dim, saved=saved,
             grads=(Saved("delta_rule.grad", c * (2 * hv * dk + 2 * value_dim)),)))
    b.compute_norm("delta_norm", "delta_rule.out", dv, rows=hv, tp=True, offset=False)  # RMSNormGated: Llama's
    # RMSNormGated: (weight * normed) * silu(z.float()), keeping the weighted output, z in fp32 and its silu
    b.add(Op("delta_gate", "elementwise", io_bytes_per_token=4 * c * value_dim, out_bytes_per_token=c * value_dim,
             saved=(Saved("delta_gate.weighted", c * value_dim), Saved("delta_gate.z_silu", 2 * FP32_BYTES * value_dim)),
             grads=(Saved("delta_gate.grad", 3 * c * value_dim),)))
    b.linear("out_proj", value_dim, s.hidden_size, False, "delta_gate.out", column=False)


def mamba2(b: BlockBuilder) -> None:
    """A Mamba-2 mixer (Dao & Gu 2024, arXiv 2405.21060) as transformers' NemotronHMamba2Mixer builds
    it: in_proj (hidden -> z, x, B, C, dt: 2·d_inner + 2·groups·state + heads), a depthwise causal
    conv1d with bias over x, B, C, then silu; dt_bias, A_log and D per head; the chunked SSD scan
    (chunks of `mamba_chunk_size`); a gated RMSNorm over d_inner (per group); out_proj.
    Per token and head the chunked scan spends about 2·C·(N + P) on the intra-chunk products and
    4·N·P on the state (SSD §6), N the state size, P the head dim.

    In training with mamba_ssm installed transformers runs all of it after in_proj as one fused
    function (mamba2_split_conv1d_scan_combined, mamba_ssm's MambaSplitConv1dScanCombinedFn), which
    keeps the in_proj output, the scan's output before the gated norm and the norm's fp32 rstd,
    and recomputes the convolution, the scan's chunk states, the norm and out_proj's input in
    backward (without mamba_ssm it falls back to a torch path that keeps far more; the oracle runs
    a stand-in of the fused function, calibration/gpu_kernels.py)."""
    s, c = b.spec, b.n.compute_bytes
    heads, head_dim, state, groups = s.mamba_heads, s.mamba_head_dim, s.mamba_state_size, s.mamba_groups
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    in_width = 2 * inner + 2 * groups * state + heads
    x = b.attn_in
    b.linear("in_proj", s.hidden_size, in_width, False, x, column=True)
    kernel = s.linear_conv_kernel
    bias = 1 if s.mamba_conv_bias else 0
    saved = (Saved("in_proj.out", c * in_width), Saved("ssd.out", c * inner), Saved("mamba_norm.rstd", FP32_BYTES * groups))
    b.add(Op("conv1d", "elementwise", params=conv_dim * (kernel + bias) + 3 * heads,
             flops_per_token=2 * kernel * conv_dim, io_bytes_per_token=4 * c * conv_dim,
             out_bytes_per_token=c * conv_dim, saved=saved,
             grads=(Saved("mamba.grad", c * (in_width + 2 * inner)),),
             param_dims=((conv_dim, conv_dim * (kernel + bias)), (heads, heads), (heads, heads), (heads, heads))))
    chunk = s.mamba_chunk_size
    b.add(Op("ssd_scan", "matmul", gemm=(chunk, heads * (state + head_dim)),
             flops_per_token=heads * (2 * chunk * (state + head_dim) + 4 * state * head_dim),
             io_bytes_per_token=c * (conv_dim + 2 * inner), out_bytes_per_token=c * inner))
    b.compute_norm("mamba_norm", "ssd_scan.out", inner, tp=True, offset=False)
    b.linear("out_proj", inner, s.hidden_size, False, "mamba_norm.out", column=False)
    for name in ("mamba_norm", "out_proj"):  # inside the fused function: recomputed in backward
        node = b.graph.nodes[name]
        node["op"] = replace(node["op"], saved=(), grads=())


def kimi_delta_attention(b: BlockBuilder) -> None:
    """Kimi Delta Attention (Kimi Linear report, arXiv 2510.26692, §3), the linear-attention mixer of
    kimi_linear, as transformers builds it (modeling_kimi_linear.py, KimiLinearDeltaAttention):
    q_proj, k_proj, v_proj (hidden -> heads x head dim each), one depthwise causal conv1d (no bias)
    over their concatenation, then silu; a per-channel forget gate f_b_proj(f_a_proj(x)) + dt_bias
    through softplus times -exp(A_log) (KimiLinearForgetGate, in fp32: torch.where keeps its mask,
    exp its output, log its input, the product the softplus); beta = sigmoid(b_proj(x)); the chunked
    delta rule with per-channel decay (fla chunk_kda, chunks of 64); an output gate
    g_b_proj(g_a_proj(x)) through RMSNormGated(head dim) with a sigmoid, in fp32; o_proj.
    FLOPs as Gated DeltaNet's chunkwise form (the report's §3.2 keeps its cost, with the decay per
    channel); the kernel keeps q, k, v, the fp32 cumulative decay per channel, beta, the two
    intra-chunk matrices (Aqk, Akk: C each per token and head) and the l2 norms' rstd."""
    s, c = b.spec, b.n.compute_bytes
    heads, dim = s.linear_value_heads, s.linear_value_head_dim
    width = heads * dim
    x, start = b.attn_in, b.last
    for name in ("q_proj", "k_proj", "v_proj"):
        b.linear(name, s.hidden_size, width, False, x, column=True, after=start)
    b.last = ["q_proj", "k_proj", "v_proj"]
    kernel = s.linear_conv_kernel
    b.add(Op("conv1d", "elementwise", params=3 * width * kernel, flops_per_token=2 * kernel * 3 * width,
             io_bytes_per_token=4 * c * 3 * width, out_bytes_per_token=c * 3 * width,
             saved=(Saved("conv1d.in", c * 3 * width),), grads=(Saved("conv1d.grad", 3 * c * 3 * width),),
             param_dims=((3 * width, 3 * width * kernel),)))
    conv = b.last
    b.linear("f_a_proj", s.hidden_size, dim, False, x, column=True, after=start, tp_split=False)
    b.linear("f_b_proj", dim, width, False, "f_a_proj.out", column=True, input_bytes=c)
    b.add(Op("forget_gate", "elementwise", params=width + heads, io_bytes_per_token=6 * FP32_BYTES * width,
             out_bytes_per_token=FP32_BYTES * width,
             saved=(Saved("forget_gate.softplus", 3 * FP32_BYTES * width), Saved("forget_gate.mask", width)),
             grads=(Saved("forget_gate.grad", 3 * FP32_BYTES * width),), param_dims=((width, width), (1, heads))))
    gate = b.last
    b.linear("b_proj", s.hidden_size, heads, False, x, column=True, after=start)
    b.last = [conv, gate, "b_proj"]
    saved = (Saved("kda.q", c * width), Saved("kda.k", c * width), Saved("kda.v", c * width),
             Saved("kda.g", FP32_BYTES * width), Saved("kda.beta", 2 * c * heads), Saved("kda.A", 2 * c * CHUNK * heads),
             Saved("kda.rstd", 2 * FP32_BYTES * heads))
    b.add(Op("delta_rule", "matmul", gemm=(CHUNK, 2 * width), flops_per_token=heads * (8 * CHUNK * dim + 6 * dim * dim),
             io_bytes_per_token=c * 4 * width + FP32_BYTES * width, out_bytes_per_token=c * width, saved=saved,
             grads=(Saved("delta_rule.grad", c * 4 * width + FP32_BYTES * width),)))
    rule = b.last
    b.linear("g_a_proj", s.hidden_size, dim, False, x, column=True, after=start, tp_split=False)
    b.linear("g_b_proj", dim, width, False, "g_a_proj.out", column=True, input_bytes=c)
    b.last = [rule, "g_b_proj"]
    b.compute_norm("o_norm", "delta_rule.out", dim, rows=heads, tp=True, offset=True)  # weight applied in fp32
    # RMSNormGated(activation sigmoid): (weight * normed) * sigmoid(gate.float()), keeping both fp32 factors
    b.add(Op("kda_gate", "elementwise", io_bytes_per_token=(3 * FP32_BYTES + 2 * c) * width,
             out_bytes_per_token=c * width,
             saved=(Saved("kda_gate.weighted", FP32_BYTES * width), Saved("kda_gate.sigmoid", FP32_BYTES * width)),
             grads=(Saved("kda_gate.grad", 3 * FP32_BYTES * width),)))
    b.linear("o_proj", width, s.hidden_size, False, "kda_gate.out", column=False)
