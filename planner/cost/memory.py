"""Per-device memory of a candidate, by category, for every stage role; the most loaded stage wins.

Storage per parameter (PyTorch mixed precision as the executor runs it: fp32 master parameters,
fp32 gradients, fp32 AdamW moments — the same 16 bytes as ZeRO's 2+2+12, Rajbhandari et al.
2020 §3.1, split differently):
  trained   params 4, grads 4, AdamW 8 (bitsandbytes 8-bit AdamW: 2, plain SGD: 0)
  frozen    the compute dtype (a LoRA base in bf16: 2)
  NF4       QLoRA base linears: 0.5 byte + double-quantised constants (Dettmers et al. 2023 §3:
            0.127 bit per parameter), i.e. 0.5159 byte
ZeRO / FSDP2 over the dp ranks: 1 shards optimizer state; 2 (FSDP2 reshard_after_forward=False)
and 3 (fully_shard) shard parameters, gradients and state, and hold compute-dtype copies while
they compute (2: the whole stage from forward to the end of backward; 3: the layer running, the
one prefetched, and the root module with embedding and head).

The peak is the larger of two moments:
  forward/backward: params + states + grads held + copies + activations in flight + the larger of
      the loss temporaries (last stage) and the recomputed layer during its backward
  optimizer step:   params + grads + states + the optimizer's temporaries
"""

from __future__ import annotations

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import ROLES, Context, Regime, StageLayout

FP32 = 4
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8
# optimizer state per trained parameter with fp32 master weights; with bf16 master weights AdamW's
# two moments are bf16 too (torchtune's default), 8-bit AdamW is unchanged
OPTIMIZER_STATE_BYTES = {("adamw", "fp32"): 8.0, ("adamw", "bf16"): 4.0, ("adamw8bit", "fp32"): 2.0,
                         ("adamw8bit", "bf16"): 2.0, ("sgd", "fp32"): 0.0, ("sgd", "bf16"): 0.0}
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS = 0, 1, 2
CATEGORIES = ("params", "grads", "optimizer", "activations", "logits", "buffers")


def loss_bytes_per_token(compute_bytes: int, vocab: int, chunks: int = 1, compiled: bool = False) -> float:
    """transformers ForCausalLMLoss upcasts logits to fp32 and runs cross_entropy (log_softmax +
    nll). Forward peak: the logits (C bytes), the fp32 copy of the chunk being processed and the
    saved fp32 log_softmax outputs (4). The executor drops the model output before backward
    (`loss = model(...).loss`), so backward starts with the saved log_softmax outputs and, for the
    chunk in flight, the gradient flowing into it and the one it produces (8). One chunk:
    max(C + 8, 12) bytes per vocabulary entry per token; torchtune's CEWithChunkedOutputLoss with k
    chunks: max(C + 4 + 4/k, 4 + 8/k). Under torch.compile the cross-entropy fuses: it keeps the
    logits and a log-sum-exp per token and writes the gradient in the logits' dtype, C·(1 + 1/k)."""
    if compiled:
        return compute_bytes * (1 + 1 / chunks) * vocab
    return max(compute_bytes + FP32 + FP32 / chunks, FP32 + 2 * FP32 / chunks) * vocab


def stage_params(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str) -> dict[str, np.ndarray]:
    """Unsharded-by-ZeRO parameter counts on one TP rank of this stage, by storage class."""
    t = c.tp
    layer, emb, head = regime.layer.params, regime.embedding.params, regime.head.params
    n = layout.layers[role]
    first, last = layout.has_embedding[role], layout.has_head[role]
    # a tied LM head on its own pipeline stage needs its own copy of the embedding (Megatron does this)
    tied_copy = np.where(last & (c.pp > 1) & ctx.spec.tie_word_embeddings, emb.trainable_tp + emb.frozen_tp, 0)
    trainable = (n * (layer.trainable_tp / t + layer.trainable_rep) + first * (emb.trainable_tp / t + emb.trainable_rep)
                 + last * (head.trainable_tp / t + head.trainable_rep))
    trainable = trainable + np.where(ctx.workload.method == "full", tied_copy / t, 0)
    frozen = (n * (layer.frozen_tp / t + layer.frozen_rep) + first * (emb.frozen_tp / t + emb.frozen_rep)
              + last * (head.frozen_tp / t + head.frozen_rep))
    frozen = frozen + np.where(ctx.workload.method != "full", tied_copy / t, 0)
    quantized = n * layer.quantized_tp / t
    # weights that pass through a linear (autocast casts them): layer linears and the LM head
    vocab_hidden = ctx.spec.vocab_size * ctx.spec.hidden_size
    matmul = n * layer.trainable_tp / t + last * vocab_hidden / t * (ctx.workload.method == "full")
    per_layer = layer.trainable_tp / t + layer.trainable_rep + layer.frozen_tp / t + layer.frozen_rep + layer.quantized_tp / t
    root = first * (emb.total - emb.quantized_tp) / t + last * (head.total + tied_copy) / t
    root_trainable = first * emb.trainable / t + last * (head.trainable + tied_copy * (ctx.workload.method == "full")) / t
    return {"trainable": trainable, "frozen": frozen, "quantized": quantized, "matmul": matmul,
            "per_layer": per_layer, "per_layer_trainable": layer.trainable_tp / t + layer.trainable_rep,
            "root": root, "root_trainable": root_trainable}


def stage_memory(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str) -> dict[str, np.ndarray]:
    w, n = ctx.workload, regime.numerics
    dp, zero, offload = c.dp, c.zero, c.offload
    p = stage_params(ctx, regime, c, layout, role)
    shard_params = np.where(zero >= 2, dp, 1)
    shard_grads = np.where(zero >= 2, dp, 1)
    shard_state = np.where(zero >= 1, dp, 1)
    master_bytes = FP32 if w.master_dtype == "fp32" else 2
    frozen_bytes = n.compute_bytes
    state_bytes = OPTIMIZER_STATE_BYTES[(w.optimizer, w.master_dtype)]

    params = (p["trainable"] * master_bytes + p["frozen"] * frozen_bytes
              + p["quantized"] * NF4_BYTES_PER_PARAM) / shard_params
    grads = p["trainable"] * master_bytes / shard_grads
    states = p["trainable"] * state_bytes / shard_state
    # ZeRO-Offload (optimizer): fp32 master, moments and fp32 grads live on the host; the device keeps
    # compute-dtype params and grads. FSDP2 CPUOffloadPolicy (params): everything lives on the host.
    offload_opt = offload == OFFLOAD_OPTIMIZER
    offload_all = offload == OFFLOAD_PARAMS
    params = np.where(offload_opt, (p["trainable"] * n.compute_bytes + p["frozen"] * frozen_bytes
                                    + p["quantized"] * NF4_BYTES_PER_PARAM) / shard_params, params)
    grads = np.where(offload_opt, p["trainable"] * n.compute_bytes / shard_grads, grads)
    params, grads = np.where(offload_all, 0.0, params), np.where(offload_all, 0.0, grads)
    states = np.where(offload_opt | offload_all, 0.0, states)
    host = np.where(offload_opt | offload_all, p["trainable"] * (2 * master_bytes + state_bytes) / shard_state, 0.0)
    host = host + np.where(offload_all, (p["frozen"] * frozen_bytes + p["quantized"] * NF4_BYTES_PER_PARAM)
                           / shard_params, 0.0)

    buffers = _parameter_copies(ctx, regime, c, p)
    activations, transient = _activations(ctx, regime, c, layout, role)
    if w.activation_offload:  # saved activations wait in host memory; the device keeps the layer running and the next
        host = host + activations
        activations = np.minimum(activations, 2 * _kept_per_layer(ctx, regime, c))
    tokens = c.micro_batch_size * w.seq_len
    loss = loss_bytes_per_token(n.compute_bytes, ctx.spec.vocab_size, w.loss_chunks, w.compile)
    logits = np.where(layout.has_head[role], loss * tokens / c.tp, 0.0)
    temps = _optimizer_temporaries(ctx, p, shard_state, shard_params, master_bytes) * (offload == OFFLOAD_NONE)
    # gradients are held during forward/backward when they accumulate over micro-batches; under a
    # pipeline, torch.distributed.pipelining turns off FSDP's gradient sync and resharding until the
    # last micro-batch, so the stage's gradients accumulate unsharded in the reduce dtype
    grads_held = np.where((c.num_micro_batches > 1) | (c.pp > 1), grads, 0.0)
    pp_fsdp = (c.zero >= 2) & (c.pp > 1)
    grads_held = np.where(pp_fsdp, _reduce_bytes(w) * p["trainable"], grads_held)
    if w.optimizer_in_backward:
        # each parameter steps in its post-accumulate-grad hook: at most one layer's gradients exist and
        # there is no separate optimizer step (torchtune optimizer_in_bwd)
        transient = transient + master_bytes * p["per_layer"] / shard_grads
        grads, grads_held, temps = 0.0 * grads, 0.0 * grads, 0.0 * temps

    fwd_bwd = params + states + grads_held + buffers + activations + np.maximum(logits, transient)
    step = params + grads + states + temps
    in_step = step > fwd_bwd
    return {
        "params": params, "grads": np.where(in_step, grads, grads_held),
        "optimizer": np.where(in_step, states + temps, states),
        "activations": np.where(in_step, 0.0, activations + np.where(logits >= transient, 0.0, transient)),
        "logits": np.where(in_step | (logits < transient), 0.0, logits),
        "buffers": np.where(in_step, 0.0, buffers),
        "allocated": np.maximum(fwd_bwd, step), "in_step": in_step, "host": host,
    }


def _reduce_bytes(w) -> int:
    """FSDP2 reduce-scatters gradients in reduce_dtype: fp32 with fp32 master weights
    (MixedPrecisionPolicy(reduce_dtype=fp32)), the parameters' bf16 otherwise."""
    return FP32 if w.master_dtype == "fp32" else 2


def _parameter_copies(ctx: Context, regime: Regime, c: Candidates, p: dict[str, np.ndarray]) -> np.ndarray:
    """Compute-dtype parameter copies alive during forward/backward.

    autocast caches one bf16 cast of every weight that enters a linear until the forward ends, and
    each linear's backward keeps it (F.linear saves its weight). FSDP2 holds what it all-gathered:
    with reshard_after_forward=False (ZeRO 2, and every unit under a pipeline) the whole stage;
    otherwise the running layer, the prefetched one and the root module (embedding, final norm, head:
    FSDP2 does not reshard the root after forward), plus one unit's unsharded gradients as the
    reduce-scatter input (trained parameters only)."""
    cb = regime.numerics.compute_bytes
    autocast_cache = np.where(regime.numerics.autocast & (c.zero <= 1), cb * p["matmul"], 0.0)
    stage = p["trainable"] + p["frozen"] + p["quantized"]
    zero2 = cb * stage
    scatter = _reduce_bytes(ctx.workload) * np.maximum(p["per_layer_trainable"], p["root_trainable"])
    zero3 = cb * (2 * p["per_layer"] + p["root"]) + scatter
    keep_whole = (c.zero == 2) | ((c.zero == 3) & (c.pp > 1))
    copies = np.where(keep_whole, zero2, np.where(c.zero == 3, zero3, autocast_cache))
    # pipeline receive buffers: one activation and one gradient of the stage boundary
    boundary = np.where(c.pp > 1, 2 * cb * ctx.spec.hidden_size * c.micro_batch_size * ctx.workload.seq_len
                        / np.where(c.sequence_parallel, c.tp, 1), 0.0)
    return copies + boundary


def _activations(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str):
    """Saved activations of all micro-batches in flight, and the extra held while one layer runs
    its backward (the recomputed layer under checkpointing, plus gradient buffers)."""
    tokens = c.micro_batch_size * ctx.workload.seq_len
    s, t = ctx.workload.seq_len, c.tp
    sp_div = np.where(c.sequence_parallel, t, 1)
    per_layer = {name: regime.layer.saved[name].evaluate(tokens, s, t, sp_div) for name in ("none", "selective", "full")}
    kept = np.select([c.recompute == 0, c.recompute == 1], [per_layer["none"], per_layer["selective"]], per_layer["full"])
    chunks = layout.chunks_in_flight[role]
    activations = layout.in_flight[role] * kept
    activations = activations + layout.has_embedding[role] * chunks * regime.embedding.saved["none"].evaluate(tokens, s, t, sp_div)
    activations = activations + layout.has_head[role] * regime.head.saved["none"].evaluate(tokens, s, t, sp_div)
    recomputed = np.where(c.recompute == 0, 0.0, per_layer["none"] - kept)
    working = regime.layer.working_bytes.evaluate(tokens, s, t, sp_div)
    return activations, recomputed + working


def _optimizer_temporaries(ctx: Context, p: dict[str, np.ndarray], shard_state, shard_params,
                           master_bytes: int) -> np.ndarray:
    """torch.optim.AdamW: foreach (the GPU default) allocates one list the size of all params in
    their dtype (torch._foreach_sqrt(exp_avg_sqs) in _multi_tensor_adam); the for-loop version two
    temporaries of the largest tensor; fused none. Other optimizers here use fused kernels."""
    w = ctx.workload
    if w.optimizer != "adamw" or w.optimizer_impl == "fused":
        return np.zeros_like(p["trainable"], dtype=float)
    if w.optimizer_impl == "foreach":
        return master_bytes * p["trainable"] / shard_state
    parts = ctx.regimes[False]
    largest = max(parts.layer.params.largest_tensor, parts.embedding.params.largest_tensor,
                  parts.head.params.largest_tensor)
    return np.full_like(p["trainable"], 2 * master_bytes * largest, dtype=float) / shard_params


def _kept_per_layer(ctx: Context, regime: Regime, c: Candidates) -> np.ndarray:
    tokens = c.micro_batch_size * ctx.workload.seq_len
    sp_div = np.where(c.sequence_parallel, c.tp, 1)
    per_policy = [regime.layer.saved[name].evaluate(tokens, ctx.workload.seq_len, c.tp, sp_div)
                  for name in ("none", "selective", "full")]
    return np.select([c.recompute == 0, c.recompute == 1], per_policy[:2], per_policy[2])


def memory_breakdown(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout) -> dict[str, np.ndarray]:
    """The most loaded existing stage's breakdown; adds `reserved` (allocator and framework)."""
    best: dict[str, np.ndarray] | None = None
    for role in ROLES:
        stage = stage_memory(ctx, regime, c, layout, role)
        exists = layout.exists[role]
        if best is None:
            best = stage
            continue
        wins = exists & (stage["allocated"] > best["allocated"])
        best = {k: np.where(wins, stage[k], best[k]) for k in best}
        best["host"] = np.maximum(best["host"], np.where(exists, stage["host"], 0.0))
    mem = ctx.profile.memory(ctx.hardware.name, ctx.hardware.vendor)
    best["reserved"] = best["allocated"] * (1 + mem.fragmentation) + mem.fixed_bytes
    best["overhead"] = best["reserved"] - best["allocated"]
    return best
