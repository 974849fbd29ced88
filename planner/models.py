"""Models: the catalog (presets/models/*.json, each a Hugging Face config.json with its source)
and the reader that turns any supported config.json into a ModelSpec.

One mechanism serves both: a catalog entry is a config.json plus a name and a source.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path
from typing import Any

from planner.errors import InvalidRequest, read_json, require_regular_file, unknown_name
from planner.families import FAMILY_READERS, NOT_YET, TEXT_PARTS, text_config
from planner.families_dsv4 import read_deepseek_v4
from planner.families_gemma4 import read_gemma4
from planner.families_hybrid import HYBRID_READERS
from planner.hfconfig import Config, llama_like
from planner.specs import ModelSpec
from planner.validity import check_model

PRESET_DIR = Path(__file__).parent / "presets" / "models"

# Model types whose config.json we read (planner/families.py holds today's families' readers).
SUPPORTED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "baichuan", "gpt2", "gpt_neox", "mpt",
                   *FAMILY_READERS, *HYBRID_READERS, "gemma4_text", "deepseek_v4", *TEXT_PARTS)


@cache
def _preset_documents() -> str:
    """The preset files read once, kept as JSON text so that no caller can change them."""
    docs = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        docs[doc["name"]] = doc
    return json.dumps(docs)


def catalog() -> dict[str, dict[str, Any]]:
    """name -> preset document {name, source, published_params, config}: a fresh copy on every call
    (transformers' config classes, for one, fill in a rope_scaling dict they are given)."""
    return json.loads(_preset_documents())


def load_model(ref: str | ModelSpec) -> ModelSpec:
    """A catalog name, a path to a config.json, a folder holding one (or a ModelSpec as is)."""
    if isinstance(ref, ModelSpec):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRequest("--model is empty; give a catalog name (see `planner models`) or a config.json path")
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise InvalidRequest(f"folder {ref!r} holds no config.json; point --model at a Hugging Face model folder")
    require_regular_file(path, "model config")  # a FIFO or device: refused, not "does not exist"
    if path.is_file():
        return spec_from_file(path)
    docs = catalog()
    key = ref.lower()
    if key in docs:
        doc = docs[key]
        return spec_from_hf_config(doc["config"], name=doc["name"], source=doc["source"])
    if ref.endswith(".json") or "/" in ref:
        raise InvalidRequest(f"model file {ref!r} does not exist; give an existing config.json or a catalog name")
    raise unknown_name("model", ref, docs, hint="(see `planner models`, or pass a config.json path)")


def spec_from_file(path: Path) -> ModelSpec:
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise InvalidRequest(f"{path} must hold a JSON object (a Hugging Face config.json)")
    name = config.get("_name_or_path") or path.parent.name or path.stem
    return spec_from_hf_config(config, name=str(name), source=str(path))


def spec_from_hf_config(config: dict[str, Any], name: str, source: str = "") -> ModelSpec:
    """The ModelSpec of a config.json; a multimodal config (gemma3, llama4) gives its language model."""
    model_type = config.get("model_type")
    if model_type in TEXT_PARTS:
        config = text_config(config, TEXT_PARTS[model_type])
        model_type = config["model_type"]
    where = source or name
    if model_type in NOT_YET:
        raise InvalidRequest(f"model_type {model_type!r} in {where} is not supported yet: the planner does not "
                             f"model {NOT_YET[model_type]}; supported: {', '.join(SUPPORTED_TYPES)}")
    if model_type not in _READERS:
        close = difflib.get_close_matches(str(model_type), SUPPORTED_TYPES, n=3, cutoff=0.5)
        nearest = f" (nearest: {', '.join(close)})" if close else ""
        raise InvalidRequest(f"unsupported model_type {model_type!r} in {where}{nearest}; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}")
    fields = _READERS[model_type](Config(config, where))
    spec = ModelSpec(name=name, family=model_type, source=source, hf_config=dict(config), **fields)
    _check_shape(spec)
    check_model(spec)  # planner/validity.py: bounds, names, what transformers can build
    return spec


def _qwen2(c: Config) -> dict[str, Any]:
    fields = llama_like(c)
    fields.update(qkv_bias=True, out_bias=False, mlp_bias=False)  # Qwen2Attention: bias on q, k, v only
    return fields


def _mixtral(c: Config) -> dict[str, Any]:
    fields = llama_like(c)
    fields.update(num_experts=c.int("num_local_experts", default=8),
                  experts_per_token=c.int("num_experts_per_tok", default=2))
    return fields


def _baichuan(c: Config) -> dict[str, Any]:
    """Baichuan / Baichuan2 (remote code): W_pack (fused qkv, no bias), RMSNorm, SwiGLU.
    The 13B models use ALiBi, the 7B models RoPE (Baichuan 2 report, arXiv 2309.10305, §2.3)."""
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    return dict(
        hidden_size=hidden, num_layers=c.int("num_hidden_layers"), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=c.int("intermediate_size"), vocab_size=c.int("vocab_size"),
        max_position_embeddings=c.int("max_position_embeddings", "model_max_length", default=4096),
        tie_word_embeddings=c.bool("tie_word_embeddings", False), fused_qkv=True,
        positions="alibi" if "max_position_embeddings" not in c.data else "rotary",
    )


def _gpt2(c: Config) -> dict[str, Any]:
    """GPT2Config: c_attn (fused qkv) and c_proj with biases, LayerNorm with bias, learned positions."""
    hidden = c.int("n_embd", "hidden_size")
    heads = c.int("n_head", "num_attention_heads")
    return dict(
        hidden_size=hidden, num_layers=c.int("n_layer", "num_hidden_layers"), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=c.int("n_inner", default=4 * hidden),
        vocab_size=c.int("vocab_size"), max_position_embeddings=c.int("n_positions", default=1024),
        tie_word_embeddings=c.bool("tie_word_embeddings", True), gated_mlp=False,
        activation=str(c.data.get("activation_function", "gelu_new")), norm="layernorm", norm_bias=True,
        qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned", fused_qkv=True,
        dropout=max(c.float("resid_pdrop", 0.1), c.float("attn_pdrop", 0.1)),
    )


def _gpt_neox(c: Config) -> dict[str, Any]:
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    bias = c.bool("attention_bias", True)
    return dict(
        hidden_size=hidden, num_layers=c.int("num_hidden_layers"), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=c.int("intermediate_size"), vocab_size=c.int("vocab_size"),
        max_position_embeddings=c.int("max_position_embeddings", default=2048),
        tie_word_embeddings=c.bool("tie_word_embeddings", False), gated_mlp=False,
        activation=str(c.data.get("hidden_act", "gelu")), norm="layernorm", norm_bias=True,
        qkv_bias=bias, out_bias=bias, mlp_bias=True, fused_qkv=True,
        dropout=max(c.float("attention_dropout", 0.0), c.float("hidden_dropout", 0.0)),
    )


def _mpt(c: Config) -> dict[str, Any]:
    """MptConfig: d_model, expansion_ratio; no_bias drops every bias incl. LayerNorm's."""
    hidden = c.int("d_model")
    heads = c.int("n_heads")
    no_bias = c.bool("no_bias", True)
    attn = c.data.get("attn_config") or {}
    learned = bool(c.data.get("learned_pos_emb", False)) and not attn.get("alibi", True)
    expansion = c.float("expansion_ratio", 4)
    return dict(
        hidden_size=hidden, num_layers=c.int("n_layers"), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=int(expansion * hidden), vocab_size=c.int("vocab_size"),
        max_position_embeddings=c.int("max_seq_len", default=2048), tie_word_embeddings=True, gated_mlp=False,
        activation="gelu", norm="layernorm", norm_bias=not no_bias, qkv_bias=not no_bias,
        out_bias=not no_bias, mlp_bias=not no_bias, positions="learned" if learned else "alibi", fused_qkv=True,
    )


_READERS = {"llama": llama_like, "mistral": llama_like, "qwen2": _qwen2, "mixtral": _mixtral,
            "baichuan": _baichuan, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "mpt": _mpt, **FAMILY_READERS,
            **HYBRID_READERS, "gemma4_text": read_gemma4, "deepseek_v4": read_deepseek_v4}


def _check_shape(spec: ModelSpec) -> None:
    where = spec.source or spec.name
    if spec.num_heads % spec.num_kv_heads:
        raise InvalidRequest(f"{where}: num_key_value_heads ({spec.num_kv_heads}) must divide "
                             f"num_attention_heads ({spec.num_heads})")
    if spec.experts_per_token > spec.num_experts:
        raise InvalidRequest(f"{where}: num_experts_per_tok ({spec.experts_per_token}) exceeds "
                             f"num_local_experts ({spec.num_experts})")
    _check_layers(spec, where)


def _check_layers(spec: ModelSpec, where: str) -> None:
    """Per-layer keys that contradict the others: one line naming both."""
    types = set(spec.layer_types)
    if "sliding_attention" in types and spec.sliding_window <= 0:
        raise InvalidRequest(f"{where}: layer_types has sliding_attention layers but sliding_window is not set; "
                             "give sliding_window or make them full_attention")
    if "chunked_attention" in types and spec.attention_chunk_size <= 0:
        raise InvalidRequest(f"{where}: layer_types has chunked_attention layers but attention_chunk_size is not set")
    if "linear_attention" in types and not (spec.linear_value_heads and spec.linear_key_heads):
        raise InvalidRequest(f"{where}: layer_types has linear_attention layers but model_type {spec.family} has no "
                             "linear-attention heads; use full_attention or a model_type with linear attention")
    if types & {"compressed_sparse_attention", "heavily_compressed_attention"} and not spec.o_groups:
        raise InvalidRequest(f"{where}: layer_types has compressed attention layers, which only model_type "
                             f"deepseek_v4 has; use full_attention or sliding_attention for {spec.family}")
    if "sparse" in spec.mlp_layer_types and not spec.is_moe:
        raise InvalidRequest(f"{where}: some layers are mixture-of-experts but the number of experts is "
                             f"{spec.num_experts}; give at least 2 experts or no MoE layers")


def check_spec_matches_config(spec: Any) -> None:
    """A plan's model spec is what its hf_config builds (the executor instantiates the config): a
    config edited to another model type or size than the spec predicted for is refused."""
    if not spec.hf_config:
        return  # a spec made in code, with no config to build from: nothing to compare
    from dataclasses import fields, replace

    rebuilt = spec_from_hf_config(spec.hf_config, name="plan", source="the plan's hf_config")
    rebuilt = replace(rebuilt, name=spec.name, source=spec.source)
    if rebuilt != spec:
        differ = [f.name for f in fields(spec) if f.compare and getattr(spec, f.name) != getattr(rebuilt, f.name)]
        raise InvalidRequest(f"the plan's model spec and its hf_config disagree on {', '.join(differ[:4])}; "
                             "write the plan again with --save-plan")
