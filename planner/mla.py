"""DeepSeek's multi-head latent attention (DeepSeek-V2 report, arXiv 2405.04434, §2.1), as
transformers' DeepseekV2Attention / DeepseekV3Attention build it (modeling_deepseek_v3.py):

  q = q_b_proj(q_a_layernorm(q_a_proj(x)))            (q_lora_rank > 0; else q = q_proj(x))
  kv_a = kv_a_proj_with_mqa(x) = [c_kv (kv_lora_rank), k_rope (qk_rope_head_dim, shared by heads)]
  [k_nope, v] = kv_b_proj(kv_a_layernorm(c_kv))        per head qk_nope_head_dim + v_head_dim
  attention over heads of qk_head_dim = nope + rope (k_rope expanded to every head), values of
  v_head_dim; o_proj(heads·v_head_dim -> hidden)

The low-rank down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms are replicated over
tensor parallelism (Megatron-LM's MLA keeps linear_q_down_proj / linear_kv_down_proj unsplit).

DeepSeek Sparse Attention (DeepSeek-V3.2-Exp report, §2.1; transformers DeepseekV32Indexer): a
lightning indexer with its own projections (wq_b from the q latent, wk and a LayerNorm over one
shared key head, weights_proj: one weight per indexer head) scores every causal (query, key) pair,
relu(q·k) summed over its heads with those weights, and the main MLA attends only the index_topk
best keys of each query. The indexer runs without gradients (transformers wraps it in no_grad;
DeepSeek trains it on its own KL loss from a detached input): its weights get none and it saves
nothing. The main attention costs the FLOPs of the keys it selects (a causal query at position i
sees min(i + 1, k) keys, the count of a k-wide sliding window) and keeps what a sparse kernel keeps
(FlashMLA's sparse kernel: q, k, v, the output, the log-sum-exp and the int32 indices of the
selected keys), or with materialised scores only the selected ones. transformers' own eager / sdpa
path instead folds the selection into a dense (s x s) additive mask over the whole sequence.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.ops import FP32_BYTES, AttentionShape, Op, Saved, attention_op, window_keys_fraction

# `b` below is planner/graph.py's _BlockBuilder (graph imports this module, so it is not named here)
BlockBuilder = Any


def mla_attention(b: BlockBuilder) -> None:
    """Adds the MLA ops of one layer to the block builder `b`."""
    s = b.spec
    heads, rope = s.num_heads, s.qk_rope_head_dim
    qk_head = s.qk_nope_head_dim + rope
    q_width, v_width = heads * qk_head, heads * s.v_head_dim
    x, bias = b.attn_in, s.qkv_bias
    start = b.last
    if s.q_lora_rank:
        b.linear("q_a_proj", s.hidden_size, s.q_lora_rank, bias, x, column=True, after=start, tp_split=False)
        b.compute_norm("q_a_norm", "q_a_proj.out", s.q_lora_rank)
        b.linear("q_b_proj", s.q_lora_rank, q_width, False, "q_a_norm.out", column=True,
                 input_bytes=b.n.compute_bytes)
    else:
        b.linear("q_proj", s.hidden_size, q_width, False, x, column=True, after=start)
    q_end = b.last
    b.linear("kv_a_proj", s.hidden_size, s.kv_lora_rank + rope, bias, x, column=True, after=start, tp_split=False)
    b.compute_norm("kv_a_norm", "kv_a_proj.out", s.kv_lora_rank)
    b.linear("kv_b_proj", s.kv_lora_rank, heads * (s.qk_nope_head_dim + s.v_head_dim), False, "kv_a_norm.out",
             column=True, input_bytes=b.n.compute_bytes)
    b.last = [q_end, b.last]
    b.rotary(heads * rope + rope)
    # k = [k_nope, k_rope expanded to every head]: as wide as q; v is a slice of kv_b_proj's output
    shape = b.attention_shape(AttentionShape(q_width, q_width, v_width, v_width, heads, v_key="kv_b_proj.out"))
    if s.index_topk:
        lightning_indexer(b, x, start)
        selected = min(s.index_topk, b.workload.seq_len)
        shape = replace(shape, keys_fraction=window_keys_fraction(selected, b.workload.seq_len), masked=False)
        b.add(_up_proj_recomputed(b, _selected(attention_op(s, b.workload, b.n, shape), selected, shape.keys_fraction)))
    else:
        b.add(_up_proj_recomputed(b, attention_op(s, b.workload, b.n, shape)))
    b.attention_out(v_width)


# the core attention's q, k and v: the outputs of the up-projections and RoPE
UP_PROJ_OUTPUTS = ("attn.q", "attn.k", "kv_b_proj.out")


def _up_proj_recomputed(b: BlockBuilder, op: Op) -> Op:
    """Megatron-Core's recompute module mla_up_proj (Megatron-LM multi_latent_attention.py 808-811 at
    92c8482e6d: q_b / kv_b projections and RoPE run under CheckpointWithoutOutput; 333-336: their
    outputs are discarded once the core attention has run, and recomputed for its backward): the
    core attention's q, k and v are not kept; the latents the up-projections read are. Memory view only."""
    if not (b.n.framework_layers and "mla_up_proj" in b.workload.recompute_module_names):
        return op
    return replace(op, saved=tuple(t for t in op.saved if t.key not in UP_PROJ_OUTPUTS))


INDEX_BYTES = 4  # int32 indices of the selected keys


def lightning_indexer(b: BlockBuilder, x: str, start: Any) -> None:
    """The DSA indexer's ops: forward only (no_grad), frozen for the optimizer, nothing saved. Its
    scores cost 2·heads·(head_dim + 1) FLOPs per (query, key) pair over the whole sequence (counted
    as attention, non-causal as in PaLM) and move fp32 scores per pair and head through memory."""
    s, c = b.spec, b.n.compute_bytes
    heads, dim = s.index_heads, s.index_head_dim
    end = b.last
    b.linear("indexer.wq_b", s.q_lora_rank, heads * dim, False, "q_a_norm.out", column=True, after=start,
             input_bytes=c, tp_split=False)
    # wk and weights_proj both read x: one GEMM here (two matmul-kind ops in all, so that the every-other
    # matmul that selective recomputation keeps is the same for the layer's other matmuls)
    b.linear("indexer.wk", s.hidden_size, dim + heads, False, x, column=True, after=start, tp_split=False)
    wk = b.graph.nodes["indexer.wk"]
    wk["op"] = replace(wk["op"], param_dims=((dim, s.hidden_size * dim), (heads, s.hidden_size * heads)))
    b.add(Op("indexer.k_norm", "norm", params=2 * dim, tp_split=False, io_bytes_per_token=3 * c * dim,
             param_dims=((dim, 2 * dim),)))
    b.add(Op("indexer.scores", "elementwise", tp_split=False, flops_per_token_seq=2 * heads * (dim + 1),
             io_bytes_per_token=c * (heads * dim + dim + heads), io_bytes_per_token_seq=4 * FP32_BYTES * heads + 16),
          after=["indexer.wq_b", "indexer.k_norm"])
    for name in ("indexer.wq_b", "indexer.wk", "indexer.k_norm", "indexer.scores"):
        node = b.graph.nodes[name]
        node["op"] = replace(node["op"], saved=(), grads=(), trainable=False, out_bytes_per_token=0)
    b.last = [end, "indexer.scores"]


def _selected(op: Op, selected: int, fraction: float) -> Op:
    """The main attention over the selected keys: the int32 indices kept for backward; materialised
    scores only for the selected keys (per query, not per key of the sequence)."""
    saved = tuple(Saved(t.key, t.bytes_per_token * selected, t.split) if t.times_seq else t for t in op.saved)
    return replace(op, saved=saved + (Saved("indexer.topk", INDEX_BYTES * selected, "sp"),),
                   io_bytes_per_token_seq=op.io_bytes_per_token_seq * fraction)
