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
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 0.0}
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS = 0, 1, 2
CATEGORIES = ("params", "grads", "optimizer", "activations", "logits", "buffers")


def loss_bytes_per_token(compute_bytes: int, vocab: int) -> float:
    """transformers ForCausalLMLoss upcasts logits to fp32 and runs cross_entropy (log_softmax +
    nll). Forward peak: the logits, their fp32 copy and the fp32 log_softmax output. The executor
    drops the model output before backward (`loss = model(...).loss`), so at the start of backward
    the saved log_softmax output, the gradient flowing into it and the one it produces coexist:
    max(C + 8, 12) bytes per vocabulary entry."""
    return max(compute_bytes + 2 * FP32, 3 * FP32) * vocab


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
    return {"trainable": trainable, "frozen": frozen, "quantized": quantized, "matmul": matmul,
            "per_layer": per_layer, "root": root}


def stage_memory(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str) -> dict[str, np.ndarray]:
    w, n = ctx.workload, regime.numerics
    dp, zero, offload = c.dp, c.zero, c.offload
    p = stage_params(ctx, regime, c, layout, role)
    shard_params = np.where(zero >= 2, dp, 1)
    shard_grads = np.where(zero >= 2, dp, 1)
    shard_state = np.where(zero >= 1, dp, 1)
    master_bytes = FP32  # fp32 master parameters in every precision
    frozen_bytes = n.compute_bytes
    state_bytes = OPTIMIZER_STATE_BYTES[w.optimizer]

    params = (p["trainable"] * master_bytes + p["frozen"] * frozen_bytes
              + p["quantized"] * NF4_BYTES_PER_PARAM) / shard_params
    grads = p["trainable"] * FP32 / shard_grads
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
    host = np.where(offload_opt | offload_all, p["trainable"] * (FP32 + state_bytes + FP32) / shard_state, 0.0)
    host = host + np.where(offload_all, (p["frozen"] * frozen_bytes + p["quantized"] * NF4_BYTES_PER_PARAM)
                           / shard_params, 0.0)

    buffers = _parameter_copies(ctx, regime, c, p)
    activations, transient = _activations(ctx, regime, c, layout, role)
    tokens = c.micro_batch_size * w.seq_len
    logits = np.where(layout.has_head[role], loss_bytes_per_token(n.compute_bytes, ctx.spec.vocab_size) * tokens / c.tp, 0.0)
    temps = _optimizer_temporaries(ctx, p, shard_state, shard_params) * (offload == OFFLOAD_NONE)
    # gradients are held during forward/backward when they accumulate over micro-batches
    grads_held = np.where((c.num_micro_batches > 1) | (c.pp > 1), grads, 0.0)

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


def _parameter_copies(ctx: Context, regime: Regime, c: Candidates, p: dict[str, np.ndarray]) -> np.ndarray:
    """Compute-dtype parameter copies alive during forward/backward.

    autocast caches one bf16 cast of every weight that enters a linear until the forward ends, and
    each linear's backward keeps it (torch/csrc/autograd: F.linear saves its weight); FSDP2 holds the
    unsharded compute-dtype parameters it all-gathered, and a fp32 reduce-scatter input per unit."""
    cb = regime.numerics.compute_bytes
    autocast_cache = np.where(regime.numerics.autocast & (c.zero <= 1), cb * p["matmul"], 0.0)
    stage = p["trainable"] + p["frozen"] + p["quantized"]
    zero2 = cb * stage
    zero3 = cb * (2 * p["per_layer"] + p["root"]) + FP32 * np.maximum(p["per_layer"], p["root"])
    copies = np.where(c.zero == 3, zero3, np.where(c.zero == 2, zero2, autocast_cache))
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


def _optimizer_temporaries(ctx: Context, p: dict[str, np.ndarray], shard_state, shard_params) -> np.ndarray:
    """torch.optim.AdamW: foreach (the GPU default) allocates one fp32 list the size of all params
    (torch._foreach_sqrt(exp_avg_sqs) in _multi_tensor_adam); the for-loop version two temporaries
    of the largest tensor; fused none. Other optimizers here use fused kernels."""
    w = ctx.workload
    if w.optimizer != "adamw" or w.optimizer_impl == "fused":
        return np.zeros_like(p["trainable"], dtype=float)
    if w.optimizer_impl == "foreach":
        return FP32 * p["trainable"] / shard_state
    largest = ctx.regimes[False].layer.params.largest_tensor
    return 2 * FP32 * largest / shard_params + 0 * p["trainable"]


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
