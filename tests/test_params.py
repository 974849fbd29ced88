"""Parameter counts equal what transformers instantiates (meta device, no memory used)."""

import pytest

from planner.graph import count_params
from planner.models import catalog, load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_count(config: dict) -> int:
    config = dict(config)
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


def test_config_json_path(tmp_path):
    import json
    path = tmp_path / "config.json"
    path.write_text(json.dumps(catalog()["mistral-7b"]["config"]))
    assert count_params(load_model(str(path))) == count_params(load_model("mistral-7b"))
    assert count_params(load_model(str(tmp_path))) == 7_241_732_096  # a folder holding config.json
