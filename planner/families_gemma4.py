"""The reader of Gemma 4's text config (gemma4_text, and the text part of gemma4): its keys onto
ModelSpec's fields (planner/gemma4.py builds the layer), with Gemma4TextConfig's defaults
(transformers/models/gemma4/configuration_gemma4.py, transformers 5.23; read, not imported)."""

from __future__ import annotations

from typing import Any

from planner.errors import InvalidRequest
from planner.families import _gemma, _window
from planner.hfconfig import Config

GEMMA4_DEFAULTS = dict(vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                       tie_word_embeddings=True, sliding_window=512)


def read_gemma4(c: Config) -> dict[str, Any]:
    """Gemma4TextConfig: five sliding layers to one full by default, the last layer always full;
    full layers of global_head_dim (512) and, with attention_k_eq_v, num_global_key_value_heads;
    per-layer inputs of hidden_size_per_layer_input (256; null: none); the last
    num_kv_shared_layers layers reuse K/V; enable_moe_block puts experts beside every MLP."""
    c = Config({**GEMMA4_DEFAULTS, **c.data}, c.where)
    if c.data.get("use_bidirectional_attention") == "all":
        raise InvalidRequest(f"{c.where}: use_bidirectional_attention 'all' (non-causal attention) is not modelled; "
                             "use null or 'vision'")
    f = _gemma(c, 6, "head")
    types = list(f["layer_types"]) or ["full_attention"] * f["num_layers"]
    types[-1] = "full_attention"  # Gemma4TextConfig.__post_init__ forces the last layer to full attention
    k_eq_v = c.bool("attention_k_eq_v", False)
    head_dim, kv_heads = _global_heads(c, types, k_eq_v)
    per_layer = c.data.get("hidden_size_per_layer_input", 256)
    f.update(layer_types=tuple(types), attn_logit_softcapping=0.0, value_norm=True, attention_k_eq_v=k_eq_v,
             final_logit_softcapping=c.float("final_logit_softcapping", 0.0), sliding_window=_window(c, 512),
             global_head_dim=head_dim, global_kv_heads=kv_heads, kv_shared_layers=_shared_layers(c, types),
             double_wide_shared_mlp=c.bool("use_double_wide_mlp", False),
             per_layer_input_size=0 if per_layer is None else c.count("hidden_size_per_layer_input", 256),
             per_layer_input_vocab=c.int("vocab_size_per_layer_input", default=262_144))
    if c.bool("enable_moe_block", False):
        experts = c.int("num_experts")
        if experts < 2:
            raise InvalidRequest(f"{c.where}: enable_moe_block needs num_experts of at least 2, got {experts}")
        f.update(num_experts=experts, experts_per_token=c.int("top_k_experts"), moe_beside_mlp=True,
                 intermediate_size=c.int("moe_intermediate_size"), dense_intermediate_size=f["intermediate_size"])
    return f


def _global_heads(c: Config, types: list[str], k_eq_v: bool) -> tuple[int, int]:
    """(head dim, KV heads; 0 = the sliding layers') of the full-attention layers: global_head_dim
    and, only with attention_k_eq_v, num_global_key_value_heads; or the overrides of a
    per_layer_config that transformers saved."""
    overrides = c.data.get("per_layer_config")
    if overrides is None:
        global_kv = c.int("num_global_key_value_heads", default=0)
        return c.int("global_head_dim", default=512), global_kv if k_eq_v else 0
    allowed = {"head_dim", "num_key_value_heads"}
    if not isinstance(overrides, dict) or any(not isinstance(v, dict) or set(v) - allowed for v in overrides.values()):
        raise InvalidRequest(f"{c.where}: per_layer_config may override only head_dim and num_key_value_heads")
    full = {i for i, t in enumerate(types) if t == "full_attention"}
    values = {tuple(sorted(v.items())) for v in overrides.values()}
    if {int(k) for k in overrides if str(k).isdigit()} != full or len(values) != 1:
        raise InvalidRequest(f"{c.where}: per_layer_config must give the full_attention layers, and only them, "
                             "one head_dim and num_key_value_heads")
    one = Config(dict(values.pop()), c.where)
    return one.int("head_dim", default=c.int("head_dim")), one.int("num_key_value_heads", default=0) \
        if "num_key_value_heads" in one.data else 0


def _shared_layers(c: Config, types: list[str]) -> int:
    """num_kv_shared_layers: the last layers reuse the K/V of an earlier layer of their attention
    type, which each type must have (Gemma4TextConfig.kv_sharing_modes raises otherwise)."""
    shared = c.count("num_kv_shared_layers", 0)
    first = len(types) - shared
    if shared and (first <= 0 or set(types[:first]) != set(types)):
        raise InvalidRequest(f"{c.where}: num_kv_shared_layers ({shared}) leaves no earlier layer of each attention "
                             "type to share keys and values from; lower it")
    return shared
