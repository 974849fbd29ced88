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

from functools import wraps

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload

# The layer count key of each config class (GPT2Config calls it n_layer).
LAYER_KEYS = {"gpt2": "n_layer"}


# routed-expert count keys of transformers' MoE configs (Mixtral, Qwen2/3-MoE, DeepSeek)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def hf_config(spec: ModelSpec, workload: Workload, num_layers: int, ep: int = 1):
    """The executor's transformers config (executor/model.py hf_config), cut to `num_layers`.

    Expert parallelism (ep > 1) as one rank of torchtitan's ExpertParallel holds it: the rank's
    num_experts / ep routed experts, which (balanced routing) receive as many token rows from the
    all-to-all as the rank sends, tokens x top-k: the rank's model routes its own tokens over its
    local experts (top-k unchanged, so ep <= experts / top-k; the router's num_experts / ep outputs
    instead of num_experts are a few thousand parameters). The all-to-all buffers themselves are not traced.

    Attention dropout is switched off: on a GPU the flash kernel keeps only an RNG state for it,
    while CPU SDPA with dropout falls back to the math kernel and materialises the scores.
    Experts use transformers' grouped_mm implementation (its default where grouped_mm runs)."""
    from executor.model import hf_config as executor_config

    config = executor_config(spec, workload)
    setattr(config, LAYER_KEYS.get(spec.family, "num_hidden_layers"), num_layers)
    for key in ("attn_pdrop", "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if getattr(config, "num_local_experts", 0) and spec.expert_dispatch == "routed":  # Llama 4's bmm takes none
        config._experts_implementation = "grouped_mm"
    keys = [key for key in EXPERT_KEYS if getattr(config, key, 0)][:1]  # one: some configs alias the others
    for key in keys if ep > 1 else ():
        setattr(config, key, getattr(config, key) // ep)
    return config


def build_model(spec: ModelSpec, workload: Workload, num_layers: int, fake_mode: FakeTensorMode,
                ep: int = 1) -> torch.nn.Module:
    """executor/model.py build_model on the meta device (dtype, attention, LoRA), then fake tensors."""
    from transformers import AutoModelForCausalLM

    from executor.model import add_lora, param_dtype, unwrap

    config = hf_config(spec, workload, num_layers, ep)
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


def fake_world(world_size: int) -> None:
    """A fake process group of `world_size` ranks in this process (rank 0 is traced)."""
    if dist.is_initialized():
        if dist.get_world_size() == world_size:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


def device_mesh(config: ParallelConfig) -> DeviceMesh:
    """The executor's mesh (executor/mesh.py): dims (pp, dp, cp, tp), TP innermost."""
    from executor.mesh import build_mesh, plan_dims

    fake_world(config.devices)
    return build_mesh("cpu", plan_dims(config))


def parallelize(model: torch.nn.Module, layers: list[torch.nn.Module], spec: ModelSpec, workload: Workload,
                config: ParallelConfig) -> None:
    """executor/setup.py `_prepare_single_stage`: TP -> checkpointing -> FSDP2 (ZeRO 2/3), over
    dp x cp with context parallelism (executor/mesh.py Topology.dp_mesh); with expert parallelism
    each layer's routed experts are FSDP units of their own over the dp x cp / ep expert-data-parallel
    ranks first (torchtitan's apply_fsdp: fully_shard(transformer_block.moe.experts, dp_mod_ep_mesh)).

    Each decoder layer's forward first enters CudaBehaviour (calibration/cuda_behaviour.py) and
    the ring attention's stand-in, inside the checkpoint, so that recomputation in the backward
    replays them too."""
    from executor.parallelize import apply_activation_checkpointing, apply_fsdp, apply_tensor_parallel
    from executor.setup import transformers_tp_plan

    mesh = device_mesh(config)
    if config.tp > 1:  # executor/setup.py _shard_and_wrap: Llama's names by hand, else the model's own plan
        apply_tensor_parallel(model, layers, mesh["tp"], config.sequence_parallel, spec.tie_word_embeddings,
                              transformers_tp_plan(spec))
    for layer in layers:
        layer.forward = _as_on_cuda(layer.forward, config.cp)
    apply_activation_checkpointing(layers, config.recompute)
    if config.zero >= 2:
        if config.ep > 1:
            _shard_experts(layers, config, workload)
        apply_fsdp([model], layers, mesh["dp", "cp"]._flatten("dp_cp") if config.cp > 1 else mesh["dp"], config,
                   workload)


def _shard_experts(layers: list[torch.nn.Module], config: ParallelConfig, workload: Workload) -> None:
    from torch.distributed.fsdp import fully_shard

    from torch.distributed.tensor import Shard

    from executor.expert_parallel import expert_dims
    from executor.mesh import build_mesh
    from executor.parallelize import mixed_precision_policy

    edp = build_mesh("cpu", expert_dims(config, config.dp * config.cp))["edp"]
    for layer in layers:
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] != "experts":  # the routed experts (executor: the ep plan), not shared_experts
                continue
            local_experts = next(module.parameters()).shape[0]
            # torchtitan: with fewer local experts than expert-data-parallel ranks, shard dim 1, not dim 0
            # (which FSDP2 would pad to the rank count)
            placement = (lambda _param: Shard(1)) if edp.size() > local_experts else None
            fully_shard(module, mesh=edp, reshard_after_forward=config.zero == 3,
                        mp_policy=mixed_precision_policy(workload), shard_placement_fn=placement)


def _as_on_cuda(forward, cp: int = 1):
    """The layer under CudaBehaviour, and (cp > 1) SDPA as the ring attention's stand-in
    (calibration/ring_attention.py)."""
    from calibration.cuda_behaviour import CudaBehaviour
    from calibration.ring_attention import RingAttention

    @wraps(forward)
    def run(*args, **kwargs):
        with CudaBehaviour(), RingAttention(cp):
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
