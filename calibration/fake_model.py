"""Build the transformers model the executor trains, on fake CPU tensors, and parallelise it.

Order as in torchtitan's parallelize_llama.py: tensor parallel, then activation checkpointing,
then FSDP2. Workarounds from TORCH-NOTES: the model (and its peft wrapper) is built on the meta
device and materialised with `to_empty` under the fake mode (peft cannot swap parameters of a
fake module); the device mesh and `fully_shard` / `parallelize_module` run outside the fake mode
on a fake process group of the plan's world size, whose rank 0 is traced.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# The layer count key of each config class (GPT2Config calls it n_layer).
LAYER_KEYS = {"gpt2": "n_layer"}
# Column-parallel (output features split) and row-parallel (input features split) linears of a
# decoder layer: Megatron's MLP and attention split (Shoeybi et al. 2019 §3), torchtitan's plan.
TP_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
TP_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
# torchtitan's selective (per-op) policy saves these outputs (parallelize_llama.py, _save_list);
# the CPU flash kernel stands in for the CUDA ones. Of the matmuls every other one is saved.
SAVE_OPS = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default)
MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def hf_config(spec_config: dict[str, Any], num_layers: int, attention: str):
    """The transformers config the executor instantiates, with `num_layers` decoder layers.

    Attention dropout is switched off: on a GPU the flash kernel keeps only an RNG state for it,
    while CPU SDPA with dropout falls back to the math kernel and materialises the scores.
    Experts use transformers' grouped_mm implementation (its default where grouped_mm runs)."""
    from transformers import AutoConfig

    values = {k: v for k, v in spec_config.items() if k != "model_type"}
    model_type = spec_config["model_type"]
    values[LAYER_KEYS.get(model_type, "num_hidden_layers")] = num_layers
    for key in ("attn_pdrop", "attention_dropout"):
        if key in values or model_type == "gpt2":
            values[key] = 0.0
    config = AutoConfig.for_model(model_type, **values)
    config._attn_implementation = attention
    if getattr(config, "num_local_experts", 0):
        config._experts_implementation = "grouped_mm"
    return config


def build_model(config, model_dtype: torch.dtype, lora: tuple[int, tuple[str, ...]] | None,
                fake_mode: FakeTensorMode) -> torch.nn.Module:
    """On meta, wrap with peft (adapters upcast to fp32: autocast_adapter_dtype=True), then
    materialise every tensor as a fake CPU tensor."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            rank, targets = lora
            lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                     target_modules=[LORA_MODULES[t] for t in targets])
            model = get_peft_model(model, lora_config, autocast_adapter_dtype=True)
    with fake_mode:
        model.to_empty(device="cpu")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.tie_weights()  # to_empty gives each holder of a tied parameter its own tensor
    model.train()
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (what FSDP2 wraps one by one and checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: torch.nn.Module, recompute: str) -> None:
    """full: every decoder layer non-reentrant; selective: torchtitan's per-op policy inside it.
    The recomputation also replays CUDA autocast's fp32 policy (calibration/cuda_autocast.py),
    which the backward does not inherit from the forward's context."""
    if recompute == "none":
        return
    kwargs = {"use_reentrant": False, "context_fn": partial(_checkpoint_contexts, recompute == "selective")}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def _checkpoint_contexts(selective: bool):
    from contextlib import nullcontext

    forward, recompute = nullcontext(), nullcontext()
    if selective:
        counts: dict[str, int] = defaultdict(int)
        forward, recompute = create_selective_checkpoint_contexts(partial(_selective_policy, counts))
    return forward, _with_fp32_policy(recompute)


@contextmanager
def _with_fp32_policy(inner):
    from calibration.cuda_autocast import CudaAutocastFp32Policy

    with CudaAutocastFp32Policy(), inner:
        yield


def _selective_policy(counts: dict[str, int], ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """torchtitan parallelize_llama.py `_custom_policy`: save SDPA and the 1st, 3rd, ... matmul of
    the layer; counted separately for the forward and the recomputation. (addmm counts as a
    matmul here so that biased projections follow the same rule.)"""
    mode = "recompute" if ctx.is_recompute else "forward"
    if func in MATMUL_OPS:
        counts[mode] += 1
        save = counts[mode] % 2 == 1
    else:
        save = func in SAVE_OPS
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def fake_world(world_size: int) -> None:
    """A fake process group of `world_size` ranks in this process (rank 0 is traced)."""
    if dist.is_initialized():
        if dist.get_world_size() == world_size:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


def device_mesh(dp: int, tp: int) -> DeviceMesh:
    fake_world(dp * tp)
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP on the decoder layers, a vocabulary-parallel embedding and LM head whose
    logits stay sharded for `loss_parallel` (torchtitan's plan without sequence parallelism).
    Parameters outside the plan (norms) become replicated DTensors: foreach AdamW cannot mix
    DTensors and plain tensors in one list."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    embedding = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
    head = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())
    plan: dict[str, Any] = {embedding: RowwiseParallel(input_layouts=Replicate()),
                            head: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for prefix, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            plan.update({f"{prefix}.{name}": ColwiseParallel() for name in TP_COLWISE})
            plan.update({f"{prefix}.{name}": RowwiseParallel() for name in TP_ROWWISE})
    parallelize_module(model, tp_mesh, plan)
    _replicate_plain_parameters(model, tp_mesh)


def _replicate_plain_parameters(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Modules whose parameters the plan left plain (norms) hold replicated DTensor parameters and
    see their input as a replicated DTensor, their output as a local tensor again."""
    from torch.distributed.tensor import DTensor, distribute_module

    def replicate(name: str, module: torch.nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                replicated = distribute_tensor(param.detach(), mesh, [Replicate()])
                module.register_parameter(key, torch.nn.Parameter(replicated, requires_grad=param.requires_grad))

    def to_dtensor(module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()]) if isinstance(x, torch.Tensor) else x for x in inputs)

    def to_local(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    for module in list(model.modules()):
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            distribute_module(module, mesh, replicate, to_dtensor, to_local)


def apply_fsdp(model: torch.nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    """FSDP2 per decoder layer, then the root (embedding, final norm, head), as torchtitan does.
    Expert weights (experts x out x in) with fewer experts than ranks are sharded along dim 1:
    FSDP2 pads dim 0 to the world size, which would multiply them (torchtitan's llama4
    parallelize.py does the same, `_experts_shard_placement_fn`)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def placement(param: torch.nn.Parameter) -> Shard | None:
        return Shard(1) if param.ndim == 3 and param.shape[0] < dp_mesh.size() else None

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=placement)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
