"""The mixture-of-experts block of the operator graph: router, routed experts, shared experts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.framework_memory import framework_memory
from planner.ops import FLOAT8_DIM_MULTIPLE, FP32_BYTES, INDEX_BYTES, Op, Saved, linear_op


def moe_block(b: Any) -> None:
    """transformers' MoE block with the grouped_mm experts (integrations/moe.py,
    grouped_mm_experts_forward), per token with k routed copies; then the shared experts
    (Qwen2-MoE shared_expert with its sigmoid gate, DeepSeek shared_experts, Llama 4
    shared_expert), a dense gated MLP every token passes through."""
    s, n = b.spec, b.n
    if s.expert_dispatch == "dense" and framework_memory(b.workload.framework).transformers_modeling:
        dense_moe_block(b)
        return
    c = n.compute_bytes
    h, i, k, e = s.hidden_size, s.intermediate_size, s.experts_per_token, s.num_experts
    start = b.last
    router = linear_op(n, "router", h, e, s.router_bias, b.mlp_in, split="sp", input_bytes=n.residual_bytes)
    # softmax(router_logits.float()) keeps its fp32 output; topk its int64 indices; the top values are
    # renormalised in place (a fp32 copy and their sum are kept)
    routing = (Saved("router.probs", FP32_BYTES * e, "sp"), Saved("router.topk", (INDEX_BYTES + FP32_BYTES) * k, "sp"),
               Saved("router.sum", FP32_BYTES, "sp"))
    # memory-bound passes over the logits: softmax (read them, write fp32 probabilities), top-k and the
    # load-balancing loss each read the probabilities (Megatron-Core moe/router.py TopKRouter: topk_softmax_
    # with_capacity, switch_load_balancing_loss_func; torchtitan moe.py TokenChoiceTopKRouter)
    router_io = (c + 3 * FP32_BYTES) * e
    b.add(replace(router, tp_split=False, saved=router.saved + routing, io_bytes_per_token=router_io))
    # experts: sort by expert (int64 permutation, its token index and inverse), gather the hidden states
    # (kept by the first grouped_mm for the weights' gradient), gate_up output (kept by the activation's
    # chunk views), act(gate) (kept with up by their product), the product (kept by the second grouped_mm
    # for the weights' gradient), the down output and the routing weights (kept by their product)
    saved = (Saved("experts.index", 3 * INDEX_BYTES * k + FP32_BYTES * k, "sp"),
             Saved("experts.in", c * h * k, for_weight_grad=True), Saved("experts.gate_up", 2 * c * i * k),
             Saved("experts.act", c * i * k), Saved("experts.prod", c * i * k, for_weight_grad=True),
             Saved("experts.down_out", c * h * k))
    if s.expert_gate == "clamped_swiglu":  # modeling_gpt_oss.py _apply_gate: the clamped gate, up + 1 and glu too
        saved += (Saved("experts.clamped", 3 * c * i * k),)
    biases = e * (2 * i + h) if s.expert_bias else 0  # gpt-oss gate_up_proj_bias, down_proj_bias
    bias_dims = ((e, e * 2 * i), (e, e * h)) if s.expert_bias else ()
    m = 3 if s.gated_mlp else 2  # gate, up and down matrices, or up and down (Nemotron-H relu2 experts)
    # permutation into expert order (a row read and written per routed copy: Megatron-Core moe_utils.permute /
    # TE moe_permute, torchtitan's index gather) and back (k rows and their fp32 routing weights read, one
    # row written: unpermute's weighted sum)
    permute_io = 2 * k * c * h + (k + 1) * c * h + FP32_BYTES * k
    # under fp8, Megatron-Core runs the grouped experts in float8 too (TEGroupedLinear inside te.fp8_autocast);
    # torchao's Float8Linear swap (torchtitan, the executor) converts nn.Linear only, not grouped experts
    float8 = (b.workload.precision == "fp8" and b.workload.framework == "megatron"
              and h % FLOAT8_DIM_MULTIPLE == 0 and i % FLOAT8_DIM_MULTIPLE == 0)
    saved = _megatron_saved(b, saved, float8)
    b.add(Op("experts", "experts", params=e * m * h * i + biases, gemm=(h, m * i), tokens_factor=k, float8=float8,
                flops_per_token=k * 2 * m * h * i, io_bytes_per_token=k * 8 * c * i + permute_io,
                out_bytes_per_token=c * h, saved=saved, quantizable=True,
                # backward, alive at once: the gate_up (or up) and product gradients, then the input's
                grads=(Saved("experts.grad", k * c * (h + m * i)),),
                param_dims=((e, e * (m - 1) * h * i), (e, e * h * i)) + bias_dims))
    _shared_experts(b, start)


def _megatron_saved(b: Any, saved: tuple[Saved, ...], float8: bool) -> tuple[Saved, ...]:
    """What Megatron-Core's TEGroupedMLP keeps of the experts (planner/framework_memory.py megatron_moe):
    not act(gate) nor the experts' outputs; the routing weights beside fc1's output. Under fp8,
    te.GroupedLinear keeps its quantized inputs (the permuted tokens, the product), one byte each."""
    memory = framework_memory(b.workload.framework)
    if not b.n.framework_layers:  # the time model's view (planner/ops.py Numerics)
        return saved
    if memory.megatron_moe:
        k = b.spec.experts_per_token
        saved = tuple(t for t in saved if t.key not in ("experts.act", "experts.down_out"))
        saved += (Saved("experts.probs", FP32_BYTES * k, "sp"),)
    if float8 and memory.float8_saves_fp8_inputs:
        c = b.n.compute_bytes
        saved = tuple(replace(t, bytes_per_token=t.bytes_per_token / c) if t.for_weight_grad else t for t in saved)
    return saved


def _shared_experts(b: Any, start: str) -> None:
    s, h = b.spec, b.spec.hidden_size
    if s.shared_expert_intermediate_size:
        routed = b.last
        b.last = start
        shared = b.gated_mlp if s.gated_mlp else b.plain_mlp
        shared(s.shared_expert_intermediate_size, prefix="shared_")
        if s.shared_expert_gate:
            b.linear("shared_expert_gate", h, 1, False, b.mlp_in, column=True, after=start, tp_split=False)
        b.last = [routed, b.last]


def dense_moe_block(b: Any) -> None:
    """transformers' Llama 4 MoE (modeling_llama4.py Llama4TextMoe / Llama4TextExperts / Llama4Router),
    which the executor and HF Trainer run: every token goes through every expert, weighted by its
    score (0 off the top k). The router keeps its top-k indices and the fp32 sigmoid of the scattered
    scores; `hidden_states.repeat(E, 1) * scores` keeps the repeated input and a contiguous copy of the
    scores; the bmm over (E, T, H) keeps its input, gate_up (whose chunks the activation and product
    read), act(gate) and the product (the second bmm's input); the sum over experts keeps nothing."""
    s, n = b.spec, b.n
    c = n.compute_bytes
    h, i, k, e = s.hidden_size, s.intermediate_size, s.experts_per_token, s.num_experts
    start = b.last
    router = linear_op(n, "router", h, e, s.router_bias, b.mlp_in, split="sp", input_bytes=n.residual_bytes)
    routing = (Saved("router.sigmoid", FP32_BYTES * e, "sp"), Saved("router.topk", INDEX_BYTES * k, "sp"))
    b.add(replace(router, tp_split=False, saved=router.saved + routing, io_bytes_per_token=(c + 3 * FP32_BYTES) * e))
    saved = (Saved("experts.repeated", c * h * e), Saved("experts.scores", c * e, "sp"),
             Saved("experts.in", c * h * e, for_weight_grad=True), Saved("experts.gate_up", 2 * c * i * e),
             Saved("experts.act", c * i * e), Saved("experts.prod", c * i * e, for_weight_grad=True))
    # the repeat writes E rows, the weighting reads and writes them, the sum over experts reads them
    spread_io = 4 * e * c * h
    b.add(Op("experts", "experts", params=e * 3 * h * i, gemm=(h, 3 * i), tokens_factor=e,
             flops_per_token=e * 2 * 3 * h * i, io_bytes_per_token=e * 8 * c * i + spread_io,
             out_bytes_per_token=c * h, saved=saved, quantizable=True,
             grads=(Saved("experts.grad", e * c * (h + 3 * i)),),
             param_dims=((e, e * 2 * h * i), (e, e * h * i))))
    _shared_experts(b, start)
