"""`planner train` on this node: check the Plan, start torchrun with one process per device the
Plan names, and record the run; after an out-of-memory failure, `--fallback` retries the Plan's
runner-ups in order. For several nodes, `--print-launch` prints the torchrun line to start on
each node (the Slurm script is `planner export`'s).

The launcher owns what it starts (executor/lifeline.py): it holds DIR/run.lock for the run's life,
torchrun runs in a process group of its own and dies with the launcher (SIGKILL included), the
workers die with torchrun, and SIGINT/SIGTERM/SIGHUP stop torchrun and are recorded. A record the
launcher composes takes only this attempt's metrics rows, never those of the run it resumed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from executor.checks import all_reasons, unsupported_reason
from executor.lifeline import LAUNCHER_PID_ENV, RunLock, child_preexec
from executor.options import RunOptions, check_options
from executor.train_progress import metrics_bar
from planner.errors import InvalidRequest
from planner.export import shell_join
from planner.plan import ParallelConfig, Plan, load_plan
from planner.progress import bars

RDZV_PORT = 29500
ATTEMPT_ENV = "EXECUTOR_ATTEMPT"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    head = "# on every node (set NODE_RANK and MASTER_ADDR):" if nnodes > 1 else "# on this node:"
    # every word escaped for the shell: `$(...)`, backticks and quotes reach torchrun verbatim; only
    # plain $VAR references (NODE_RANK, MASTER_ADDR) expand (planner/export.py shell_word)
    return f"{head}\nOMP_NUM_THREADS=1 " + shell_join(worker_command(options, per_node, nnodes))


def dry_run(plan_path: str) -> tuple[int, str]:
    """`planner train --plan P --dry-run`: every check the executor makes before it launches (the
    plan file, its layout, the model, method and hardware support), without data or devices.
    Returns (0, one line) when the plan would run, (2, the reasons) when not."""
    from executor.preflight import preflight_reason

    plan = load_plan(plan_path)
    reasons = all_reasons(plan)
    if not reasons:  # the model as transformers will build it (meta device): config, shape, count
        reasons = [r for r in (preflight_reason(plan.model, plan.workload, plan.config),) if r]
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
    """What can be refused before any process starts: the Plan and its model, the devices, the
    data, the output."""
    from executor.data import load_examples
    from executor.tokenizer import load_tokenizer
    from executor.worker import check_environment, uses_cuda

    check_options(options, document.workload, document.config)
    if document.cluster.num_nodes > 1:
        raise InvalidRequest(f"the plan spans {document.cluster.num_nodes} nodes; print the launch line with "
                             "--print-launch and start it on every node")
    processes = str(document.config.devices)
    saved = {key: os.environ.get(key) for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=processes, LOCAL_WORLD_SIZE=processes)  # what torchrun will set
    try:
        check_environment(document, uses_cuda(document), options)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    load_examples(options.data, load_tokenizer(options.tokenizer, document.model.vocab_size), options.max_bad_fraction,
                  options.chat_template)
    if options.init_from and not Path(options.init_from).expanduser().is_dir():
        raise InvalidRequest(f"--init-from {options.init_from} is not a folder")
    output = options.output_dir
    if output.exists() and not output.is_dir():
        raise InvalidRequest(f"--output {options.output} is a file; give a folder")


def _check_fresh_output(options: RunOptions) -> None:
    if not options.resume and (options.output_dir / "checkpoints").exists():
        raise InvalidRequest(f"{options.output} already holds a run's checkpoints; add --resume to continue it "
                             "or give a new --output")


def launch(options: RunOptions, fallback: bool = False) -> int:
    """Train with the Plan, holding DIR/run.lock for the run's life (executor/lifeline.py)."""
    document = load_plan(options.plan)
    preflight(document, options)
    output = options.output_dir
    output.mkdir(parents=True, exist_ok=True)
    with RunLock(output) as lock:
        lock.acquire(str(options.output))
        _check_fresh_output(options)
        try:
            return _attempts(document, options, fallback)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise InvalidRequest(f"the disk under {options.output} is full ({exc.strerror}); free space "
                                     "and add --resume") from None
            raise


def _attempts(document: Plan, options: RunOptions, fallback: bool) -> int:
    output = options.output_dir
    attempts = [document] + (runner_up_plans(document) if fallback else [])
    for number, plan in enumerate(attempts):
        spec, workload, config = plan.model, plan.workload, plan.config
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
    attempt = uuid.uuid4().hex[:12]  # tags this attempt's metrics rows (executor/measure.py)
    env = {**os.environ, ATTEMPT_ENV: attempt, LAUNCHER_PID_ENV: str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", "1")  # TORCH-NOTES: one thread per process
    nproc = plan.config.devices
    log_path = output / "logs" / f"torchrun-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(exist_ok=True)
    # the bar (stderr, a terminal only) follows rank 0's metrics rows: the workers' stderr is the log
    with open(log_path, "w") as log, bars(options.progress), \
            metrics_bar(output / "metrics.jsonl", attempt, options.steps) as tick:
        # its own process group, and SIGKILL when this process dies (executor/lifeline.py)
        proc = subprocess.Popen(worker_command(run_options, nproc), env=env, stderr=log, preexec_fn=child_preexec)
        rc, stopped_by = _wait_forwarding_signals(proc, tick)
    summary = _summary_or_compose(plan, run_options, rc, attempt, stopped_by, log_path)
    _record_in_store(summary, options)
    status = summary["status"]
    if status == "finished":
        return status, 0
    if stopped_by is not None:
        print(f"planner train: stopped by {stopped_by.name}; continue with --resume (record in "
              f"{output / 'summary.json'})", file=sys.stderr)
        return status, 128 + stopped_by
    failures = [json.loads(p.read_text()) for p in sorted(output.glob("failure-rank-*.json"))]
    if any(f.get("exit") == 2 for f in failures):
        print(f"planner train: {summary.get('error')}", file=sys.stderr)
        return status, 2
    print(f"planner train: run {status}: {summary.get('error')} (record in {output / 'summary.json'}, "
          f"log in {log_path})", file=sys.stderr)
    return status, 1


def _wait_forwarding_signals(proc: subprocess.Popen, tick: Callable[[], None] = lambda: None,
                             tick_s: float = 0.5) -> tuple[int, signal.Signals | None]:
    """Wait for torchrun, calling `tick` every `tick_s` (the progress bar); SIGINT/SIGTERM/SIGHUP
    sent to this process are passed on to torchrun's group as SIGTERM (torchrun then stops its
    workers), and the run is recorded as stopped."""
    received: list[signal.Signals] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python takes handlers
    previous = {sig: signal.signal(sig, forward) for sig in wanted} if in_main_thread else {}
    try:
        while True:
            try:
                rc = proc.wait(timeout=tick_s)
                break
            except subprocess.TimeoutExpired:
                tick()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc, (received[0] if received else None)


def _summary_or_compose(plan: Plan, options: RunOptions, rc: int, attempt: str,
                        stopped_by: signal.Signals | None, log_path: Path) -> dict:
    """The worker's record, or one composed from this attempt's rows of metrics.jsonl (never an
    earlier run's: a resumed folder keeps them) and the failure notes of the ranks."""
    output = options.output_dir
    path = output / "summary.json"
    if path.exists() and stopped_by is None:
        return json.loads(path.read_text())
    from executor.measure import Recorder, environment, run_record, write_json

    import torch

    recorder = Recorder(plan.workload.tokens_per_step, plan.config.devices)
    metrics = output / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        if row.get("attempt") != attempt:
            continue
        recorder.add(row["step"], row["loss"], row["step_s"])
        recorder.note_memory(row.get("peak_memory_bytes"), row.get("peak_reserved_bytes"))
    failure = _failure(output, rc, stopped_by, log_path)
    device = torch.device("cuda" if plan.hardware.vendor != "cpu" and torch.cuda.is_available() else "cpu")
    record = run_record(failure["status"], failure["error"], plan.to_dict(), recorder.measured(),
                        environment(device, plan.config.devices), {"options": options.to_dict()})
    write_json(path, record)
    return record


def _failure(output: Path, rc: int, stopped_by: signal.Signals | None, log_path: Path) -> dict:
    """Why the attempt ended: a signal to the launcher, an OOM on any rank, a rank's note, a worker
    killed by a signal (torchrun's report in the log), or torchrun's exit status."""
    if stopped_by is not None:
        return {"status": "failed", "error": f"killed: stopped by {stopped_by.name} before the last step"}
    failures = [json.loads(p.read_text()) for p in sorted(output.glob("failure-rank-*.json"))]
    oom = next((f for f in failures if f.get("status") == "oom"), None)
    if oom or failures:
        return oom or failures[0]
    killed = re.search(r"Signal \d+ \((SIG[A-Z]+)\) received by PID", log_path.read_text(errors="replace")) \
        if log_path.exists() else None
    if killed:
        return {"status": "failed", "error": f"killed: a worker was stopped by {killed.group(1)} (out of host memory?)"}
    return {"status": "failed", "error": f"workers exited with status {rc}"}


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
