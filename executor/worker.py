"""One training process (started by torchrun, or alone): `python -m executor.train --plan ...`.

It sets up the process group (gloo on CPU, NCCL on GPUs), checks the Plan against the world it
finds, trains, and writes the run record. A failure is recorded too: rank 0 writes summary.json
when it can; any failing rank leaves DIR/failure-rank-N.json for the launcher, which writes the
record when no rank could (e.g. an OOM on rank 3 while rank 0 waits in a collective)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from executor.checks import check_device, check_supported, check_world, plan_notes
from executor.lifeline import bind_to_parent, started_by_torchrun
from executor.measure import Recorder, comparison_lines, environment, run_record, write_json
from executor.options import RunOptions
from planner.errors import InvalidRequest, PlannerError
from planner.plan import Plan, load_plan

EXIT_REFUSED, EXIT_FAILED, EXIT_OOM = 2, 1, 75


def init_distributed(on_cuda: bool) -> torch.device:
    """torchrun's environment, or a world of one when started alone."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=10))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_cuda(plan: Plan) -> bool:
    return plan.hardware.vendor != "cpu"


def check_environment(document: Plan, on_cuda: bool, options: RunOptions | None = None) -> None:
    from executor.preflight import preflight_reason

    spec, hardware, workload, config = document.model, document.hardware, document.workload, document.config
    check_supported(spec, workload, config, on_cuda)
    reason = preflight_reason(spec, workload, config, options)
    if reason:
        raise InvalidRequest(reason)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_world(document.cluster, config, world)
    if on_cuda:
        if not torch.cuda.is_available():
            raise InvalidRequest(f"the plan is for {hardware.name} but no CUDA device is visible; "
                                 "plan with --gpu cpu for a CPU run")
        props = torch.cuda.get_device_properties(0)
        check_device(hardware, props.name, props.total_memory, torch.cuda.device_count(),
                     int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def train(document: Plan, options: RunOptions, device: torch.device, recorder: Recorder,
          trainer_class: Callable[..., Any]) -> dict:
    """Build and run `trainer_class` (executor/train.py's Trainer, which hands itself in: train.py
    builds on this module, not the other way round)."""
    from executor.mesh import build_topology
    from executor.save import save_final
    from executor.setup import prepare, should_compile

    spec, workload, config = document.model, document.workload, document.config
    notes = plan_notes(config, device.type == "cuda")
    if getattr(workload, "compile", False) and not should_compile(workload):
        notes.append("the plan says compile, but EXECUTOR_COMPILE=0 turned it off: timings are eager")
    if notes and dist.get_rank() == 0:
        print("\n".join(f"note: {n}" for n in notes))
    topo = build_topology(config, device)
    prepared = prepare(spec, workload, config, topo, device, options)
    trainer = trainer_class(spec, workload, config, topo, device, options, prepared, recorder)
    trainer.run(document.config.to_dict())
    if options.save_final:
        save_final(options.output_dir / "final", prepared, spec, workload, topo, options)
    return {"data": trainer.data_report.to_dict(), "parameters": prepared.parameters,
            "compile": should_compile(workload), "memory_probe_error": trainer.probe.error, "notes": notes}


def _outcome(exc: Exception) -> tuple[str, str, int]:
    """(status, one-line error, exit status) of a failed training."""
    from executor.checkpoint import is_disk_full

    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", f"out of memory: {str(exc).splitlines()[0]}", EXIT_OOM
    if isinstance(exc, PlannerError):
        return "failed", str(exc), EXIT_REFUSED
    if is_disk_full(exc):
        return "failed", f"the disk is full ({exc}); free space, then add --resume", EXIT_REFUSED
    traceback.print_exc()  # into the launcher's log of this attempt
    return "failed", f"{type(exc).__name__}: {exc}", EXIT_FAILED


def main(trainer_class: Callable[..., Any], argv: list[str] | None = None) -> int:
    options = RunOptions.parse(sys.argv[1:] if argv is None else argv)
    output = options.output_dir
    rank = int(os.environ.get("RANK", "0"))
    if started_by_torchrun():
        bind_to_parent()  # a worker never outlives torchrun (executor/lifeline.py)
    try:
        document = load_plan(options.plan)
        on_cuda = uses_cuda(document)
        check_environment(document, on_cuda, options)
    except PlannerError as exc:
        if rank == 0:
            print(f"planner train: {exc}", file=sys.stderr)
            output.mkdir(parents=True, exist_ok=True)
            write_json(output / f"failure-rank-{rank}.json", {"status": "failed", "error": str(exc), "exit": EXIT_REFUSED})
        return EXIT_REFUSED
    device = init_distributed(on_cuda)
    recorder = Recorder(document.workload.tokens_per_step, document.config.devices)
    status, error, extra, code = "finished", None, {}, 0
    try:
        extra = train(document, options, device, recorder, trainer_class)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, as what it is
        status, error, code = _outcome(exc)
    if code:
        with contextlib.suppress(OSError):  # a full disk may refuse the note too; the launcher then says so
            write_json(output / f"failure-rank-{rank}.json", {"status": status, "error": error, "exit": code})
    if rank == 0:
        record = run_record(status, error, document.to_dict(), recorder.measured(), environment(device, document.config.devices),
                            {"options": options.to_dict(), **extra})
        write_json(output / "summary.json", record)
        if status == "finished":
            print("\n".join(["Predicted vs measured:"] + comparison_lines(document.to_dict(), record["measured"])))
    if code == 0:
        dist.destroy_process_group()
    return code

