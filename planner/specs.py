"""The three descriptions that stay apart (STYLE.md lesson 1): what is trained (ModelSpec),
where (Hardware, Cluster) and with which workload (Workload). The parallel plan lives in plan.py.

All quantities are SI: bytes, seconds, FLOP/s. Conversions happen only at the edges.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from planner.errors import InvalidRequest

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# sdpa: flash / memory-efficient kernels (scores never written out); eager: transformers'
# eager_attention_forward (materialised scores, fp32 softmax); fused-softmax: Megatron-LM before
# FlashAttention (materialised scores, FusedScaleMaskSoftmax in the compute dtype)
ATTENTION_IMPLS = ("sdpa", "eager", "fused-softmax")
OPTIMIZER_IMPLS = ("foreach", "fused", "forloop")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
RECOMPUTE_MODULES = ("mla_up_proj",)  # Megatron-Core's --recompute-modules the planner models
MOMENTS_DTYPES = ("fp32", "bf16")
# the software stack a run uses: each is a set of fitted parameters in the calibration profile
# (planner/profile.py frameworks.<name>). megatron: Megatron-LM / Megatron-Core / NeMo / Megatron-Bridge
# with Transformer Engine; deepspeed: incl. Megatron-DeepSpeed; hf: transformers Trainer, TRL,
# Accelerate, axolotl; executor: this project's own trainer
FRAMEWORKS = ("executor", "torchtitan", "megatron", "deepspeed", "hf", "llm-foundry", "torchtune")
# how routed tokens travel to their experts' ranks (planner/cost/cpep.py ep_seconds): a copy per routed
# expert, or one per destination rank (DeepEP)
EXPERT_DISPATCHERS = ("alltoall", "deepep")


ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention",
                   "compressed_sparse_attention", "heavily_compressed_attention")  # the last two: DeepSeek-V4
# a hybrid's block may hold a Mamba-2 mixer, or no mixer / no MLP at all (Nemotron-H)
MIXER_TYPES = (*ATTENTION_TYPES, "mamba", "none")
MLP_TYPES = ("dense", "sparse", "none")


@dataclass(frozen=True)
class LayerKind:
    """What sets one decoder layer apart from another of the same model."""

    attention: str = "full_attention"  # one of ATTENTION_TYPES (linear_attention: a Gated DeltaNet mixer)
    rope: bool = True  # rotary embedding applied to q and k
    mlp: str = "dense"  # dense (gated or plain MLP) | sparse (routed experts)
    kv_shared: bool = False  # reuses an earlier layer's keys and values (Gemma 4 num_kv_shared_layers)
    hash_routed: bool = False  # its experts are chosen by a fixed token-id table (DeepSeek-V4 hash_moe)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape, as transformers would instantiate it."""

    name: str
    family: str  # the Hugging Face model_type it was read from (llama, mistral, gpt2, ...)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # per expert for MoE
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # SwiGLU-style gate/up/down (Llama) vs fc1/act/fc2 (GPT-2)
    activation: str = "silu"
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_bias: bool = False
    # Gemma / Qwen3-Next RMSNorm: (1 + weight) multiplies the fp32 normalised tensor, cast after
    # (modeling_gemma3.py Gemma3RMSNorm), so the fp32 tensor is what the weight's gradient keeps
    norm_offset: bool = False
    qkv_bias: bool = False
    out_bias: bool = False  # bias of the attention output projection
    mlp_bias: bool = False
    positions: str = "rotary"  # rotary | learned | alibi
    num_experts: int = 1  # MoE: routed experts per layer (1 = dense)
    experts_per_token: int = 1
    dropout: float = 0.0  # residual/attention dropout active in training (GPT-2 style)
    fused_qkv: bool = False  # one qkv projection (gpt2 c_attn, gpt_neox, baichuan W_pack)
    final_norm: bool = True
    # -- per-layer variants (STYLE.md lesson 10): lists as transformers' configs spell them ------
    # attention of each layer: full_attention | sliding_attention | chunked_attention; () = all full
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0  # keys a sliding_attention layer sees
    attention_chunk_size: int = 0  # tokens of a chunked_attention layer's chunk (Llama 4)
    no_rope_layers: tuple[int, ...] = ()  # indices of layers without rotary embedding (SmolLM3, Llama 4)
    mlp_layer_types: tuple[str, ...] = ()  # dense | sparse per layer; () = all sparse for MoE, else dense
    dense_intermediate_size: int = 0  # the dense layers of a MoE model (0: intermediate_size)
    shared_expert_intermediate_size: int = 0  # shared experts' total width (Qwen2-MoE, DeepSeek, Llama 4)
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE shared_expert_gate)
    router_bias: bool = False  # the router linear has a bias (gpt-oss)
    expert_bias: bool = False  # experts' gate_up / down projections have biases (gpt-oss)
    # the experts' gating: act(gate) * up, or gpt-oss's clamped (up + 1) * gate * sigmoid(alpha * gate)
    expert_gate: str = "act"  # act | clamped_swiglu
    # how transformers' modeling code runs the routed experts: "routed" (the top-k copies of each token,
    # grouped by expert) or "dense" (every token through every expert, weighted: Llama 4)
    expert_dispatch: str = "routed"
    # routed experts run in a latent of this width between two projections (Nemotron 3 LatentMoE; 0: none)
    moe_latent_size: int = 0
    qk_norm: str = ""  # "" | "head": RMSNorm over head_dim (Qwen3, Gemma 3) | "full": over q/kv width (OLMo 2)
    attention_sinks: bool = False  # one learned sink logit per head (gpt-oss)
    layer_norms: str = "pre"  # pre | sandwich (Gemma 2/3: pre and post norms) | post (OLMo 2: post only)
    # DeepSeek multi-head latent attention (q_lora_rank 0: q_proj without low rank; kv_lora_rank 0: no MLA)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Gated DeltaNet linear-attention layers (Qwen3-Next, Qwen3.5: layer_types linear_attention)
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # which linear-attention mixer: gated_deltanet (Qwen3-Next) | kimi_delta (Kimi Delta Attention, kimi_linear)
    linear_mixer: str = "gated_deltanet"
    # DeepSeek Sparse Attention (deepseek_v32): the lightning indexer's heads and head dim, and the keys
    # each query's MLA attends (index_topk); 0 = dense attention
    index_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # Mamba-2 mixers (Nemotron-H: attention kind "mamba"); linear_conv_kernel is their conv kernel too
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state_size: int = 0
    mamba_groups: int = 0
    mamba_chunk_size: int = 0
    mamba_conv_bias: bool = True
    attention_output_gate: bool = False  # q_proj also makes a sigmoid gate on attention's output (Qwen3-Next)
    embedding_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma): no parameter
    attn_logit_softcapping: float = 0.0  # tanh soft-cap of attention logits (Gemma 2)
    final_logit_softcapping: float = 0.0  # tanh soft-cap of the LM head's logits (Gemma 2)
    # Gemma 4 (planner/gemma4.py): full_attention layers' own head dim and KV heads (0: head_dim,
    # num_kv_heads), their values being their keys (attention_k_eq_v: no v_proj), a weightless
    # RMSNorm on values, the last kv_shared_layers layers reusing an earlier layer's K/V, the
    # kv-shared layers' MLP twice as wide, per-layer input embeddings of per_layer_input_size
    # (0: none) from a table of per_layer_input_vocab rows, and the experts beside the dense MLP
    global_head_dim: int = 0
    global_kv_heads: int = 0
    attention_k_eq_v: bool = False
    value_norm: bool = False
    kv_shared_layers: int = 0
    double_wide_shared_mlp: bool = False
    per_layer_input_size: int = 0
    per_layer_input_vocab: int = 0
    moe_beside_mlp: bool = False
    # DeepSeek-V4 (planner/deepseek_v4.py): hc_mult residual streams mixed by hyper-connections (0: one
    # plain residual stream), grouped low-rank output projection (o_groups x o_lora_rank), the
    # compression rates of compressed_sparse_attention / heavily_compressed_attention layers, the
    # hash-routed MoE layers and the clamp of the SwiGLU inputs (0: none)
    hc_mult: int = 0
    hc_sinkhorn_iters: int = 0
    o_groups: int = 0
    o_lora_rank: int = 0
    csa_compress_rate: int = 0
    hca_compress_rate: int = 0
    hash_moe_layers: tuple[int, ...] = ()
    swiglu_limit: float = 0.0
    source: str = ""
    # the config.json it was read from (what the executor instantiates); not part of equality
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def expert_width(self) -> int:
        """Width of the routed experts' input and output (and of the tokens they exchange)."""
        return self.moe_latent_size or self.hidden_size

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def residual_width(self) -> int:
        """Values per token of the residual stream between layers: hc_mult copies of the hidden
        state under hyper-connections (DeepSeek-V4), else the hidden state."""
        return self.hidden_size * max(self.hc_mult, 1)

    def layer_kinds(self) -> list[tuple[LayerKind, tuple[int, ...]]]:
        """The distinct kinds of layer in the stack, in order of first appearance, with the
        indices of the layers of each kind (a uniform model has one kind holding every layer)."""
        kinds: dict[LayerKind, list[int]] = {}
        for index in range(self.num_layers):
            kinds.setdefault(self.layer_kind(index), []).append(index)
        return [(kind, tuple(indices)) for kind, indices in kinds.items()]

    def layer_kind(self, index: int) -> LayerKind:
        attention = self.layer_types[index] if self.layer_types else "full_attention"
        mlp = self.mlp_layer_types[index] if self.mlp_layer_types else ("sparse" if self.is_moe else "dense")
        shared = index >= self.num_layers - self.kv_shared_layers if self.kv_shared_layers else False
        return LayerKind(attention=attention, rope=index not in self.no_rope_layers, mlp=mlp, kv_shared=shared,
                         hash_routed=index in self.hash_moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        values = _strict_fields(cls, data, "model spec")
        for key in ("layer_types", "no_rope_layers", "mlp_layer_types", "hash_moe_layers"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU socket for the executor's CPU runs) and its node."""

    name: str
    description: str
    source: str
    memory_bytes: int
    peak_flops: dict[str, float]  # dense FLOP/s by dtype: fp32, tf32, bf16, fp16, fp8
    hbm_bandwidth_bytes_per_s: float
    intra_node_bandwidth_bytes_per_s: float  # per device, one direction (NVLink, xGMI)
    inter_node_bandwidth_bytes_per_s: float  # per device, one direction (NIC)
    devices_per_node: int
    pcie_bandwidth_bytes_per_s: float  # device <-> host, one direction
    host_memory_bytes_per_node: int
    host_memory_bandwidth_bytes_per_s: float
    vendor: str = "nvidia"
    # the silicon (GH100, GA100, ...): SKUs of one chip share the calibration's efficiencies, their
    # clocks, memory and links being in the fields above; "" when a part is its own chip
    chip: str = ""
    # the node's host CPU cores, shared by its devices for host-side work (the offloaded optimizer
    # step); hardware files without it get a 2-socket server's 32
    host_cpu_cores_per_node: int = 32

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            known = ", ".join(sorted(self.peak_flops))
            raise InvalidRequest(f"{self.name} has no {dtype} peak (it has {known}); choose another --precision")
        return self.peak_flops[dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        return cls(**_strict_fields(cls, data, "hardware"))


@dataclass(frozen=True)
class Cluster:
    hardware: Hardware
    num_devices: int
    devices_per_node: int

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_devices / self.devices_per_node)

    def to_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware.name, "num_devices": self.num_devices,
                "devices_per_node": self.devices_per_node}


def option(help: str, choices: tuple | None = None, flag: str | None = None) -> dict[str, Any]:
    """Field metadata from which the CLI options are derived (planner/commands/common.py add_workload)."""
    return {"help": help, "choices": choices, "flag": flag}


@dataclass(frozen=True)
class Workload:
    """What is trained and how: the one definition from which the CLI options, the API's Request,
    the Plan file and the run records are derived (each field's metadata is its option)."""

    seq_len: int = field(metadata=option("tokens per sequence (default 4096)"))
    # None until a cluster is known: one sequence per device (planner.api.resolve fills it in)
    global_batch: int | None = field(metadata=option("sequences per optimizer step (default: one per device)"))
    method: str = field(default="full", metadata=option("what is trained (default full)", METHODS))
    precision: str = field(default="bf16", metadata=option("compute precision (default bf16)", PRECISIONS))
    optimizer: str = field(default="adamw", metadata=option("optimizer (default adamw)", OPTIMIZERS))
    optimizer_impl: str = field(default="foreach", metadata=option(
        "PyTorch AdamW implementation (default foreach, the GPU default)", OPTIMIZER_IMPLS))
    lora_rank: int = field(default=16, metadata=option("LoRA rank (default 16)"))
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS, metadata=option(
        "comma list of q,k,v,o,gate,up,down (default all)"))
    attention: str = field(default="sdpa", metadata=option(
        "sdpa (flash / memory-efficient kernels, default), eager (transformers' materialised scores) or "
        "fused-softmax (Megatron-LM's before FlashAttention)", ATTENTION_IMPLS))
    master_dtype: str = field(default="fp32", metadata=option(
        "fp32 master weights and AdamW moments (default), or bf16 for all (torchtune's default)", ("fp32", "bf16")))
    loss_chunks: int = field(default=1, metadata=option("cross-entropy in this many chunks (torchtune's chunked loss "
                                                        "uses 8)"))
    activation_offload: bool = field(default=False, metadata=option(
        "keep saved activations in host memory (torch save_on_cpu)"))
    optimizer_in_backward: bool = field(default=False, metadata=option(
        "step each parameter as soon as its gradient is ready (needs one micro-batch); no held gradients"))
    compile: bool = field(default=False, metadata=option("torch.compile (fused elementwise ops and loss)"))
    # cross-entropy on the vocabulary shards, logits split over TP (Megatron's vocab-parallel
    # cross-entropy, torchtitan's loss_parallel); without it the logits are gathered (the executor).
    # Its temporaries are those of torch's loss_parallel; Megatron's works in place and holds less.
    loss_parallel: bool = field(default=False, metadata=option(
        "cross-entropy on TP vocabulary shards (torch's loss_parallel, as torchtitan; Megatron's in-place one "
        "holds less); the executor gathers logits"))
    # the model itself returns fp32 logits (torchtune's TransformerDecoder without chunked output:
    # `output = self.output(h).float()`); otherwise the loss upcasts them (transformers' ForCausalLMLoss)
    fp32_logits: bool = field(default=False, metadata=option(
        "the model returns fp32 logits (torchtune without chunked loss); default: the loss upcasts"))
    # a fused cross-entropy kernel on the logits (flash-attn's xentropy, which llm-foundry's MPT uses by
    # default: loss_fn fused_crossentropy): no fp32 copy, a log-sum-exp per token, the gradient written
    # in the logits' dtype — the memory of a compiled loss without compiling the model
    fused_loss: bool = field(default=False, metadata=option(
        "a fused cross-entropy kernel (flash-attn's, llm-foundry's default): no fp32 copy of the logits"))
    # last, so that positional Workload(...) calls keep their meaning; plans and records from before
    # it existed read as "executor"
    framework: str = field(default="executor", metadata=option(
        "the training software whose calibration to use: executor (default, this project's), torchtitan, "
        "megatron (Megatron-LM/Core, NeMo; Transformer Engine), deepspeed, hf (Trainer, TRL, Accelerate, "
        "axolotl), llm-foundry, torchtune", FRAMEWORKS))
    # a fused RMSNorm kernel that saves its input and rstd only (torchtitan's fused_rmsnorm, the norm_type
    # of its 2024 llama2_7b / llama2_13b / llama3_8b configs; TritonFusedRMSNorm in torchtitan/models/norms.py);
    # otherwise transformers' LlamaRMSNorm, which keeps an fp32 copy of its input and the normalised tensor
    fused_norm: bool = field(default=False, metadata=option(
        "a fused RMSNorm kernel that keeps only its input and rstd (torchtitan's fused_rmsnorm); the executor "
        "runs transformers' norms"))
    # the MoE token dispatcher: "alltoall" sends a copy of a token per routed expert (torchtitan's
    # ExpertParallel, Megatron-Core's MoEAlltoAllTokenDispatcher, the executor); "deepep" one per
    # destination rank (DeepEP's dispatch, Megatron-Core's flex dispatcher with moe_enable_deepep)
    expert_dispatcher: str = field(default="alltoall", metadata=option(
        "MoE token dispatch: alltoall (a copy per routed expert; default, the executor's) or deepep (a copy "
        "per destination rank: DeepEP, Megatron's flex dispatcher)", EXPERT_DISPATCHERS))
    # Megatron-Core's selective recomputation of named modules (--recompute-granularity selective
    # --recompute-modules; transformer_config.py recompute_modules): what they keep is recomputed in
    # backward. The planner models MLA's up-projection and RoPE (mla_up_proj); memory only
    recompute_modules: str = field(default="", metadata=option(
        "Megatron-Core modules recomputed in backward (framework megatron; --recompute-modules): mla_up_proj"))
    # Megatron-Core's precision-aware optimizer (--use-precision-aware-optimizer --exp-avg-dtype bf16
    # --exp-avg-sq-dtype bf16): AdamW's moments in bf16 beside the fp32 main parameters
    moments_dtype: str = field(default="fp32", metadata=option(
        "AdamW's moments: fp32 (default) or bf16 (Megatron-Core's precision-aware optimizer; framework megatron)",
        MOMENTS_DTYPES))

    @property
    def recompute_module_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.recompute_modules.split(",") if m.strip())

    def __post_init__(self) -> None:
        _require_positive("--seq-len", self.seq_len)
        if self.global_batch is not None:
            _require_positive("--global-batch", self.global_batch)
        _require_choice("--method", self.method, METHODS)
        _require_choice("--precision", self.precision, PRECISIONS)
        _require_choice("--optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("optimizer implementation", self.optimizer_impl, OPTIMIZER_IMPLS)
        _require_choice("--attention", self.attention, ATTENTION_IMPLS)
        _require_choice("--expert-dispatcher", self.expert_dispatcher, EXPERT_DISPATCHERS)
        _require_choice("--master-dtype", self.master_dtype, ("fp32", "bf16"))
        _require_choice("--framework", self.framework, FRAMEWORKS)
        _require_choice("--moments-dtype", self.moments_dtype, MOMENTS_DTYPES)
        for module in self.recompute_module_names:
            _require_choice("--recompute-modules entry", module, RECOMPUTE_MODULES)
        if (self.recompute_modules or self.moments_dtype != "fp32") and self.framework != "megatron":
            raise InvalidRequest("--recompute-modules and --moments-dtype bf16 are Megatron-Core's; they need "
                                 "--framework megatron")
        _require_positive("--loss-chunks", self.loss_chunks)
        if self.master_dtype == "bf16" and self.precision == "fp32":
            raise InvalidRequest("--master-dtype bf16 needs a 16-bit --precision (bf16 or fp16)")
        if self.method != "full":
            _require_positive("--lora-rank", self.lora_rank)
            if not self.lora_targets:
                raise InvalidRequest("--lora-targets is empty; give e.g. q,k,v,o")
            for target in self.lora_targets:
                _require_choice("--lora-targets entry", target, LORA_TARGETS)

    @property
    def tokens_per_step(self) -> int:
        assert self.global_batch is not None, "a workload's global batch is set once the cluster is known"
        return self.seq_len * self.global_batch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        values = _strict_fields(cls, data, "workload")
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values)


def _require_positive(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"{option} must be a positive whole number, got {value!r}")


def _require_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequest(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def _strict_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject unknown keys and report missing required ones (Calculon-style strict JSON)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidRequest(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise InvalidRequest(f"{what}: missing key(s) {', '.join(missing)}")
    return dict(data)
