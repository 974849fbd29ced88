"""Apply the Plan's parallelism to a model, in torchtitan's fixed order:
tensor parallel (+ sequence parallel) -> activation checkpointing -> compile -> data parallel
(DDP for ZeRO 0/1, FSDP2 `fully_shard` for ZeRO 2/3, per decoder layer plus the root).

Each step is one function; the order matters: checkpointing wraps the TP-sharded layer, compile
sees the checkpointed layer, and FSDP's all-gathers stay outside both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.specs import Workload

aten = torch.ops.aten
# selective recomputation (torchtitan's op policy): keep every other matmul's output and the
# attention output; recompute the rest (norms, activations, rotary, casts)
MATMUL_OPS = {aten.mm.default, aten.addmm.default}
ATTENTION_OPS = {aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
                 aten._scaled_dot_product_cudnn_attention.default,
                 aten._scaled_dot_product_flash_attention_for_cpu.default}


# -- tensor parallel --------------------------------------------------------------------------

def layer_tp_plan(sequence_parallel: bool) -> dict:
    """Megatron's split of a Llama block (Shoeybi et al. 2019 §3): q, k, v, gate, up column-wise,
    o and down row-wise; with sequence parallelism (Korthikanti et al. 2022 §4.2.2) the norms run
    on sequence shards and the row-wise outputs are reduce-scattered along the sequence."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan.update({f"mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
    if not sequence_parallel:
        plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()})
        return plan
    gather = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                desired_input_kwarg_layouts={"hidden_states": Replicate()})
    plan.update({"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                 "self_attn": gather,
                 "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                 "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                 "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
    return plan


# transformers' base_model_tp_plan strings (transformers/distributed/tensor_parallel.py,
# ALL_PARALLEL_STYLES) that split a block as the planner costs it: heads and MLP columns split,
# one all-reduce after o_proj and after down_proj. Styles that replicate the attention instead
# ("colwise_gather_output", "rowwise_split_input": OLMo 2, Phi-3) or split experts are not here.
LAYER_PREFIX = "layers.*."


def _torch_style(style: str):
    """transformers' style name -> torch's ParallelStyle. "replicated_with_grad_allreduce" marks
    Qwen3's / Gemma 3's per-head q/k norms between q/k_proj (colwise) and o_proj: their input is
    (B, S, local heads, head_dim), so torch's SequenceParallel on dim 2 keeps the weight a
    Replicate DTensor whose gradient is summed over the heads of every rank (transformers does it
    with a post-accumulate hook, which would all-reduce the accumulated gradient again at every
    micro-batch)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
              "replicated_with_grad_allreduce": lambda: SequenceParallel(sequence_dim=2, use_local_output=True)}
    if style not in styles:
        raise InvalidRequest(f"the executor's tensor parallelism has no transformers style {style!r}; plan with --tp 1")
    return styles[style]()


def transformers_layer_plan(model_plan: dict[str, str]) -> dict:
    """The per-block entries ("layers.*.self_attn.q_proj": "colwise", ...) of a transformers
    `base_model_tp_plan` as torch styles keyed by the path inside the block."""
    plan = {path[len(LAYER_PREFIX):]: _torch_style(style) for path, style in model_plan.items()
            if path.startswith(LAYER_PREFIX)}
    outside = [path for path in model_plan if not path.startswith(LAYER_PREFIX)]
    if outside or not plan:
        raise InvalidRequest(f"the executor applies transformers' tp plan per decoder layer only, not {outside or model_plan}; "
                             "plan with --tp 1")
    return plan


def apply_tensor_parallel(model: nn.Module, layers: list[nn.Module], tp_mesh: DeviceMesh, sequence_parallel: bool,
                          tied_embeddings: bool, model_plan: dict[str, str] | None = None) -> None:
    """Shard each block (Llama's names by hand, or the model's own transformers plan when given),
    and (untied models) the embedding by vocabulary rows and the LM head by vocabulary columns;
    the head's output is replicated so the loss sees whole logits."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    if model_plan is not None and sequence_parallel:
        raise InvalidRequest("the executor's sequence parallelism is written for llama-like models only; "
                             "plan with no --sequence-parallel")
    for layer in layers:
        plan = layer_tp_plan(sequence_parallel) if model_plan is None else transformers_layer_plan(model_plan)
        parallelize_module(layer, tp_mesh, plan)
    seq = Shard(1) if sequence_parallel else Replicate()
    root_plan: dict = {}
    if not tied_embeddings:
        root_plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq,
                                                          use_local_output=not sequence_parallel)
        root_plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)
    if sequence_parallel:
        root_plan["model.norm"] = SequenceParallel()
    root_plan = {path: style for path, style in root_plan.items() if _has_module(model, path)}
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)


def _has_module(root: nn.Module, path: str) -> bool:
    """A pipeline stage lacks the embedding or the head that another stage holds."""
    try:
        return root.get_submodule(path) is not None
    except AttributeError:
        return False


# -- activation checkpointing -----------------------------------------------------------------

def selective_context() -> tuple:
    """Fresh per checkpointed call: the matmul counter is shared by its forward and recompute."""
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in MATMUL_OPS:
            mode = "recompute" if ctx.is_recompute else "forward"
            counts[mode] += 1
            keep = counts[mode] % 2 == 1  # the 1st, 3rd, ... matmul of the layer
        else:
            keep = func in ATTENTION_OPS
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(layers: list[nn.Module], recompute: str) -> None:
    """full: keep only each layer's input (torch.utils.checkpoint, non-reentrant); selective: the
    op policy above. The layer's own forward is wrapped, so module names and hooks stay."""
    if recompute == "none":
        return
    for layer in layers:
        forward = layer.forward
        kwargs = {"context_fn": selective_context} if recompute == "selective" else {}
        layer.forward = _checkpointed(forward, kwargs)


def _checkpointed(forward: Callable, extra: dict) -> Callable:
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    return run


def apply_compile(layers: list[nn.Module]) -> None:
    """torch.compile each block in place (torchtitan: per block; identical blocks share code)."""
    for layer in layers:
        layer.compile()


# -- data parallel ----------------------------------------------------------------------------

def mixed_precision_policy(workload: Workload):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if workload.precision == "bf16" and workload.master_dtype == "fp32" and workload.method == "full":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(roots: list[nn.Module], layers: list[nn.Module], dp_mesh: DeviceMesh, config: ParallelConfig,
               workload: Workload) -> None:
    """ZeRO-2: fully_shard(reshard_after_forward=False); ZeRO-3: True. Per layer, then each root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # on a CPU run the device memory is the host memory: parameters are already "offloaded"
    offload = config.offload == "params" and dp_mesh.device_type != "cpu"
    options = dict(mesh=dp_mesh, reshard_after_forward=config.zero == 3, mp_policy=mixed_precision_policy(workload),
                   offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **options)
    if config.shard_ends:  # the embedding and the LM head as units of their own (torchtune custom_sharded_layers)
        for root in roots:
            for name in ("embed_tokens", "lm_head"):
                found = [m for n, m in root.named_modules() if n.split(".")[-1] == name]
                for module in found:
                    fully_shard(module, **options)
    for root in roots:
        fully_shard(root, **options)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device, has_dtensors: bool) -> nn.Module:
    """ZeRO 0/1: DistributedDataParallel with gradients as views of the buckets. With TP the
    DTensor parameters are first turned into local tensors (torch's TP + DDP recipe)."""
    from torch.nn.parallel import DistributedDataParallel

    if has_dtensors:
        from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

        _pre_dp_module_transform(model)
        model._tp_localized = [(parent, name, param) for parent in model.modules()
                               for name, param in parent.named_parameters(recurse=False) if hasattr(param, "_st_info")]
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids,
                                   gradient_as_bucket_view=True)


@contextmanager
def dtensor_parameters(root: nn.Module) -> Iterator[None]:
    """With TP + DDP, torch's hooks leave the TP weights as plain DTensor attributes after a forward
    (no longer parameters, so a state dict would lack them); inside this block they are DTensor
    parameters again, built on the localized shards' storage, so that a state dict sees every weight."""
    from torch.distributed.tensor import DTensor

    saved = []
    for parent, name, local in [r for m in root.modules() for r in getattr(m, "_tp_localized", ())]:
        spec = local._st_info
        saved.append((parent, name, parent._parameters.pop(name, None), parent.__dict__.pop(name, None)))
        parent._parameters[name] = nn.Parameter(
            DTensor.from_local(local.detach(), spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                               stride=spec.stride), requires_grad=local.requires_grad)
    try:
        yield
    finally:
        for parent, name, param, attribute in reversed(saved):
            del parent._parameters[name]
            if param is not None:
                parent._parameters[name] = param
            if attribute is not None:
                parent.__dict__[name] = attribute
