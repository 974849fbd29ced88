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

from planner.specs import ModelSpec, Workload

FP32_BYTES = 4
INDEX_BYTES = 8  # int64 token ids

# How many I-sized tensors each activation function's backward keeps (its input included), from
# transformers/activations.py: nn.functional.silu/gelu keep their input only; NewGELUActivation
# and FastGELUActivation are written as Python expressions whose pow/tanh/mul each save a tensor.
ACTIVATION_SAVED_TENSORS = {"silu": 1, "swish": 1, "gelu": 1, "relu": 1, "gelu_pytorch_tanh": 1,
                            "gelu_new": 4, "gelu_fast": 4}

LORA_TARGET_OPS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Numerics:
    """Dtypes of one training regime, as PyTorch runs it.

    autocast: fp32 parameters under torch.autocast (DDP / TP / PP without FSDP). The residual stream
    stays fp32 (the embedding is not autocast), every linear casts its input to bf16 and saves
    that copy. Otherwise parameters are already in the compute dtype (FSDP2 MixedPrecisionPolicy
    param_dtype, or a frozen bf16 base under LoRA) and activations are all in that dtype.
    """

    compute_bytes: int
    residual_bytes: int
    autocast: bool


@dataclass(frozen=True)
class Saved:
    key: str  # tensors with the same key are one tensor (shared input of q/k/v, say)
    bytes_per_token: float
    split: str = "tp"
    for_weight_grad: bool = False  # kept only if the op's weight is trained
    times_seq: bool = False  # materialised attention scores: also × sequence length
    selective: bool = False  # also kept under selective recomputation


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # matmul | attention | norm | elementwise | embedding | router | experts
    params: int = 0
    tp_split: bool = True  # params and FLOPs divided by the TP degree
    gemm: tuple[int, int] = (0, 0)  # (in_features, out_features) of a linear
    tokens_factor: float = 1.0  # tokens each token becomes (MoE: experts per token)
    flops_per_token: float = 0.0  # forward, unsharded
    flops_per_token_seq: float = 0.0  # forward attention FLOPs per token per unit of sequence
    io_bytes_per_token: float = 0.0  # memory-bound traffic (read + write) of non-matmul ops
    out_bytes_per_token: float = 0.0
    saved: tuple[Saved, ...] = ()
    trainable: bool = True
    quantizable: bool = False  # a base linear weight: NF4 under QLoRA
    lora_of: str = ""  # name of the base linear a LoRA adapter belongs to


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
    """`params_sharded`: parameters live as FSDP2 shards cast to the compute dtype (ZeRO 2/3)."""
    if workload.precision == "fp32":
        return Numerics(compute_bytes=4, residual_bytes=4, autocast=False)
    if workload.method != "full" or params_sharded or workload.master_dtype == "bf16":
        return Numerics(compute_bytes=2, residual_bytes=2, autocast=False)
    return Numerics(compute_bytes=2, residual_bytes=4, autocast=True)


def build_graph(spec: ModelSpec, workload: Workload, numerics: Numerics) -> ModelGraph:
    builder = _BlockBuilder(spec, workload, numerics)
    block = builder.build()
    ends = _build_ends(spec, workload, numerics)
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
               column: bool, after: str | list[str] | None = None) -> str:
        """A (possibly LoRA-wrapped) linear. Column-parallel inputs are replicated across TP ranks."""
        op = linear_op(self.n, name, in_features, out_features, bias, input_key,
                       split="sp" if column else "tp")
        base = self.add(op, after=after)
        target = next((t for t, n in LORA_TARGET_OPS.items() if n == name), None)
        if target in self.lora_targets or (name == "qkv_proj" and self.lora_targets & {"q", "k", "v"}):
            self.add(lora_op(self.n, self.workload.lora_rank, name, in_features, out_features,
                             input_key, column), after=after)
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
            # apply_rotary_pos_emb: q*cos + rotate_half(q)*sin; with fp32 cos/sin (autocast) the result is fp32
            rope_out = (FP32_BYTES if n.autocast else c) * qk
            self.add(Op("rotary", "elementwise", io_bytes_per_token=c * qk * 3 + rope_out,
                        out_bytes_per_token=rope_out))
        self.add(attention_op(s, self.workload, n))
        # sdpa_attention_forward returns attn_output.transpose(1, 2).contiguous(): a copy that o_proj saves
        self.add(Op("attn_transpose", "elementwise", io_bytes_per_token=2 * c * s.q_dim,
                    out_bytes_per_token=c * s.q_dim))
        self.linear("o_proj", s.q_dim, s.hidden_size, s.out_bias, "attn.out_t", column=False)

    def residual(self, name: str, dropout: bool) -> None:
        r, h = self.n.residual_bytes, self.spec.hidden_size
        saved = (Saved(f"{name}.dropout_mask", h, "sp"),) if dropout else ()
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
        self.add(Op("act_mul", "elementwise", io_bytes_per_token=6 * c * i, out_bytes_per_token=c * i,
                    saved=tuple(x for x in saved if x.bytes_per_token)))
        self.linear("down_proj", i, h, s.mlp_bias, "mlp.prod", column=False)

    def plain_mlp(self) -> None:
        s, c = self.spec, self.n.compute_bytes
        h, i = s.hidden_size, s.intermediate_size
        self.linear("up_proj", h, i, s.mlp_bias, "mlp_norm.out", column=True)
        act = ACTIVATION_SAVED_TENSORS.get(s.activation, 1)
        self.add(Op("act", "elementwise", io_bytes_per_token=2 * c * i * act, out_bytes_per_token=c * i,
                    saved=(Saved("up_proj.out", c * i * act),)))
        self.linear("down_proj", i, h, s.mlp_bias, "mlp.act_out", column=False)

    def moe(self) -> None:
        s, n = self.spec, self.n
        c = n.compute_bytes
        h, i, k = s.hidden_size, s.intermediate_size, s.experts_per_token
        router = linear_op(n, "router", h, s.num_experts, False, "mlp_norm.out", split="sp")
        self.add(replace(router, tp_split=False,
                          saved=router.saved + (Saved("router.probs", FP32_BYTES * s.num_experts, "sp"),)))
        # MixtralExperts: per routed token, hidden_states[token_idx] (a copy; autocast casts it again),
        # gate_up output (kept by the chunk views), act(gate), act*up (saved by down), down output
        # (saved by the routing-weight multiply).
        copy_bytes = (n.residual_bytes + c) if n.autocast else c
        saved = (Saved("experts.in", copy_bytes * h, for_weight_grad=True),
                 Saved("experts.gate_up", 2 * c * i), Saved("experts.act", c * i),
                 Saved("experts.prod", c * i, for_weight_grad=True), Saved("experts.down_out", c * h))
        self.add(Op("experts", "experts", params=s.num_experts * 3 * h * i, gemm=(h, 3 * i), tokens_factor=k,
                    flops_per_token=k * 2 * 3 * h * i, io_bytes_per_token=k * 8 * c * i,
                    out_bytes_per_token=c * h, saved=saved, quantizable=True))


def norm_op(spec: ModelSpec, n: Numerics, name: str, input_key: str) -> Op:
    """LlamaRMSNorm upcasts to fp32: saves the fp32 input (pow, mul), rsqrt (1 float per token) and,
    for the weight's gradient, the normalised tensor cast back to the input dtype. F.layer_norm saves
    its input (an fp32 copy under autocast's fp32 policy when the input is not fp32) plus mean/rstd."""
    h, r = spec.hidden_size, n.residual_bytes
    params = h * (2 if spec.norm_bias else 1)
    if spec.norm == "rmsnorm":
        fp32_in = Saved(input_key, FP32_BYTES * h, "sp") if r == FP32_BYTES else Saved(f"{name}.fp32", FP32_BYTES * h, "sp")
        saved = (fp32_in, Saved(f"{name}.rstd", FP32_BYTES, "sp"),
                 Saved(f"{name}.normed", r * h, "sp", for_weight_grad=True))
    else:
        saved = (Saved(input_key, r * h, "sp"), Saved(f"{name}.stats", 2 * FP32_BYTES, "sp"))
    out = FP32_BYTES * h if (n.autocast and spec.norm == "layernorm") else r * h
    return Op(name, "norm", params=params, tp_split=False, io_bytes_per_token=2 * r * h + out,
              out_bytes_per_token=out, saved=saved)


def linear_op(n: Numerics, name: str, in_features: int, out_features: int, bias: bool, input_key: str,
              split: str) -> Op:
    """F.linear keeps its input for the weight gradient. Under autocast each linear casts its fp32
    input to bf16 on its own (activation casts are not cached), so each keeps its own copy."""
    c = n.compute_bytes
    key = f"{name}.in_cast" if n.autocast and split == "sp" else input_key
    return Op(name, "matmul", params=in_features * out_features + (out_features if bias else 0),
              gemm=(in_features, out_features), flops_per_token=2 * in_features * out_features,
              out_bytes_per_token=c * out_features,
              saved=(Saved(key, c * in_features, split, for_weight_grad=True),),
              quantizable=True)


def lora_op(n: Numerics, rank: int, base: str, in_features: int, out_features: int, input_key: str,
            column: bool) -> Op:
    """peft LoRA: lora_B(lora_A(x)) * scaling. lora_A keeps x, lora_B keeps lora_A's output (r per
    token). A is sharded with the base's input, B with its output; the rank dimension is replicated."""
    c = n.compute_bytes
    split = "sp" if column else "tp"
    key = f"{base}.in_cast" if n.autocast and column else input_key
    return Op(f"{base}.lora", "matmul", params=rank * (in_features + out_features), tp_split=True,
              gemm=(in_features, rank), flops_per_token=2 * rank * (in_features + out_features),
              io_bytes_per_token=3 * c * out_features, out_bytes_per_token=c * out_features,
              saved=(Saved(key, c * in_features, split, for_weight_grad=True),
                     Saved(f"{base}.lora_a_out", c * rank, "none", for_weight_grad=True)),
              lora_of=base)


def attention_op(spec: ModelSpec, workload: Workload, n: Numerics) -> Op:
    """SDPA (flash / memory-efficient kernels): keeps q, k, v, the output and the fp32 log-sum-exp
    (one per head per token). GQA runs natively (enable_gqa), so k and v stay kv-sized. Eager
    attention also keeps the fp32 softmax output, its bf16 cast, and the dropout mask and output."""
    c, a = n.compute_bytes, spec.num_heads
    q, kv = spec.q_dim, spec.kv_dim
    saved = [Saved("attn.q", c * q), Saved("attn.k", c * kv), Saved("v_proj.out", c * kv),
             Saved("attn.out", c * q), Saved("attn.lse", FP32_BYTES * a, selective=True)]
    if workload.attention == "eager":
        per_score = FP32_BYTES + c + ((1 + c) if spec.dropout > 0 else 0)
        saved = saved[:3] + [Saved("attn.scores", per_score * a, times_seq=True)]
    # QK^T and PV: 2 FLOPs x 2 matmuls x head_dim x heads per (query, key) pair; counted non-causal as
    # in PaLM (Chowdhery et al. 2022, App. B: 12·L·H·Q·T per token for fwd+bwd)
    return Op("attention", "attention", flops_per_token_seq=4 * q, io_bytes_per_token=c * (2 * q + 2 * kv),
              out_bytes_per_token=c * q, saved=tuple(saved))


def _build_ends(spec: ModelSpec, workload: Workload, n: Numerics) -> nx.DiGraph:
    """embedding -> [blocks] -> final_norm -> lm_head. The loss lives in cost/memory.py (logits)."""
    graph = nx.DiGraph()
    h, v = spec.hidden_size, spec.vocab_size
    trainable = workload.method == "full"
    emb_out = n.residual_bytes * h
    graph.add_node("embedding", op=Op("embedding", "embedding", params=v * h, io_bytes_per_token=2 * emb_out,
                                      out_bytes_per_token=emb_out, trainable=trainable,
                                      saved=(Saved("input_ids", INDEX_BYTES, "none"),)))
    last = "embedding"
    if spec.positions == "learned":
        graph.add_node("position_embedding", op=Op("position_embedding", "embedding", tp_split=False,
                                                   params=spec.max_position_embeddings * h,
                                                   io_bytes_per_token=3 * emb_out, trainable=trainable))
        graph.add_edge(last, "position_embedding")
        last = "position_embedding"
    if spec.final_norm:
        graph.add_node("final_norm", op=replace(norm_op(spec, n, "final_norm", "final_in"), trainable=trainable))
        graph.add_edge(last, "final_norm")
        last = "final_norm"
    head = linear_op(n, "lm_head", h, v, False, "final_norm.out", split="sp")
    head = replace(head, params=0 if spec.tie_word_embeddings else v * h, trainable=trainable, quantizable=False)
    graph.add_node("lm_head", op=head)
    graph.add_edge(last, "lm_head")
    return graph


def count_params(spec: ModelSpec) -> int:
    """Parameters as transformers instantiates the model (tied embeddings counted once)."""
    graph = build_graph(spec, Workload(seq_len=1, global_batch=1), Numerics(2, 2, False))
    per_layer = sum(op.params for op in graph.block_ops())
    return spec.num_layers * per_layer + sum(op.params for op in graph.end_ops())
