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
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_SDPA = F.scaled_dot_product_attention


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the GPU dispatches it: the memory-efficient kernel where q/k and v head dims differ."""
    differs = query.shape[-1] != value.shape[-1]
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


def _linear_attention_patches() -> list:
    return []
