"""The mixture-of-experts block of the operator graph: router, routed experts, shared experts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.framework_memory import framework_memory
from planner.ops import FLOAT8_DIM_MULTIPLE, FP32_BYTES, INDEX_BYTES, BackwardPart, Op, Saved, linear_op


def moe_block(b: Any) -> None:
    """transformers' MoE block with the grouped_mm experts (integrations/moe.py,
    grouped_mm_experts_forward), per token with k routed copies; then the shared experts
    (Qwen2-MoE shared_expert with its sigmoid gate, DeepSeek shared_experts, Llama 4
    shared_expert), a dense gated MLP every token passes through. With a latent (Nemotron 3
    LatentMoE, moe_latent_size) the routed experts run at its width `w` between fc1_latent_proj and
    fc2_latent_proj; the router and the shared experts read the hidden states (transformers 5.23
    modeling_nemotron_h.py NemotronHMoE.forward, NemotronHExperts: up (E, I, w), down (E, w, I))."""
    s, n = b.spec, b.n
    if s.expert_dispatch == "dense" and framework_memory(b.workload.framework).transformers_modeling:
        dense_moe_block(b)
        return
    c = n.compute_bytes
    h, i, k, e = s.hidden_size, s.intermediate_size, s.experts_per_token, s.num_experts
    w = s.expert_width  # the experts' input and output width: the hidden size, or the latent
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
    if s.moe_latent_size:  # replicated over TP, as MLA's low-rank projections (the experts need the whole latent)
        b.linear("fc1_latent_proj", h, w, s.mlp_bias, b.mlp_in, column=True, tp_split=False)
    saved = _experts_saved(s, c, w, i, k)
    biases = e * (2 * i + w) if s.expert_bias else 0  # gpt-oss gate_up_proj_bias, down_proj_bias
    bias_dims = ((e, e * 2 * i), (e, e * w)) if s.expert_bias else ()
    m = 3 if s.gated_mlp else 2  # gate, up and down matrices, or up and down (Nemotron-H relu2 experts)
    # permutation into expert order (a row read and written per routed copy: Megatron-Core moe_utils.permute /
    # TE moe_permute, torchtitan's index gather) and back (k rows and their fp32 routing weights read, one
    # row written: unpermute's weighted sum)
    permute_io = 2 * k * c * w + (k + 1) * c * w + FP32_BYTES * k
    # under fp8, Megatron-Core runs the grouped experts in float8 too (TEGroupedLinear inside te.fp8_autocast);
    # torchao's Float8Linear swap (torchtitan, the executor) converts nn.Linear only, not grouped experts
    float8 = (b.workload.precision == "fp8" and b.workload.framework == "megatron"
              and w % FLOAT8_DIM_MULTIPLE == 0 and i % FLOAT8_DIM_MULTIPLE == 0)
    saved = _megatron_saved(b, saved, float8)
    # memory-bound passes over the intermediate: gated, gate_up written and read, act written, act and up
    # read, product written and read (8 i); relu2, up written and read, relu's output written and read, the
    # square written and read (6 i)
    b.add(Op("experts", "experts", params=e * m * w * i + biases, gemm=(w, m * i), tokens_factor=k, float8=float8,
                flops_per_token=k * 2 * m * w * i, io_bytes_per_token=k * (2 * m + 2) * c * i + permute_io,
                out_bytes_per_token=c * w, saved=saved, quantizable=True,
                # backward, alive at once: the gate_up (or up) and product gradients, then the input's
                grads=(Saved("experts.grad", k * c * (w + m * i)),),
                param_dims=((e, e * (m - 1) * w * i), (e, e * w * i)) + bias_dims))
    if s.moe_latent_size:  # keeps the experts' combined latent output for its weight gradient
        b.linear("fc2_latent_proj", w, h, s.mlp_bias, "experts.out", column=True, input_bytes=c, tp_split=False)
    _shared_experts(b, start)


def _experts_saved(s: Any, c: int, w: int, i: int, k: int) -> tuple[Saved, ...]:
    """What autograd keeps of the grouped experts per token (transformers 5.23 integrations/moe.py
    grouped_mm_experts_forward, 440-535): the sort by expert (int64 permutation, its token index and
    inverse) and the gathered hidden states (kept by the first grouped_mm for the weights' gradient);
    gated, the gate_up output (kept by the activation's chunk views), act(gate) (kept with up by their
    product) and the product (kept by the second grouped_mm); the down output and the routing weights
    (kept by their product). Non-gated (Nemotron-H, has_gate=False, 503-504): relu2 is
    ReLUSquaredActivation (activations.py 211-214), relu then torch.square; ReluBackward0 keeps relu's
    result and PowBackward0 keeps its input, the same tensor, so up's output is not kept: relu's output
    and the square (kept by the second grouped_mm)."""
    index = Saved("experts.index", 3 * INDEX_BYTES * k + FP32_BYTES * k, "sp")
    inputs = Saved("experts.in", c * w * k, for_weight_grad=True)
    down_out = Saved("experts.down_out", c * w * k)
    if not s.gated_mlp:
        return (index, inputs, Saved("experts.relu", c * i * k),
                Saved("experts.prod", c * i * k, for_weight_grad=True), down_out)
    saved = (index, inputs, Saved("experts.gate_up", 2 * c * i * k), Saved("experts.act", c * i * k),
             Saved("experts.prod", c * i * k, for_weight_grad=True), down_out)
    if s.expert_gate == "clamped_swiglu":  # modeling_gpt_oss.py _apply_gate: the clamped gate, up + 1 and glu too
        saved += (Saved("experts.clamped", 3 * c * i * k),)
    return saved


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
    scores (Llama4Router.forward, transformers 5.23 lines 147-150); `hidden_states.repeat(E, 1) * scores`
    (Llama4TextMoe.forward, 168-169) keeps the repeated input and a contiguous copy of the scores; the
    bmm over (E, T, H) (Llama4TextExperts.forward, 79-81) keeps its input, gate_up (whose chunks the
    activation and product read), act(gate) and the product (the second bmm's input); the sum over
    experts (172) keeps nothing. Its backward runs node by node (dense_expert_backward)."""
    s, n = b.spec, b.n
    c = n.compute_bytes
    h, i, k, e = s.hidden_size, s.intermediate_size, s.experts_per_token, s.num_experts
    router = linear_op(n, "router", h, e, s.router_bias, b.mlp_in, split="sp", input_bytes=n.residual_bytes)
    routing = (Saved("router.sigmoid", FP32_BYTES * e, "sp"), Saved("router.topk", INDEX_BYTES * k, "sp"))
    b.add(replace(router, tp_split=False, saved=router.saved + routing, io_bytes_per_token=(c + 3 * FP32_BYTES) * e))
    saved = (Saved("experts.repeated", c * h * e), Saved("experts.scores", c * e, "sp"),
             Saved("experts.in", c * h * e, for_weight_grad=True), Saved("experts.gate_up", 2 * c * i * e),
             Saved("experts.act", c * i * e), Saved("experts.prod", c * i * e, for_weight_grad=True))
    # the shared expert's input gradient waits in autograd's buffer for the block input's other
    # contributions (the repeat's, the router's) while the experts run their backward
    waiting = (Saved("experts.grad_shared_in", c * h, "sp"),) if s.shared_expert_intermediate_size else ()
    # the repeat writes E rows, the weighting reads and writes them, the sum over experts reads them
    spread_io = 4 * e * c * h
    b.add(Op("experts", "experts", params=e * 3 * h * i, gemm=(h, 3 * i), tokens_factor=e,
             flops_per_token=e * 2 * 3 * h * i, io_bytes_per_token=e * 8 * c * i + spread_io,
             out_bytes_per_token=c * h, saved=saved, quantizable=True,
             backward_parts=dense_expert_backward(c * h * e, c * i * e, waiting),
             param_dims=((e, e * 2 * h * i), (e, e * h * i))))
    # the shared expert runs after the experts (Llama4TextMoe.forward: routed_out at 170, then shared_expert
    # at 171), so autograd runs its whole backward before theirs (later nodes first): its weights' gradients
    # exist by then
    _shared_experts(b, "experts")


def dense_expert_backward(rows_h: int, rows_i: int, waiting: tuple[Saved, ...] = ()) -> tuple[BackwardPart, ...]:
    """Llama4TextMoe's backward node by node (autograd frees what a node saved once it has run), for
    E·T rows of width H (`rows_h`, bytes per token) and of width I (`rows_i`), with `waiting` held
    throughout:
    1. the sum over experts' gradient, expanded over E, is copied by the reshape before it (E·T·H),
       and the down bmm makes the product's gradient (E·T·I) and down_proj's (1/3 of the weights);
       then the product is freed;
    2. `up * act(gate)` makes up's and act's gradients beside the product's (3 E·T·I); then act and,
       after silu's backward (3 E·T·I again, act freed), gate_up are freed;
    3. chunk's backward concatenates gate_up's gradient (2 E·T·I), the gate_up bmm makes the input's
       (E·T·H) and gate_up_proj's (2/3); then its input is freed;
    4. the weighting by the scores makes the repeated input's gradient and, for the scores', the
       product of the gradient and the repeated input before its sum over H (3 E·T·H).
    As traced (a middle layer of the llama-4-scout-4l 1x4096 oracle point): down_proj's gradient
    +1.25 GiB, the product's +1, the copy and the product freed -1.6, step 2 +2: the layer's peak."""
    return (BackwardPart((Saved("experts.grad_out", rows_h), Saved("experts.grad_prod", rows_i), *waiting), 1 / 3,
                         ("experts.prod",)),
            BackwardPart((Saved("experts.grad_act_mul", 3 * rows_i), *waiting), 0.0,
                         ("experts.act", "experts.gate_up")),
            BackwardPart((Saved("experts.grad_gate_up", 2 * rows_i), Saved("experts.grad_in", rows_h), *waiting), 2 / 3,
                         ("experts.in",)),
            BackwardPart((Saved("experts.grad_spread", 3 * rows_h), *waiting), 0.0))
