"""The Plan against what the executor implements and the world it finds. The executor never
re-plans: anything it cannot do exactly as the Plan says is refused with one line naming the fix
(planner.errors.InvalidRequest, exit status 2)."""

from __future__ import annotations

import importlib.util

from planner.capabilities import rules_for, runnable_reason
from planner.cost.candidates import Candidates
from planner.rules import rule_masks
from planner.errors import InvalidRequest
from planner.plan import ParallelConfig, Plan
from planner.specs import Cluster, Hardware, ModelSpec, Workload

# a device must have at least this share of the memory of the hardware the plan was made for
MEMORY_TOLERANCE = 0.9


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def unsupported_reason(spec: ModelSpec, workload: Workload, config: ParallelConfig, on_cuda: bool) -> str | None:
    """Why the executor cannot run this Plan as written, or None. Checked in every process.

    The plan's own consistency (degrees, micro-batches, options) was checked when it was loaded
    (planner/plan.py Plan); what the executor implements is the `executor` row of the capability
    table (planner/capabilities.py), the same one `suggest` ranks with; what this machine has
    (bitsandbytes) is checked here."""
    reason = runnable_reason("executor", config, spec, workload, gpu=on_cuda)
    if reason:
        return reason.replace("not runnable by executor: ", "", 1)
    return _model_reason(spec) or _environment_reason(workload)


def all_reasons(plan: Plan) -> list[str]:
    """Every reason the executor would refuse this Plan before launching (for `train --dry-run`):
    each broken rule of the executor's row of the capability table, then the model and this
    machine's libraries. No data and no devices are needed."""
    on_gpu = plan.hardware.vendor != "cpu"
    broken = [rule for rule, mask in rule_masks(rules_for("executor", on_gpu), Candidates.from_configs([plan.config]),
                                                plan.model, plan.workload) if mask[0]]
    reasons = [f"{rule.reason}; plan with {rule.fix}" if rule.fix else rule.reason for rule in broken]
    return reasons + [r for r in (_model_reason(plan.model), _environment_reason(plan.workload)) if r]


def _model_reason(spec: ModelSpec) -> str | None:
    if not spec.hf_config:
        return "the plan's model carries no hf_config (config.json); write the plan again with `planner suggest --save-plan`"
    return None


def _environment_reason(workload: Workload) -> str | None:
    if workload.method == "qlora" and not has_bitsandbytes():
        return "qlora needs bitsandbytes (NF4), which is not installed; `pip install bitsandbytes` or use --method lora"
    if workload.optimizer == "adamw8bit" and not has_bitsandbytes():
        return "adamw8bit needs bitsandbytes, which is not installed; `pip install bitsandbytes` or plan with --optimizer adamw"
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
        raise InvalidRequest(f"the plan is inconsistent: dp x cp x tp x pp = {config.devices} but it has "
                             f"{cluster.num_devices} devices; write it again with `planner suggest --save-plan`")
    if world_size != config.devices:
        raise InvalidRequest(f"the plan needs {config.devices} processes (dp {config.dp} x cp {config.cp} x tp {config.tp} x "
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
