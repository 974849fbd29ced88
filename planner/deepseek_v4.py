"""DeepSeek-V4's attention (DeepSeek-V4 report §2.3; transformers 5.x models/deepseek_v4/
modeling_deepseek_v4.py, cited below by line as `m:LINE`), for the three layer types of its
`layer_types`:

  q = q_b_norm(q_b_proj(q_a_norm(q_a_proj(x))))      q latent of q_lora_rank; q_b_norm has no weight (m:66-72)
  kv = kv_norm(kv_proj(x))                           ONE key head of head_dim; keys are values (m:834-835)
  both rotated on their last qk_rope_head_dim dims (interleaved RoPE, m:353-370)
  compressed_sparse_attention (CSA) / heavily_compressed_attention (HCA): a compressor appends
      T = s / m entries to the keys (m:840-845): kv_proj / gate_proj of the layer input, softmax
      over each window of m tokens of (gate + position_bias) weighting the kv rows, summed, kv_norm
      and RoPE (HCA, m:373-454: m' = 128, windows apart; CSA, m:600-713: m = 4, two series of
      2·head_dim per token, overlapping windows of 2m), and CSA's lightning indexer (m:473-597)
      picks index_topk entries per query by Σ_h w_h·relu(q_h·k) over its own compressed keys
  attention with one learned sink per head over [window keys | compressed entries]; the output's
      rope slice rotated back (m:878), then the grouped output projection: o_groups groups of
      heads·head_dim/o_groups -> o_lora_rank each (o_a_proj, a bmm, m:314-343), o_b_proj -> hidden

What runs, and so what is costed, depends on who runs the model. transformers has eager attention
only for V4 (m:1226: no sdpa, no flash: head_dim 512 and the sinks): every query's scores over the
whole sequence plus all T entries are materialised and masked (sliding window mask cat the
compressor's block bias, m:849-854), key and value repeated for every head (repeat_kv, m:738-739),
the fp32-free softmax over [scores | sink] kept (m:740-753). That is what the executor and HF
Trainer (framework_memory transformers_modeling) run and what is costed for them. Any other
framework is costed as DeepSeek's kernels compute: each query attends min(i + 1, sliding_window)
keys, plus the entries it may see (HCA: all i / m' before it; CSA: min(i / m, index_topk)), one kv
head kept once, a flash-style log-sum-exp, and CSA's int32 top-k indices.

The indexer's output is integer indices (m:589-596): no gradient reaches its weights, and the
autograd graph of its forward is freed as it returns; as DeepSeek-V3.2's (planner/mla.py) its ops
are forward-only, frozen and save nothing. Its q·k scores are an fp32 matmul (m:467) over every
(query, entry) pair, counted as attention FLOPs at the attention's efficiency (an fp32 GEMM runs
slower: not modelled).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.framework_memory import framework_memory
from planner.ops import FP32_BYTES, Op, Saved, norm_op, window_keys_fraction

# `b` below is planner/graph.py's _BlockBuilder (graph imports this module, so it is not named here)
BlockBuilder = Any
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
TOPK_INDEX_BYTES = 4  # int32 indices of the selected entries (a sparse kernel's)
MAX_INDEX_BYTES = 8  # int64 argmax of the row maximum eager attention subtracts (m:750)


def compress_rate(spec: Any, kind: str) -> int:
    """Source tokens per compressed entry of a layer type (0: a sliding-only layer)."""
    return {CSA: spec.csa_compress_rate, HCA: spec.hca_compress_rate}.get(kind, 0)


def dsv4_attention(b: BlockBuilder) -> None:
    """Adds one DeepSeek-V4 attention (q latent, shared kv head, compressor, sinks, grouped output)."""
    s, c, x = b.spec, b.n.compute_bytes, b.attn_in
    heads, dim, rank = s.num_heads, s.head_dim, s.q_lora_rank
    width = heads * dim
    start = b.last
    b.linear("q_a_proj", s.hidden_size, rank, False, x, column=True, after=start, tp_split=False)
    b.compute_norm("q_a_norm", "q_a_proj.out", rank, offset=True)  # fp32 weight (m:1242): fp32 normalised kept
    b.linear("q_b_proj", rank, width, False, "q_a_norm.out", column=True, input_bytes=c)
    # x * rsqrt(mean(x.float()²)).to(x.dtype): keeps x, its fp32 copy (square) and the per-head scale
    b.add(Op("q_b_norm", "elementwise", io_bytes_per_token=(3 * c + 2 * FP32_BYTES) * width,
             out_bytes_per_token=c * width,
             saved=(Saved("q_b_proj.out", c * width), Saved("q_b_norm.fp32", FP32_BYTES * width),
                    Saved("q_b_norm.scale", (FP32_BYTES + c) * heads)),
             grads=(Saved("q_b_norm.grad", (2 * c + 2 * FP32_BYTES) * width),)))
    _rotary(b, "q_rotary", width)
    q_end = b.last
    b.linear("kv_proj", s.hidden_size, dim, False, x, column=True, after=start, tp_split=False)
    b.compute_norm("kv_norm", "kv_proj.out", dim, offset=True)
    _rotary(b, "kv_rotary", dim, split="sp")
    rate = compress_rate(s, b.kind.attention)
    if rate:
        kv_end = b.last
        compressor(b, x, start, rate)
        b.last = [kv_end, *([b.last] if isinstance(b.last, str) else b.last)]
    entries = 1.0 / rate if rate else 0.0  # compressed entries per token of the sequence
    b.add(Op("kv_cat", "elementwise", tp_split=False, io_bytes_per_token=2 * c * dim * (1 + entries),
             out_bytes_per_token=c * dim * (1 + entries)))
    b.last = [q_end, "kv_cat"]
    if framework_memory(b.workload.framework).transformers_modeling:
        b.add(_eager_attention(b, entries))
    else:
        b.add(_kernel_attention(b, rate))
    _rotary(b, "out_rotary", width)
    _grouped_output(b)


def _rotary(b: BlockBuilder, name: str, width: int, split: str = "tp") -> None:
    """apply_rotary_pos_emb (m:353-370): the rope slice in fp32, then cat([nope, rotated]) writes a
    new tensor of the full width; only cos / sin (per position) are kept."""
    s, c = b.spec, b.n.compute_bytes
    rope = s.qk_rope_head_dim * width // s.head_dim
    b.add(Op(name, "elementwise", tp_split=split == "tp",
             io_bytes_per_token=2 * c * width + 4 * FP32_BYTES * rope, out_bytes_per_token=c * width,
             grads=(Saved(f"{name}.grad", 2 * c * width, split),)))


def compressor(b: BlockBuilder, x: str, start: Any, rate: int) -> None:
    """The compressor of a CSA (two series: kv_proj / gate_proj to 2·head_dim, windows of 2m) or HCA
    layer (to head_dim, windows of m): softmax(gate + position_bias) over the window in fp32, kept;
    its cast and the kv rows, kept by their product; the sum, kv_norm (fp32 weight) and RoPE per entry."""
    s, c, dim = b.spec, b.n.compute_bytes, b.spec.head_dim
    series = 2 if b.kind.attention == CSA else 1
    width = series * dim
    b.linear("compressor.kv_proj", s.hidden_size, width, False, x, column=True, after=start, tp_split=False)
    b.linear("compressor.gate_proj", s.hidden_size, width, False, x, column=True, after=start, tp_split=False)
    b.last = ["compressor.kv_proj", "compressor.gate_proj"]
    # CSA lays both series into fresh (windows, 2m, head_dim) kv and gate tensors (m:675-683): its product
    # keeps that copy of the kv rows; HCA's keeps kv_proj's output itself
    rows = "compressor.windows" if series == 2 else "compressor.kv_proj.out"
    b.add(Op("compressor.pool", "elementwise", tp_split=False, params=rate * width,
             io_bytes_per_token=(6 * c + 2 * FP32_BYTES) * width + (4 * c * width if series == 2 else 0),
             out_bytes_per_token=c * dim / rate,
             saved=(Saved("compressor.softmax", FP32_BYTES * width, "sp"), Saved(rows, c * width, "sp"),
                    Saved("compressor.weights", c * width, "sp")),
             grads=(Saved("compressor.pool.grad", (3 * c + FP32_BYTES) * width, "sp"),),
             param_dims=((rate, rate * width),)))
    b.add(_per_entry(norm_op(s, replace(b.n, residual_bytes=c), "compressor.kv_norm", "compressor.pool.out",
                             width=dim, offset=True), rate))
    if series == 2:
        lightning_indexer(b, x, start, rate)


def _per_entry(op: Op, rate: int) -> Op:
    """An op over the compressed entries (one per `rate` tokens): its per-token bytes divided by rate."""
    return replace(op, io_bytes_per_token=op.io_bytes_per_token / rate,
                   out_bytes_per_token=op.out_bytes_per_token / rate,
                   saved=tuple(replace(t, bytes_per_token=t.bytes_per_token / rate) for t in op.saved),
                   grads=tuple(replace(g, bytes_per_token=g.bytes_per_token / rate) for g in op.grads))


def lightning_indexer(b: BlockBuilder, x: str, start: Any, rate: int) -> None:
    """CSA's indexer (m:473-597): kv_proj / gate_proj to 2·index_head_dim and the scorer's weights_proj
    (one GEMM here: all read x), its own window pooling and kv_norm, q_b_proj from the q latent, and
    the scores of every query against every compressed key over index_n_heads heads (relu, the
    per-head weight, the sum: fp32 per pair and head). Forward only, frozen, nothing kept."""
    s, c = b.spec, b.n.compute_bytes
    heads, dim = s.index_heads, s.index_head_dim
    end = b.last
    b.linear("indexer.kv_gate", s.hidden_size, 4 * dim + heads, False, x, column=True, after=start, tp_split=False)
    gemm = b.graph.nodes["indexer.kv_gate"]
    gemm["op"] = replace(gemm["op"], param_dims=((2 * dim, 2 * dim * s.hidden_size),) * 2
                         + ((heads, heads * s.hidden_size),))
    b.add(Op("indexer.pool", "elementwise", tp_split=False, params=rate * 2 * dim + dim,
             io_bytes_per_token=(10 * c + 2 * FP32_BYTES) * 2 * dim, param_dims=((rate, rate * 2 * dim), (dim, dim))))
    b.linear("indexer.q_b_proj", s.q_lora_rank, heads * dim, False, "q_a_norm.out", column=True, after=start,
             input_bytes=c, tp_split=False)
    b.add(Op("indexer.scores", "elementwise", tp_split=False, flops_per_token_seq=2 * heads * (dim + 1) / rate,
             io_bytes_per_token=c * heads * dim, io_bytes_per_token_seq=(4 * FP32_BYTES * heads + 16) / rate),
          after=["indexer.pool", "indexer.q_b_proj"])
    for name in ("indexer.kv_gate", "indexer.pool", "indexer.q_b_proj", "indexer.scores"):
        node = b.graph.nodes[name]
        node["op"] = replace(node["op"], saved=(), grads=(), trainable=False, out_bytes_per_token=0)
    b.last = [end, "indexer.scores"]


def _eager_attention(b: BlockBuilder, entries: float) -> Op:
    """transformers' eager_attention_forward (m:728-763) over s + T keys per query: QK^T and PV over
    every pair (`entries` = T / s), the repeated key and value (two copies, every head) and q kept,
    the softmax of [scores | sink] kept (c per score), the row maximum's int64 index; the scores move
    through QK^T, scaling, the mask, the sink cat, the maximum, its subtraction, softmax and PV. Its
    backward holds a score-sized gradient besides the kept softmax (the fake-tensor trace of a 4-layer
    V4-Flash cut under full recomputation misses 2.5 GiB, one such tensor, without it)."""
    s, c = b.spec, b.n.compute_bytes
    heads, width = s.num_heads, s.num_heads * s.head_dim
    keys = 1 + entries
    saved = (Saved("q_rotary.out", c * width), Saved("attn.k_repeated", c * width * keys),
             Saved("attn.v_repeated", c * width * keys), Saved("attn.max_index", MAX_INDEX_BYTES * heads),
             Saved("attn.scores", c * heads * keys, times_seq=True))
    return Op("attention", "attention", params=heads, flops_per_token_seq=2 * 2 * width * keys,
              io_bytes_per_token=c * (2 * width + 2 * width * keys) + 2 * c * width * keys,
              io_bytes_per_token_seq=13 * c * heads * keys, out_bytes_per_token=c * width, saved=saved,
              grads=(Saved("attention.grad", c * (2 * width + 2 * width * keys)),
                     Saved("attention.scores_grad", c * heads * keys, times_seq=True)), param_dims=((heads, heads),))


def _kernel_attention(b: BlockBuilder, rate: int) -> Op:
    """A sparse / flash kernel (FlashMLA's sparse MQA kind): the FLOPs of the keys each query sees,
    as a share of the sequence before the causal half (window_keys_fraction): the window, plus all
    earlier entries (HCA: 1/m'), or the top-k of them (CSA: the top-k over entries is a window of
    k·m tokens, 1/m as wide); q, the one kv head with its entries, the output, the fp32 log-sum-exp
    and CSA's indices kept."""
    s, w, c = b.spec, b.workload, b.n.compute_bytes
    heads, dim, width = s.num_heads, s.head_dim, s.num_heads * s.head_dim
    keys = window_keys_fraction(s.sliding_window, w.seq_len)
    entries = 1.0 / rate if rate else 0.0
    indices = ()
    if b.kind.attention == CSA:
        keys += window_keys_fraction(s.index_topk * rate, w.seq_len) / rate
        indices = (Saved("indexer.topk", TOPK_INDEX_BYTES * min(s.index_topk, w.seq_len // rate), "sp"),)
    elif rate:
        keys += 1.0 / rate
    saved = (Saved("q_rotary.out", c * width), Saved("kv_cat.out", c * dim * (1 + entries), "sp"),
             Saved("attn.out", c * width), Saved("attn.lse", FP32_BYTES * heads, selective=True)) + indices
    return Op("attention", "attention", params=heads, flops_per_token_seq=2 * 2 * width * keys,
              io_bytes_per_token=c * (2 * width + 2 * dim * (1 + entries)), out_bytes_per_token=c * width,
              saved=saved, grads=(Saved("attention.grad", c * (2 * width + dim * (1 + entries))),),
              param_dims=((heads, heads),))


def _grouped_output(b: BlockBuilder) -> None:
    """o_a_proj (m:314-343): a bmm of o_groups groups, each heads·head_dim/o_groups -> o_lora_rank (one
    GEMM per group: tokens_factor o_groups), keeping the rotated output; its output reshaped into a
    copy that o_b_proj (o_groups·o_lora_rank -> hidden) keeps."""
    s, c = b.spec, b.n.compute_bytes
    groups, rank, width = s.o_groups, s.o_lora_rank, s.num_heads * s.head_dim
    b.linear("o_a_proj", width // groups, rank, False, "out_rotary.out", column=False)
    node = b.graph.nodes["o_a_proj"]
    node["op"] = replace(node["op"], tokens_factor=groups, flops_per_token=2 * width * rank, params=width * rank,
                         io_bytes_per_token=2 * c * groups * rank, param_dims=((groups * rank, width * rank),),
                         saved=(Saved("out_rotary.out", c * width, for_weight_grad=True),),
                         grads=(Saved("o_a_proj.grad_out", c * groups * rank), Saved("o_a_proj.grad_in", c * width)))
    b.linear("o_b_proj", groups * rank, s.hidden_size, False, "o_a_proj.out", column=False)
