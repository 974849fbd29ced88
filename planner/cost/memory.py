"""Per-device memory of a candidate, by category, for every stage role; the most loaded stage wins.

Storage per parameter (PyTorch mixed precision as the executor runs it: fp32 master parameters,
fp32 gradients, fp32 AdamW moments — the same 16 bytes as ZeRO's 2+2+12, Rajbhandari et al.
2020 §3.1, split differently):
  trained   params 4, grads 4, AdamW 8 (bitsandbytes 8-bit AdamW: 2, plain SGD: 0)
  frozen    the compute dtype (a LoRA base in bf16: 2)
  NF4       QLoRA base linears: 0.5 byte + double-quantised constants (Dettmers et al. 2023 §3:
            0.127 bit per parameter), i.e. 0.5159 byte
ZeRO / FSDP2 over the dp x cp ranks (torchtitan's dp_shard_cp mesh: context-parallel ranks hold the
same parameters and shard them like data-parallel ones): 1 shards optimizer state; 2 (FSDP2 reshard_after_forward=False)
and 3 (fully_shard) shard parameters, gradients and state, and hold compute-dtype copies while
they compute (2: the whole stage from forward to the end of backward; 3: the layer running, the
one prefetched, and the root module with embedding and head).

Context parallelism (cp) splits each micro-batch's sequence over cp ranks: every activation, the
logits and the loss temporaries per rank are those of seq_len / cp tokens; the ring attention adds
the all-gathered K/V of the whole sequence and fp32 dK/dV accumulators while a layer's attention
runs its backward (torch.distributed.tensor.experimental._context_parallel._attention).
Expert parallelism (ep) gives each rank num_experts / ep of the routed experts (torchtitan
expert_parallel.py, Megatron-Core's expert-model-parallel group): the unsharded expert weights,
gradients and states on a rank are divided by ep; ZeRO / FSDP shards them further over the
expert-data-parallel ranks (dp x cp / ep), which is the same dp x cp share of the whole layer.

The peak is the larger of two moments:
  forward/backward: params + states + grads held + copies + activations in flight + the larger of
      the loss temporaries (last stage) and the recomputed layer during its backward
  optimizer step:   params + grads + states + the optimizer's temporaries
"""

from __future__ import annotations

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import ROLES, Context, Regime, StageLayout
from planner.cost.moments import MOMENTS, StepParts, moments
from planner.cost.stages import POSITIONS, SIZED, role_layer, role_layer_sizes
from planner.cost.zero3 import zero3_by_module
from planner.cost.loss import loss_bytes_per_token
from planner.framework_memory import framework_memory

FP32 = 4
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8
# optimizer state per trained parameter with fp32 master weights; with bf16 master weights AdamW's
# two moments are bf16 too (torchtune's default), 8-bit AdamW is unchanged
OPTIMIZER_STATE_BYTES = {("adamw", "fp32"): 8.0, ("adamw", "bf16"): 4.0, ("adamw8bit", "fp32"): 2.0,
                         ("adamw8bit", "bf16"): 2.0, ("sgd", "fp32"): 0.0, ("sgd", "bf16"): 0.0}
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS = 0, 1, 2
CATEGORIES = ("params", "grads", "optimizer", "activations", "logits", "buffers")


def stage_params(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str) -> dict[str, np.ndarray]:
    """Unsharded-by-ZeRO parameter counts on one TP rank of this stage, by storage class, and the
    FSDP2 padding of its tensors over the data-parallel ranks."""
    t = c.tp
    layer = role_layer(regime, layout, role, ctx.spec.num_layers).params  # the stage's mix of layer kinds
    emb, head = regime.embedding.params, regime.head.params
    n = layout.layers[role]
    first, last = layout.has_embedding[role], layout.has_head[role]
    full = ctx.workload.method == "full"
    # the executor shards a tied embedding / LM head with TP only when they are not tied; with a
    # vocabulary-parallel loss both are vocabulary shards, tied or not (Megatron's
    # VocabParallelEmbedding and its output layer share the shard: megatron/core/tensor_parallel/layers.py)
    tv = np.where(ctx.spec.tie_word_embeddings & ~np.asarray(ctx.workload.loss_parallel), 1, t)
    # a tied LM head on its own pipeline stage needs its own copy of the embedding (Megatron does this)
    tied_copy = np.where(last & (c.pp > 1) & ctx.spec.tie_word_embeddings, emb.trainable_tp + emb.frozen_tp, 0)
    emb_trainable = emb.trainable_tp / tv + emb.trainable_rep
    head_trainable = head.trainable_tp / tv + head.trainable_rep + np.where(full, tied_copy / tv, 0)
    trainable = n * (layer.trainable_tp / t + layer.trainable_rep) + first * emb_trainable + last * head_trainable
    frozen = (n * (layer.frozen_tp / t + layer.frozen_rep) + first * (emb.frozen_tp / tv + emb.frozen_rep)
              + last * (head.frozen_tp / tv + head.frozen_rep))
    frozen = frozen + np.where(full, 0, tied_copy / tv)
    quantized = n * layer.quantized_tp / t
    per_layer = layer.trainable_tp / t + layer.trainable_rep + layer.frozen_tp / t + layer.frozen_rep + layer.quantized_tp / t
    root = first * (emb.total - emb.quantized_tp) / tv + last * (head.total + tied_copy) / tv
    layer_pad, root_pad = _layer_padding(layer, regime.experts, c, ctx.spec.num_experts), (emb + head).padding(c.data_ranks)
    stage = n * per_layer + root
    # the executor's vocabulary-parallel embedding (RowwiseParallel) gets its gradient replicated: DTensor's
    # embedding backward all-reduces a whole-vocabulary gradient that AccumulateGrad then keeps
    replicated = first * np.where((t > 1) & ~ctx.spec.tie_word_embeddings & full & (c.zero < 2),
                                  emb.trainable_tp * (1 - 1 / t), 0.0)
    full = {"trainable": trainable, "frozen": frozen, "quantized": quantized,
            "per_layer": per_layer, "per_layer_quantized": layer.quantized_tp / t, "per_layer_trainable": layer.trainable_tp / t + layer.trainable_rep}
    local = _expert_local(regime, c, n, full)
    mean = (local["per_layer"], local["per_layer_trainable"])
    sizes = role_layer_sizes(regime, layout, role, ctx.spec.num_layers, t)
    at = {} if sizes is None else {k: v for k, v in sizes.items() if k.startswith("kind")}
    for name in SIZED:
        # under expert parallelism the experts' share of each kind is averaged (_expert_local): the mean layer
        size, trained = mean if sizes is None else (np.where(c.ep > 1, m, v) for v, m in zip(sizes[name], mean))
        at[f"layer_{name}"], at[f"layer_{name}_trainable"] = size, trained
    return {**local, **{f"{k}_full": v for k, v in full.items()},
            **at,
            "root": root, "root_trainable": first * emb_trainable + last * head_trainable,
            "root_embedding": first * (emb.total - emb.quantized_tp) / tv, "root_head": last * (head.total + tied_copy) / tv,
            "head_trainable": last * head_trainable, "vocab_split": tv, "embedding_replicated_grad": replicated,
            "layer_padding": layer_pad, "root_padding": root_pad,
            "padding": (n * per_layer * layer_pad + root * root_pad) / np.maximum(stage, 1)}


def _layer_padding(layer, experts, c: Candidates, num_experts: int) -> np.ndarray:
    """FSDP2's dim-0 padding of a layer's tensors over the dp x cp ranks, except the routed experts
    under expert parallelism when dp x cp exceeds the experts: torchtitan then shards them along
    dim 1 (apply_fsdp's `_experts_shard_placement_fn`: dp_mod_ep x ep > num_experts), which pads
    nothing. A stack of mixed layer kinds keeps the dim-0 padding (its experts carry no shapes)."""
    padding = layer.padding(c.data_ranks)
    total, expert_total = sum(n for _, n in layer.dims), sum(n for _, n in experts.dims)
    if not total or not expert_total:
        return padding
    excess = (experts.padding(c.data_ranks) - 1.0) * expert_total / total
    return np.where((c.ep > 1) & (c.data_ranks > num_experts), padding - excess, padding)


def _expert_local(regime: Regime, c: Candidates, layers: np.ndarray,
                  full: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The counts of `full` as one expert-parallel rank holds them before ZeRO: the routed experts'
    share divided by ep (their TP split is Megatron-Core's default expert-tensor-parallel size = tp).
    `_full` keys keep the whole layer's, which ZeRO / FSDP shards over dp x cp."""
    x, t = regime.experts, c.tp
    gone = 1 - 1 / c.ep  # the other ep ranks' share; 0 without expert parallelism
    trainable = (x.trainable_tp / t + x.trainable_rep) * gone
    frozen = (x.frozen_tp / t + x.frozen_rep) * gone
    quantized = x.quantized_tp / t * gone
    return {"trainable": full["trainable"] - layers * trainable, "frozen": full["frozen"] - layers * frozen,
            "quantized": full["quantized"] - layers * quantized,
            "per_layer": full["per_layer"] - (trainable + frozen + quantized),
            "per_layer_quantized": full["per_layer_quantized"] - quantized,
            "per_layer_trainable": full["per_layer_trainable"] - trainable}


def _at(p: dict[str, np.ndarray], key: str, divisor) -> np.ndarray:
    """Parameters of `key` before dividing by `divisor` ranks: sharded, the whole layer's (each
    expert-data-parallel rank holds 1 / (dp x cp / ep) of 1 / ep of the experts); else this rank's."""
    return np.where(np.asarray(divisor) > 1, p[f"{key}_full"], p[key])


def stage_memory(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str) -> dict[str, np.ndarray]:
    """The stage role's memory at every moment (planner/cost/moments.py); the largest is the peak."""
    store = _storage(ctx, regime, c, stage_params(ctx, regime, c, layout, role))
    parts = zero3_by_module(ctx, regime, c, _step_parts(ctx, regime, c, layout, role, store))
    if ctx.workload.activation_offload:  # saved activations wait in host memory; the device keeps two layers'
        store["host"] = store["host"] + parts.others + parts.layers * parts.kept_layer
        parts.layers_resident = np.minimum(parts.layers, 2)
        parts.others = 0.0 * parts.others
    table = moments(parts)
    table["optimizer-step"] = {"grads": store["grads"], "buffers": 0.0, "activations": 0.0, "logits": 0.0}
    static = store["params"] + store["states"]
    totals = np.stack([static + sum(table[m].values()) + (store["temps"] if m == "optimizer-step" else 0.0)
                       for m in MOMENTS])
    peak = np.argmax(totals, axis=0)
    in_step = peak == MOMENTS.index("optimizer-step")

    def at_peak(category: str) -> np.ndarray:
        return np.choose(peak, [np.broadcast_to(table[m][category], peak.shape) for m in MOMENTS])

    result = {"params": store["params"], "grads": at_peak("grads"),
              "optimizer": store["states"] + np.where(in_step, store["temps"], 0.0),
              "activations": at_peak("activations"), "logits": at_peak("logits"), "buffers": at_peak("buffers"),
              "allocated": totals.max(axis=0), "in_step": in_step, "peak_moment": peak, "host": store["host"]}
    result.update({f"moment:{m}": totals[i] for i, m in enumerate(MOMENTS)})
    result["largest_block"] = _largest_block(ctx, parts)
    return result


def _largest_block(ctx: Context, parts: StepParts) -> np.ndarray:
    """The step's largest single allocation: the loss's logits block (the fp32 upcast of a chunk
    in eager mode or from a model returning fp32 logits, the compute-dtype logits under torch.compile)
    or one gathered FSDP unit.
    The caching allocator serves each step's block of that size from a segment that earlier,
    smaller allocations of the same step have split (c10/cuda/CUDACachingAllocator.cpp), so its
    reserved memory holds about one more such block beyond the allocated peak."""
    w = ctx.workload
    per_element = 1.0 if (w.compile or w.fused_loss) and not w.fp32_logits else FP32 / parts.compute_bytes
    return np.maximum(parts.grad_logits * per_element / w.loss_chunks, parts.gathered_at["max"])


def _storage(ctx: Context, regime: Regime, c: Candidates, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parameters, gradients, optimizer states and their host share, as stored on the device."""
    w, n = ctx.workload, regime.numerics
    fsdp = c.zero >= 2
    shard = np.where(fsdp, c.data_ranks, 1) * 1.0
    shard_state = np.where(c.zero >= 1, c.data_ranks, 1)
    trainable, trainable_state = _at(p, "trainable", shard), _at(p, "trainable", shard_state)
    master_bytes = FP32 if w.master_dtype == "fp32" else 2
    state_bytes = OPTIMIZER_STATE_BYTES[(w.optimizer, w.master_dtype)]
    if w.moments_dtype == "bf16" and w.optimizer == "adamw":  # Megatron-Core's precision-aware optimizer
        state_bytes = OPTIMIZER_STATE_BYTES[("adamw", "bf16")]
    # Megatron-Core: the model and its grad buffer in the compute dtype, the fp32 main parameters
    # among the optimizer's states (planner/framework_memory.py megatron_mixed_precision)
    megatron = (n.framework_layers and framework_memory(w.framework).megatron_mixed_precision
                and master_bytes != n.compute_bytes)
    stored_bytes = n.compute_bytes if megatron else master_bytes
    held_state_bytes = state_bytes + (master_bytes if megatron else 0.0)
    pad = np.where(fsdp, p["padding"], 1.0)  # FSDP2 pads dim 0 to a multiple of the ranks
    frozen = _at(p, "frozen", shard) * n.compute_bytes + _at(p, "quantized", shard) * NF4_BYTES_PER_PARAM
    params = (trainable * stored_bytes + frozen) * pad / shard
    states = trainable_state * held_state_bytes * np.where(c.zero >= 2, pad, 1.0) / shard_state
    # ZeRO-Offload (optimizer): fp32 master, moments and fp32 grads live on the host; the device keeps
    # compute-dtype params and grads. FSDP2 CPUOffloadPolicy (params): everything lives on the host
    # (each reduce-scattered gradient is moved there).
    offload_opt, offload_all = c.offload == OFFLOAD_OPTIMIZER, c.offload == OFFLOAD_PARAMS
    grad_bytes = np.where(offload_all, 0.0, np.where(offload_opt, n.compute_bytes, stored_bytes))  # as stored
    grads = (trainable * grad_bytes * pad
             + np.where(c.offload == OFFLOAD_NONE, p["embedding_replicated_grad"] * stored_bytes, 0.0)) / shard
    params = np.where(offload_opt, (trainable * n.compute_bytes + frozen) * pad / shard, params)
    params = np.where(offload_all, 0.0, params)
    states = np.where(offload_opt | offload_all, 0.0, states)
    host = np.where(offload_opt | offload_all, trainable_state * (2 * master_bytes + state_bytes) / shard_state, 0.0)
    host = host + np.where(offload_all, frozen * pad / shard, 0.0)
    temps = _optimizer_temporaries(ctx, {**p, "trainable": trainable_state}, shard_state, shard, master_bytes) * (c.offload == OFFLOAD_NONE)
    # gradients are held during forward/backward when they accumulate over micro-batches; under a
    # pipeline, torch.distributed.pipelining turns off FSDP's gradient sync and resharding until the
    # last micro-batch, so the stage's gradients accumulate unsharded in the reduce dtype
    grads_held = np.where((c.num_micro_batches > 1) | (c.pp > 1), grads, 0.0)
    grads_held = np.where(fsdp & (c.pp > 1), reduce_bytes(w) * p["trainable"], grads_held)
    if w.optimizer_in_backward:
        # each parameter steps in its post-accumulate-grad hook: gradients exist only while their layer's
        # backward runs and there is no separate optimizer step (torchtune optimizer_in_bwd)
        grads, grads_held, temps = 0.0 * grads, 0.0 * grads, 0.0 * temps
    return {"params": params, "grads": grads, "states": states, "temps": temps, "host": host,
            "grads_held": grads_held, "shard": shard, "pad": pad, "master_bytes": master_bytes,
            "grad_bytes": grad_bytes, "p": p}


def _step_parts(ctx: Context, regime: Regime, c: Candidates, layout: StageLayout, role: str,
                store: dict[str, np.ndarray]) -> StepParts:
    w, spec, num = ctx.workload, ctx.spec, regime.numerics
    p, cb = store["p"], num.compute_bytes
    # context parallelism: each rank holds seq_len / cp of every sequence (2 x cp chunks divide it)
    tokens, s, t = c.micro_batch_size * w.seq_len // c.cp, w.seq_len, c.tp
    sp_div = np.where(c.sequence_parallel, t, 1)

    def per_micro_batch(b) -> np.ndarray:
        return b.evaluate(tokens, s, t, sp_div)

    layer = role_layer(regime, layout, role, spec.num_layers)  # the stage's mix of layer kinds
    saved = {name: per_micro_batch(layer.saved[name]) for name in ("none", "selective", "full")}
    kept = np.select([c.recompute == 0, c.recompute == 1], [saved["none"], saved["selective"]], saved["full"])
    layers, has_emb, has_head = layout.layers[role], layout.has_embedding[role], layout.has_head[role]
    vocab, hidden = spec.vocab_size, spec.hidden_size
    vocab_parallel = w.loss_parallel & (t > 1)  # the cross-entropy runs on the logits' TP shards
    logit_split = np.where(vocab_parallel, t, 1)
    fused = w.compile or w.fused_loss  # a fused cross-entropy keeps the logits, not an fp32 copy
    loss = {phase: has_head * tokens / logit_split * np.where(
                vocab_parallel, loss_bytes_per_token(cb, vocab, w.loss_chunks, fused, phase, True, w.fp32_logits),
                loss_bytes_per_token(cb, vocab, w.loss_chunks, fused, phase, False, w.fp32_logits))
            for phase in ("forward", "backward")}
    fsdp, gb = c.zero >= 2, store["grad_bytes"]
    shard = store["shard"]
    layer_pad, root_pad = np.where(fsdp, p["layer_padding"], 1.0), np.where(fsdp, p["root_padding"], 1.0)
    head_weights = has_head * vocab * hidden / p["vocab_split"] * (w.method == "full")
    tied = spec.tie_word_embeddings * has_head * has_emb * store["master_bytes"] * head_weights
    casts = num.autocast & (c.zero <= 1)
    gone = regime.experts.trainable_tp * (1 - 1 / c.ep)  # the experts other ep ranks hold
    trained_matmuls = (layer.params.trainable_tp - gone) / t
    steps = _backward_steps(layer, t, gone, per_micro_batch)
    kind_steps = [_backward_steps(part, t, gone, per_micro_batch) for part, _ in regime.kinds] or None
    if w.optimizer_in_backward:
        gb = 0.0 * gb
    grad_layer = gb * _at(p, "per_layer_trainable", shard) * layer_pad / shard
    kept_at, grad_at = _position_parts(regime, c, p, per_micro_batch, gb * layer_pad / shard, grad_layer)
    stream = spec.residual_width  # the residual between layers: hc_mult streams under hyper-connections
    boundary = np.where(c.pp > 1, 2 * cb * stream * tokens / sp_div, 0.0)  # pipeline send/receive buffers
    ends = fsdp & c.shard_ends  # the embedding and the head are FSDP units of their own
    embedding_trainable = p["root_trainable"] - p["head_trainable"]
    return StepParts(
        layers=layers, others=(layout.in_flight[role] - layers) * kept, kept_layer=kept,
        embedding=has_emb * layout.chunks_in_flight[role] * per_micro_batch(regime.embedding.saved["none"]),
        head=has_head * per_micro_batch(regime.head.saved["none"]),
        held_output=has_head * num.residual_bytes * stream * tokens / sp_div,
        loss_forward=loss["forward"], loss_backward=loss["backward"], grad_logits=has_head * tokens * vocab * cb / logit_split,
        steps=steps, grads_held=store["grads_held"], grad_layer=grad_layer,
        kind_steps=kind_steps, kept_at=kept_at, grad_at=grad_at, kind_at={k[5:]: p[k] for k in p if k.startswith("kind_")} if kind_steps else None,
        grad_head=gb * p["head_trainable"] * root_pad / shard, grad_all=store["grads"], grad_bytes=gb,
        head_weights=head_weights,
        embedding_grad=has_emb * gb * (vocab * hidden / p["vocab_split"] + p["embedding_replicated_grad"]),
        incoming_grad=has_emb * num.residual_bytes * stream * tokens / sp_div,
        tied_grad=np.where(fsdp, 0.0, tied),
        compute_bytes=cb, autocast_casts=casts, cast_layer=np.where(casts, cb * trained_matmuls, 0.0),
        cast_head=np.where(casts, cb * head_weights, 0.0), fsdp=fsdp,
        zero2=(c.zero == 2) | (fsdp & (c.pp > 1)),
        gathered_layer=_gathered_bytes(cb, p["per_layer"], p["per_layer_quantized"]) * layer_pad,
        gathered_at={k: _gathered_bytes(cb, p[f"layer_{k}"], p["per_layer_quantized"]) * layer_pad for k in SIZED},
        gathered_root=np.where(ends, 0.0, cb * p["root"] * root_pad),
        gathered_head=np.where(ends, cb * p["root_head"] * root_pad, 0.0),
        gathered_embedding=np.where(ends, cb * p["root_embedding"] * root_pad, 0.0), ends=ends,
        scatter_layer=reduce_bytes(w) * p["per_layer_trainable"] * layer_pad,
        scatter_at={k: reduce_bytes(w) * p[f"layer_{k}_trainable"] * layer_pad for k in SIZED},
        scatter_root=reduce_bytes(w) * np.where(ends, embedding_trainable, p["root_trainable"]) * root_pad,
        # the head's unsharded gradient, a tied head's too (autograd buffers it for the embedding's)
        root_grads=np.where(fsdp & ~ends, cb * (p["head_trainable"] * root_pad + tied / store["master_bytes"]), 0.0),
        root_grads_all=np.where(fsdp, cb * np.where(ends, embedding_trainable, p["root_trainable"]) * root_pad, 0.0),
        layer_grads_unsharded=np.where(fsdp, cb * p["layer_first_trainable"] * layer_pad, 0.0),
        unsharded_at={k: np.where(fsdp, cb * p[f"layer_{k}_trainable"], 0.0) for k in SIZED},  # unpadded
        boundary=boundary, layers_resident=layers, ring=_ring_bytes(spec, c, tokens, cb),
        tied_sum=np.where(fsdp & ~ends, 3 * cb * tied / store["master_bytes"], 0.0),
        checkpointed=c.recompute != 0, **_expert_units(regime, c, w, cb, layer_pad, fsdp))


def _expert_units(regime: Regime, c: Candidates, w, compute_bytes: int, layer_pad, fsdp) -> dict[str, np.ndarray]:
    """One layer's ep-local routed experts as an FSDP2 unit of their own (ep > 1, ZeRO 3), gathered in
    the compute dtype and reduce-scattered in the reduce dtype, padded as the layer is."""
    x, t = regime.experts, c.tp
    separate = (c.ep > 1) & fsdp & (c.zero == 3)
    trainable = (x.trainable_tp / t + x.trainable_rep) / c.ep
    held = trainable + (x.frozen_tp / t + x.frozen_rep) / c.ep
    return {"experts_gathered": np.where(separate, compute_bytes * held * layer_pad, 0.0),
            "experts_scatter": np.where(separate, reduce_bytes(w) * trainable * layer_pad, 0.0)}


def _position_parts(regime, c: Candidates, p: dict[str, np.ndarray], per_micro_batch, grad_per_param: np.ndarray,
                    grad_layer: np.ndarray) -> tuple[dict | None, dict | None]:
    """A stack of several kinds: the activations kept and the gradients stored by the stage's layer
    at each position (planner/cost/stages.py POSITIONS), by its own kind (under expert parallelism
    the gradients of the mean layer)."""
    if not regime.kinds:
        return None, None
    policy = np.select([c.recompute == 0, c.recompute == 1], [0, 1], 2)
    kept = [np.choose(policy, [per_micro_batch(part.saved[name]) for name in ("none", "selective", "full")])
            for part, _ in regime.kinds]
    kept = np.stack(np.broadcast_arrays(*kept))
    kept_at, grad_at = {}, {}
    for where in POSITIONS:
        kind = np.broadcast_to(p[f"kind_{where}"], kept.shape[1:])
        kept_at[where] = np.take_along_axis(kept, kind[None], 0)[0]
        grad_at[where] = np.where(c.ep > 1, grad_layer, grad_per_param * p[f"layer_{where}_trainable"])
    return kept_at, grad_at


def _backward_steps(layer, t, gone, per_micro_batch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(alive, weights made here, made before) of each backward step of a layer on this rank: the
    routed experts' weight gradients are of the rank's 1/ep of them (`gone`: the others' share), made
    over one step or several (`weight_share`: a step's part of them, BackwardPart)."""
    steps, experts_done = [], 0.0
    for step in layer.backward:  # in backward order: the ops before the experts see them done
        own = step.weight_share if step.name == "experts" else 0.0
        steps.append((per_micro_batch(step.alive), (step.weight_params_tp - gone * own) / t + step.weight_params_rep,
                      (step.done_params_tp - gone * experts_done) / t + step.done_params_rep))
        experts_done = min(experts_done + own, 1.0)
    return steps


def _ring_bytes(spec, c: Candidates, tokens: np.ndarray, compute_bytes: int) -> np.ndarray:
    """Context parallelism's buffers while a layer's attention runs its backward (torch's
    _templated_ring_attention_backward): K and V all-gathered over the cp ranks (its default
    rotate method, ALL_GATHER), and this rank's dK, dV in fp32 twice (the accumulator and the one
    passed round the ring; _cp_options.convert_to_f32)."""
    kv = 2 * spec.kv_dim / c.tp * tokens  # K and V of this rank's tokens
    return np.where(c.cp > 1, kv * (c.cp * compute_bytes + 2 * FP32), 0.0)


def _gathered_bytes(compute_bytes: int, params: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    """One FSDP2 unit all-gathered: parameters in the compute dtype, NF4 weights as NF4 (torchao's
    NF4Tensor all-gathers its packed data and scalers, fsdp_pre_all_gather / fsdp_post_all_gather,
    and dequantises per linear at compute time)."""
    return compute_bytes * (params - quantized) + NF4_BYTES_PER_PARAM * quantized


def reduce_bytes(w) -> int:
    """FSDP2 reduce-scatters gradients in reduce_dtype: fp32 with fp32 master weights
    (MixedPrecisionPolicy(reduce_dtype=fp32)), the parameters' bf16 otherwise."""
    return FP32 if w.master_dtype == "fp32" else 2


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
    best["reserved"] = (best["allocated"] * (1 + mem.fragmentation) + mem.fixed_bytes
                        + mem.largest_block_factor * best["largest_block"])
    best["overhead"] = best["reserved"] - best["allocated"]
    return best
