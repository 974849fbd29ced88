"""Readers of the families whose layers go beyond softmax attention + MLP in ways the readers of
planner/families.py do not cover: Kimi Linear (Kimi Delta Attention layers between MLA layers,
planner/linear_attention.py) and DeepSeek-V3.2 (MLA with DeepSeek Sparse Attention's indexer,
planner/mla.py). Keys and defaults are those of transformers' own configuration classes
(configuration_kimi_linear.py, configuration_deepseek_v32.py; read, not imported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from planner.errors import InvalidRequest
from planner.families import _attention_types, _deepseek_v3, _q_lora_rank, _sparse
from planner.hfconfig import Config, llama_like

# KimiLinearConfig's defaults (the 48B-A3B release's shape) for the keys llama_like requires
KIMI_DEFAULTS = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 27, "num_attention_heads": 32,
                 "vocab_size": 163840}


def _kimi_linear(c: Config) -> dict[str, Any]:
    """KimiLinearConfig: MLA layers without rotary (the model has no rotary embedding) and Kimi Delta
    Attention layers (linear_attn_config: num_heads, head_dim, short_conv_kernel_size and the
    1-indexed full_attn_layers / kda_layers), DeepSeek-style MoE after first_k_dense_replace dense
    layers. The release spells the MoE keys num_experts, num_experts_per_token, num_shared_experts and
    the context model_max_length (KimiLinearConfig.attribute_map)."""
    c = Config({**KIMI_DEFAULTS, **c.data}, c.where)
    linear = c.data.get("linear_attn_config") or {}
    if not isinstance(linear, dict):
        raise InvalidRequest(f"{c.where}: linear_attn_config must be a JSON object, got {linear!r}")
    lc = Config(linear, f"{c.where} (linear_attn_config)")
    f = llama_like(c)
    layers, heads = f["num_layers"], f["num_heads"]
    nope, rope = c.int("qk_nope_head_dim", default=128), c.int("qk_rope_head_dim", default=64)
    kda_heads = lc.int("num_heads", default=c.int("linear_num_heads", default=32))
    kda_dim = lc.int("head_dim", default=c.int("linear_head_dim", default=128))
    f.update(num_kv_heads=heads, head_dim=nope + rope, positions="none", mlp_bias=False,
             max_position_embeddings=c.int("model_max_length", "max_position_embeddings", default=1048576),
             q_lora_rank=_q_lora_rank(c, 0), kv_lora_rank=c.int("kv_lora_rank", default=512),
             qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=c.int("v_head_dim", default=128),
             linear_mixer="kimi_delta", linear_key_heads=kda_heads, linear_value_heads=kda_heads,
             linear_key_head_dim=kda_dim, linear_value_head_dim=kda_dim,
             linear_conv_kernel=lc.int("short_conv_kernel_size", default=c.int("linear_conv_kernel_dim", default=4)),
             layer_types=_attention_types(c, layers, _kimi_pattern(lc, layers)))
    experts = c.int("num_experts", "num_local_experts", default=256)
    expert_width = c.int("moe_intermediate_size", default=1024)
    shared = c.count("num_shared_experts", c.count("n_shared_experts", 1))
    f.update(num_experts=experts, experts_per_token=c.int("num_experts_per_token", "num_experts_per_tok", default=8),
             intermediate_size=expert_width, dense_intermediate_size=c.int("intermediate_size"),
             shared_expert_intermediate_size=expert_width * shared,
             mlp_layer_types=_mlp_types(c, layers, c.count("first_k_dense_replace", 1)))
    return f


def _kimi_pattern(lc: Config, layers: int) -> Callable[[int], str]:
    """The attention of each layer when layer_types is absent: the checkpoint's 1-indexed
    full_attn_layers and kda_layers, which must name every layer once, else every 4th layer full."""
    full, kda = lc.int_list("full_attn_layers"), lc.int_list("kda_layers")
    if full is None or kda is None:
        return lambda i: "full_attention" if i and i % 4 == 0 else "linear_attention"
    named = sorted(full + kda)
    if named != list(range(1, layers + 1)):
        raise InvalidRequest(f"{lc.where}: full_attn_layers and kda_layers must name each layer 1..{layers} once "
                             f"(they are 1-indexed); they name {named}")
    full_set = set(full)
    return lambda i: "full_attention" if i + 1 in full_set else "linear_attention"


def _mlp_types(c: Config, layers: int, first_dense: int) -> tuple[str, ...]:
    """mlp_layer_types as given (dense / sparse per layer), else the first `first_dense` layers dense."""
    given = c.str_list("mlp_layer_types", ("dense", "sparse"))
    if given is None:
        if first_dense > layers:
            raise InvalidRequest(f"{c.where}: first_k_dense_replace ({first_dense}) exceeds num_hidden_layers ({layers})")
        return _sparse(layers, lambda i: i >= first_dense)
    if len(given) != layers:
        raise InvalidRequest(f"{c.where}: mlp_layer_types lists {len(given)} layers but num_hidden_layers is {layers}")
    return tuple(given)


def _deepseek_v32(c: Config) -> dict[str, Any]:
    """DeepseekV32Config: DeepSeek-V3 (MLA + MoE) whose every layer's attention is DeepSeek Sparse
    Attention: an indexer of index_n_heads heads of index_head_dim (its first qk_rope_head_dim
    dims rotated) selecting index_topk keys per query. Its attention always has the q latent
    (q_a_proj): q_lora_rank cannot be null."""
    if c.data.get("q_lora_rank", 1) is None:
        raise InvalidRequest(f"{c.where}: deepseek_v32 needs q_lora_rank (its indexer reads the q latent); "
                             "give a rank such as 1536")
    f = _deepseek_v3(c)
    index_dim = c.int("index_head_dim", default=128)
    if index_dim < f["qk_rope_head_dim"]:
        raise InvalidRequest(f"{c.where}: index_head_dim ({index_dim}) is smaller than qk_rope_head_dim "
                             f"({f['qk_rope_head_dim']}), which the indexer rotates; raise index_head_dim")
    f.update(mlp_bias=False, index_heads=c.int("index_n_heads", default=64), index_head_dim=index_dim,
             index_topk=c.int("index_topk", default=2048),
             mlp_layer_types=_mlp_types(c, f["num_layers"], c.count("first_k_dense_replace", 3)))
    return f


HYBRID_READERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "kimi_linear": _kimi_linear, "deepseek_v32": _deepseek_v32,
}
