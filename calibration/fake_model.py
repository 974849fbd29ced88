"""Build and parallelise the model exactly as the executor does, but on fake CPU tensors.

The executor's own functions make the model (executor/model.py: config, dtype, peft LoRA), the
parallelism (executor/parallelize.py: TP -> activation checkpointing -> FSDP2, torchtitan's order)
and the optimizer (executor/optim.py), so the oracle cannot drift from what really runs. What is
added here is only what fake tensors need (TORCH-NOTES): the model (and its peft wrapper) is
built on the meta device and materialised with `to_empty` under the fake mode (peft cannot swap
parameters of a fake module; weights are tied again afterwards); the device mesh, `fully_shard`
and `parallelize_module` run outside the fake mode on a fake process group of the plan's world
size, whose rank 0 is traced.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import wraps

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload

# The layer count key of each config class (GPT2Config calls it n_layer).
LAYER_KEYS = {"gpt2": "n_layer"}


def hf_config(spec: ModelSpec, workload: Workload, num_layers: int):
    """The executor's transformers config (executor/model.py hf_config), cut to `num_layers`.

    Attention dropout is switched off: on a GPU the flash kernel keeps only an RNG state for it,
    while CPU SDPA with dropout falls back to the math kernel and materialises the scores.
    Experts use transformers' grouped_mm implementation (its default where grouped_mm runs)."""
    from executor.model import hf_config as executor_config

    config = executor_config(spec, workload)
    setattr(config, LAYER_KEYS.get(spec.family, "num_hidden_layers"), num_layers)
    for key in ("attn_pdrop", "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if getattr(config, "num_local_experts", 0):
        config._experts_implementation = "grouped_mm"
    return config


def build_model(spec: ModelSpec, workload: Workload, num_layers: int, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """executor/model.py build_model on the meta device (dtype, attention, LoRA), then fake tensors."""
    from transformers import AutoModelForCausalLM

    from executor.model import add_lora, param_dtype, unwrap

    config = hf_config(spec, workload, num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=param_dtype(workload),
                                                 attn_implementation=workload.attention)
        if workload.method != "full":
            model = add_lora(model, workload)
    with fake_mode:
        model.to_empty(device="cpu")
    unwrap(model).tie_weights()  # to_empty gives each holder of a tied parameter its own tensor
    model.train()
    return model


@contextmanager
def unpacked_sequences():
    """transformers checks position_ids for several sequences packed in one row
    (masking_utils.find_packed_sequence_indices). With real tensors the executor's positions
    0..s-1 show none, so SDPA runs with is_causal and native GQA; fake tensors have no values to
    check, and transformers would materialise an s x s mask and repeat k and v for every head.
    During a trace the check answers what it answers on the real run: no packing."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def fake_world(world_size: int) -> None:
    """A fake process group of `world_size` ranks in this process (rank 0 is traced)."""
    if dist.is_initialized():
        if dist.get_world_size() == world_size:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


def device_mesh(config: ParallelConfig) -> DeviceMesh:
    """The executor's mesh (executor/mesh.py): dims (pp, dp, cp, tp), TP innermost."""
    from executor.mesh import MESH_DIMS

    fake_world(config.devices)
    return init_device_mesh("cpu", (config.pp, config.dp, config.cp, config.tp), mesh_dim_names=MESH_DIMS)


def parallelize(model: torch.nn.Module, layers: list[torch.nn.Module], spec: ModelSpec, workload: Workload,
                config: ParallelConfig) -> None:
    """executor/setup.py `_prepare_single_stage`: TP -> checkpointing -> FSDP2 (ZeRO 2/3).

    Each decoder layer's forward first enters CudaBehaviour (calibration/cuda_behaviour.py),
    inside the checkpoint, so that recomputation in the backward replays it too."""
    from executor.parallelize import apply_activation_checkpointing, apply_fsdp, apply_tensor_parallel

    mesh = device_mesh(config)
    if config.tp > 1:
        apply_tensor_parallel(model, layers, mesh["tp"], config.sequence_parallel, spec.tie_word_embeddings)
    for layer in layers:
        layer.forward = _as_on_cuda(layer.forward)
    apply_activation_checkpointing(layers, config.recompute)
    if config.zero >= 2:
        apply_fsdp([model], layers, mesh["dp"], config, workload)


def _as_on_cuda(forward):
    from calibration.cuda_behaviour import CudaBehaviour

    @wraps(forward)
    def run(*args, **kwargs):
        with CudaBehaviour():
            return forward(*args, **kwargs)
    return run


def build_optimizer(model: torch.nn.Module, workload: Workload, config: ParallelConfig) -> torch.optim.Optimizer:
    """executor/optim.py build_optimizers with the executor's defaults (lr, no weight decay)."""
    from executor.optim import build_optimizers
    from executor.options import RunOptions

    defaults = {f: RunOptions.__dataclass_fields__[f].default for f in ("lr", "weight_decay")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    group = dist.group.WORLD
    return build_optimizers(trainable, workload, config, group, defaults["lr"], defaults["weight_decay"]).main
