"""Search speed of today's heterogeneous models against a dense model of the same depth (issue 15:
`planner suggest` answers for them in about the time of a dense model). Run with
`.venv/bin/python -m pytest benchmarks/test_todays_models_speed.py` and compare the groups' means."""

import pytest

from planner.api import Request, suggest
from planner.models import spec_from_hf_config

# a dense Llama with DeepSeek-V3's depth, width and vocabulary (61 layers, hidden 7168)
DENSE_61 = spec_from_hf_config({"model_type": "llama", "hidden_size": 7168, "intermediate_size": 18432,
                                "num_hidden_layers": 61, "num_attention_heads": 56, "num_key_value_heads": 8,
                                "vocab_size": 129280}, name="dense-61")
# a dense Llama with Qwen3-30B-A3B's depth and width (48 layers, hidden 2048)
DENSE_48 = spec_from_hf_config({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 6144,
                                "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                                "head_dim": 128, "vocab_size": 151936}, name="dense-48")


@pytest.mark.benchmark(group="256 H100, 61 layers")
@pytest.mark.parametrize("model", ["deepseek-v3", DENSE_61], ids=["deepseek-v3", "dense-61"])
def test_search_61_layers_256_h100(benchmark, model):
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=256, seq_len=4096, global_batch=512)
    result = benchmark.pedantic(suggest, args=(request,), rounds=3, iterations=1)
    assert result["feasible"] > 0


@pytest.mark.benchmark(group="8 H100, 48 layers")
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", DENSE_48], ids=["qwen3-30b-a3b", "dense-48"])
def test_search_48_layers_8_h100(benchmark, model):
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=512)
    result = benchmark.pedantic(suggest, args=(request,), rounds=3, iterations=1)
    assert result["feasible"] > 0


@pytest.mark.benchmark(group="8 H100, alternating attention")
@pytest.mark.parametrize("model", ["gpt-oss-20b", "gemma-3-27b", "llama-4-scout"])
def test_search_mixed_attention_8_h100(benchmark, model):
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=512)
    result = benchmark.pedantic(suggest, args=(request,), rounds=3, iterations=1)
    assert result["feasible"] > 0
