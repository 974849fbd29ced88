"""The loss of a step, normalised so that every parallel layout trains the same model.

Per micro-batch: the sum of token cross-entropies divided by the number of trained tokens in the
whole global batch, times dp (DDP and FSDP2 average gradients over the dp ranks). Summed over
micro-batches and ranks, this is the token mean over the global batch whatever the split, which
is why every layout matches the single-process run. transformers' ForCausalLMLoss does exactly
this when given `num_items_in_batch` (the Trainer's gradient-accumulation fix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from executor.data import IGNORE_INDEX


def items_per_rank(labels_global: torch.Tensor, dp: int, device: torch.device) -> torch.Tensor:
    """`num_items_in_batch` for one rank: trained tokens of the global batch over dp. A 0-dim
    tensor, so that a compiled loss does not recompile for every new count."""
    shifted = labels_global[:, 1:]
    count = max(int((shifted != IGNORE_INDEX).sum()), 1) / dp
    return torch.tensor(count, dtype=torch.float32, device=device)


def chunked_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                           num_items_in_batch: torch.Tensor, chunks: int, **_: object) -> torch.Tensor:
    """Cross-entropy over `chunks` pieces of the sequence, each upcast to fp32 on its own, as
    torchtune's CEWithChunkedOutputLoss: the fp32 copy of the logits never exists whole.
    logits (B, S, V) in the compute dtype, labels (B, S) unshifted."""
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    for logit_piece, label_piece in zip(logits.chunk(chunks, dim=1), shift.chunk(chunks, dim=1)):
        total = total + F.cross_entropy(logit_piece.float().reshape(-1, vocab_size), label_piece.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch: torch.Tensor,
                   chunks: int = 1) -> torch.Tensor:
    """The same loss as transformers' ForCausalLMLoss (chunks=1) for the pipeline's last stage."""
    if chunks > 1:
        return chunked_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, chunks)
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), shift.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum") / num_items_in_batch
