"""The oracle points for the layer mechanisms of today's families (issue 15): real released
configs at their full width, cut to a few layers so that every kind of layer of the stack is
present and the whole stack is traced (calibration/oracle.py traces a stack of several kinds
whole), traced into calibration/data/oracle_families.json.

The cut configs are stored beside it (calibration/data/oracle_models/, written by `--write-models`
from the catalog entries: only the depth and the per-layer lists are cut, and where a family puts
its first dense layers or its global layers beyond the cut, the key that places them is set so
that the cut stack still holds one of each). The points use FSDP2 (ZeRO 3): transformers' grouped
experts take bf16 weights only, so MoE models are traced with FSDP2's bf16 parameters, and the
activations then dominate the peak. Families of one kind of layer (Qwen3, Qwen3-MoE, Phi-3) are cut
to four layers, and Qwen3 is traced on one device (autocast) and tensor parallel too, through its
transformers plan as the executor runs it. `python -m calibration.oracle_families` re-traces them
(`--only NAME` for some);
`planner oracle --grid calibration/data/oracle_families.json` compares.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from calibration.oracle_grid import _point, _trace_all, _write
from planner.progress import add_flag, bars, progress

FAMILIES_FILE = Path(__file__).parent / "data" / "oracle_families.json"
MODELS_DIR = Path(__file__).parent / "data" / "oracle_models"
MODELS_REF = "calibration/data/oracle_models"  # how points name them (repository-relative)

# name -> (catalog entry, layers, keys set on the (text) config, what the cut keeps)
CUTS: dict[str, tuple[str, int, dict[str, Any], str]] = {
    "gemma-3-27b-6l": ("gemma-3-27b", 6, {}, "five sliding (1024) layers and one global, zero-centred norms, tied head"),
    "deepseek-v3-4l": ("deepseek-v3", 4, {"first_k_dense_replace": 1},
                       "MLA (q rank 1536, kv rank 512, qk 192 / v 128) and one dense layer before three of 256 experts"),
    "glm-4.5-air-4l": ("glm-4.5-air", 4, {"first_k_dense_replace": 1},
                       "one dense layer before three of 128 experts with a shared expert"),
    "qwen3-next-80b-a3b-4l": ("qwen3-next-80b-a3b", 4, {},
                              "three Gated DeltaNet layers and one gated full-attention layer, 512 experts"),
    "gpt-oss-20b-4l": ("gpt-oss-20b", 4, {}, "attention sinks, sliding (128) and full layers, clamped SwiGLU experts"),
    "llama-4-scout-4l": ("llama-4-scout", 4, {}, "three chunked (8192) rotary layers and a global one without rotary, "
                         "16 experts (top 1) beside a shared expert, which transformers runs on every token"),
    # compress_ratios (46 long in the release) is cut by transformers itself: sliding, sliding, CSA, HCA
    "deepseek-v4-4l": ("deepseek-v4", 4, {}, "two sliding-window layers, a compressed sparse (with its indexer) and a "
                       "heavily compressed one, 4 hyper-connected streams, the first 3 of 256 experts hash-routed"),
    # one kind of layer each (traced whole all the same: four layers are no more than the oracle traces)
    "qwen3-8b-4l": ("qwen3-8b", 4, {}, "per-head q and k RMSNorms, an untied head"),
    "qwen3-30b-a3b-4l": ("qwen3-30b-a3b", 4, {}, "per-head q and k RMSNorms, 128 experts (top 8) without a shared one"),
    "phi-4-4l": ("phi-4", 4, {}, "fused qkv and gate-up projections, an untied head"),
    "gemma-4-26b-a4b-6l": ("gemma-4-26b-a4b", 6, {}, "five sliding (1024) layers and one global (head dim 512, keys as "
                           "values, partial rotary), 128 experts (top 8) beside a dense MLP, a tied softcapped head"),
    "gemma-4-31b-6l": ("gemma-4-31b", 6, {}, "the dense Gemma 4: five sliding (1024) layers and one global (head dim 512, "
                       "keys as values), a tied softcapped head"),
    "nemotron-3-nano-30b-a3b-6l": ("nemotron-3-nano-30b-a3b", 6, {}, "Mamba-2, relu2 experts (128, top 6) beside a "
                                   "shared expert, Mamba-2, experts, Mamba-2, attention (MEMEM*)"),
}


# configs that are no release (no published Nemotron-H config is in the catalog): shapes chosen here
SHAPES: dict[str, dict[str, Any]] = {
    "nemotron-h-shape-6l": {
        "_name_or_path": "nemotron-h-shape-6l", "model_type": "nemotron_h", "hidden_size": 4096,
        "intermediate_size": 16384, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 131072, "max_position_embeddings": 8192, "mamba_num_heads": 128, "mamba_head_dim": 64,
        "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True,
        "layers_block_type": ["linear_attention", "mlp", "linear_attention", "full_attention", "linear_attention", "mlp"],
        "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}


def model_ref(name: str) -> str:
    return f"{MODELS_REF}/{name}.json"


FAMILY_GRID: list[dict[str, Any]] = [
    _point("gemma-3-27b-6l fsdp8 2x4096", model_ref("gemma-3-27b-6l"), 4096, 2, dp=8, zero=3),
    _point("gemma-3-27b-6l fsdp8 1x8192 full", model_ref("gemma-3-27b-6l"), 8192, 1, "full", dp=8, zero=3),
    _point("deepseek-v3-4l fsdp64 1x4096", model_ref("deepseek-v3-4l"), 4096, 1, dp=64, zero=3),
    _point("deepseek-v3-4l fsdp64 2x2048 full", model_ref("deepseek-v3-4l"), 2048, 2, "full", dp=64, zero=3),
    _point("glm-4.5-air-4l fsdp32 2x4096", model_ref("glm-4.5-air-4l"), 4096, 2, dp=32, zero=3),
    _point("qwen3-next-80b-a3b-4l fsdp32 2x4096", model_ref("qwen3-next-80b-a3b-4l"), 4096, 2, dp=32, zero=3),
    _point("qwen3-next-80b-a3b-4l fsdp32 1x8192 full", model_ref("qwen3-next-80b-a3b-4l"), 8192, 1, "full",
           dp=32, zero=3),
    # transformers runs gpt-oss's sinks in eager attention only (the executor too)
    # Mamba-2 through the fused mamba_ssm function's stand-in (nemotron_h counts as MoE: bf16 master weights)
    _point("nemotron-h-shape-6l bf16 2x4096", model_ref("nemotron-h-shape-6l"), 4096, 2, master_dtype="bf16"),
    _point("nemotron-h-shape-6l fsdp8 4x4096 full", model_ref("nemotron-h-shape-6l"), 4096, 4, "full", dp=8, zero=3),
    _point("nemotron-3-nano-30b-a3b-6l fsdp8 2x4096", model_ref("nemotron-3-nano-30b-a3b-6l"), 4096, 2, dp=8, zero=3),
    _point("nemotron-3-nano-30b-a3b-6l fsdp8 2x8192 full", model_ref("nemotron-3-nano-30b-a3b-6l"), 8192, 2, "full",
           dp=8, zero=3),
    _point("gpt-oss-20b-4l fsdp8 1x2048 eager", model_ref("gpt-oss-20b-4l"), 2048, 1, dp=8, zero=3, attention="eager"),
    _point("llama-4-scout-4l fsdp16 1x4096", model_ref("llama-4-scout-4l"), 4096, 1, dp=16, zero=3),
    _point("llama-4-scout-4l fsdp16 1x16384 full", model_ref("llama-4-scout-4l"), 16384, 1, "full", dp=16, zero=3),
    # transformers has eager attention only for DeepSeek-V4
    _point("deepseek-v4-4l fsdp256 1x4096 eager", model_ref("deepseek-v4-4l"), 4096, 1, dp=256, zero=3,
           attention="eager"),
    _point("deepseek-v4-4l fsdp256 1x4096 eager full", model_ref("deepseek-v4-4l"), 4096, 1, "full", dp=256, zero=3,
           attention="eager"),
    # one device: autocast over fp32 parameters; tensor parallel through Qwen3's transformers plan
    _point("qwen3-8b-4l 1x4096", model_ref("qwen3-8b-4l"), 4096, 1),
    _point("qwen3-8b-4l fsdp8 2x4096 full", model_ref("qwen3-8b-4l"), 4096, 2, "full", dp=8, zero=3),
    _point("qwen3-8b-4l tp4 1x4096", model_ref("qwen3-8b-4l"), 4096, 1, tp=4),
    _point("qwen3-30b-a3b-4l fsdp16 2x4096", model_ref("qwen3-30b-a3b-4l"), 4096, 2, dp=16, zero=3),
    _point("qwen3-30b-a3b-4l fsdp16 1x8192 full", model_ref("qwen3-30b-a3b-4l"), 8192, 1, "full", dp=16, zero=3),
    _point("phi-4-4l 1x4096", model_ref("phi-4-4l"), 4096, 1),
    _point("phi-4-4l fsdp8 2x4096 full", model_ref("phi-4-4l"), 4096, 2, "full", dp=8, zero=3),
    _point("gemma-4-26b-a4b-6l fsdp8 2x4096", model_ref("gemma-4-26b-a4b-6l"), 4096, 2, dp=8, zero=3),
    _point("gemma-4-26b-a4b-6l fsdp8 1x8192 full", model_ref("gemma-4-26b-a4b-6l"), 8192, 1, "full", dp=8, zero=3),
    _point("gemma-4-31b-6l fsdp8 1x8192", model_ref("gemma-4-31b-6l"), 8192, 1, dp=8, zero=3),
]


def cut_config(name: str) -> dict[str, Any]:
    """The catalog entry's config.json cut to the layers of CUTS[name]."""
    from planner.models import catalog

    entry, layers, overrides, _ = CUTS[name]
    config = copy.deepcopy(catalog()[entry]["config"])
    text = config.get("text_config", config)
    text["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        if isinstance(text.get(key), list):
            text[key] = text[key][:layers]
    if isinstance(text.get("hybrid_override_pattern"), str):  # Nemotron-H: a letter per layer
        text["hybrid_override_pattern"] = text["hybrid_override_pattern"][:layers]
    text.update(overrides)
    config["_name_or_path"] = name
    return config


def write_models() -> None:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for name in CUTS:
        (MODELS_DIR / f"{name}.json").write_text(json.dumps(cut_config(name), indent=1) + "\n")
    for name, config in SHAPES.items():
        (MODELS_DIR / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")


def load_families(path: str | Path | None = None) -> dict[str, Any]:
    from calibration.oracle_grid import load_grid

    return load_grid(path or FAMILIES_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.oracle_families",
                                     description="trace the families' oracle points into calibration/data/oracle_families.json")
    parser.add_argument("--only", action="append", default=[], help="trace only points whose name contains this")
    parser.add_argument("--write-models", action="store_true", help="write the cut configs from the catalog first")
    parser.add_argument("--jobs", type=int, default=1, help="processes tracing in parallel (default 1)")
    add_flag(parser)
    args = parser.parse_args(argv)
    if args.write_models:
        write_models()
    previous = {p["name"]: p for p in load_families()["points"]} if FAMILIES_FILE.exists() else {}
    chosen = [p for p in FAMILY_GRID if not args.only or any(part in p["name"] for part in args.only)]
    traced: dict[str, dict[str, Any]] = {}
    with bars(not args.no_progress), progress(len(chosen), "tracing the families' oracle points") as advance:
        for name, point in _trace_all(chosen, args.jobs, advance):
            traced[name] = point
            _write(FAMILIES_FILE, [traced.get(p["name"], previous.get(p["name"])) for p in FAMILY_GRID])
    return 1 if len(traced) < len(chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
