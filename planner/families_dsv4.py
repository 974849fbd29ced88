"""The reader of DeepSeek-V4 config.json files (model_type deepseek_v4), with the keys and defaults of
transformers' DeepseekV4Config (transformers 5.x models/deepseek_v4/configuration_deepseek_v4.py; read,
not imported), including the legacy keys its __post_init__ folds in: compress_ratios (0 / 4 / 128 per
layer), compress_rate_csa / compress_rate_hca, num_hash_layers and qk_rope_head_dim.

What the model is (modeling_deepseek_v4.py): every layer holds shared-KV multi-query attention (one
kv head of head_dim, keys = values) with a q latent, a per-head sink and a grouped low-rank output
projection, over a sliding window plus, in compressed_sparse_attention (CSA) / heavily_compressed_
attention (HCA) layers, the entries of a compressor; every layer's MLP is a mixture of experts
(hash-routed in `hash_moe` layers) beside one shared expert of moe_intermediate_size; the residual is
hc_mult streams mixed by hyper-connections. The multi-token-prediction module (num_nextn_predict_layers)
is not built by transformers ("not instantiated here") and is not counted, as for DeepSeek-V3.
"""

from __future__ import annotations

from typing import Any

from planner.errors import InvalidRequest
from planner.hfconfig import Config

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_TYPES = ("hash_moe", "moe")
# DeepseekV4Config._COMPRESS_RATIO_TO_LAYER_TYPE: the legacy per-layer compress_ratios
RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
# DeepseekV4Config's defaults (the DeepSeek-V4-Flash shape, checkpoint deepseek-ai/DeepSeek-V4-Flash-Base)
DEFAULTS = {"vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
            "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6,
            "n_routed_experts": 256, "max_position_embeddings": 1048576, "hc_mult": 4, "hc_sinkhorn_iters": 20,
            "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
            "index_topk": 512}
HASH_LAYERS = 3  # DeepseekV4Config.default_num_hash_layers


def read_deepseek_v4(c: Config) -> dict[str, Any]:
    """ModelSpec fields of a DeepseekV4Config."""
    d = lambda key: c.int(key, default=DEFAULTS[key])  # noqa: E731
    layers, heads, head_dim = d("num_hidden_layers"), d("num_attention_heads"), d("head_dim")
    groups = d("o_groups")
    if heads * head_dim % groups:
        raise InvalidRequest(f"{c.where}: o_groups ({groups}) must divide num_attention_heads x head_dim "
                             f"({heads} x {head_dim}), which the grouped output projection splits evenly")
    types = _layer_types(c, layers)
    rates = _compress_rates(c, types)
    hashed = _hash_layers(c, layers)
    # DeepseekV4Config.attribute_map: num_local_experts and intermediate_size are aliases that win over
    # n_routed_experts and moe_intermediate_size when both are given (set after them)
    experts = c.int("num_local_experts", "n_routed_experts", default=DEFAULTS["n_routed_experts"])
    expert_width = c.int("intermediate_size", "moe_intermediate_size", default=DEFAULTS["moe_intermediate_size"])
    return dict(
        hidden_size=d("hidden_size"), num_layers=layers, num_heads=heads, num_kv_heads=1, head_dim=head_dim,
        intermediate_size=expert_width, vocab_size=d("vocab_size"),
        max_position_embeddings=d("max_position_embeddings"),
        tie_word_embeddings=c.bool("tie_word_embeddings", False), activation=str(c.data.get("hidden_act") or "silu"),
        dropout=c.float("attention_dropout", 0.0), attention_sinks=True,
        num_experts=experts, experts_per_token=c.int("num_experts_per_tok", default=DEFAULTS["num_experts_per_tok"]),
        # DeepseekV4MLP reads config.intermediate_size, which attribute_map sends to moe_intermediate_size:
        # one shared expert of the routed width, whatever n_shared_experts says
        shared_expert_intermediate_size=expert_width, mlp_layer_types=("sparse",) * layers,
        hash_moe_layers=hashed, q_lora_rank=d("q_lora_rank"), qk_rope_head_dim=_rope_dim(c, head_dim),
        index_heads=d("index_n_heads"), index_head_dim=d("index_head_dim"), index_topk=d("index_topk"),
        layer_types=types, sliding_window=d("sliding_window"), hc_mult=d("hc_mult"),
        hc_sinkhorn_iters=d("hc_sinkhorn_iters"), o_groups=groups, o_lora_rank=d("o_lora_rank"),
        csa_compress_rate=rates["compressed_sparse_attention"], hca_compress_rate=rates["heavily_compressed_attention"],
        swiglu_limit=c.float("swiglu_limit", 10.0),
    )


def _layer_types(c: Config, layers: int) -> tuple[str, ...]:
    """layer_types as given, else the legacy compress_ratios, else two HCA layers then CSA / HCA
    alternating (DeepseekV4Config.__post_init__); cut to num_hidden_layers as transformers cuts them."""
    given = c.str_list("layer_types", LAYER_TYPES)
    if given is None and c.data.get("compress_ratios") is not None:
        ratios = c.int_list("compress_ratios")
        if any(r not in RATIO_TO_TYPE for r in ratios):
            raise InvalidRequest(f"{c.where}: compress_ratios may hold only 0, 4 and 128 (sliding, CSA, HCA); "
                                 f"got {sorted(set(ratios) - set(RATIO_TO_TYPE))}")
        given = [RATIO_TO_TYPE[r] for r in ratios]
    if given is None:
        csa, hca = "compressed_sparse_attention", "heavily_compressed_attention"
        given = [hca] * min(layers, 2) + [csa if i % 2 else hca for i in range(max(layers - 2, 0))]
    if len(given) < layers:
        raise InvalidRequest(f"{c.where}: layer_types (or compress_ratios) names {len(given)} layers but "
                             f"num_hidden_layers is {layers}; give one entry per layer")
    return tuple(given[:layers])


def _compress_rates(c: Config, types: tuple[str, ...]) -> dict[str, int]:
    """compress_rates (its default when absent), with the legacy compress_rate_csa / compress_rate_hca."""
    given = c.data.get("compress_rates")
    if given is not None and not isinstance(given, dict):
        raise InvalidRequest(f"{c.where}: compress_rates must map layer types to rates, got {given!r}")
    rates = dict(DEFAULT_RATES if given is None else given)
    for key, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                      ("compress_rate_hca", "heavily_compressed_attention")):
        if c.data.get(key) is not None:
            rates[kind] = c.int(key)
    out = {}
    for kind in DEFAULT_RATES:
        if kind in types and kind not in rates:
            raise InvalidRequest(f"{c.where}: compress_rates has no rate for {kind}, which layer_types uses")
        out[kind] = Config(rates, f"{c.where} (compress_rates)").int(kind, default=DEFAULT_RATES[kind])
    return out


def _hash_layers(c: Config, layers: int) -> tuple[int, ...]:
    """The indices of the hash_moe layers: mlp_layer_types as given, else the first num_hash_layers (3)."""
    given = c.str_list("mlp_layer_types", MLP_TYPES)
    if given is None:
        return tuple(range(min(layers, c.count("num_hash_layers", HASH_LAYERS))))
    if len(given) < layers:
        raise InvalidRequest(f"{c.where}: mlp_layer_types lists {len(given)} layers but num_hidden_layers is {layers}")
    return tuple(i for i, kind in enumerate(given[:layers]) if kind == "hash_moe")


def _rope_dim(c: Config, head_dim: int) -> int:
    """qk_rope_head_dim = int(head_dim x partial_rotary_factor); the factor is the legacy
    qk_rope_head_dim / head_dim when given, else 64 / 512."""
    factor = c.data.get("partial_rotary_factor")
    if factor is None:
        legacy = c.data.get("qk_rope_head_dim")
        factor = (c.int("qk_rope_head_dim") if legacy is not None else 64) / (head_dim if legacy is not None else 512)
    elif isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise InvalidRequest(f"{c.where}: partial_rotary_factor must be in (0, 1], got {factor!r}")
    rope = int(head_dim * factor)
    if rope < 2 or rope % 2:
        raise InvalidRequest(f"{c.where}: the rotary slice head_dim x partial_rotary_factor ({rope}) must be an even "
                             "number of at least 2 (V4's interleaved RoPE rotates pairs)")
    return rope
