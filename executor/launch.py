"""`planner train` on this node: check the Plan, start torchrun with one process per device the
Plan names, and record the run; after an out-of-memory failure, `--fallback` retries the Plan's
runner-ups in order. For several nodes, `--print-launch` prints the torchrun line to start on
each node (the Slurm script is `planner export`'s)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from executor.checks import all_reasons, unsupported_reason
from executor.options import RunOptions
from planner.errors import InvalidRequest
from planner.plan import ParallelConfig, Plan, load_plan, typed_plan

RDZV_PORT = 29500


def worker_command(options: RunOptions, nproc: int, nnodes: int = 1) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`) running executor.train on every process."""
    if nnodes == 1:
        rendezvous = ["--standalone", "--nnodes=1"]
    else:
        rendezvous = [f"--nnodes={nnodes}", "--node-rank=${NODE_RANK}", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=${{MASTER_ADDR}}:{RDZV_PORT}", "--rdzv-id=planner-train"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}",
            "-m", "executor.train", *options.to_argv()]


def print_launch(options: RunOptions) -> str:
    cluster = load_plan(options.plan).cluster
    per_node = min(cluster.devices_per_node, cluster.num_devices)
    nnodes = cluster.num_nodes
    parts = [shlex.quote(p) if "$" not in p else p for p in worker_command(options, per_node, nnodes)]
    head = "# on every node (set NODE_RANK and MASTER_ADDR):" if nnodes > 1 else "# on this node:"
    return f"{head}\nOMP_NUM_THREADS=1 " + " ".join(parts)


def dry_run(plan_path: str) -> tuple[int, str]:
    """`planner train --plan P --dry-run`: every check the executor makes before it launches (the
    plan file, its layout, the model, method and hardware support), without data or devices.
    Returns (0, one line) when the plan would run, (2, the reasons) when not."""
    plan = load_plan(plan_path)
    reasons = all_reasons(plan)
    if reasons:
        return 2, "the plan would not run: " + "; and ".join(reasons)
    c = plan.config
    return 0, (f"the plan would run: {plan.model.name} on {plan.num_devices} x {plan.hardware.name}, dp {c.dp} x tp {c.tp} "
               f"x pp {c.pp}, {c.num_micro_batches} micro-batches of {c.micro_batch_size}, "
               f"{plan.cluster.num_nodes} node(s)")


def runner_up_plans(plan: Plan) -> list[Plan]:
    """The Plan rewritten for each runner-up, best first (same model, cluster and workload)."""
    return [plan.with_runner_up(i) for i in range(len(plan.runner_ups))]


def preflight(document: Plan, options: RunOptions) -> None:
    """What can be refused before any process starts: the Plan, the devices, the data, the output."""
    from executor.data import load_examples
    from executor.tokenizer import load_tokenizer
    from executor.worker import check_environment, uses_cuda

    spec, _, cluster, _, _ = typed_plan(document)
    if cluster.num_nodes > 1:
        raise InvalidRequest(f"the plan spans {cluster.num_nodes} nodes; print the launch line with "
                             "--print-launch and start it on every node")
    processes = str(document.config.devices)
    saved = {key: os.environ.get(key) for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=processes, LOCAL_WORLD_SIZE=processes)  # what torchrun will set
    try:
        check_environment(document, uses_cuda(document))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    load_examples(options.data, load_tokenizer(options.tokenizer, spec.vocab_size), options.max_bad_fraction,
                  options.chat_template)
    if options.init_from and not Path(options.init_from).expanduser().is_dir():
        raise InvalidRequest(f"--init-from {options.init_from} is not a folder")
    output = options.output_dir
    if output.exists() and not output.is_dir():
        raise InvalidRequest(f"--output {options.output} is a file; give a folder")
    if not options.resume and (output / "checkpoints").exists():
        raise InvalidRequest(f"{options.output} already holds a run's checkpoints; add --resume to continue it "
                             "or give a new --output")


def launch(options: RunOptions, fallback: bool = False) -> int:
    document = load_plan(options.plan)
    preflight(document, options)
    output = options.output_dir
    output.mkdir(parents=True, exist_ok=True)
    attempts = [document] + (runner_up_plans(document) if fallback else [])
    for number, plan in enumerate(attempts):
        spec, _, _, workload, config = typed_plan(plan)
        if number and unsupported_reason(spec, workload, config, on_cuda=plan.hardware.vendor != "cpu"):
            print(f"planner train: skipping runner-up {number} ({unsupported_reason(spec, workload, config, True)})",
                  file=sys.stderr)
            continue
        status, code = _attempt(plan, options, resume=options.resume and number == 0)
        if status == "oom" and fallback and number + 1 < len(attempts):
            _archive_attempt(output, number)
            print(f"planner train: out of memory with {_describe(config)}; trying the next runner-up", file=sys.stderr)
            continue
        return code
    return 1


def _attempt(plan: Plan, options: RunOptions, resume: bool) -> tuple[str, int]:
    output = options.output_dir
    plan_path = output / "plan.json"
    plan_path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    for stale in [output / "summary.json", *output.glob("failure-rank-*.json")]:
        stale.unlink(missing_ok=True)
    run_options = RunOptions(**{**options.to_dict(), "plan": str(plan_path), "resume": resume})
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # TORCH-NOTES: one thread per process
    nproc = plan.config.devices
    log_path = output / "logs" / f"torchrun-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w") as log:  # torchrun's failure reports and the workers' warnings
        rc = subprocess.call(worker_command(run_options, nproc), env=env, stderr=log)
    summary = _summary_or_compose(plan, run_options, rc)
    _record_in_store(summary, options)
    status = summary["status"]
    if status == "finished":
        return status, 0
    failures = [json.loads(p.read_text()) for p in sorted(output.glob("failure-rank-*.json"))]
    if any(f.get("exit") == 2 for f in failures):
        print(f"planner train: {summary.get('error')}", file=sys.stderr)
        return status, 2
    print(f"planner train: run {status}: {summary.get('error')} (record in {output / 'summary.json'}, "
          f"log in {log_path})", file=sys.stderr)
    return status, 1


def _summary_or_compose(plan: Plan, options: RunOptions, rc: int) -> dict:
    """The worker's record, or one composed from metrics.jsonl and the failure notes of the ranks."""
    output = options.output_dir
    path = output / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    from executor.measure import Recorder, environment, run_record, write_json

    import torch

    _, _, _, workload, config = typed_plan(plan)
    recorder = Recorder(workload.tokens_per_step, config.devices)
    metrics = output / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        recorder.add(row["step"], row["loss"], row["step_s"])
        recorder.note_memory(row.get("peak_memory_bytes"), row.get("peak_reserved_bytes"))
    failures = [json.loads(p.read_text()) for p in sorted(output.glob("failure-rank-*.json"))]
    oom = next((f for f in failures if f.get("status") == "oom"), None)
    failure = oom or (failures[0] if failures else {"status": "failed", "error": f"workers exited with status {rc}"})
    device = torch.device("cuda" if plan.hardware.vendor != "cpu" and torch.cuda.is_available() else "cpu")
    record = run_record(failure["status"], failure["error"], plan.to_dict(), recorder.measured(),
                        environment(device, config.devices), {"options": options.to_dict()})
    write_json(path, record)
    return record


def _record_in_store(summary: dict, options: RunOptions) -> None:
    """Every finished or failed run becomes a measured run for calibration. A store that cannot
    take it costs nothing: DIR/summary.json is the record and `planner runs import` reads it."""
    if not options.record_in_store:
        return
    try:
        from planner.runstore import record_run, store_path
    except ImportError:
        return
    try:
        record_run(summary, options.store)
        print(f"planner train: run {summary['run_id']} recorded in {store_path(options.store)}")
    except Exception as exc:  # noqa: BLE001 - the record is safe on disk; say why the store refused it
        print(f"planner train: note: not recorded in the store ({exc}); "
              f"`planner runs import {options.output_dir / 'summary.json'}` later", file=sys.stderr)


def _archive_attempt(output: Path, number: int) -> None:
    folder = output / "attempts" / f"{number + 1}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl", "plan.json"):
        if (output / name).exists():
            os.replace(output / name, folder / name)
    for failure in output.glob("failure-rank-*.json"):
        os.replace(failure, folder / failure.name)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)


def _describe(config: ParallelConfig) -> str:
    return (f"dp {config.dp} tp {config.tp} pp {config.pp}, micro-batch {config.micro_batch_size} x "
            f"{config.num_micro_batches}, recompute {config.recompute}, zero {config.zero}")
