"""Gemma 4's decoder layer (gemma4_text), as transformers builds it (modeling_gemma4.py,
Gemma4TextAttention, Gemma4TextDecoderLayer, Gemma4TextModel):

  attention: q_proj, a per-head q_norm, rotary; k_proj and v_proj, a per-head k_norm and a
  weightless per-head v_norm, rotary on k. Full-attention layers have their own head dim and KV
  heads (global_head_dim, num_global_key_value_heads) and, with attention_k_eq_v, no v_proj: the
  values are k_proj's output, normalised by v_norm. The last num_kv_shared_layers layers have no
  k/v projections or norms: they reuse the keys and values the last earlier layer of their
  attention type made (config.kv_sharing_modes), so they keep no K/V of their own unless SDPA is
  given a mask (then repeat_kv makes each layer its own copies). With use_double_wide_mlp their
  MLP is twice as wide.
  MoE (enable_moe_block): the dense MLP and the experts side by side on the residual; the router
  normalises the residual without a weight, multiplies it by `scale` (hidden) and scales its top-k
  weights by `per_expert_scale` (experts); the experts read pre_feedforward_layernorm_2(residual);
  post_feedforward_layernorm_1 / _2 on the two outputs before their sum.
  per-layer inputs (hidden_size_per_layer_input > 0, Gemma 3n's PLE): once per model an embedding
  of num_layers x p per token and a projection of the embeddings to the same width, normalised per
  layer (p) and summed; in each layer, after the MLP: gate (hidden -> p), activation, times the
  layer's slice, projection (p -> hidden), post_per_layer_input_norm, residual add.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.ops import AttentionShape, Numerics, Op, Saved, attention_op, linear_op, norm_op
from planner.specs import LayerKind, ModelSpec

# `b` below is planner/graph.py's _BlockBuilder (graph imports this module, so it is not named here)
BlockBuilder = Any
# transformers' SDPA runs GQA natively only for head dims up to this (integrations/sdpa_attention.py
# use_gqa_in_sdpa: `key.shape[-1] == value.shape[-1] <= 256`); above it, repeat_kv copies k and v
# for every head even without a mask (Gemma 4's 512-wide global heads), and SDPA keeps the copies
SDPA_GQA_MAX_HEAD_DIM = 256


def repeats_kv(spec: ModelSpec, kind: LayerKind, masked: bool) -> bool:
    """Whether transformers hands SDPA k and v repeated for every query head."""
    head_dim, kv_heads = layer_heads(spec, kind)
    return kv_heads < spec.num_heads and (masked or head_dim > SDPA_GQA_MAX_HEAD_DIM)


def layer_heads(spec: ModelSpec, kind: LayerKind) -> tuple[int, int]:
    """(head dim, KV heads) of a layer: full-attention layers may have their own (Gemma 4)."""
    if kind.attention == "full_attention":
        return spec.global_head_dim or spec.head_dim, spec.global_kv_heads or spec.num_kv_heads
    return spec.head_dim, spec.num_kv_heads


def gemma4_attention(b: BlockBuilder) -> None:
    """Adds one Gemma 4 attention to the block builder `b`."""
    s, kind = b.spec, b.kind
    head_dim, kv_heads = layer_heads(s, kind)
    q_width, kv_width = s.num_heads * head_dim, kv_heads * head_dim
    x, start = b.attn_in, b.last
    b.linear("q_proj", s.hidden_size, q_width, s.qkv_bias, x, column=True, after=start)
    b.compute_norm("q_norm", "q_proj.out", head_dim, rows=s.num_heads, tp=True)
    ends = [b.last]
    if not kind.kv_shared:
        b.linear("k_proj", s.hidden_size, kv_width, s.qkv_bias, x, column=True, after=start)
        b.compute_norm("k_norm", "k_proj.out", head_dim, rows=kv_heads, tp=True)
        ends.append(b.last)
        values = "k_proj"
        if not (s.attention_k_eq_v and kind.attention == "full_attention"):
            values = b.linear("v_proj", s.hidden_size, kv_width, s.qkv_bias, x, column=True, after=start)
        b.last = values
        _weightless_norm(b, "v_norm", f"{values}.out", head_dim, kv_heads)
        ends.append(b.last)
    b.last = ends
    b.rotary(q_width + (0 if kind.kv_shared else kv_width))
    shape = b.attention_shape(AttentionShape(q_width, kv_width, kv_width, q_width, s.num_heads, v_key="v_norm.out"))
    repeated = repeats_kv(s, kind, shape.masked)
    if repeated and not shape.masked:  # the masked path repeats them already
        shape = replace(shape, k=q_width, v=q_width, v_key="attn.v")
    op = attention_op(s, b.workload, b.n, shape)
    if kind.kv_shared and not (shape.masked or repeated):  # SDPA keeps the producing layer's K and V: no copy of its own
        op = replace(op, saved=tuple(t for t in op.saved if t.key not in ("attn.k", shape.v_key)))
    b.add(op)
    b.attention_out(q_width)


def _weightless_norm(b: BlockBuilder, name: str, input_key: str, width: int, rows: int, tp: bool = True) -> None:
    """Gemma4RMSNorm(with_scale=False) after `b.last`: the fp32 input and its rsqrt kept, no weight."""
    b.compute_norm(name, input_key, width, rows=rows, tp=tp)
    node = b.graph.nodes[name]
    op = node["op"]
    node["op"] = replace(op, params=0, param_dims=(), saved=tuple(t for t in op.saved if not t.for_weight_grad))


def mlp_width(spec: ModelSpec, kind: LayerKind) -> int:
    """The dense MLP's width: twice as wide in kv-shared layers with use_double_wide_mlp."""
    width = spec.dense_intermediate_size or spec.intermediate_size
    return 2 * width if spec.double_wide_shared_mlp and kind.kv_shared else width


def gemma4_moe(b: BlockBuilder) -> None:
    """The dense MLP and the experts side by side (enable_moe_block), each with its post norm."""
    s, c = b.spec, b.n.compute_bytes
    h, experts = s.hidden_size, s.num_experts
    start = b.last
    b.gated_mlp(mlp_width(s, b.kind))
    b.compute_norm("mlp_post_norm_1", "down_proj.out", h)
    dense_end = b.last
    b.last = start
    _weightless_norm(b, "router_norm", "mid", h, 1, tp=False)
    # hidden_states * scale * hidden**-0.5 keeps the normalised input and the product; per_expert_scale
    # multiplies the top-k weights
    b.add(Op("router_scale", "elementwise", params=h + experts, tp_split=False, io_bytes_per_token=3 * c * h,
             out_bytes_per_token=c * h, saved=(Saved("router_norm.out", c * h, "sp"),),
             grads=(Saved("router_scale.grad", 2 * c * h, "sp"),), param_dims=((h, h), (experts, experts))))
    b.compute_norm("moe_pre_norm", "mid", h)
    mlp_in, b.mlp_in = b.mlp_in, "router_scale.out"
    b.moe()
    b.mlp_in = mlp_in
    b.compute_norm("mlp_post_norm_2", "experts.out", h)
    b.add(Op("moe_sum", "elementwise", tp_split=False, io_bytes_per_token=3 * c * h, out_bytes_per_token=c * h),
          after=[dense_end, b.last])


def per_layer_input(b: BlockBuilder) -> None:
    """The per-layer input branch at the end of a layer: gate, activation, times the layer's slice
    of the per-layer inputs (kept once for the model, per_layer_ends), projection, norm, residual."""
    s, c = b.spec, b.n.compute_bytes
    p = s.per_layer_input_size
    b.linear("per_layer_input_gate", s.hidden_size, p, False, "mlp_residual.out", column=True, tp_split=False)
    b.add(Op("per_layer_act_mul", "elementwise", tp_split=False, io_bytes_per_token=5 * c * p,
             out_bytes_per_token=c * p,
             saved=(Saved("per_layer_input_gate.out", c * p, "sp"), Saved("per_layer_act.out", c * p, "sp")),
             grads=(Saved("per_layer_act_mul.grad", 3 * c * p, "sp"),)))
    b.linear("per_layer_projection", p, s.hidden_size, False, "per_layer_act_mul.out", column=False, tp_split=False)
    b.compute_norm("per_layer_norm", "per_layer_projection.out", s.hidden_size)
    b.residual("per_layer_residual", dropout=False)


def per_layer_ends(spec: ModelSpec, n: Numerics, trainable: bool) -> list[Op]:
    """Once per model: embed_tokens_per_layer (scaled), per_layer_model_projection of the scaled
    embeddings, per_layer_projection_norm over each layer's p, their sum times 2**-0.5, kept for
    every layer's product (one tensor, sliced per layer). Not in the tensor-parallel plan."""
    rows, p, r = spec.per_layer_input_vocab, spec.per_layer_input_size, n.residual_bytes
    width = spec.num_layers * p
    embedding = Op("per_layer_embedding", "embedding", params=rows * width, tp_split=False,
                   io_bytes_per_token=2 * r * width, out_bytes_per_token=r * width, trainable=trainable,
                   param_dims=((rows, rows * width),))
    projection = replace(linear_op(n, "per_layer_model_projection", spec.hidden_size, width, False, "embedding.out",
                                   split="sp", input_bytes=r), tp_split=False, trainable=trainable, quantizable=False)
    norm = replace(norm_op(spec, replace(n, residual_bytes=n.compute_bytes), "per_layer_projection_norm",
                           "per_layer_model_projection.out", width=p, rows=spec.num_layers), trainable=trainable)
    inputs = Op("per_layer_inputs", "elementwise", tp_split=False, io_bytes_per_token=4 * r * width,
                out_bytes_per_token=r * width, saved=(Saved("per_layer_inputs", r * width, "sp"),),
                grads=(Saved("per_layer_inputs.grad", 2 * r * width, "sp"),))
    return [embedding, projection, norm, inputs]
