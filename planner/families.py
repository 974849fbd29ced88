"""Readers of today's decoder families: each maps its config.json keys onto ModelSpec's fields,
with the defaults of transformers' own configuration class for the keys a config leaves out
(transformers/models/<type>/configuration_<type>.py, transformers 5.24; read, not imported).

Per-layer lists follow the configs' own spelling (STYLE.md lesson 10): `layer_types`
(full_attention / sliding_attention / chunked_attention / linear_attention = Gated DeltaNet),
`mlp_only_layers` + `decoder_sparse_step` (Qwen MoE), `first_k_dense_replace` (DeepSeek, GLM),
`moe_layers` / `interleave_moe_layer_step` (Llama 4), `no_rope_layers` (1 = the layer uses rotary,
as SmolLM3 and Llama 4 spell it), Nemotron-H's `layers_block_type` (one mixer or one MLP per block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from planner.errors import InvalidRequest
from planner.hfconfig import Config, llama_like
from planner.specs import ATTENTION_TYPES

# families transformers ships whose layers are not softmax attention + MLP: what they lack here
# (deepseek_v4, the last one, is read by planner/families_dsv4.py)
NOT_YET: dict[str, str] = {}


def _attention_types(c: Config, layers: int, default: Callable[[int], str]) -> tuple[str, ...]:
    """`layer_types` as given, else the family's default pattern; () when every layer is full."""
    given = c.str_list("layer_types", ATTENTION_TYPES)
    types = given if given is not None else [default(i) for i in range(layers)]
    if len(types) != layers:
        raise InvalidRequest(f"{c.where}: layer_types lists {len(types)} layers but num_hidden_layers is {layers}")
    return () if all(t == "full_attention" for t in types) else tuple(types)


def _nope(flags: list[int] | None, layers: int, interval: int, where: str) -> tuple[int, ...]:
    """Indices of the layers without rotary from `no_rope_layers` (1 = uses rotary), default every
    `interval`-th layer without (SmolLM3Config / Llama4TextConfig)."""
    flags = flags or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(flags) != layers:
        raise InvalidRequest(f"{where}: no_rope_layers lists {len(flags)} layers but num_hidden_layers is {layers}")
    return tuple(i for i, uses_rope in enumerate(flags) if not uses_rope)


def _window(c: Config, default: int) -> int:
    """sliding_window: absent -> the family's default, null -> none (0)."""
    if "sliding_window" in c.data and c.data["sliding_window"] is None:
        return 0
    return c.count("sliding_window", default)


def _sparse(layers: int, is_sparse: Callable[[int], bool]) -> tuple[str, ...]:
    return tuple("sparse" if is_sparse(i) else "dense" for i in range(layers))


def _indices(c: Config, key: str, layers: int, default: list[int]) -> set[int]:
    """A list of layer indices (mlp_only_layers, moe_layers), each below num_hidden_layers."""
    indices = c.int_list(key, default)
    outside = [i for i in indices if i >= layers]
    if outside:
        raise InvalidRequest(f"{c.where}: {key} names layer {outside[0]} but num_hidden_layers is {layers}")
    return set(indices)


def _qwen3(c: Config) -> dict[str, Any]:
    """Qwen3Config: head_dim 128, q/k RMSNorm per head, bias on q, k, v, o with attention_bias;
    sliding layers from max_window_layers on when use_sliding_window."""
    f = llama_like(c)
    f.update(head_dim=c.int("head_dim", default=128), qk_norm="head",
             max_position_embeddings=c.int("max_position_embeddings", default=32768))
    window = _window(c, 4096) if c.bool("use_sliding_window", False) else 0
    first = c.count("max_window_layers", 28)
    f.update(sliding_window=window, layer_types=_attention_types(
        c, f["num_layers"], lambda i: "sliding_attention" if window and i >= first else "full_attention"))
    return f


def _qwen_moe_layers(c: Config, layers: int, experts: int) -> tuple[str, ...]:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: sparse unless in mlp_only_layers, every
    decoder_sparse_step-th layer."""
    only = _indices(c, "mlp_only_layers", layers, [])
    step = c.int("decoder_sparse_step", default=1)
    return _sparse(layers, lambda i: i not in only and experts > 0 and (i + 1) % step == 0)


def _qwen3_moe(c: Config) -> dict[str, Any]:
    f = llama_like(c)
    experts = c.int("num_experts", default=128)
    f.update(qk_norm="head", num_experts=experts, experts_per_token=c.int("num_experts_per_tok", default=8),
             intermediate_size=c.int("moe_intermediate_size", default=768),
             dense_intermediate_size=c.int("intermediate_size", default=6144),
             mlp_layer_types=_qwen_moe_layers(c, f["num_layers"], experts))
    return f


def _qwen2_moe(c: Config) -> dict[str, Any]:
    """Qwen2MoeConfig: bias on q, k, v (qkv_bias), a shared expert with a sigmoid gate."""
    f = llama_like(c)
    experts = c.int("num_experts", default=60)
    window = _window(c, 4096) if c.bool("use_sliding_window", False) else 0
    last = c.count("max_window_layers", 28)
    f.update(qkv_bias=c.bool("qkv_bias", True), out_bias=False, num_experts=experts,
             experts_per_token=c.int("num_experts_per_tok", default=4),
             intermediate_size=c.int("moe_intermediate_size", default=1408),
             dense_intermediate_size=c.int("intermediate_size", default=5632),
             shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=5632),
             shared_expert_gate=True, mlp_layer_types=_qwen_moe_layers(c, f["num_layers"], experts),
             sliding_window=window, layer_types=_attention_types(
                 c, f["num_layers"], lambda i: "sliding_attention" if window and (i + 1) % 2 and i < last
                 else "full_attention"))
    return f


def _gemma(c: Config, pattern: int, qk_norm: str) -> dict[str, Any]:
    """Gemma2Config / Gemma3TextConfig: head_dim 256, tied and scaled embeddings, sandwich norms,
    every `pattern`-th layer global and the others sliding."""
    f = llama_like(c)
    f.update(head_dim=c.int("head_dim", default=256), tie_word_embeddings=c.bool("tie_word_embeddings", True),
             activation=str(c.data.get("hidden_activation") or "gelu_pytorch_tanh"), layer_norms="sandwich",
             embedding_scale=True, qk_norm=qk_norm, sliding_window=_window(c, 4096), norm_offset=True,
             attn_logit_softcapping=c.float("attn_logit_softcapping", 50.0 if pattern == 2 else 0.0),
             final_logit_softcapping=c.float("final_logit_softcapping", 30.0 if pattern == 2 else 0.0))
    pattern = c.int("sliding_window_pattern", default=pattern)
    f["layer_types"] = _attention_types(
        c, f["num_layers"], lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention")
    return f


def _phi3(c: Config) -> dict[str, Any]:
    """Phi3Config: fused qkv_proj and gate_up_proj, no biases; a sliding window on every layer when set."""
    f = llama_like(c)
    window = _window(c, 0)
    f.update(fused_qkv=True, qkv_bias=False, out_bias=False, sliding_window=window,
             layer_types=("sliding_attention",) * f["num_layers"] if window else (),
             dropout=max(c.float("attention_dropout", 0.0), c.float("resid_pdrop", 0.0)))
    return f


def _olmo2(c: Config) -> dict[str, Any]:
    """Olmo2Config: post-norms only, q/k RMSNorm over their whole width."""
    f = llama_like(c)
    f.update(layer_norms="post", qk_norm="full", head_dim=f["hidden_size"] // f["num_heads"],
             max_position_embeddings=c.int("max_position_embeddings", default=2048))
    return f


def _olmo3(c: Config) -> dict[str, Any]:
    """Olmo3Config: OLMo 2 with three sliding layers to one full layer."""
    f = _olmo2(c)
    f.update(sliding_window=_window(c, 4096), layer_types=_attention_types(
        c, f["num_layers"], lambda i: "sliding_attention" if (i + 1) % 4 else "full_attention"))
    return f


def _smollm3(c: Config) -> dict[str, Any]:
    """SmolLM3Config: tied embeddings, every 4th layer without rotary (no_rope_layers)."""
    f = llama_like(c)
    layers = f["num_layers"]
    nope = _nope(c.int_list("no_rope_layers"), layers, c.int("no_rope_layer_interval", default=4), c.where)
    window = _window(c, 0) if c.bool("use_sliding_window", False) else 0
    f.update(tie_word_embeddings=c.bool("tie_word_embeddings", True), no_rope_layers=nope, sliding_window=window,
             layer_types=_attention_types(c, layers, lambda i: "sliding_attention" if window and i in nope
                                          else "full_attention"))
    return f


def _llama4(c: Config) -> dict[str, Any]:
    """Llama4TextConfig: MoE every interleave_moe_layer_step-th layer (moe_layers) with a shared
    expert as wide as the routed ones; dense layers of intermediate_size_mlp; chunked attention on
    the rotary layers, global attention without rotary on every 4th (its L2 q/k norm has no weight)."""
    f = llama_like(c)
    layers = f["num_layers"]
    step = c.int("interleave_moe_layer_step", default=1)
    moe = _indices(c, "moe_layers", layers, list(range(step - 1, layers, step)))
    nope = _nope(c.int_list("no_rope_layers"), layers, c.int("no_rope_layer_interval", default=4), c.where)
    chunk = c.count("attention_chunk_size", 8192)
    expert = c.int("intermediate_size", default=8192)
    f.update(head_dim=c.int("head_dim", default=128), num_experts=c.int("num_local_experts", default=16),
             experts_per_token=c.int("num_experts_per_tok", default=1), intermediate_size=expert,
             dense_intermediate_size=c.int("intermediate_size_mlp", default=16384),
             shared_expert_intermediate_size=expert, mlp_layer_types=_sparse(layers, lambda i: i in moe),
             expert_dispatch="dense",
             no_rope_layers=nope, attention_chunk_size=chunk, layer_types=_attention_types(
                 c, layers, lambda i: "chunked_attention" if i not in nope and chunk else "full_attention"))
    return f


def _gpt_oss(c: Config) -> dict[str, Any]:
    """GptOssConfig: biases on q, k, v, o, a learned sink per head, 128 experts with biases behind
    a router with a bias, alternating sliding (128) and full layers."""
    f = llama_like(c)
    bias = c.bool("attention_bias", True)
    f.update(head_dim=c.int("head_dim", default=64), qkv_bias=bias, out_bias=bias, attention_sinks=True,
             num_experts=c.int("num_local_experts", default=128),
             experts_per_token=c.int("num_experts_per_tok", default=4),
             router_bias=True, expert_bias=True, expert_gate="clamped_swiglu", sliding_window=_window(c, 128))
    f["layer_types"] = _attention_types(
        c, f["num_layers"], lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
    return f


def _deepseek_moe(c: Config, f: dict[str, Any], experts: int, shared: int, first_dense: int,
                  expert_width: int, top_k: int = 8) -> dict[str, Any]:
    """DeepSeek-style MoE (DeepSeek-V2/V3, GLM-4.5): the first `first_k_dense_replace` layers dense,
    `n_shared_experts` shared experts (one MLP of their summed width), a router whose
    e_score_correction_bias is a buffer, not a parameter."""
    if first_dense > f["num_layers"]:
        raise InvalidRequest(f"{c.where}: first_k_dense_replace ({first_dense}) exceeds num_hidden_layers "
                             f"({f['num_layers']})")
    f.update(num_experts=experts, experts_per_token=c.int("num_experts_per_tok", default=top_k),
             intermediate_size=expert_width,
             dense_intermediate_size=c.int("intermediate_size"), shared_expert_intermediate_size=expert_width * shared,
             mlp_layer_types=_sparse(f["num_layers"], lambda i: i >= first_dense))
    return f


def _deepseek(c: Config, defaults: dict[str, Any]) -> dict[str, Any]:
    """DeepseekV2Config / DeepseekV3Config: multi-head latent attention (planner/mla.py)."""
    f = llama_like(c)
    bias = c.bool("attention_bias", False)
    nope, rope = c.int("qk_nope_head_dim", default=128), c.int("qk_rope_head_dim", default=64)
    f.update(num_kv_heads=f["num_heads"], head_dim=nope + rope, qkv_bias=bias, out_bias=bias,
             q_lora_rank=_q_lora_rank(c, defaults["q_lora_rank"]), kv_lora_rank=c.int("kv_lora_rank", default=512),
             qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=c.int("v_head_dim", default=128))
    return _deepseek_moe(c, f, c.int("n_routed_experts", default=defaults["n_routed_experts"]),
                         c.count("n_shared_experts", defaults["n_shared_experts"]),
                         c.count("first_k_dense_replace", defaults["first_k_dense_replace"]),
                         c.int("moe_intermediate_size", default=defaults["moe_intermediate_size"]))


def _q_lora_rank(c: Config, default: int) -> int:
    """q_lora_rank: null means q_proj without the low-rank pair (DeepSeek-V2-Lite), absent the default."""
    if "q_lora_rank" in c.data and c.data["q_lora_rank"] is None:
        return 0
    return c.count("q_lora_rank", default)


def _deepseek_v3(c: Config) -> dict[str, Any]:
    return _deepseek(c, dict(q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1, first_k_dense_replace=3,
                             moe_intermediate_size=2048))


def _deepseek_v2(c: Config) -> dict[str, Any]:
    f = _deepseek(c, dict(q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2, first_k_dense_replace=0,
                          moe_intermediate_size=1407))
    f["mlp_bias"] = c.bool("mlp_bias", False)
    return f


def _glm4_moe(c: Config) -> dict[str, Any]:
    """Glm4MoeConfig: GQA with bias on q, k, v (not o), optional per-head q/k norm, DeepSeek-style MoE."""
    f = llama_like(c)
    f.update(out_bias=False, qk_norm="head" if c.bool("use_qk_norm", False) else "")
    return _deepseek_moe(c, f, c.int("n_routed_experts", default=128), c.count("n_shared_experts", 1),
                         c.count("first_k_dense_replace", 1), c.int("moe_intermediate_size", default=1408))


def _minimax_m2(c: Config) -> dict[str, Any]:
    """MiniMaxM2Config: every layer MoE (intermediate_size per expert), q/k norms over the whole width."""
    f = llama_like(c)
    f.update(head_dim=c.int("head_dim", default=128), qk_norm="full",
             num_experts=c.int("num_local_experts", default=256),
             experts_per_token=c.int("num_experts_per_tok", default=8))
    return f


def _gated_deltanet(c: Config, f: dict[str, Any]) -> dict[str, Any]:
    """Qwen3NextConfig / Qwen3_5TextConfig attention: three Gated DeltaNet layers to one full
    attention layer (full_attention_interval), whose q_proj also makes an output gate; per-head q/k norm."""
    interval = c.int("full_attention_interval", default=4)
    f.update(head_dim=c.int("head_dim", default=256), qk_norm="head", attention_output_gate=True, norm_offset=True,
             linear_key_heads=c.int("linear_num_key_heads", default=16),
             linear_value_heads=c.int("linear_num_value_heads", default=32),
             linear_key_head_dim=c.int("linear_key_head_dim", default=128),
             linear_value_head_dim=c.int("linear_value_head_dim", default=128),
             linear_conv_kernel=c.int("linear_conv_kernel_dim", default=4),
             layer_types=_attention_types(c, f["num_layers"], lambda i: "linear_attention" if (i + 1) % interval
                                          else "full_attention"))
    return f


def _qwen_shared_moe(c: Config, f: dict[str, Any], experts: int, top_k: int, sparse: tuple[str, ...]) -> dict[str, Any]:
    """Routed experts of moe_intermediate_size and a sigmoid-gated shared expert (Qwen2-MoE style)."""
    f.update(num_experts=experts, experts_per_token=c.int("num_experts_per_tok", default=top_k),
             dense_intermediate_size=f["intermediate_size"], intermediate_size=c.int("moe_intermediate_size", default=512),
             shared_expert_intermediate_size=c.int("shared_expert_intermediate_size", default=512),
             shared_expert_gate=True, mlp_layer_types=sparse)
    return f


def _qwen3_next(c: Config) -> dict[str, Any]:
    f = _gated_deltanet(c, llama_like(c))
    experts = c.int("num_experts", default=512)
    return _qwen_shared_moe(c, f, experts, 10, _qwen_moe_layers(c, f["num_layers"], experts))


def _qwen3_5_moe(c: Config) -> dict[str, Any]:
    """Qwen3_5MoeTextConfig: every layer MoE (no intermediate_size key)."""
    c = Config({"intermediate_size": 1, **c.data}, c.where)
    f = _gated_deltanet(c, llama_like(c))
    f = _qwen_shared_moe(c, f, c.int("num_experts", default=256), 8, ("sparse",) * f["num_layers"])
    f["dense_intermediate_size"] = 0
    return f


NEMOTRON_BLOCKS = {"linear_attention": ("mamba", "none"), "full_attention": ("full_attention", "none"),
                   "mlp": ("none", "dense"), "moe": ("none", "sparse")}
NEMOTRON_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
# the names released config.json files still use (e.g. Nemotron 3.5 Lightning), as transformers renames them
# (configuration_utils._LEGACY_LAYER_TYPE_REMAP)
NEMOTRON_LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}


def _nemotron_h(c: Config) -> dict[str, Any]:
    """NemotronHConfig: a stack of single-purpose blocks (layers_block_type, or the older
    hybrid_override_pattern M / * / - / E): a Mamba-2 mixer, attention without positional encoding,
    a relu2 MLP, or relu2 experts with a shared expert; one norm per block."""
    blocks = c.data.get("layers_block_type") or c.data.get("layer_types")
    pattern = c.data.get("hybrid_override_pattern")
    if blocks is None and isinstance(pattern, str):
        if set(pattern) - set(NEMOTRON_PATTERN):
            raise InvalidRequest(f"{c.where}: hybrid_override_pattern may hold only M, *, - and E; got {pattern!r}")
        blocks = [NEMOTRON_PATTERN[ch] for ch in pattern]
    blocks = blocks or ["linear_attention", "moe", "full_attention", "mlp"]
    if isinstance(blocks, list):
        blocks = [NEMOTRON_LEGACY.get(b, b) if isinstance(b, str) else b for b in blocks]
    if not isinstance(blocks, list) or any(b not in NEMOTRON_BLOCKS for b in blocks):
        raise InvalidRequest(f"{c.where}: layers_block_type must list {', '.join(NEMOTRON_BLOCKS)}; got {blocks!r}")
    hidden, heads = c.int("hidden_size", default=4096), c.int("num_attention_heads", default=32)
    mamba_heads = c.int("mamba_num_heads", default=128)
    return dict(
        hidden_size=hidden, num_layers=len(blocks), num_heads=heads,
        num_kv_heads=c.int("num_key_value_heads", default=8),
        head_dim=c.int("head_dim", default=128), intermediate_size=c.int("moe_intermediate_size", default=7688),
        dense_intermediate_size=c.int("intermediate_size", default=21504),
        vocab_size=c.int("vocab_size", default=131072),
        max_position_embeddings=c.int("max_position_embeddings", default=4096),
        tie_word_embeddings=c.bool("tie_word_embeddings", False), gated_mlp=False,
        activation=str(c.data.get("mlp_hidden_act") or "relu2"), qkv_bias=c.bool("attention_bias", False),
        out_bias=c.bool("attention_bias", False), mlp_bias=c.bool("mlp_bias", False), positions="none",
        num_experts=c.int("n_routed_experts", "num_local_experts", default=8),
        experts_per_token=c.int("num_experts_per_tok", default=2),
        shared_expert_intermediate_size=c.int("moe_shared_expert_intermediate_size", default=7688)
        * c.count("n_shared_experts", 1),
        moe_latent_size=c.int("moe_latent_size", default=0),
        layer_types=tuple(NEMOTRON_BLOCKS[b][0] for b in blocks),
        mlp_layer_types=tuple(NEMOTRON_BLOCKS[b][1] for b in blocks),
        mamba_heads=mamba_heads, mamba_head_dim=c.int("mamba_head_dim", default=64),
        mamba_state_size=c.int("ssm_state_size", default=128), mamba_groups=c.int("n_groups", default=8),
        mamba_chunk_size=c.int("chunk_size", "mamba_chunk_size", default=128),
        linear_conv_kernel=c.int("conv_kernel", default=4), mamba_conv_bias=c.bool("use_conv_bias", True),
    )


def text_config(config: dict[str, Any], text_type: str) -> dict[str, Any]:
    """The language model of a multimodal config (gemma3, llama4): its text_config, typed."""
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", text_type)
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


FAMILY_READERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "qwen3": _qwen3, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe,
    "gemma2": lambda c: _gemma(c, 2, ""), "gemma3_text": lambda c: _gemma(c, 6, "head"),
    "phi3": _phi3, "olmo2": _olmo2, "olmo3": _olmo3, "smollm3": _smollm3, "llama4_text": _llama4,
    "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek_v3, "deepseek_v2": _deepseek_v2, "glm4_moe": _glm4_moe,
    "minimax_m2": _minimax_m2, "qwen3_next": _qwen3_next, "qwen3_5_text": lambda c: _gated_deltanet(c, llama_like(c)),
    "qwen3_5_moe_text": _qwen3_5_moe, "nemotron_h": _nemotron_h,
}
# multimodal configs whose text part we read: model_type -> the text config's model_type
TEXT_PARTS = {"gemma3": "gemma3_text", "llama4": "llama4_text", "qwen3_5": "qwen3_5_text",
              "qwen3_5_moe": "qwen3_5_moe_text", "gemma4": "gemma4_text"}
