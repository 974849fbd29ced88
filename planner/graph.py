"""The operator graph of one transformer block, plus the model-level ends (embedding, final norm,
LM head, loss), as a networkx DiGraph whose nodes carry an `Op`.

Each Op knows, per token of a micro-batch (multiply by b·s; attention scores also by s):
parameters, forward FLOPs, memory-bound bytes, and the tensors autograd keeps for backward.
What is saved mirrors the PyTorch / transformers code that the executor runs and the oracle
traces (modeling_llama.py, modeling_gpt2.py, integrations/sdpa_attention.py, activations.py,
torch autocast's cast policy), not a textbook approximation. Tensors shared by several
consumers carry the same key and are counted once.

Sharding tags: "tp" = divided by the tensor-parallel degree; "sp" = replicated across TP ranks
unless sequence parallelism shards it along the sequence; "none" = never divided.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import networkx as nx

from planner.ops import FP32_BYTES, Numerics, Op, Saved, attention_op, linear_op, lora_op, norm_op
from planner.specs import ModelSpec, Workload

INDEX_BYTES = 8  # int64 token ids
# float8 GEMMs (cuBLASLt _scaled_mm) take only dimensions that are multiples of 16; torchao leaves
# other linears in high precision (float8_linear_utils.module_filter_fn)
FLOAT8_DIM_MULTIPLE = 16

# How many I-sized tensors each activation function's backward keeps (its input included), from
# transformers/activations.py: nn.functional.silu/gelu keep their input only; NewGELUActivation
# and FastGELUActivation are written as Python expressions whose pow/tanh/mul each save a tensor.
ACTIVATION_SAVED_TENSORS = {"silu": 1, "swish": 1, "gelu": 1, "relu": 1, "gelu_pytorch_tanh": 1,
                            "gelu_new": 4, "gelu_fast": 4}

LORA_TARGET_OPS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass
class ModelGraph:
    """The block graph (one layer) and the ends of the model, with what they were built for."""

    spec: ModelSpec
    workload: Workload
    numerics: Numerics
    block: nx.DiGraph
    ends: nx.DiGraph  # embedding -> (blocks) -> final_norm -> lm_head
    extras: dict[str, float] = field(default_factory=dict)

    def block_ops(self) -> list[Op]:
        return [self.block.nodes[n]["op"] for n in nx.topological_sort(self.block)]

    def end_ops(self) -> list[Op]:
        return [self.ends.nodes[n]["op"] for n in nx.topological_sort(self.ends)]


def numerics_for(workload: Workload, params_sharded: bool) -> Numerics:
    return replace(_dtypes_for(workload, params_sharded), compiled=workload.compile)


def _dtypes_for(workload: Workload, params_sharded: bool) -> Numerics:
    """The executor's numerics (executor/train.py `_forward_context`): `params_sharded` = FSDP2
    shards cast to the compute dtype by its MixedPrecisionPolicy (ZeRO 2/3, full training), no
    autocast; a LoRA base is stored in the compute dtype and runs under autocast (its fp32
    adapters are cast); bf16 master weights run in bf16 without autocast."""
    if workload.precision == "fp32":
        return Numerics(compute_bytes=4, residual_bytes=4, autocast=False)
    if workload.master_dtype == "bf16" or (params_sharded and workload.method == "full"):
        return Numerics(compute_bytes=2, residual_bytes=2, autocast=False)
    if workload.method != "full":
        return Numerics(compute_bytes=2, residual_bytes=2, autocast=True)
    return Numerics(compute_bytes=2, residual_bytes=4, autocast=True)


def build_graph(spec: ModelSpec, workload: Workload, numerics: Numerics) -> ModelGraph:
    builder = _BlockBuilder(spec, workload, numerics)
    block = builder.build()
    ends = _build_ends(spec, workload, replace(numerics, compiled=False))  # compiled: the layers only
    return ModelGraph(spec=spec, workload=workload, numerics=numerics, block=block, ends=ends)


class _BlockBuilder:
    """Adds the ops of one decoder layer in execution order."""

    def __init__(self, spec: ModelSpec, workload: Workload, numerics: Numerics) -> None:
        self.spec, self.workload, self.n = spec, workload, numerics
        self.graph = nx.DiGraph()
        self.last: str | list[str] | None = None
        self.lora_targets = set(workload.lora_targets) if workload.method != "full" else set()

    def add(self, op: Op, after: str | list[str] | None = None) -> str:
        trainable = self.workload.method == "full"
        op = replace(op, trainable=trainable if not op.lora_of else True)
        self.graph.add_node(op.name, op=op)
        sources = after if after is not None else self.last
        for source in [sources] if isinstance(sources, str) else (sources or []):
            self.graph.add_edge(source, op.name)
        self.last = op.name
        return op.name

    def build(self) -> nx.DiGraph:
        s = self.spec
        self.norm("attn_norm", input_key="layer_in")
        self.attention()
        self.residual("attn_residual", dropout=s.dropout > 0)
        self.norm("mlp_norm", input_key="mid")
        if s.is_moe:
            self.moe()
        elif s.gated_mlp:
            self.gated_mlp()
        else:
            self.plain_mlp()
        self.residual("mlp_residual", dropout=s.dropout > 0)
        return self.graph

    # -- pieces -------------------------------------------------------------------------------
    def norm(self, name: str, input_key: str) -> None:
        self.add(norm_op(self.spec, self.n, name, input_key))

    def linear(self, name: str, in_features: int, out_features: int, bias: bool, input_key: str,
               column: bool, after: str | list[str] | None = None, input_bytes: int | None = None) -> str:
        """A (possibly LoRA-wrapped) linear. Column-parallel inputs (the normalised residual stream)
        are replicated across TP ranks; row-parallel ones are in the compute dtype unless given."""
        if input_bytes is None:
            input_bytes = self.n.residual_bytes if column else self.n.compute_bytes
        op = linear_op(self.n, name, in_features, out_features, bias, input_key,
                       split="sp" if column else "tp", input_bytes=input_bytes)
        # fp8 training swaps the layers' linears for float8 ones (not the LM head: _build_ends)
        float8 = (self.workload.precision == "fp8" and in_features % FLOAT8_DIM_MULTIPLE == 0
                  and out_features % FLOAT8_DIM_MULTIPLE == 0)
        op = replace(op, float8=float8)
        base = self.add(op, after=after)
        target = next((t for t, n in LORA_TARGET_OPS.items() if n == name), None)
        if target in self.lora_targets or (name == "qkv_proj" and self.lora_targets & {"q", "k", "v"}):
            self.add(lora_op(self.n, self.workload.lora_rank, name, in_features, out_features,
                             input_key, column, input_bytes), after=after)
            self.last = base
        return base

    def attention(self) -> None:
        s, n = self.spec, self.n
        c = n.compute_bytes
        x = "attn_norm.out"
        if s.fused_qkv:
            self.linear("qkv_proj", s.hidden_size, s.q_dim + 2 * s.kv_dim, s.qkv_bias, x, column=True)
        else:
            start = self.last
            for name, width in (("q_proj", s.q_dim), ("k_proj", s.kv_dim), ("v_proj", s.kv_dim)):
                self.linear(name, s.hidden_size, width, s.qkv_bias, x, column=True, after=start)
            self.last = ["q_proj", "k_proj", "v_proj"]
        qk = s.q_dim + s.kv_dim
        if s.positions == "rotary":
            # apply_rotary_pos_emb: q*cos + rotate_half(q)*sin; the rotary embedding returns cos/sin in the
            # hidden states' dtype, so under autocast over fp32 weights the result is fp32
            rope_out = n.residual_bytes * qk
            self.add(Op("rotary", "elementwise", io_bytes_per_token=c * qk * 3 + rope_out,
                        out_bytes_per_token=rope_out, grads=(Saved("rotary.grad", rope_out + 2 * c * qk),)))
        self.add(attention_op(s, self.workload, n))
        # sdpa_attention_forward returns attn_output.transpose(1, 2).contiguous(); the flash kernels
        # write their output as (batch, seq, heads, dim) already, so the copy is a view that o_proj
        # saves as the attention output itself
        self.add(Op("attn_transpose", "elementwise", io_bytes_per_token=2 * c * s.q_dim,
                    out_bytes_per_token=c * s.q_dim))
        self.linear("o_proj", s.q_dim, s.hidden_size, s.out_bias, "attn.out", column=False)

    def residual(self, name: str, dropout: bool) -> None:
        r, h = self.n.residual_bytes, self.spec.hidden_size
        saved = (Saved(f"{name}.dropout_mask", h, "sp"),) if dropout and not self.n.compiled else ()
        self.add(Op(name, "elementwise", tp_split=False, io_bytes_per_token=3 * r * h,
                    out_bytes_per_token=r * h, saved=saved))

    def gated_mlp(self) -> None:
        s, c = self.spec, self.n.compute_bytes
        h, i = s.hidden_size, s.intermediate_size
        start = self.last
        self.linear("gate_proj", h, i, s.mlp_bias, "mlp_norm.out", column=True, after=start)
        self.linear("up_proj", h, i, s.mlp_bias, "mlp_norm.out", column=True, after=start)
        self.last = ["gate_proj", "up_proj"]
        act = ACTIVATION_SAVED_TENSORS.get(s.activation, 1)
        # act_fn(gate) saves gate's output; act_fn(gate) * up saves both factors; down saves the product
        saved = (Saved("gate_proj.out", c * i), Saved("act.extra", c * i * (act - 1)),
                 Saved("act.out", c * i), Saved("up_proj.out", c * i))
        if self.n.compiled:  # act(gate) is recomputed from gate's output
            saved = (Saved("gate_proj.out", c * i), Saved("up_proj.out", c * i))
        # backward: the product's gradient and the two it produces (activation and up)
        self.add(Op("act_mul", "elementwise", io_bytes_per_token=6 * c * i, out_bytes_per_token=c * i,
                    saved=tuple(x for x in saved if x.bytes_per_token), grads=(Saved("act_mul.grad", 3 * c * i),)))
        self.linear("down_proj", i, h, s.mlp_bias, "mlp.prod", column=False)

    def plain_mlp(self) -> None:
        s, c = self.spec, self.n.compute_bytes
        h, i = s.hidden_size, s.intermediate_size
        self.linear("up_proj", h, i, s.mlp_bias, "mlp_norm.out", column=True)
        act = ACTIVATION_SAVED_TENSORS.get(s.activation, 1)
        saved_bytes, out_bytes = c * act, c
        if self.n.autocast and s.activation == "gelu_new":
            # NewGELUActivation under CUDA autocast: torch.pow runs in fp32 (autocast_mode.cpp fp32 list) and
            # keeps its fp32 input copy; tanh keeps its fp32 output; the final product keeps 0.5*x (bf16) and
            # 1 + tanh (fp32) and is fp32, which c_proj casts again
            saved_bytes, out_bytes = 3 * FP32_BYTES + c, FP32_BYTES
        if self.n.compiled:  # the activation's intermediates are recomputed from up's output
            saved_bytes = c
        self.add(Op("act", "elementwise", io_bytes_per_token=2 * c * i * act, out_bytes_per_token=out_bytes * i,
                    saved=(Saved("up_proj.out", saved_bytes * i),),
                    grads=(Saved("act.grad", (2 * out_bytes + c) * i),)))
        self.linear("down_proj", i, h, s.mlp_bias, "mlp.act_out", column=False, input_bytes=out_bytes)

    def moe(self) -> None:
        """transformers' MoE block with the grouped_mm experts (integrations/moe.py,
        grouped_mm_experts_forward), per token with k routed copies."""
        s, n = self.spec, self.n
        c = n.compute_bytes
        h, i, k, e = s.hidden_size, s.intermediate_size, s.experts_per_token, s.num_experts
        router = linear_op(n, "router", h, e, False, "mlp_norm.out", split="sp", input_bytes=n.residual_bytes)
        # softmax(router_logits.float()) keeps its fp32 output; topk its int64 indices; the top values are
        # renormalised in place (a fp32 copy and their sum are kept)
        routing = (Saved("router.probs", FP32_BYTES * e, "sp"), Saved("router.topk", (INDEX_BYTES + FP32_BYTES) * k, "sp"),
                   Saved("router.sum", FP32_BYTES, "sp"))
        self.add(replace(router, tp_split=False, saved=router.saved + routing))
        # experts: sort by expert (int64 permutation, its token index and inverse), gather the hidden states
        # (kept by the first grouped_mm for the weights' gradient), gate_up output (kept by the activation's
        # chunk views), act(gate) (kept with up by their product), the product (kept by the second grouped_mm
        # for the weights' gradient), the down output and the routing weights (kept by their product)
        saved = (Saved("experts.index", 3 * INDEX_BYTES * k + FP32_BYTES * k, "sp"),
                 Saved("experts.in", c * h * k, for_weight_grad=True), Saved("experts.gate_up", 2 * c * i * k),
                 Saved("experts.act", c * i * k), Saved("experts.prod", c * i * k, for_weight_grad=True),
                 Saved("experts.down_out", c * h * k))
        self.add(Op("experts", "experts", params=e * 3 * h * i, gemm=(h, 3 * i), tokens_factor=k,
                    flops_per_token=k * 2 * 3 * h * i, io_bytes_per_token=k * 8 * c * i,
                    out_bytes_per_token=c * h, saved=saved, quantizable=True,
                    grads=(Saved("experts.grad", k * c * (2 * h + 3 * i)),),
                    param_dims=((e, e * 2 * h * i), (e, e * h * i))))


def _build_ends(spec: ModelSpec, workload: Workload, n: Numerics) -> nx.DiGraph:
    """embedding -> [blocks] -> final_norm -> lm_head. The loss lives in cost/memory.py (logits)."""
    graph = nx.DiGraph()
    h, v = spec.hidden_size, spec.vocab_size
    trainable = workload.method == "full"
    emb_out = n.residual_bytes * h
    saved = [Saved("input_ids", INDEX_BYTES, "none")]
    graph.add_node("embedding", op=Op("embedding", "embedding", params=v * h, io_bytes_per_token=2 * emb_out,
                                      out_bytes_per_token=emb_out, trainable=trainable, saved=tuple(saved),
                                      param_dims=((v, v * h),)))
    last = "embedding"
    if spec.positions == "learned":
        positions = spec.max_position_embeddings
        graph.add_node("position_embedding", op=Op("position_embedding", "embedding", tp_split=False,
                                                   params=positions * h, io_bytes_per_token=3 * emb_out,
                                                   trainable=trainable, param_dims=((positions, positions * h),)))
        graph.add_edge(last, "position_embedding")
        last = "position_embedding"
    if spec.final_norm:
        graph.add_node("final_norm", op=replace(norm_op(spec, n, "final_norm", "final_in"), trainable=trainable))
        graph.add_edge(last, "final_norm")
        last = "final_norm"
    head = linear_op(n, "lm_head", h, v, False, "final_norm.out", split="sp")
    head = replace(head, params=0 if spec.tie_word_embeddings else v * h, trainable=trainable, quantizable=False,
                   param_dims=() if spec.tie_word_embeddings else head.param_dims)
    graph.add_node("lm_head", op=head)
    graph.add_edge(last, "lm_head")
    return graph


def count_params(spec: ModelSpec) -> int:
    """Parameters as transformers instantiates the model (tied embeddings counted once)."""
    graph = build_graph(spec, Workload(seq_len=1, global_batch=1), Numerics(2, 2, False))
    per_layer = sum(op.params for op in graph.block_ops())
    return spec.num_layers * per_layer + sum(op.params for op in graph.end_ops())
