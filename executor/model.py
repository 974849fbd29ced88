"""The model a Plan describes: transformers' AutoModelForCausalLM from the Plan's config.json
(random init with the run's seed, identical on every rank) or from a local safetensors folder,
then LoRA (peft) or QLoRA (bitsandbytes NF4 base + LoRA) as the workload says."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.loss import chunked_causal_lm_loss
from planner.errors import InvalidRequest
from planner.layout import dtypes_for
from planner.specs import ModelSpec, Workload

LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def compute_dtype(workload: Workload) -> torch.dtype:
    """The Plan's compute dtype (planner/layout.py dtypes_for, written into the Plan as `dtypes`)."""
    return getattr(torch, dtypes_for(workload).compute)


def param_dtype(workload: Workload) -> torch.dtype:
    """What the model is built in: the trained weights' dtype for full training (fp32 master
    weights, or the compute dtype with bf16 masters); a frozen LoRA / QLoRA base is stored in the
    compute dtype (planner/cost/memory.py: frozen = compute bytes) and its adapters made fp32 by peft."""
    dtypes = dtypes_for(workload)
    return getattr(torch, dtypes.trained if workload.method == "full" else dtypes.compute)


def hf_config(spec: ModelSpec, workload: Workload):
    """`AutoConfig.for_model(model_type, **rest)` of the Plan's config.json."""
    from transformers import AutoConfig

    values = {k: v for k, v in spec.hf_config.items() if not k.startswith("_") and k not in
              ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version")}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.use_cache = False
    return config


def build_model(spec: ModelSpec, workload: Workload, device: torch.device, seed: int,
                init_from: str | None = None, compile_loss: bool = False) -> nn.Module:
    """The causal LM on `device`, its trainable parameters as the method says."""
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, workload)
    dtype = param_dtype(workload)
    torch.manual_seed(seed)
    if init_from:
        _check_same_shape(spec, init_from)
        model = AutoModelForCausalLM.from_pretrained(init_from, config=config, dtype=dtype, local_files_only=True,
                                                     attn_implementation=workload.attention).to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=workload.attention)
    model.train()
    if workload.loss_chunks > 1:
        model.loss_function = functools.partial(chunked_causal_lm_loss, chunks=workload.loss_chunks)
    if compile_loss:  # one fused kernel chain for upcast + log-softmax + nll (the planner's --compile)
        model.loss_function = torch.compile(model.loss_function)
    if workload.method == "qlora":
        quantize_base_linears(model, compute_dtype(workload), device)
    if workload.method != "full":
        model = add_lora(model, workload)
    return model


def _check_same_shape(spec: ModelSpec, folder: str) -> None:
    config_path = Path(folder).expanduser() / "config.json"
    if not config_path.is_file():
        raise InvalidRequest(f"--init-from {folder} holds no config.json; give a saved model folder")
    if not any(Path(folder).expanduser().glob("*.safetensors")):
        raise InvalidRequest(f"--init-from {folder} holds no .safetensors weights")
    found = json.loads(config_path.read_text())
    differ = [k for k in SHAPE_KEYS if found.get(k) != spec.hf_config.get(k)]
    if differ:
        key = differ[0]
        raise InvalidRequest(f"--init-from {folder} has {key} = {found.get(key)!r} but the plan's model has "
                             f"{spec.hf_config.get(key)!r}; plan with --model {folder}")


def add_lora(model: nn.Module, workload: Workload) -> nn.Module:
    """peft LoRA on the Plan's targets; adapters in fp32 (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    targets = [LORA_MODULES[t] for t in workload.lora_targets]
    lora = LoraConfig(r=workload.lora_rank, lora_alpha=2 * workload.lora_rank, lora_dropout=0.0, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def quantize_base_linears(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every linear of the decoder layers with a bitsandbytes NF4 Linear4bit (QLoRA,
    Dettmers et al. 2023: NF4 with double quantization), keeping the random or loaded weights."""
    import bitsandbytes as bnb

    for layer in decoder_layers(model):
        for name, child in list(layer.named_modules()):
            if not isinstance(child, nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, quantized.to(device))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside DDP / peft wrappers."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the classes transformers itself never splits (`_no_split_modules`)."""
    inner = unwrap(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise InvalidRequest(f"cannot find the decoder layers of {type(inner).__name__}; the executor needs a "
                             "transformers model that declares _no_split_modules")
    return layers


def count_parameters(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
