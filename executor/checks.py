"""The Plan against what the executor implements and the world it finds. The executor never
re-plans: anything it cannot do exactly as the Plan says is refused with one line naming the fix
(planner.errors.InvalidRequest, exit status 2)."""

from __future__ import annotations

import importlib.util

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.specs import Cluster, Hardware, ModelSpec, Workload

# families whose modules carry Llama's names (model.layers[i].self_attn.q_proj, mlp.gate_proj, ...):
# tensor and pipeline parallelism are written against those names
LLAMA_LIKE = ("llama", "mistral", "qwen2")
# a device must have at least this share of the memory of the hardware the plan was made for
MEMORY_TOLERANCE = 0.9


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def unsupported_reason(spec: ModelSpec, workload: Workload, config: ParallelConfig, on_cuda: bool) -> str | None:
    """Why the executor cannot run this Plan as written, or None. Checked in every process."""
    checks = (_structure_reason(spec, workload, config), _model_reason(spec, config), _numerics_reason(workload, config),
              _method_reason(workload, config, on_cuda), _optimizer_reason(workload, config, on_cuda))
    return next((reason for reason in checks if reason), None)


def _structure_reason(spec: ModelSpec, workload: Workload, config: ParallelConfig) -> str | None:
    """The planner's own checks of the degrees (a hand-edited Plan may break them; a pipeline whose
    stages do not divide the layers would otherwise drop some)."""
    from planner.plan import option_reason, structural_reason

    reason = structural_reason(spec, workload, config.devices, config.tp, config.pp, config.micro_batch_size)
    reason = reason or option_reason(spec, config, workload)
    return f"the plan's degrees are invalid ({reason}); write the plan again with `planner suggest --save-plan`" if reason else None


def _model_reason(spec: ModelSpec, config: ParallelConfig) -> str | None:
    if spec.family == "baichuan":
        return ("model_type baichuan needs remote code, which the executor does not run; "
                "plan with a llama-family config of the same shape instead")
    if not spec.hf_config:
        return "the plan's model carries no hf_config (config.json); write the plan again with `planner suggest --save-plan`"
    if (config.tp > 1 or config.pp > 1) and spec.family not in LLAMA_LIKE:
        return (f"tp/pp for model_type {spec.family} is not implemented (only {', '.join(LLAMA_LIKE)}); "
                "plan with --tp 1 --pp 1")
    if config.pp > 1 and spec.tie_word_embeddings:
        return "pp > 1 with tied input/output embeddings is not implemented; plan with --pp 1"
    return None


def _numerics_reason(workload: Workload, config: ParallelConfig) -> str | None:
    if workload.precision == "fp8":
        return "precision fp8 is not implemented by the executor; plan with --precision bf16"
    if workload.precision == "fp16":
        return "precision fp16 (it needs a gradient scaler) is not implemented by the executor; plan with --precision bf16"
    if workload.loss_parallel and config.tp > 1:
        return ("loss_parallel (cross-entropy on vocabulary shards) is not implemented by the executor, which "
                "gathers the logits; plan without --loss-parallel")
    if workload.attention == "fused-softmax":
        return ("attention fused-softmax describes Megatron-LM's attention; the executor runs transformers' sdpa or "
                "eager attention; plan with --attention sdpa")
    if workload.fp32_logits:
        return ("fp32_logits describes a model that returns fp32 logits (torchtune's); the executor's transformers "
                "models return them in the compute dtype and upcast in the loss; plan without --fp32-logits")
    if workload.optimizer_in_backward and (config.dp > 1 or config.pp > 1 or config.num_micro_batches > 1):
        return ("optimizer_in_backward runs only with dp = pp = 1 and one micro-batch (gradients must be final "
                "when each parameter's hook fires); plan without --optimizer-in-backward")
    return None


def _method_reason(workload: Workload, config: ParallelConfig, on_cuda: bool) -> str | None:
    if workload.method == "full":
        return None
    if config.tp > 1 or config.pp > 1:
        return f"{workload.method} with tp or pp > 1 is not implemented by the executor; plan with --tp 1 --pp 1"
    if workload.method == "qlora":
        if not has_bitsandbytes():
            return "qlora needs bitsandbytes (NF4), which is not installed; `pip install bitsandbytes` or use --method lora"
        if config.zero >= 2:
            return "qlora with zero 2/3 (FSDP2 over NF4 weights) is not implemented; plan with --zero 0 or 1"
    return None


def _optimizer_reason(workload: Workload, config: ParallelConfig, on_cuda: bool) -> str | None:
    if workload.optimizer == "adamw8bit":
        if not has_bitsandbytes():
            return "adamw8bit needs bitsandbytes, which is not installed; `pip install bitsandbytes` or plan with --optimizer adamw"
        if config.zero >= 1 or config.tp > 1:
            return "adamw8bit with zero >= 1 or tp > 1 (sharded states) is not implemented; plan with --zero 0 --tp 1"
    if config.offload == "optimizer" and on_cuda:
        return ("offload 'optimizer' (ZeRO-Offload) is not implemented on GPUs by the executor; plan with "
                "--offload none, or --offload params with --zero 3")
    return None


def plan_notes(config: ParallelConfig, on_cuda: bool) -> list[str]:
    """What the executor does differently from the letter of the Plan, and why that is the same."""
    notes = []
    if config.offload != "none" and not on_cuda:
        notes.append(f"offload {config.offload}: on a CPU run device memory is host memory; nothing is moved")
    return notes


def check_supported(spec: ModelSpec, workload: Workload, config: ParallelConfig, on_cuda: bool) -> None:
    reason = unsupported_reason(spec, workload, config, on_cuda)
    if reason:
        raise InvalidRequest(reason)


def check_world(cluster: Cluster, config: ParallelConfig, world_size: int) -> None:
    """The process count the launcher found against the Plan's degrees and devices."""
    if config.devices != cluster.num_devices:
        raise InvalidRequest(f"the plan is inconsistent: dp x tp x pp = {config.devices} but it has "
                             f"{cluster.num_devices} devices; write it again with `planner suggest --save-plan`")
    if world_size != config.devices:
        raise InvalidRequest(f"the plan needs {config.devices} processes (dp {config.dp} x tp {config.tp} x "
                             f"pp {config.pp}) but {world_size} were started; launch with "
                             f"--nproc-per-node x nodes = {config.devices}, or plan with --gpus {world_size}")


def check_device(hardware: Hardware, found_name: str, found_memory_bytes: int, local_devices: int,
                 local_world_size: int) -> None:
    """A GPU plan needs as many visible GPUs as local processes, each with the plan's memory."""
    if local_devices < local_world_size:
        raise InvalidRequest(f"{local_world_size} processes on this node but {local_devices} GPU(s) are visible; "
                             f"make {local_world_size} visible (CUDA_VISIBLE_DEVICES) or plan with fewer --gpus")
    if found_memory_bytes < MEMORY_TOLERANCE * hardware.memory_bytes:
        raise InvalidRequest(f"the plan is for {hardware.name} ({hardware.memory_bytes / 2**30:.0f} GiB) but this "
                             f"{found_name} has {found_memory_bytes / 2**30:.0f} GiB; plan again with the --gpu you have")
