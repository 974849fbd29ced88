"""DeepSeek-V4's decoder layer around its attention (planner/deepseek_v4.py) and MoE
(planner/moe_graph.py): manifold-constrained hyper-connections (mHC, DeepSeek-V4 report §2.2), the
hash-routed MoE layers and the clamped SwiGLU, as transformers 5.x builds them
(models/deepseek_v4/modeling_deepseek_v4.py, cited as `m:LINE`).

The residual is hc_mult streams of the hidden state, (B, S, n, H), from the embedding
(`expand(...).contiguous()`, m:1364) to the head (DeepseekV4HyperHead, m:1001-1017): every layer's
input, every pipeline send and every checkpointed layer input is n·H values per token
(ModelSpec.residual_width). Each of the layer's two branches (m:1175-1199):

  DeepseekV4HyperConnection (m:887-998): the streams flattened to n·H in fp32, an unweighted
      RMSNorm, one linear of (2 + n)·n outputs (fn, with base and three scales): pre (sigmoid),
      post (2·sigmoid) and an n x n comb (softmax, then hc_sinkhorn_iters Sinkhorn-Knopp
      normalisations, each a division by a column or row sum); the branch input is Σ pre_j·stream_j
  branch: input_layernorm + attention, or post_attention_layernorm + MoE
  streams' = post ⊗ branch_output + combᵀ @ streams        (n x n mixing per token, m:1190-1199)

What autograd keeps per branch: the fp32 flattened streams (the norm's square), the normalised fp32
tensor (the linear's input; its bf16 cast under autocast), the small mixes and every Sinkhorn step's
operands (fp32, (n² + n) per division), the streams themselves (pre's product, comb's matmul), post,
comb and the branch output (their product).

MoE (m:1039-1148): every layer's MLP is a DeepseekV4SparseMoeBlock: routed experts (grouped_mm) plus
ONE shared expert of moe_intermediate_size. A `hash_moe` layer (DeepseekV4HashRouter, m:1100-1128)
picks its experts by a fixed table, tid2eid[input_ids] (a vocab x top-k int64 buffer, not a
parameter), instead of a top-k; its learned gate still scores the experts whose scores weight the
picked ones. The experts' and the shared expert's gate and up are clamped to swiglu_limit before the
activation (m:1033-1034, m:1069-1076): the clamped gate (silu's input) and clamped up (the
product's) are kept besides what an unclamped SwiGLU keeps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.ops import FP32_BYTES, INDEX_BYTES, Numerics, Op, Saved, norm_op

# `b` below is planner/graph.py's _BlockBuilder (graph imports this module, so it is not named here)
BlockBuilder = Any


def hyper_connected_layer(b: BlockBuilder) -> None:
    """A DeepSeek-V4 decoder layer: [attn_hc -> input_layernorm -> attention -> mix] then
    [ffn_hc -> post_attention_layernorm -> MoE -> mix]; the streams between them are "mid"."""
    s, n = b.spec, b.n
    _pre(b, "attn_hc", "layer_in")
    b.add(norm_op(s, n, "attn_norm", "attn_hc.out", offset=True))  # fp32 weights (m:1242-1254)
    b.mixer()
    _post(b, "attn_hc", "layer_in", "o_b_proj.out")  # its output: the streams "mid"
    _pre(b, "ffn_hc", "mid")
    b.add(norm_op(s, n, "mlp_norm", "ffn_hc.out", offset=True))
    b.mlp()
    if b.kind.hash_routed:
        _hash_router(b)
    if s.swiglu_limit:
        _clamps(b)
    _post(b, "ffn_hc", "mid", "moe.out")


def _mix_saved_bytes(hc: int, iters: int) -> int:
    """fp32 bytes per token the mixes keep: the three scaled inputs ((2 + n)·n), the sigmoids of pre
    and post (2n), comb's softmax (n²) and each of the 2·iters - 1 Sinkhorn divisions' operands."""
    return FP32_BYTES * ((2 + hc) * hc + 2 * hc + hc * hc + (2 * max(iters, 1) - 1) * (hc * hc + hc))


def _pre(b: BlockBuilder, name: str, streams: str) -> None:
    """DeepseekV4HyperConnection.forward up to the collapsed branch input (m:954-998)."""
    s, n = b.spec, b.n
    hc, h, r, c = s.hc_mult, s.hidden_size, n.residual_bytes, n.compute_bytes
    width, mixes = hc * h, (2 + hc) * hc
    # .float() of the streams is the streams themselves when they are fp32
    flat = Saved(streams, r * width, "sp") if r == FP32_BYTES else Saved(f"{name}.flat", FP32_BYTES * width, "sp")
    # F.linear(normed, fn.float()) keeps its fp32 input, or its bf16 cast under autocast
    normed = Saved(f"{name}.fn_in_cast", c * width, "sp", for_weight_grad=True) if n.autocast else \
        Saved(f"{name}.normed", FP32_BYTES * width, "sp", for_weight_grad=True)
    b.add(Op(f"{name}.fn", "matmul", params=mixes * width + mixes + 3, tp_split=False, gemm=(width, mixes),
             flops_per_token=2 * width * mixes, io_bytes_per_token=(r + 4 * FP32_BYTES) * width,
             out_bytes_per_token=FP32_BYTES * mixes,
             saved=(flat, Saved(f"{name}.rstd", FP32_BYTES, "sp"), normed,
                    Saved(f"{name}.mixes", _mix_saved_bytes(hc, s.hc_sinkhorn_iters), "sp")),
             grads=(Saved(f"{name}.fn.grad", 3 * FP32_BYTES * width, "sp"),),
             param_dims=((mixes, mixes * width), (mixes, mixes), (3, 3))))
    # (pre.unsqueeze(-1) * streams).sum(2): fp32 product (pre is fp32) of the streams, kept with pre
    b.add(Op(f"{name}.collapse", "elementwise", tp_split=False,
             io_bytes_per_token=(r + 2 * FP32_BYTES) * width + (FP32_BYTES + r) * h, out_bytes_per_token=r * h,
             saved=(Saved(streams, r * width, "sp"), Saved(f"{name}.pre", FP32_BYTES * hc, "sp")),
             grads=(Saved(f"{name}.collapse.grad", r * h + (r + FP32_BYTES) * width, "sp"),)))


def _post(b: BlockBuilder, name: str, streams: str, branch: str) -> None:
    """post ⊗ branch output + combᵀ @ streams (m:1190-1199): the product keeps post (cast to the
    streams' dtype) and the branch output; the n x n matmul keeps comb's cast and the streams."""
    s, n = b.spec, b.n
    hc, h, r, c = s.hc_mult, s.hidden_size, n.residual_bytes, n.compute_bytes
    width = hc * h
    b.add(Op(f"{name}.mix", "elementwise", tp_split=False, io_bytes_per_token=c * h + 6 * r * width,
             out_bytes_per_token=r * width,
             saved=(Saved(branch, c * h, "sp"), Saved(f"{name}.post", r * hc, "sp"),
                    Saved(f"{name}.comb", r * hc * hc, "sp"), Saved(streams, r * width, "sp")),
             grads=(Saved(f"{name}.mix.grad", 2 * r * width + c * h, "sp"),)))


def _hash_router(b: BlockBuilder) -> None:
    """DeepseekV4HashRouter: the gate's scores, the experts read from tid2eid[input_ids] (int64) in
    place of a top-k over them; the scores of the picked experts gathered and renormalised."""
    s, c = b.spec, b.n.compute_bytes
    node = b.graph.nodes["router"]
    op = node["op"]
    kept = tuple(t for t in op.saved if t.key not in ("router.topk",))
    node["op"] = replace(op, saved=kept + (Saved("router.table", (INDEX_BYTES + FP32_BYTES) * s.experts_per_token,
                                                  "sp"),),
                         io_bytes_per_token=(c + 2 * FP32_BYTES) * s.num_experts)


def _clamps(b: BlockBuilder) -> None:
    """The clamp of gate (max) and up (min, max) before silu and the product: two more tensors of
    the expert width per routed copy, and per token for the shared expert."""
    s, c = b.spec, b.n.compute_bytes
    routed = 2 * c * s.intermediate_size * s.experts_per_token
    shared = 2 * c * s.shared_expert_intermediate_size
    b.add(Op("moe", "elementwise", io_bytes_per_token=2 * (routed + shared),
             out_bytes_per_token=c * s.hidden_size,
             saved=(Saved("experts.clamped", routed), Saved("shared_clamped", shared))))


def hc_ends(spec: Any, n: Numerics, trainable: bool) -> tuple[Op, Op]:
    """The streams made from the embedding (expand + contiguous: n copies written, nothing kept)
    and DeepseekV4HyperHead (m:1001-1017): the fp32 flattened streams normalised, a linear to n
    pre weights (hc_fn, hc_base, hc_scale), sigmoid, Σ pre_j·stream_j, before the final norm."""
    hc, h, r, c = spec.hc_mult, spec.hidden_size, n.residual_bytes, n.compute_bytes
    width = hc * h
    expand = Op("hc_expand", "elementwise", tp_split=False, io_bytes_per_token=r * h + r * width,
                out_bytes_per_token=r * width, trainable=trainable)
    flat = Saved("final_in", r * width, "sp") if r == FP32_BYTES else Saved("hc_head.flat", FP32_BYTES * width, "sp")
    normed = Saved("hc_head.fn_in_cast", c * width, "sp", for_weight_grad=True) if n.autocast else \
        Saved("hc_head.normed", FP32_BYTES * width, "sp", for_weight_grad=True)
    head = Op("hc_head", "matmul", params=hc * width + hc + 1, tp_split=False, gemm=(width, hc),
              flops_per_token=2 * width * hc, io_bytes_per_token=(2 * r + 6 * FP32_BYTES) * width + r * h,
              out_bytes_per_token=r * h, trainable=trainable,
              saved=(flat, Saved("hc_head.rstd", FP32_BYTES, "sp"), normed, Saved("final_in", r * width, "sp"),
                     Saved("hc_head.pre", 3 * FP32_BYTES * hc, "sp")),
              grads=(Saved("hc_head.grad", r * h + (r + 3 * FP32_BYTES) * width, "sp"),),
              param_dims=((hc, hc * width), (hc, hc), (1, 1)))
    return expand, head
