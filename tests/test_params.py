"""Parameter counts equal what transformers instantiates (meta device, no memory used)."""

import copy

import pytest

from planner.graph import count_params
from planner.families import TEXT_PARTS, text_config
from planner.models import catalog, load_model, spec_from_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_count(config: dict) -> int:
    config = copy.deepcopy(config)  # transformers fills in nested dicts (rope_scaling) it is given
    if config["model_type"] in TEXT_PARTS:  # the language model of a multimodal config
        config = text_config(config, TEXT_PARTS[config["model_type"]])
    model_type = config.pop("model_type")
    if model_type == "baichuan":
        # Baichuan is remote code; its W_pack holds q, k, v with Llama's shapes and no bias, and its
        # NormHead an untied vocab x hidden matrix: a Llama with kv heads = heads counts the same.
        model_type = "llama"
        config["num_key_value_heads"] = config["num_attention_heads"]
        config["max_position_embeddings"] = config.pop("model_max_length", config.get("max_position_embeddings", 4096))
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(catalog()))
def test_catalog_count_matches_transformers(name):
    doc = catalog()[name]
    ours = count_params(load_model(name))
    assert ours == transformers_count(doc["config"])
    if doc["published_params"] is not None:
        assert ours == doc["published_params"]


def test_known_counts():
    # the two numbers the issue names (TORCH-NOTES.md, meta-device instantiation)
    assert count_params(load_model("llama3-70b")) == 70_553_706_496
    assert count_params(load_model("llama3-8b")) == 8_030_261_248


@pytest.mark.parametrize("name, count", [
    ("deepseek-v3", 671_026_404_352), ("qwen3-30b-a3b", 30_532_122_624), ("gemma-3-27b", 27_009_346_304),
    ("phi-4", 14_659_507_200), ("gpt-oss-20b", 20_914_757_184), ("llama-4-scout", 107_769_861_120),
    ("qwen3-8b", 8_190_735_360), ("deepseek-v4", 284_332_230_231)])
def test_todays_models_counts(name, count):
    # the counts issue 15 names (transformers' meta-device counts; DeepSeek-V3 and V4-Flash without their MTP
    # module, which transformers does not build)
    assert count_params(load_model(name)) == count


@pytest.mark.parametrize("name, count", [
    ("qwen3.5-27b", 26_895_998_464), ("qwen3.5-35b-a3b", 34_660_610_688), ("qwen3.5-122b-a10b", 122_111_526_912),
    ("qwen3.5-397b-a17b", 396_346_350_336), ("gemma-4-26b-a4b", 25_233_141_760),
    ("nemotron-3-nano-30b-a3b", 31_577_937_344), ("nemotron-3.5-lightning-30b-a3b", 31_577_937_344),
    ("nemotron-h-56b", 56_324_350_464), ("nemotron-3-super-120b-a12b", 120_668_687_360),
    ("nemotron-3-ultra-550b-a55b", 549_308_968_960), ("deepseek-v4-pro", 1_572_997_179_491)])
def test_hybrid_release_counts(name, count):
    # issue 15's later releases, their official config.json (sources in the presets); transformers 5.23 meta-device
    # counts of the language model (no vision tower, no MTP layer)
    assert count_params(load_model(name)) == count


def test_nemotron_h_older_block_names_read_as_transformers_renames_them():
    # released config.json files still say mamba / attention (transformers' _LEGACY_LAYER_TYPE_REMAP)
    config = {**hand_written("nemotron_h"), "layers_block_type": ["mamba", "attention", "mlp", "moe", "mamba"]}
    del config["hybrid_override_pattern"]
    renamed = {**config, "layers_block_type": ["linear_attention", "full_attention", "mlp", "moe", "linear_attention"]}
    ours = count_params(spec_from_hf_config(config, name="legacy"))
    assert ours == transformers_count(config) == count_params(spec_from_hf_config(renamed, name="renamed"))
    assert spec_from_hf_config(config, name="legacy").layer_types == spec_from_hf_config(renamed, name="r").layer_types



def test_nemotron_h_latent_moe_counts_match_transformers():
    # Nemotron 3 Super / Ultra: routed experts of width moe_latent_size between fc1_latent_proj and
    # fc2_latent_proj (with mlp_bias: their biases too); the experts themselves have no bias
    config = {**hand_written("nemotron_h"), "moe_latent_size": 20, "mlp_bias": True}
    ours = count_params(spec_from_hf_config(config, name="latent"))
    assert ours == transformers_count(config)
    assert ours != count_params(spec_from_hf_config({**config, "moe_latent_size": None}, name="plain"))


_SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# one hand-written config.json per family, each exercising its per-layer keys and left-out defaults
HAND_WRITTEN = {
    "qwen3": {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 3, "attention_bias": True},
    "qwen3_moe": {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "mlp_only_layers": [1],
                  "decoder_sparse_step": 2, "head_dim": 24},
    "qwen2_moe": {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 40, "mlp_only_layers": [0]},
    "gemma2": {"head_dim": 16, "tie_word_embeddings": False},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16,
                    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                                    "sliding_attention"]},
    "gemma3": {"text_config": {"head_dim": 16}},
    "phi3": {"sliding_window": 32},
    "olmo2": {"attention_bias": True},
    "olmo3": {"sliding_window": 16},
    "smollm3": {"no_rope_layers": [1, 0, 1, 1, 0], "use_sliding_window": True, "sliding_window": 16},
    "llama4_text": {"intermediate_size_mlp": 80, "num_local_experts": 4, "interleave_moe_layer_step": 2,
                    "head_dim": 16, "attention_chunk_size": 32},
    "llama4": {"text_config": {"num_local_experts": 3, "head_dim": 16, "moe_layers": [0, 4]}},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 8},
    "deepseek_v3": {"moe_intermediate_size": 24, "n_routed_experts": 6, "num_experts_per_tok": 2,
                    "n_shared_experts": 2, "first_k_dense_replace": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12, "n_group": 1, "topk_group": 1},
    "deepseek_v2": {"moe_intermediate_size": 24, "n_routed_experts": 6, "num_experts_per_tok": 2,
                    "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "first_k_dense_replace": 1, "attention_bias": True},
    "glm4_moe": {"moe_intermediate_size": 24, "n_routed_experts": 6, "num_experts_per_tok": 2, "head_dim": 24,
                 "use_qk_norm": True, "attention_bias": True, "first_k_dense_replace": 2},
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "qwen3_next": {"head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                   "linear_value_head_dim": 12, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                   "shared_expert_intermediate_size": 32, "mlp_only_layers": [1]},
    "nemotron_h": {"head_dim": 16, "mamba_num_heads": 8, "mamba_head_dim": 12, "ssm_state_size": 16, "n_groups": 2,
                   "hybrid_override_pattern": "M-M*-E", "n_routed_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 24, "moe_shared_expert_intermediate_size": 32},
    "kimi_linear": {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_token": 2, "num_shared_experts": 2,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12,
                    "first_k_dense_replace": 2, "linear_attn_config": {"head_dim": 8, "num_heads": 4,
                    "short_conv_kernel_size": 3, "full_attn_layers": [2, 5], "kda_layers": [1, 3, 4]}},
    "deepseek_v32": {"moe_intermediate_size": 24, "n_routed_experts": 6, "num_experts_per_tok": 2, "n_shared_experts": 2,
                     "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                     "v_head_dim": 12, "n_group": 1, "topk_group": 1, "index_n_heads": 3, "index_head_dim": 16,
                     "index_topk": 4, "mlp_layer_types": ["sparse", "dense", "sparse", "sparse", "dense"]},
    # intermediate_size (from _SMALL) is DeepseekV4Config's alias of moe_intermediate_size and wins over it;
    # compress_ratios names one layer more (the MTP layer's), transformers builds one shared expert whatever
    # n_shared_experts says
    "deepseek_v4": {"head_dim": 32, "q_lora_rank": 24, "moe_intermediate_size": 40, "n_routed_experts": 6,
                    "num_experts_per_tok": 2, "n_shared_experts": 2, "o_groups": 2, "o_lora_rank": 16,
                    "index_n_heads": 3, "index_head_dim": 16, "index_topk": 4, "hc_mult": 3, "hc_sinkhorn_iters": 5,
                    "compress_ratios": [4, 0, 128, 4, 128, 0], "compress_rate_hca": 8, "num_hash_layers": 2,
                    "qk_rope_head_dim": 8, "sliding_window": 16},
    "qwen3_5_text": {"head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 4, "linear_key_head_dim": 8,
                     "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3},
    "qwen3_5_moe": {"text_config": {"head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                                    "linear_key_head_dim": 8, "linear_value_head_dim": 12, "num_experts": 4,
                                    "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                    "shared_expert_intermediate_size": 32}},
    "gemma4_text": {"head_dim": 16, "global_head_dim": 32, "attention_k_eq_v": True, "num_global_key_value_heads": 1,
                    "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "hidden_size_per_layer_input": 8,
                    "vocab_size_per_layer_input": 100, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                    "full_attention"]},
    "gemma4": {"text_config": {"head_dim": 16, "global_head_dim": 32, "hidden_size_per_layer_input": 0,
                               "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                               "moe_intermediate_size": 24}},
}


def hand_written(model_type: str) -> dict:
    extra = HAND_WRITTEN[model_type]
    if "text_config" in extra:  # a multimodal config: the shape lives in its text part
        return {"model_type": model_type, "text_config": {**_SMALL, **extra["text_config"]}}
    return {"model_type": model_type, **_SMALL, **extra}


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_hand_written_config_counts_match_transformers(model_type, tmp_path):
    import json
    config = hand_written(model_type)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert count_params(load_model(str(path))) == transformers_count(config)


def test_config_json_path(tmp_path):
    import json
    path = tmp_path / "config.json"
    path.write_text(json.dumps(catalog()["mistral-7b"]["config"]))
    assert count_params(load_model(str(path))) == count_params(load_model("mistral-7b"))
    assert count_params(load_model(str(tmp_path))) == 7_241_732_096  # a folder holding config.json
