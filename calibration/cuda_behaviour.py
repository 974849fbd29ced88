"""What CUDA does that a CPU trace would not: autocast's fp32 policy and fused dropout.

Fused dropout: on CUDA `F.dropout` runs the fused kernel (aten::native_dropout), which keeps a
one-byte boolean mask for backward; on CPU it multiplies by a noise tensor in the input's dtype
and keeps that (aten/src/ATen/native/Dropout.cpp, `is_fused_kernel_acceptable`). The mode below
routes training-time dropout to native_dropout, which keeps the boolean mask on CPU too.

CUDA autocast's fp32 policy:

CPU autocast (what a CPU-only trace gets) casts matmuls to bf16 like CUDA autocast does, but it
does not run CUDA's "fp32" ops in fp32: under CUDA autocast `torch.pow`, `exp`, `rsqrt`,
`layer_norm`, `softmax`, `log_softmax`, `sum`, ... upcast a bf16 input and return fp32
(aten/src/ATen/autocast_mode.cpp, the CUDA `KERNEL_CUDA(..., fp32)` and `fp32_set_opt_dtype`
lists). It matters for memory where such an op meets a bf16 activation: GPT-2's gelu_new
(`torch.pow(x, 3.0)` on the bf16 output of c_fc) keeps fp32 intermediates on a GPU. This
TorchFunctionMode upcasts the inputs of those ops while autocast is on, so the trace keeps what
a GPU keeps. Ops reached only through other ops (inside aten) are unaffected, as on CUDA where
the policy applies at the dispatcher entry of each op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# CUDA autocast runs these in fp32 whatever the input dtype.
FP32_OPS = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.exp, torch.Tensor.exp,
            torch.expm1, torch.log, torch.Tensor.log, torch.log1p, torch.rsqrt, torch.Tensor.rsqrt,
            torch.reciprocal, torch.Tensor.reciprocal, F.layer_norm, torch.layer_norm, F.group_norm,
            F.softplus, torch.logsumexp, torch.Tensor.logsumexp, F.nll_loss, F.mse_loss, F.l1_loss,
            F.binary_cross_entropy_with_logits, F.kl_div, torch.cdist}
# ... and these in fp32 unless a `dtype` is given.
FP32_UNLESS_DTYPE = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax,
                     torch.Tensor.log_softmax, F.log_softmax, torch.sum, torch.Tensor.sum, torch.prod,
                     torch.Tensor.prod, torch.cumsum, torch.Tensor.cumsum, torch.cumprod}
LOWER_PRECISION = (torch.bfloat16, torch.float16)


class CudaBehaviour(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return _fused_dropout(*args, **kwargs)
        upcast = torch.is_autocast_enabled("cpu") and (
            func in FP32_OPS or (func in FP32_UNLESS_DTYPE and kwargs.get("dtype") is None))
        if upcast:
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
        return func(*args, **kwargs)


def _fused_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's signature
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOWER_PRECISION:
        return value.float()
    return value
