"""Operators of the graph (planner/graph.py): the `Op` each node carries, what it saves for backward
(`Saved`), the dtypes of a training regime (`Numerics`), and the constructors of the ops the blocks
and the model's ends share (norms, linears, LoRA adapters, attention). Per token of a micro-batch;
what is saved mirrors the torch / transformers code the executor runs (see graph.py)."""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import ModelSpec, Workload

FP32_BYTES = 4
INDEX_BYTES = 8  # int64 token ids
# float8 GEMMs (cuBLASLt _scaled_mm) take only dimensions that are multiples of 16; torchao leaves
# other linears in high precision (float8_linear_utils.module_filter_fn)
FLOAT8_DIM_MULTIPLE = 16


@dataclass(frozen=True)
class Numerics:
    """Dtypes of one training regime, as PyTorch runs it.

    autocast: fp32 parameters under torch.autocast (DDP / TP / PP without FSDP). The residual stream
    stays fp32 (the embedding is not autocast), every linear casts its input to bf16 and saves
    that copy. Otherwise parameters are already in the compute dtype (FSDP2 MixedPrecisionPolicy
    param_dtype, or a frozen bf16 base under LoRA) and activations are all in that dtype.

    compiled: the decoder layers run under torch.compile. Inductor's partitioner
    (torch/_functorch/partitioners.py, min_cut_rematerialization_partition) recomputes pointwise ops
    in backward rather than saving their outputs: a layer keeps the inputs of its matmuls and of
    attention (one copy of each cast), the matmul outputs that pointwise backward needs, each norm's
    input and statistics. Dropout masks are regenerated from the RNG state.
    """

    compute_bytes: int
    residual_bytes: int
    autocast: bool
    compiled: bool = False
    # the memory view: the framework's own layers keep what planner/framework_memory.py says (the
    # time model's graph keeps the executor's view its calibration was fitted on)
    framework_layers: bool = False


@dataclass(frozen=True)
class Saved:
    key: str  # tensors with the same key are one tensor (shared input of q/k/v, say)
    bytes_per_token: float
    split: str = "tp"
    for_weight_grad: bool = False  # kept only if the op's weight is trained
    times_seq: bool = False  # materialised attention scores: also × sequence length
    selective: bool = False  # also kept under selective recomputation


@dataclass(frozen=True)
class BackwardPart:
    """One step of an op whose backward runs several autograd nodes in turn, each allocating its
    own temporaries (transformers' Llama 4 experts: the down bmm, act(gate) * up, the gate_up bmm):
    the gradients alive in it, the share of the op's weights whose gradients it makes, and the op's
    saved tensors (keys) that autograd frees once it is done."""

    grads: tuple[Saved, ...]
    weight_share: float = 0.0
    releases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # matmul | attention | norm | elementwise | embedding | router | experts
    params: int = 0
    tp_split: bool = True  # params and FLOPs divided by the TP degree
    gemm: tuple[int, int] = (0, 0)  # (in_features, out_features) of a linear
    row_parallel: bool = False  # TP splits the linear's input features (RowwiseParallel), not its output's
    float8: bool = False  # runs as a float8 linear (fp8 training)
    tokens_factor: float = 1.0  # tokens each token becomes (MoE: experts per token)
    flops_per_token: float = 0.0  # forward, unsharded
    flops_per_token_seq: float = 0.0  # forward attention FLOPs per token per unit of sequence
    io_bytes_per_token: float = 0.0  # memory-bound traffic (read + write) of non-matmul ops
    io_bytes_per_token_seq: float = 0.0  # ... on materialised attention scores: also × sequence length
    out_bytes_per_token: float = 0.0
    saved: tuple[Saved, ...] = ()
    trainable: bool = True
    quantizable: bool = False  # a base linear weight: NF4 under QLoRA
    lora_of: str = ""  # name of the base linear a LoRA adapter belongs to
    # gradients alive while this op's backward runs: its output's, the ones it produces, their casts
    grads: tuple[Saved, ...] = ()
    # (dim 0, elements) of each parameter tensor: FSDP2 pads dim 0 to a multiple of the ranks
    param_dims: tuple[tuple[int, int], ...] = ()
    # the backward as several steps in order (then `grads` is unused); empty: one step
    backward_parts: tuple[BackwardPart, ...] = ()


def norm_op(spec: ModelSpec, n: Numerics, name: str, input_key: str, width: int = 0, rows: int = 1,
            offset: bool | None = None, fused: bool = False) -> Op:
    """LlamaRMSNorm upcasts to fp32: saves the fp32 input (pow, mul), rsqrt (1 float per token) and,
    for the weight's gradient, the normalised tensor cast back to the input dtype. F.layer_norm saves
    its input (an fp32 copy under autocast's fp32 policy when the input is not fp32) plus mean/rstd.
    `width`: the normalised size when not the hidden size (q/k norms, MLA's low-rank norms), with
    `rows` rows of it per token (a per-head q norm: one per head, one weight of head_dim).
    `offset` (default: the spec's norm_offset): Gemma's (1 + weight) in fp32 keeps the fp32 normalised tensor.
    `fused`: torchtitan's TritonFusedRMSNorm (torchtitan/models/norms.py at 0413364: `ctx.save_for_backward(x,
    weight, rstd)`; its backward writes dx in x's dtype and recomputes the rest): it reads x, writes y."""
    if fused and spec.norm == "rmsnorm" and not n.compiled:
        h, r = (width or spec.hidden_size) * rows, n.residual_bytes
        params = (h // rows) * (2 if spec.norm_bias else 1)
        return Op(name, "norm", params=params, tp_split=False, io_bytes_per_token=2 * r * h,
                  out_bytes_per_token=r * h,
                  saved=(Saved(input_key, r * h, "sp"), Saved(f"{name}.rstd", FP32_BYTES * rows, "sp")),
                  grads=(Saved(f"{name}.grad", 2 * r * h, "sp"),), param_dims=((h // rows, params),))
    h, r = (width or spec.hidden_size) * rows, n.residual_bytes
    offset = spec.norm_offset if offset is None else offset
    params = (h // rows) * (2 if spec.norm_bias else 1)
    if spec.norm == "rmsnorm" and n.compiled:  # the fp32 copy and the normalised tensor are recomputed
        saved = (Saved(input_key, r * h, "sp"), Saved(f"{name}.rstd", FP32_BYTES * rows, "sp"))
    elif spec.norm == "rmsnorm":
        fp32_in = Saved(input_key, FP32_BYTES * h, "sp") if r == FP32_BYTES else Saved(f"{name}.fp32", FP32_BYTES * h, "sp")
        saved = (fp32_in, Saved(f"{name}.rstd", FP32_BYTES * rows, "sp"),
                 Saved(f"{name}.normed", (FP32_BYTES if offset else r) * h, "sp", for_weight_grad=True))
    else:
        saved = (Saved(input_key, r * h, "sp"), Saved(f"{name}.stats", 2 * FP32_BYTES, "sp"))
    out = FP32_BYTES * h if (n.autocast and spec.norm == "layernorm") else r * h
    # backward: the output's gradient, the input's, and fp32 temporaries of the normalisation's chain rule
    grads = (Saved(f"{name}.grad", out + r * h + 2 * FP32_BYTES * h, "sp"),)
    return Op(name, "norm", params=params, tp_split=False, io_bytes_per_token=2 * r * h + out,
              out_bytes_per_token=out, saved=saved, grads=grads, param_dims=((h // rows, params),))


def linear_op(n: Numerics, name: str, in_features: int, out_features: int, bias: bool, input_key: str,
              split: str, input_bytes: int | None = None) -> Op:
    """F.linear keeps its input for the weight gradient. Under autocast each linear casts an fp32
    input (the normalised residual stream, GPT-2's fp32 gelu_new output) to bf16 on its own
    (activation casts are not cached), so each keeps its own copy."""
    c = n.compute_bytes
    cast = n.autocast and (input_bytes if input_bytes is not None else c) != c
    key = _matmul_input_key(n, name, input_key, cast)
    out_split = "tp" if split == "sp" else "sp"  # column: output sharded; row: input sharded
    # backward: the output's gradient (in the compute dtype) and the input's (cast back when the input was)
    grads = (Saved(f"{name}.grad_out", c * out_features, out_split),
             Saved(f"{name}.grad_in", (c + (FP32_BYTES if cast else 0)) * in_features, split))
    return Op(name, "matmul", params=in_features * out_features + (out_features if bias else 0),
              gemm=(in_features, out_features), row_parallel=split == "tp",
              flops_per_token=2 * in_features * out_features, out_bytes_per_token=c * out_features,
              saved=(Saved(key, c * in_features, split, for_weight_grad=True),),
              quantizable=True, grads=grads,
              param_dims=((out_features, in_features * out_features),) + (((out_features, out_features),) if bias else ()))


def _matmul_input_key(n: Numerics, name: str, input_key: str, cast: bool) -> str:
    """What a linear saves for its weight gradient: its input, or its own cast of it (under
    torch.compile the casts of one tensor are one)."""
    if not cast:
        return input_key
    return f"{input_key}.cast" if n.compiled else f"{name}.in_cast"


def lora_op(n: Numerics, rank: int, base: str, in_features: int, out_features: int, input_key: str,
            column: bool, input_bytes: int) -> Op:
    """peft LoRA: lora_B(lora_A(x)) * scaling, with x first cast to the adapters' fp32 (peft
    `_cast_input_dtype`; adapters are fp32 by autocast_adapter_dtype). Under autocast lora_A casts
    that copy back to bf16 and keeps it; without autocast it keeps the fp32 copy, or x itself when
    x is fp32. lora_B keeps lora_A's output (rank per token). A is sharded with the base's input,
    B with its output; the rank dimension is replicated."""
    c = n.compute_bytes
    split = "sp" if column else "tp"
    kept = c if n.autocast else FP32_BYTES
    key = input_key if (input_bytes == FP32_BYTES and not n.autocast) else f"{base}.lora_in"
    if n.compiled:  # the adapters' cast of x is recomputed from what the base linear keeps
        kept, key = min(c, input_bytes), _matmul_input_key(n, base, input_key, n.autocast and input_bytes != c)
    return Op(f"{base}.lora", "matmul", params=rank * (in_features + out_features), tp_split=True,
              gemm=(in_features, rank), flops_per_token=2 * rank * (in_features + out_features),
              io_bytes_per_token=3 * c * out_features, out_bytes_per_token=c * out_features,
              saved=(Saved(key, kept * in_features, split, for_weight_grad=True),
                     Saved(f"{base}.lora_a_out", kept * rank, "none", for_weight_grad=True)),
              lora_of=base, grads=(Saved(f"{base}.lora_grad", (c + FP32_BYTES) * in_features, split),),
              param_dims=((rank, rank * in_features), (out_features, rank * out_features)))


def sliding_window(spec: ModelSpec) -> int | None:
    """The attention window of Mistral-family models (config.json `sliding_window`)."""
    window = spec.hf_config.get("sliding_window") if spec.family in ("mistral", "mixtral") else None
    return window if isinstance(window, int) and window > 0 else None


def masked_attention(spec: ModelSpec, workload: Workload) -> bool:
    """transformers lets SDPA run causally without a mask unless a sliding window is no longer than
    the sequence (masking_utils._ignore_causal_mask_sdpa); then it passes an explicit mask."""
    window = sliding_window(spec)
    return window is not None and masked_by_window(workload, window)


def masked_by_window(workload: Workload, window: int) -> bool:
    """SDPA gets an explicit mask once a sliding window or chunk is no longer than the sequence
    (masking_utils: sliding_window / chunked causal masks are not skippable then)."""
    return workload.attention == "sdpa" and window > 0 and workload.seq_len >= window


def score_bytes(workload: Workload, n: Numerics, dropout: bool, sinks: bool = False) -> tuple[float, float]:
    """(saved, forward traffic) in bytes per attention score per head when scores are materialised.

    eager (transformers eager_attention_forward, modeling_llama.py): QK^T writes the scores (c),
    `* scaling` and `+ attention_mask` read and write them (4c), softmax(dtype=float32) reads c and
    writes fp32 (on CUDA one kernel, _softmax with half_to_float), `.to(dtype)` reads fp32 and writes
    c, PV reads c: 8c + 8. Softmax saves its fp32 output, PV its input (the cast).
    fused-softmax (Megatron-LM ParallelAttention before FlashAttention, 2021): baddbmm writes the
    scaled scores (c), FusedScaleMaskSoftmax reads and writes them (2c), PV reads c: 4c; softmax
    saves its output, which PV also saves (one tensor). As Korthikanti et al. 2022 Eq. 1 counts.
    Attention dropout (CUDA native_dropout) reads and writes the probabilities and writes a bool
    mask (2c + 1); it saves the mask and PV saves its output instead (1 + c).
    eager with attention sinks (modeling_gpt_oss.py eager_attention_forward): the sink logits are
    concatenated, the row maximum subtracted and softmax taken in the compute dtype; softmax keeps
    its output, whose slice PV keeps (one tensor, c); QK^T, scaling, mask, cat, max, subtraction,
    softmax and PV move about 13c."""
    c = n.compute_bytes
    if workload.attention == "eager" and sinks:
        saved, traffic = c, 13 * c
    elif workload.attention == "eager":
        saved, traffic = FP32_BYTES + c, 8 * c + 8
    else:
        saved, traffic = c, 4 * c
    if dropout:
        saved += 1 + (c if workload.attention == "fused-softmax" else 0)
        traffic += 2 * c + 1
    return saved, traffic


@dataclass(frozen=True)
class AttentionShape:
    """Widths per token of what attention reads and writes (q, k, v, its output), the fraction of the
    sequence each query's keys span (a sliding window or chunk shorter than the sequence), whether
    transformers passes SDPA a mask, and the key v is saved under."""

    q: int
    k: int
    v: int
    out: int
    heads: int
    keys_fraction: float = 1.0
    masked: bool = False
    v_key: str = "v_proj.out"


def attention_shape(spec: ModelSpec, workload: Workload) -> AttentionShape:
    """Standard multi-/grouped-query attention over the whole causal sequence."""
    return AttentionShape(spec.q_dim, spec.kv_dim, spec.kv_dim, spec.q_dim, spec.num_heads,
                          masked=masked_attention(spec, workload))


def window_keys_fraction(window: int, seq_len: int) -> float:
    """The share of the full (non-causal, PaLM-style) count of s keys per query that a sliding
    window of W keys costs, such that the flash kernels' causal fraction (s/2 keys on average)
    still applies: a causal query at position i sees min(i, W) keys, W - W²/(2s) on average over
    the sequence, which is (2W - W²/s)/s of s/2."""
    if window <= 0 or window >= seq_len:
        return 1.0
    return (2 * window - window * window / seq_len) / seq_len


def chunk_keys_fraction(chunk: int, seq_len: int) -> float:
    """Chunked attention (Llama 4): a query sees the keys of its own chunk up to itself, C/2 on
    average, i.e. C/s of the full causal count."""
    if chunk <= 0 or chunk >= seq_len:
        return 1.0
    return chunk / seq_len


def attention_op(spec: ModelSpec, workload: Workload, n: Numerics, shape: AttentionShape | None = None) -> Op:
    """SDPA (flash / memory-efficient kernels): keeps q, k, v, the output and the fp32 log-sum-exp
    (one per head per token). GQA runs natively (enable_gqa), so k and v stay kv-sized, unless a
    mask is passed: then transformers repeats k and v for every head (repeat_kv,
    sdpa_attention.use_gqa_in_sdpa) and SDPA keeps the copies. Materialised scores (eager,
    fused-softmax) keep q, k, v and the scores' softmax (`score_bytes`) and move them through HBM.
    A sliding window or chunk costs the FLOPs of the keys it spans (`keys_fraction`)."""
    shape = shape or attention_shape(spec, workload)
    c, a = n.compute_bytes, shape.heads
    q, k, v, out = shape.q, shape.k, shape.v, shape.out
    k_and_v = [Saved("attn.k", c * k), Saved(shape.v_key, c * v)]
    if shape.masked:
        # SDPA turns the boolean mask into an additive one in the compute dtype and keeps it, per layer
        # (torch/nn/attention/_utils: convert_boolean_attn_mask), one (batch, 1, s, s) per layer
        k_and_v = [Saved("attn.k", c * q), Saved("attn.v", c * out), Saved("attn.mask", c * workload.seq_len, "none")]
    saved = [Saved("attn.q", c * q), *k_and_v,
             Saved("attn.out", c * out), Saved("attn.lse", FP32_BYTES * a, selective=True)]
    score_traffic = 0.0
    if workload.attention != "sdpa":
        per_score, score_traffic = score_bytes(workload, n, spec.dropout > 0, spec.attention_sinks)
        saved = saved[:3] + [Saved("attn.scores", per_score * a, times_seq=True)]
    # QK^T and PV: 2 FLOPs x 2 matmuls x head_dim x heads per (query, key) pair; counted non-causal as
    # in PaLM (Chowdhery et al. 2022, App. B: 12·L·H·Q·T per token for fwd+bwd)
    # backward: the output's gradient and those of q, k and v
    grads = (Saved("attention.grad", c * (q + out + k + v)),)
    return Op("attention", "attention", flops_per_token_seq=2 * (q + out) * shape.keys_fraction,
              io_bytes_per_token=c * (q + out + k + v), io_bytes_per_token_seq=score_traffic * a,
              out_bytes_per_token=c * out, saved=tuple(saved), grads=grads)
