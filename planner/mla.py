"""DeepSeek's multi-head latent attention (DeepSeek-V2 report, arXiv 2405.04434, §2.1), as
transformers' DeepseekV2Attention / DeepseekV3Attention build it (modeling_deepseek_v3.py):

  q = q_b_proj(q_a_layernorm(q_a_proj(x)))            (q_lora_rank > 0; else q = q_proj(x))
  kv_a = kv_a_proj_with_mqa(x) = [c_kv (kv_lora_rank), k_rope (qk_rope_head_dim, shared by heads)]
  [k_nope, v] = kv_b_proj(kv_a_layernorm(c_kv))        per head qk_nope_head_dim + v_head_dim
  attention over heads of qk_head_dim = nope + rope (k_rope expanded to every head), values of
  v_head_dim; o_proj(heads·v_head_dim -> hidden)

The low-rank down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms are replicated over
tensor parallelism (Megatron-LM's MLA keeps linear_q_down_proj / linear_kv_down_proj unsplit).
"""

from __future__ import annotations

from typing import Any

from planner.ops import AttentionShape, attention_op

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
    shape = AttentionShape(q_width, q_width, v_width, v_width, heads, v_key="kv_b_proj.out")
    b.add(attention_op(s, b.workload, b.n, b.attention_shape(shape)))
    b.attention_out(v_width)
