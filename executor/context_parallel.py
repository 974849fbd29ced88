"""Context parallelism: each micro-batch's sequence split over the cp ranks, attention as torch's
ring attention (torch.distributed.tensor.experimental.context_parallel).

As torchtitan's train step runs it (torchtitan/distributed/utils.py create_context_parallel_ctx:
the inputs, labels and rotary buffers are the CP buffers, sharded in place along the sequence with
head-tail load balancing, and the forward and backward run inside the context) and as transformers'
Trainer runs it on transformers models with Accelerate (Trainer._prepare_context_parallel_inputs:
the buffers are input_ids, the already shifted labels and position_ids; accelerate's
_attach_context_parallel_hooks: each self_attn drops its attention mask and runs is_causal=True).
The ring attention needs the CUDA SDPA kernels: torch 2.13 has no CPU handler
(planner/capabilities.py CP_CPU_REFUSAL), so CPU plans with cp > 1 are refused before launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from executor.data import IGNORE_INDEX


def attach_causal_hooks(model: nn.Module) -> None:
    """Every self_attn module runs full causal attention without a mask: the ring attention
    accepts no attn_mask (accelerate.big_modeling._attach_context_parallel_hooks)."""

    def causal(_module, args, kwargs):
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
            kwargs["is_causal"] = True
        return args, kwargs

    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_pre_hook(causal, with_kwargs=True, prepend=True)


def shard_inputs(inputs: dict) -> dict:
    """The micro-batch's keyword arguments with whole-sequence buffers that context_parallel can
    shard in place: labels shifted before the split (transformers' loss takes `shift_labels`, which
    it does not shift again) and position ids 0..S-1 (rotary positions of each rank's chunks)."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    return {**inputs, "input_ids": ids.contiguous().clone(), "labels": shifted, "shift_labels": shifted,
            "position_ids": positions}


@contextlib.contextmanager
def unpacked_sequences() -> Iterator[None]:
    """transformers reads position ids that do not increase as several documents packed in one row
    (masking_utils.find_packed_sequence_indices) and builds an s x s mask for them. Inside, it sees
    no packing. The executor's sharded position ids are not increasing (head-tail chunks) and the
    hooks drop that mask anyway: it refuses --document-mask with cp, so there is nothing to detect.
    The oracle (calibration/oracle.py) traces on fake tensors, which have no values to check: there
    the check answers what it answers on the real run (positions 0..s-1, no packing), so SDPA runs
    with is_causal and native GQA instead of a materialised mask and k, v repeated for every head."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextlib.contextmanager
def sequence_split(cp_mesh: DeviceMesh, inputs: dict) -> Iterator[dict]:
    """Inside: `inputs` (from shard_inputs) hold this rank's 2 chunks of every sequence, and SDPA is
    the ring attention over the cp group; forward and backward both run inside."""
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [inputs["input_ids"], inputs["labels"], inputs["position_ids"]]
    with context_parallel(cp_mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)), \
            unpacked_sequences():
        yield inputs
