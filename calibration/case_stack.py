"""What a published run's software stack says about it, read from its row's text: the planner's
--framework, and the kernels the stack ran (loss on vocabulary shards, fused norms, attention)."""

from __future__ import annotations

import re
from typing import Any

from planner.specs import RECOMPUTE_MODULES


def framework_of(row: dict[str, Any]) -> str:
    """The planner's --framework for a row's stack, as its `framework` text names it (for rows
    without a `planner_framework` tag, e.g. ../shared/validation/cases.json): Narayanan et al.'s
    table compares Megatron's PTD-P with DeepSpeed's ZeRO-3; FMEngine is DeepSpeed's pipeline
    engine; MoAI (transformers models and AdamW on Moreh's runtime) and LLaMA2-Accessory (its own
    PyTorch loop on bitsandbytes) are none of the planner's frameworks and read as hf, the nearest."""
    text = str(row.get("framework") or "")
    for needle, name in (("torchtitan", "torchtitan"), ("llm-foundry", "llm-foundry"), ("torchtune", "torchtune"),
                         ("FMEngine", "deepspeed"), ("HF", "hf"), ("Moreh", "hf"), ("Accessory", "hf")):
        if needle in text:
            return name
    if "Megatron" in text:
        zero3 = (row.get("parallelism") or {}).get("zero_stage") == 3
        return "deepspeed" if zero3 and "DeepSpeed" in text else "megatron"  # Megatron-Core's own FSDP stays megatron
    return "executor"


def loss_parallel_of(row: dict[str, Any]) -> bool:
    """Megatron-LM's cross-entropy runs on the vocabulary shards (tensor_parallel/cross_entropy.py,
    vocab_parallel_cross_entropy) and so does torchtitan's (parallelize_llama.py apply_tp:
    loss_parallel keeps the output projection's result sharded); other frameworks gather logits."""
    framework = str(row.get("framework") or "").lower()
    return "megatron" in framework or "torchtitan" in framework


# torchtitan's train configs at commit 0413364 (the 2024 docs/performance.md runs): llama2_7b.toml,
# llama2_13b.toml and llama3_8b.toml set norm_type = "fused_rmsnorm", the 70B configs "rmsnorm";
# from 9dec370 (the 2024-12 benchmarks) on, every config says "rmsnorm"
FUSED_RMSNORM_CONFIGS = {"0413364": ("Llama-2-7B", "Llama-2-13B", "Llama-3-8B")}


def fused_norm_of(row: dict[str, Any]) -> bool:
    """Whether the run's norms were torchtitan's fused RMSNorm kernel (its train config's norm_type)."""
    if "torchtitan" not in str(row.get("framework")):
        return False
    return any(f"commit {commit}" in str(row.get("source")) and row.get("model") in models
               for commit, models in FUSED_RMSNORM_CONFIGS.items())


def attention_of(row: dict[str, Any]) -> str:
    """Megatron-LM of 2021 (Narayanan et al. 2021, and DeepSpeed's ZeRO-3 runs of the same GPT
    models) materialised the attention scores: baddbmm, FusedScaleMaskSoftmax, dropout, bmm
    (megatron/model/transformer.py ParallelAttention); FlashAttention came to Megatron-LM in 2023.
    The other frameworks ran flash kernels (flash-attn, SDPA)."""
    return "fused-softmax" if "Megatron-LM" in str(row.get("framework")) and "2021" in str(row.get("source")) else "sdpa"


def expert_dispatcher_of(row: dict[str, Any]) -> str:
    """DeepEP where the row's source names it (Megatron-Core's flex dispatcher with moe_enable_deepep,
    e.g. the Megatron-MoE-ModelZoo rows' "DeepEP" column), else the all-to-all dispatcher."""
    text = " ".join(str(row.get(key) or "") for key in ("source_detail", "notes"))
    return "deepep" if "DeepEP" in text else "alltoall"


def recompute_modules_of(row: dict[str, Any]) -> tuple[str, ...] | None:
    """The Megatron-Core modules a row's `activation_recompute` names ('selective: recompute_modules [a, b]')."""
    found = re.search(r"recompute_modules \[([^\]]*)\]", str(row.get("activation_recompute") or "").lower())
    return None if found is None else tuple(m.strip() for m in found.group(1).split(",") if m.strip())


def megatron_options(row: dict[str, Any], optimizer_text: str, notes: list[str]) -> dict[str, Any]:
    """Megatron-Core's recompute modules the planner models, and its precision-aware optimizer with
    bf16 moments (--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16)."""
    options: dict[str, Any] = {}
    modules = recompute_modules_of(row)
    if modules and set(modules) <= set(RECOMPUTE_MODULES):
        options["recompute_modules"] = ",".join(modules)
        notes.append(f"Megatron-Core recompute_modules {list(modules)}")
    if "precision-aware" in optimizer_text and "bf16 exp_avg" in optimizer_text:
        options["moments_dtype"] = "bf16"
        notes.append("Megatron-Core's precision-aware optimizer: bf16 Adam moments")
    return options
