"""Memory of the loss over the logits, per token: what transformers' cross-entropy (or a chunked
or fused one) keeps alive."""

from __future__ import annotations

FP32 = 4


def loss_bytes_per_token(compute_bytes: int, vocab: int, chunks: int = 1, compiled: bool = False,
                         phase: str = "backward", vocab_parallel: bool = False, fp32_logits: bool = False) -> float:
    """transformers ForCausalLMLoss upcasts logits to fp32 and runs cross_entropy (log_softmax +
    nll). Forward: the logits (C bytes), the fp32 copy of the chunk being processed and the saved
    fp32 log_softmax outputs (4): C + 4 + 4/k bytes per vocabulary entry per token for k chunks
    (torchtune's CEWithChunkedOutputLoss). The executor drops the model output before backward
    (`loss = model(...).loss`), so backward starts with the saved log_softmax outputs and, for the
    chunk in flight, the gradient flowing into it and the one it produces: 4 + 8/k. Under
    torch.compile the cross-entropy fuses: it keeps the logits and a log-sum-exp per token and
    writes the gradient in the logits' dtype, C·(1 + 1/k).

    On vocabulary shards (torch.distributed.tensor.parallel.loss_parallel, loss.py) the log-softmax
    is decomposed: the fp32 copy, `shifted = x - max` and `exp(shifted)` or the result are alive
    together, C + 4 + 8/k; its fused nll + log-softmax backward holds zeros_like(x),
    exp(x) + that and the product beside the saved output, 4 + 12/k (traced per op).

    A model that returns fp32 logits (`fp32_logits`) needs no copy of them: its logits are 4 bytes
    and the loss's upcast is a no-op (4 + 4 eager, 4·(1 + 1/k) compiled)."""
    logits = FP32 if fp32_logits else compute_bytes
    if compiled:
        return logits * (1 + 1 / chunks) * vocab
    upcast_copy = 0 if fp32_logits else FP32
    decomposed = FP32 if vocab_parallel else 0  # loss_parallel's shifted logits
    if phase == "forward":
        return (logits + FP32 + (upcast_copy + decomposed) / chunks) * vocab
    return (FP32 + (2 * FP32 + decomposed) / chunks) * vocab
