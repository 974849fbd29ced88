"""GPU kernels a CPU trace would otherwise replace with something that keeps other tensors.

The planner models what a training step keeps on a GPU. Where transformers (or torch) picks a
different kernel on the CPU, the trace would measure the CPU path, so during a trace these
stand-ins run instead. Each allocates the outputs of the GPU kernel and keeps, for backward,
exactly the tensors the GPU kernel's autograd function saves (shapes and dtypes read from the
kernel's source, cited below); everything around them (projections, norms, gates, casts) is
still transformers' own code, traced as it runs.

* SDPA with a value head dim unlike the query's (DeepSeek MLA: q/k 192, v 128): the CUDA flash
  kernel refuses it and SDPA runs the memory-efficient kernel, which keeps q, k, v, the output
  and a fp32 log-sum-exp; the CPU has no such kernel and falls back to the math path, which
  materialises the scores. The stand-in calls `aten._scaled_dot_product_efficient_attention`,
  whose meta kernel runs on fake tensors and whose autograd formula is the CUDA one.
* Gated DeltaNet (Qwen3-Next, Qwen3.5): without flash-linear-attention and causal-conv1d
  transformers runs `torch_chunk_gated_delta_rule` (a Python loop over chunks that keeps every
  chunk's intermediates) and `causal_conv1d_fn` as F.conv1d then silu. On a GPU with those
  packages: causal-conv1d's CausalConv1dFn fuses the silu and keeps its input, weight and bias
  (causal_conv1d_interface.py); fla's ChunkGatedDeltaRuleFunction (fla/ops/gated_delta_rule/chunk.py)
  keeps the l2-normalised q and k (key heads) with their fp32 rstd, v made contiguous, the fp32
  chunk-local cumsum of g, beta and the solved intra-chunk matrix A (value heads x 64, k's
  dtype), and recomputes w, u and the chunk states in backward. The stand-ins do exactly that.
* Mamba-2 (Nemotron-H): in training with mamba_ssm transformers calls the fused
  `mamba2_split_conv1d_scan_combined` (mamba_ssm's MambaSplitConv1dScanCombinedFn,
  ssd_combined.py), which keeps the in_proj output (zxbcdt), the scan output before the gated norm
  (out_x) and the norm's fp32 rstd per group, and recomputes the convolution, the scan, the norm
  and out_proj's input in backward; without mamba_ssm the function returns None and a torch path
  runs. The stand-in returns the fused function's output and keeps what it keeps.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_SDPA = F.scaled_dot_product_attention


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the GPU dispatches it: the memory-efficient kernel where q/k and v head dims differ
    or exceed the CUDA flash kernel's 256 (sdp_utils.cpp check_head_dim_size_flash; Gemma 4's 512)."""
    differs = query.shape[-1] != value.shape[-1] or query.shape[-1] > 256
    if differs and attn_mask is None and dropout_p == 0.0 and query.shape[1] == key.shape[1]:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, 0.0, is_causal, scale=scale)
        return out[0]
    return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                 scale=scale, enable_gqa=enable_gqa)


@contextmanager
def _patched(owner: object, name: str, replacement: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def gpu_kernels() -> Iterator[None]:
    """Within: the stand-ins above replace the CPU paths (forward, backward and recomputation)."""
    with ExitStack() as stack:
        stack.enter_context(_patched(F, "scaled_dot_product_attention", _sdpa))
        for patch in _linear_attention_patches():
            stack.enter_context(patch)
        yield


class _CausalConv1d(torch.autograd.Function):
    """causal-conv1d's CausalConv1dFn with activation="silu": keeps x, weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return torch.empty_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)


def _causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    return _CausalConv1d.apply(hidden_states, weight, bias)


CHUNK = 64  # fla's chunk size


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """fla's ChunkGatedDeltaRuleFunction with use_qk_l2norm_in_kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        batch, tokens, heads, _ = q.shape
        value_heads, value_dim = v.shape[2], v.shape[3]
        fp32 = torch.float32
        q_normed, k_normed = torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format)
        q_rstd, k_rstd = q.new_empty(batch, tokens, heads, dtype=fp32), k.new_empty(batch, tokens, heads, dtype=fp32)
        v = v.contiguous()
        g_cumsum = g.new_empty(batch, tokens, value_heads, dtype=fp32)
        solved = k.new_empty(batch, tokens, value_heads, CHUNK)
        _chunk_transients(k, v)
        out = v.new_empty(batch, tokens, value_heads, value_dim)
        ctx.save_for_backward(q_normed, q_rstd, k_normed, k_rstd, v, g_cumsum, beta, solved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, _, k, _, v, g, beta, _ = ctx.saved_tensors
        transients = _chunk_transients(k, v)  # w, u, the chunk states and v_new, recomputed
        grad_h = torch.empty_like(transients[2], dtype=torch.float32)
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta))
        del transients, grad_h
        return grads


def _chunk_transients(k, v) -> tuple:
    """w and u (the WY representation), the per-chunk states h (k's dtype) and v_new."""
    batch, tokens, _, key_dim = k.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    chunks = -(-tokens // CHUNK)
    return (k.new_empty(batch, tokens, value_heads, key_dim), v.new_empty(batch, tokens, value_heads, value_dim),
            k.new_empty(batch, chunks, value_heads, key_dim, value_dim), torch.empty_like(v))


def _chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=CHUNK, initial_state=None,
                            output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    return _ChunkGatedDeltaRule.apply(query, key, value, g, beta), None


GATED_DELTANET_MODULES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


class _SplitConv1dScanCombined(torch.autograd.Function):
    """mamba_ssm's MambaSplitConv1dScanCombinedFn with the gated norm and out_proj fused in."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, out_bias,
                inner: int, groups: int):
        batch, tokens, _ = zxbcdt.shape
        out_x = zxbcdt.new_empty(batch, tokens, inner)
        rstd = zxbcdt.new_empty(batch * tokens * groups, dtype=torch.float32)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, out_x, A, D, dt_bias, norm_weight, rstd, out_weight, out_bias)
        return zxbcdt.new_empty(batch, tokens, out_weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        zxbcdt, conv_weight, conv_bias, out_x, A, D, dt_bias, norm_weight, _, out_weight, out_bias = ctx.saved_tensors
        recomputed = (torch.empty_like(out_x), torch.empty_like(out_x))  # the normed output, out_proj's input
        grads = (torch.empty_like(zxbcdt), torch.zeros_like(conv_weight),
                 None if conv_bias is None else torch.zeros_like(conv_bias), torch.zeros_like(dt_bias),
                 torch.zeros_like(A), torch.zeros_like(D), torch.zeros_like(norm_weight), torch.zeros_like(out_weight),
                 None if out_bias is None else torch.zeros_like(out_bias), None, None)
        del recomputed
        return grads


def _split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                                dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
                                rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                                headdim=None, ngroups=1, norm_before_gate=True, **kwargs):
    inner = rmsnorm_weight.shape[0]
    return _SplitConv1dScanCombined.apply(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, rmsnorm_weight,
                                          outproj_weight, outproj_bias, inner, ngroups)


def _linear_attention_patches() -> list:
    import importlib

    patches = []
    for family in GATED_DELTANET_MODULES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        patches += [_patched(module, "causal_conv1d_fn", _causal_conv1d_fn),
                    _patched(module, "torch_chunk_gated_delta_rule", _chunk_gated_delta_rule)]
    module = importlib.import_module("transformers.models.nemotron_h.modeling_nemotron_h")
    patches.append(_patched(module, "mamba2_split_conv1d_scan_combined", _split_conv1d_scan_combined))
    return patches
