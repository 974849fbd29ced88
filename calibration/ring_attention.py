"""Context parallelism on fake tensors: each rank's model sees seq_len / cp tokens (its two
head-tail chunks) and SDPA runs as torch's ring attention, whose buffers are allocated here.

torch's context_parallel cannot run in the oracle: its ring attention dispatches only the CUDA
SDPA kernels (no handler for aten._scaled_dot_product_flash_attention_for_cpu, see
planner/capabilities.py CP_CPU_REFUSAL) and needs real collectives. So the oracle models it the way
torchtitan runs it (torch/distributed/tensor/experimental/_context_parallel/_attention.py,
`_templated_ring_attention` and `_templated_ring_attention_backward`, default rotate method
ALL_GATHER, `_cp_options.convert_to_f32`): what autograd keeps is the local flash kernel's
(q, k, v, output, log-sum-exp of this rank's tokens, as the ring op's DTensor wrapper keeps), and
while the attention runs its forward and backward the ring's buffers are alive:

* forward: the rank's K and V concatenated for the exchange, the all-gathered K and V of the cp
  ranks (compute dtype), the fp32 output and log-sum-exp accumulators of _SDPAMerger;
* backward: the all-gathered K and V again with the rank's concatenated K and V, fp32 dQ, dK, dV
  accumulators, the fp32 dK/dV passed round the ring (ALL_TO_ALL rotater: sent and received).

The block computations are one local flash call each way (the blocks' own outputs are the size of
one block's: the local call's stand in for them). Values are not computed: these are fake tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
FP32 = torch.float32


def _kv_exchange(key: torch.Tensor, value: torch.Tensor, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rank's K and V concatenated, the all-gathered K and V of the cp ranks)."""
    local = torch.cat([key.flatten(), value.flatten()])
    return local, local.new_empty(cp * local.numel())


class _RingSDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, cp):  # noqa: D102 - see the module docstring
        buffers = _kv_exchange(key, value, cp)
        merged = query.new_empty(query.shape, dtype=FP32), query.new_empty(query.shape[:-1], dtype=FP32)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
        del buffers, merged
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.cp = scale, cp
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        query, key, value, out, lse = ctx.saved_tensors
        buffers = _kv_exchange(key, value, ctx.cp)
        accumulators = [torch.zeros_like(t, dtype=FP32) for t in (query, key, value)]
        rotated = [key.new_empty(key.numel() + value.numel(), dtype=FP32) for _ in range(2)]  # sent, received
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, lse, 0.0, True, scale=ctx.scale)
        del buffers, accumulators, rotated
        return grads[0], grads[1], grads[2], None, None


class RingAttention(TorchFunctionMode):
    """Causal SDPA calls become the ring attention's stand-in (cp > 1); everything else runs as is."""

    def __init__(self, cp: int) -> None:
        super().__init__()
        self.cp = cp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.cp > 1:
            query, key, value = args[:3]
            if kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0):
                raise RuntimeError("context parallelism runs causal attention without a mask or dropout")
            return _RingSDPA.apply(query, key, value, kwargs.get("scale"), self.cp)
        return func(*args, **kwargs)
