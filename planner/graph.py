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

from planner.ops import (FLOAT8_DIM_MULTIPLE, FP32_BYTES, INDEX_BYTES, AttentionShape, Numerics, Op, Saved,
                         attention_op, attention_shape, chunk_keys_fraction, linear_op, lora_op, masked_by_window,
                         norm_op, window_keys_fraction)
from planner.framework_memory import framework_memory
from planner.deepseek_v4 import dsv4_attention
from planner.gemma4 import gemma4_attention, gemma4_moe, mlp_width, per_layer_ends, per_layer_input
from planner.hyper_connections import hc_ends, hyper_connected_layer
from planner.linear_attention import gated_deltanet, kimi_delta_attention, mamba2
from planner.mla import mla_attention
from planner.moe_graph import moe_block
from planner.specs import LayerKind, ModelSpec, Workload


# How many I-sized tensors each activation function's backward keeps (its input included), from
# transformers/activations.py: nn.functional.silu/gelu keep their input only; NewGELUActivation
# and FastGELUActivation are written as Python expressions whose pow/tanh/mul each save a tensor.
ACTIVATION_SAVED_TENSORS = {"silu": 1, "swish": 1, "gelu": 1, "relu": 1, "gelu_pytorch_tanh": 1,
                            "gelu_new": 4, "gelu_fast": 4, "relu2": 2}

LORA_TARGET_OPS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass
class ModelGraph:
    """The block graph of each kind of layer (with the indices of the layers of that kind) and the
    ends of the model, with what they were built for."""

    spec: ModelSpec
    workload: Workload
    numerics: Numerics
    blocks: list[tuple[LayerKind, tuple[int, ...], nx.DiGraph]]
    ends: nx.DiGraph  # embedding -> (blocks) -> final_norm -> lm_head
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def block(self) -> nx.DiGraph:
        """The first layer's block (every layer's, for a uniform model)."""
        return self.blocks[0][2]

    def block_ops(self) -> list[Op]:
        return _ordered(self.block)

    def kind_ops(self) -> list[tuple[list[Op], tuple[int, ...]]]:
        """Each kind of layer's ops with the indices of the layers of that kind."""
        return [(_ordered(block), indices) for _, indices, block in self.blocks]

    def end_ops(self) -> list[Op]:
        return _ordered(self.ends)


def _float8_saved(saved: tuple[Saved, ...], quantized: bool, compute_bytes: int) -> tuple[Saved, ...]:
    """A Transformer Engine fp8 linear keeps its quantized input (one byte an element) for the weight
    gradient instead of the input itself (planner/framework_memory.py float8_saves_fp8_inputs); linears
    reading one tensor share its fp8 copy (te.LayerNormLinear quantizes the fused QKV's input once)."""
    if not quantized:
        return saved
    return tuple(replace(t, key=f"{t.key}.fp8", bytes_per_token=t.bytes_per_token / compute_bytes)
                 if t.for_weight_grad else t for t in saved)


def _ordered(graph: nx.DiGraph) -> list[Op]:
    return [graph.nodes[n]["op"] for n in nx.topological_sort(graph)]


def numerics_for(workload: Workload, params_sharded: bool, for_memory: bool = False) -> Numerics:
    """`for_memory`: the numerics the memory model costs saved tensors with, where the framework's
    memory row departs from the executor (Megatron-Core's bf16 model, Transformer Engine's layers)."""
    numerics = replace(_dtypes_for(workload, params_sharded), compiled=workload.compile)
    if not (for_memory and memory_view_differs(workload)):
        return numerics
    if framework_memory(workload.framework).megatron_mixed_precision and workload.precision != "fp32":
        numerics = replace(numerics, residual_bytes=numerics.compute_bytes, autocast=False)  # Float16Module
    return replace(numerics, framework_layers=True)


def memory_view_differs(workload: Workload) -> bool:
    """Whether the memory model's graph differs from the time model's (planner/framework_memory.py)."""
    row = framework_memory(workload.framework)
    return row.megatron_mixed_precision or row.float8_saves_fp8_inputs or row.te_norms or row.megatron_moe


def _dtypes_for(workload: Workload, params_sharded: bool) -> Numerics:
    """The executor's numerics (executor/train.py `_forward_context`): `params_sharded` = FSDP2
    shards cast to the compute dtype by its MixedPrecisionPolicy (ZeRO 2/3, full training), no
    autocast; a LoRA base is stored in the compute dtype and runs under autocast (its fp32
    adapters are cast); bf16 master weights run in bf16 without autocast."""
    if workload.precision == "fp32":
        return Numerics(compute_bytes=4, residual_bytes=4, autocast=False)
    if workload.master_dtype == "bf16" or (params_sharded and workload.method == "full"):
        return Numerics(compute_bytes=2, residual_bytes=2, autocast=False)
    if workload.method == "qlora" and framework_memory(workload.framework).qlora_fp32_norms:
        # peft's prepare_model_for_kbit_training keeps the norms fp32: an fp32 residual stream under
        # autocast (planner/framework_memory.py)
        return Numerics(compute_bytes=2, residual_bytes=4, autocast=True)
    if workload.method != "full":
        return Numerics(compute_bytes=2, residual_bytes=2, autocast=True)
    return Numerics(compute_bytes=2, residual_bytes=4, autocast=True)


def build_graph(spec: ModelSpec, workload: Workload, numerics: Numerics) -> ModelGraph:
    blocks = [(kind, indices, _BlockBuilder(spec, workload, numerics, kind).build())
              for kind, indices in spec.layer_kinds()]
    ends = _build_ends(spec, workload, replace(numerics, compiled=False))  # compiled: the layers only
    return ModelGraph(spec=spec, workload=workload, numerics=numerics, blocks=blocks, ends=ends)


class _BlockBuilder:
    """Adds the ops of one decoder layer in execution order."""

    def __init__(self, spec: ModelSpec, workload: Workload, numerics: Numerics, kind: LayerKind) -> None:
        self.spec, self.workload, self.n, self.kind = spec, workload, numerics, kind
        self.graph = nx.DiGraph()
        self.attn_in, self.mlp_in = "attn_norm.out", "mlp_norm.out"
        self.last: str | list[str] | None = None
        self.lora_targets = set(workload.lora_targets) if workload.method != "full" else set()
        row = framework_memory(workload.framework)
        self.fp8_inputs = numerics.framework_layers and row.float8_saves_fp8_inputs
        self.te_norms = numerics.framework_layers and row.te_norms

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
        """Pre-norm (Llama), sandwich (Gemma 2/3: input, post-attention, pre- and post-feedforward
        norms) or post-norm (OLMo 2: the branch's output normalised before the residual add). A
        hybrid's block may hold a mixer only or an MLP only (Nemotron-H: attention "none" / mlp "none")."""
        s, kind = self.spec, self.kind
        if s.hc_mult:  # DeepSeek-V4's hyper-connected streams (planner/hyper_connections.py)
            hyper_connected_layer(self)
            return self.graph
        pre, post = s.layer_norms != "post", s.layer_norms in ("sandwich", "post")
        if not pre:
            self.attn_in, self.mlp_in = "layer_in", "mid"
        if kind.attention != "none":
            if pre:
                self.norm("attn_norm", input_key="layer_in")
            self.mixer()
            if post:
                self.compute_norm("attn_post_norm", "o_proj.out", s.hidden_size)
            self.residual("attn_residual", dropout=s.dropout > 0)
        if kind.mlp != "none":
            if pre:
                self.norm("mlp_norm", input_key="mid" if kind.attention != "none" else "layer_in")
            self.mlp()
            if post:
                self.compute_norm("mlp_post_norm", "down_proj.out", s.hidden_size)
            self.residual("mlp_residual", dropout=s.dropout > 0)
        if s.per_layer_input_size:  # Gemma 4's per-layer inputs (planner/gemma4.py)
            per_layer_input(self)
        return self.graph

    def mixer(self) -> None:
        attention = self.kind.attention  # a hybrid's linear layers first: Kimi Linear's others are MLA
        if attention == "linear_attention":
            (kimi_delta_attention if self.spec.linear_mixer == "kimi_delta" else gated_deltanet)(self)
        elif attention == "mamba":
            mamba2(self)
        elif self.spec.o_groups:
            dsv4_attention(self)
        elif self.spec.value_norm:
            gemma4_attention(self)
        elif self.spec.is_mla:
            mla_attention(self)
        else:
            self.attention()

    def mlp(self) -> None:
        s = self.spec
        if self.kind.mlp == "sparse" and s.moe_beside_mlp:
            gemma4_moe(self)
        elif self.kind.mlp == "sparse":
            self.moe()
        elif s.gated_mlp:
            self.gated_mlp(mlp_width(s, self.kind))
        else:
            self.plain_mlp(mlp_width(s, self.kind))

    # -- pieces -------------------------------------------------------------------------------
    def norm(self, name: str, input_key: str) -> None:
        self.add(norm_op(self.spec, self.n, name, input_key, fused=self.workload.fused_norm or self.te_norms))

    def compute_norm(self, name: str, input_key: str, width: int, rows: int = 1, tp: bool = False,
                     offset: bool | None = None) -> None:
        """A norm over a tensor in the compute dtype (q/k norms, post norms, MLA's low-rank norms);
        `tp`: its input is sharded by tensor parallelism (per-head q/k)."""
        n = replace(self.n, residual_bytes=self.n.compute_bytes)
        op = norm_op(self.spec, n, name, input_key, width=width, rows=rows, offset=offset, fused=self.te_norms)
        if tp:
            op = replace(op, saved=tuple(replace(t, split="tp") for t in op.saved),
                         grads=tuple(replace(g, split="tp") for g in op.grads))
        self.add(op)

    def linear(self, name: str, in_features: int, out_features: int, bias: bool, input_key: str,
               column: bool, after: str | list[str] | None = None, input_bytes: int | None = None,
               tp_split: bool = True) -> str:
        """A (possibly LoRA-wrapped) linear. Column-parallel inputs (the normalised residual stream)
        are replicated across TP ranks; row-parallel ones are in the compute dtype unless given.
        `tp_split` False: replicated over TP (MLA's low-rank down-projections, a scalar gate)."""
        if input_bytes is None:
            input_bytes = self.n.residual_bytes if column else self.n.compute_bytes
        op = linear_op(self.n, name, in_features, out_features, bias, input_key,
                       split="sp" if column else "tp", input_bytes=input_bytes)
        if not tp_split:
            op = replace(op, tp_split=False)
        # fp8 training swaps the layers' linears for float8 ones (not the LM head: _build_ends)
        float8 = (self.workload.precision == "fp8" and in_features % FLOAT8_DIM_MULTIPLE == 0
                  and out_features % FLOAT8_DIM_MULTIPLE == 0)
        op = replace(op, float8=float8, saved=_float8_saved(op.saved, float8 and self.fp8_inputs, self.n.compute_bytes))
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
        x = self.attn_in
        if s.fused_qkv:
            self.linear("qkv_proj", s.hidden_size, s.q_dim + 2 * s.kv_dim, s.qkv_bias, x, column=True)
        else:
            start = self.last
            q_width = s.q_dim * (2 if s.attention_output_gate else 1)  # Qwen3-Next: query and gate
            for name, width in (("q_proj", q_width), ("k_proj", s.kv_dim), ("v_proj", s.kv_dim)):
                self.linear(name, s.hidden_size, width, s.qkv_bias, x, column=True, after=start)
            self.last = ["q_proj", "k_proj", "v_proj"]
        if s.qk_norm:  # Qwen3 / Gemma 3: RMSNorm per head (one head_dim weight); OLMo 2: over the whole width
            per_head = s.qk_norm == "head"
            self.compute_norm("q_norm", "q_proj.out", s.head_dim if per_head else s.q_dim,
                              rows=s.num_heads if per_head else 1, tp=True)
            self.compute_norm("k_norm", "k_proj.out", s.head_dim if per_head else s.kv_dim,
                              rows=s.num_kv_heads if per_head else 1, tp=True)
        self.rotary(s.q_dim + s.kv_dim)
        self.add(attention_op(s, self.workload, n, self.attention_shape(
            AttentionShape(s.q_dim, s.kv_dim, s.kv_dim, s.q_dim, s.num_heads))))
        self.attention_out(s.q_dim)

    def rotary(self, qk: int) -> None:
        """apply_rotary_pos_emb: q*cos + rotate_half(q)*sin; the rotary embedding returns cos/sin in the
        hidden states' dtype, so under autocast over fp32 weights the result is fp32. Layers without
        positional encoding (SmolLM3 / Llama 4 no_rope_layers) skip it."""
        s, n = self.spec, self.n
        if s.positions != "rotary" or not self.kind.rope:
            return
        c, rope_out = n.compute_bytes, n.residual_bytes * qk
        self.add(Op("rotary", "elementwise", io_bytes_per_token=c * qk * 3 + rope_out,
                    out_bytes_per_token=rope_out, grads=(Saved("rotary.grad", rope_out + 2 * c * qk),)))

    def attention_shape(self, shape: AttentionShape) -> AttentionShape:
        """The layer's attention: the whole sequence (Mistral's window: as before, by family) or its
        sliding window / chunk, with the mask transformers then passes to SDPA."""
        s, w = self.spec, self.workload
        kind = self.kind.attention
        if kind == "full_attention":
            return replace(shape, masked=attention_shape(s, w).masked)
        span = s.sliding_window if kind == "sliding_attention" else s.attention_chunk_size
        fraction = (window_keys_fraction if kind == "sliding_attention" else chunk_keys_fraction)(span, w.seq_len)
        return replace(shape, keys_fraction=fraction, masked=masked_by_window(w, span))

    def attention_out(self, width: int) -> None:
        s, c = self.spec, self.n.compute_bytes
        if s.attention_output_gate:  # attn_output * sigmoid(gate): keeps the gate and the output
            self.add(Op("output_gate", "elementwise", io_bytes_per_token=4 * c * width, out_bytes_per_token=c * width,
                        saved=(Saved("output_gate.gate", c * width), Saved("attn.out", c * width)),
                        grads=(Saved("output_gate.grad", 3 * c * width),)))
        if s.attention_sinks:  # gpt-oss: one learned logit per head, joined to the softmax
            self.add(Op("sinks", "elementwise", params=s.num_heads, param_dims=((s.num_heads, s.num_heads),)))
        # sdpa_attention_forward returns attn_output.transpose(1, 2).contiguous(); the flash kernels
        # write their output as (batch, seq, heads, dim) already, so the copy is a view that o_proj
        # saves as the attention output itself
        self.add(Op("attn_transpose", "elementwise", io_bytes_per_token=2 * c * width,
                    out_bytes_per_token=c * width))
        out_key = "output_gate.out" if s.attention_output_gate else "attn.out"
        self.linear("o_proj", width, s.hidden_size, s.out_bias, out_key, column=False)

    def residual(self, name: str, dropout: bool) -> None:
        r, h = self.n.residual_bytes, self.spec.hidden_size
        saved = (Saved(f"{name}.dropout_mask", h, "sp"),) if dropout and not self.n.compiled else ()
        self.add(Op(name, "elementwise", tp_split=False, io_bytes_per_token=3 * r * h,
                    out_bytes_per_token=r * h, saved=saved))

    def gated_mlp(self, i: int, prefix: str = "") -> None:
        """SwiGLU gate/up/down of width `i`; `prefix` names a shared expert's copy (shared_)."""
        s, c = self.spec, self.n.compute_bytes
        h, p, x = s.hidden_size, prefix, self.mlp_in
        start = self.last
        self.linear(f"{p}gate_proj", h, i, s.mlp_bias, x, column=True, after=start)
        self.linear(f"{p}up_proj", h, i, s.mlp_bias, x, column=True, after=start)
        self.last = [f"{p}gate_proj", f"{p}up_proj"]
        act = ACTIVATION_SAVED_TENSORS.get(s.activation, 1)
        # act_fn(gate) saves gate's output; act_fn(gate) * up saves both factors; down saves the product
        saved = (Saved(f"{p}gate_proj.out", c * i), Saved(f"{p}act.extra", c * i * (act - 1)),
                 Saved(f"{p}act.out", c * i), Saved(f"{p}up_proj.out", c * i))
        if self.n.compiled:  # act(gate) is recomputed from gate's output
            saved = (Saved(f"{p}gate_proj.out", c * i), Saved(f"{p}up_proj.out", c * i))
        # backward: the product's gradient and the two it produces (activation and up)
        self.add(Op(f"{p}act_mul", "elementwise", io_bytes_per_token=6 * c * i, out_bytes_per_token=c * i,
                    saved=tuple(x for x in saved if x.bytes_per_token), grads=(Saved(f"{p}act_mul.grad", 3 * c * i),)))
        self.linear(f"{p}down_proj", i, h, s.mlp_bias, f"{p}mlp.prod", column=False)

    def plain_mlp(self, i: int, prefix: str = "") -> None:
        """fc1 / activation / fc2 of width `i`; `prefix` names a shared expert's copy (shared_)."""
        s, c, p = self.spec, self.n.compute_bytes, prefix
        h = s.hidden_size
        self.linear(f"{p}up_proj", h, i, s.mlp_bias, self.mlp_in, column=True)
        act = ACTIVATION_SAVED_TENSORS.get(s.activation, 1)
        saved_bytes, out_bytes = c * act, c
        if self.n.autocast and s.activation == "gelu_new":
            # NewGELUActivation under CUDA autocast: torch.pow runs in fp32 (autocast_mode.cpp fp32 list) and
            # keeps its fp32 input copy; tanh keeps its fp32 output; the final product keeps 0.5*x (bf16) and
            # 1 + tanh (fp32) and is fp32, which c_proj casts again
            saved_bytes, out_bytes = 3 * FP32_BYTES + c, FP32_BYTES
        if self.n.compiled:  # the activation's intermediates are recomputed from up's output
            saved_bytes = c
        self.add(Op(f"{p}act", "elementwise", io_bytes_per_token=2 * c * i * act, out_bytes_per_token=out_bytes * i,
                    saved=(Saved(f"{p}up_proj.out", saved_bytes * i),),
                    grads=(Saved(f"{p}act.grad", (2 * out_bytes + c) * i),)))
        self.linear(f"{p}down_proj", i, h, s.mlp_bias, f"{p}mlp.act_out", column=False, input_bytes=out_bytes)

    def moe(self) -> None:
        moe_block(self)


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
    if spec.per_layer_input_size:  # Gemma 4's per-layer inputs (planner/gemma4.py)
        for op in per_layer_ends(spec, n, trainable):
            graph.add_node(op.name, op=op)
            graph.add_edge(last, op.name)
            last = op.name
    final_in = "final_in"
    if spec.hc_mult:  # DeepSeek-V4: the embedding made into streams, collapsed by the hyper-head
        expand, hc_head = hc_ends(spec, n, trainable)
        for op in (expand, hc_head):
            graph.add_node(op.name, op=op)
            graph.add_edge(last, op.name)
            last = op.name
        final_in = "hc_head.out"
    if spec.final_norm:
        fused = workload.fused_norm or (n.framework_layers and framework_memory(workload.framework).te_norms)
        graph.add_node("final_norm", op=replace(norm_op(spec, n, "final_norm", final_in, fused=fused),
                                                trainable=trainable))
        graph.add_edge(last, "final_norm")
        last = "final_norm"
    head = linear_op(n, "lm_head", h, v, False, "final_norm.out", split="sp")
    head = replace(head, params=0 if spec.tie_word_embeddings else v * h, trainable=trainable, quantizable=False,
                   param_dims=() if spec.tie_word_embeddings else head.param_dims)
    graph.add_node("lm_head", op=head)
    graph.add_edge(last, "lm_head")
    if spec.final_logit_softcapping:
        graph.add_node("logit_softcap", op=logit_softcap_op(spec, n))
        graph.add_edge("lm_head", "logit_softcap")
    return graph


def logit_softcap_op(spec: ModelSpec, n: Numerics) -> Op:
    """Gemma 2 / Gemma 4's head soft-cap, `logits = tanh(logits / cap) * cap` (modeling_gemma2.py
    Gemma2ForCausalLM.forward, modeling_gemma4.py Gemma4ForCausalLM.forward): tanh keeps its output
    for its backward, one more tensor of the logits' size in the compute dtype (whole on every TP
    rank: the head's output is gathered for the loss)."""
    c, v = n.compute_bytes, spec.vocab_size
    return Op("logit_softcap", "elementwise", tp_split=False, io_bytes_per_token=6 * c * v,
              out_bytes_per_token=c * v, saved=(Saved("logit_softcap.tanh", c * v, "none"),))


def count_params(spec: ModelSpec) -> int:
    """Parameters as transformers instantiates the model (tied embeddings counted once), summed
    over the layers of each kind."""
    graph = build_graph(spec, Workload(seq_len=1, global_batch=1), Numerics(2, 2, False))
    layers = sum(len(indices) * sum(op.params for op in ops) for ops, indices in graph.kind_ops())
    return layers + sum(op.params for op in graph.end_ops())
