"""From a Plan to the objects the training loop drives: the model with the Plan's parallelism,
its optimizer, and (pp > 1) the pipeline schedule."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from executor.expert_parallel import ExpertParallel, apply_expert_fsdp, apply_expert_parallel, ignore_in_ddp
from executor.context_parallel import attach_causal_hooks
from executor.loss import causal_lm_loss
from executor.mesh import Topology
from executor.model import build_model, count_parameters, decoder_layers
from executor.optim import Optimizers, build_optimizers
from executor.options import RunOptions
from executor.parallelize import (apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp,
                                  apply_tensor_parallel)
from executor.pipeline import build_schedule, build_stages
from planner.capabilities import EXECUTOR_TP_PP_FAMILIES
from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload


@dataclass
class Prepared:
    forward_module: nn.Module  # what the loop calls (DDP / FSDP wrapped); unused with pp > 1
    state_module: nn.Module  # parameter names of the transformers model: checkpoints and the final save
    peft_model: nn.Module | None  # the peft wrapper (LoRA), for saving the adapter
    optimizers: Optimizers
    uses_ddp: bool
    schedule: object | None = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    loss_holder: dict = field(default_factory=dict)  # num_items_in_batch of the current step (pp loss_fn)
    parameters: dict = field(default_factory=dict)
    experts: ExpertParallel | None = None  # ep > 1: the sharded experts (executor/expert_parallel.py)


def should_compile(workload: Workload) -> bool:
    """The Plan's workload says (`planner suggest --compile`); EXECUTOR_COMPILE=0 turns it off for
    debugging, noted in the run record."""
    return bool(getattr(workload, "compile", False)) and os.environ.get("EXECUTOR_COMPILE", "1") != "0"


def prepare(spec: ModelSpec, workload: Workload, config: ParallelConfig, topo: Topology, device: torch.device,
            options: RunOptions) -> Prepared:
    compile_layers = should_compile(workload)
    model = build_model(spec, workload, device, options.seed, options.init_from, compile_loss=compile_layers)
    counts = count_parameters(model)
    peft_model = model if workload.method != "full" else None
    if config.pp > 1:
        prepared = _prepare_pipeline(model, spec, workload, config, topo, device, compile_layers, options)
    else:
        if config.cp > 1:  # the capability table refuses cp with pp
            attach_causal_hooks(model)
        prepared = _prepare_single_stage(model, spec, workload, config, topo, device, compile_layers, options)
    prepared.peft_model = peft_model
    prepared.parameters = counts
    return prepared


def transformers_tp_plan(spec: ModelSpec) -> dict[str, str] | None:
    """None for Llama-named families (executor/parallelize.py's hand-written plan), else the
    model's own `base_model_tp_plan` (the capability table refuses tp for families without a usable one)."""
    if spec.family in EXECUTOR_TP_PP_FAMILIES:
        return None
    from transformers import AutoConfig

    return dict(AutoConfig.for_model(spec.family).base_model_tp_plan or {})


def _shard_and_wrap(module: nn.Module, layers: list[nn.Module], tp_root: nn.Module | None, spec: ModelSpec,
                    workload: Workload, config: ParallelConfig, topo: Topology, compile_layers: bool) -> None:
    """TP -> activation checkpointing -> compile (DDP / FSDP follow by the caller)."""
    if config.tp > 1:
        apply_tensor_parallel(tp_root if tp_root is not None else module, layers, topo.tp_mesh,
                              config.sequence_parallel, spec.tie_word_embeddings, transformers_tp_plan(spec))
    apply_activation_checkpointing(layers, config.recompute)
    if compile_layers:
        apply_compile(layers)


def _prepare_single_stage(model, spec, workload, config, topo, device, compile_layers, options) -> Prepared:
    layers = decoder_layers(model)
    experts = apply_expert_parallel(model, config, device) if config.ep > 1 else None
    _shard_and_wrap(model, layers, None, spec, workload, config, topo, compile_layers)
    forward_module, uses_ddp = model, False
    if config.zero >= 2:
        if experts is not None:
            apply_expert_fsdp(experts, config, workload)
        apply_fsdp([model], layers, topo.dp_mesh, config, workload)
    elif config.dp * config.cp > 1:  # cp ranks average their gradients too (topo.dp_mesh is dp x cp)
        if experts is not None:
            ignore_in_ddp(model, experts)
        forward_module, uses_ddp = apply_ddp(model, topo.dp_mesh, device, has_dtensors=config.tp > 1), True
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = build_optimizers(trainable, workload, config, topo.dp_mesh.get_group(), options.lr,
                                  options.weight_decay)
    return Prepared(forward_module, model, None, optimizers, uses_ddp, experts=experts)


def _prepare_pipeline(model, spec, workload, config, topo, device, compile_layers, options) -> Prepared:
    container, stages = build_stages(model, topo.pp_rank, config.pp, config.vpp, options.document_mask)
    del model  # layers of other stages are freed with it
    holder: dict = {"items": 1.0}
    uses_ddp = False
    wrapped = []
    for index, stage in stages:
        layers = list(stage.model.layers.values())
        _shard_and_wrap(stage, layers, stage, spec, workload, config, topo, compile_layers)
        if config.zero >= 2:
            apply_fsdp([stage], layers, topo.dp_mesh, config, workload)
        elif config.dp > 1:
            stage, uses_ddp = apply_ddp(stage, topo.dp_mesh, device, has_dtensors=config.tp > 1), True
        wrapped.append((index, stage))
    vocab = spec.vocab_size

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, labels, vocab, holder["items"], workload.loss_chunks)

    if compile_layers:
        loss_fn = torch.compile(loss_fn)

    schedule = build_schedule(wrapped, config.pp * config.vpp, device, topo.pp_group, config.num_micro_batches,
                              loss_fn)
    trainable = [p for p in container.parameters() if p.requires_grad]
    optimizers = build_optimizers(trainable, workload, config, topo.dp_mesh.get_group(), options.lr,
                                  options.weight_decay)
    last_index = config.pp * config.vpp - 1
    return Prepared(container, container, None, optimizers, uses_ddp, schedule=schedule,
                    has_first_stage=any(i == 0 for i, _ in stages),
                    has_last_stage=any(i == last_index for i, _ in stages), loss_holder=holder)
