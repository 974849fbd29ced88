"""Exports of a Plan to what people already run: a torchrun launch line, a DeepSpeed JSON config,
an Accelerate FSDP config (YAML), a torchtitan 0.3 configuration module, Megatron-LM's arguments and
a Slurm batch script.

Pure Python (no torch, no yaml library): the YAML here is a small block mapping whose scalars are
written as JSON scalars, which YAML reads as the same values. Tests load every output with the
format's own parser (json, yaml.safe_load, accelerate's ClusterConfig, Python's compile(), torchrun's
argparse, Megatron-LM's argument names). The engine-specific renderers are in export_engines.py.

Escaping (issue 18): every word of a shell line is quoted with shlex.quote, except a word made only
of plain characters and `$VAR` / `${VAR}` / `${VAR:?message}` references (the `--data "$DATA"`
default, Slurm's variables), which is double-quoted so that the variable, and nothing else, expands:
`$(...)`, backticks, quotes and newlines never reach the shell unquoted. Comment lines (`# Plan:`)
carry names with every non-printable character replaced, so that no newline can end them; names
in folder and job names are cut to [A-Za-z0-9_.-].

Assumption to align with the executor when merging: each node runs
    torchrun --nnodes N --nproc-per-node K --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m executor.train --plan plan.json --data DATA --output DIR [--steps S]
i.e. `python -m executor.train` takes --plan/--data/--output/--steps, as `planner train` does.

What an engine can run is planner/capabilities.py's table: `export --format F` refuses a plan that
F's engine cannot run, with what to change (the same words `suggest --target` counts), and says in
a note on stderr what lives in training code rather than in the engine's config (never silently).
"""

from __future__ import annotations

import math
import re
import shlex

from planner.capabilities import FORMAT_TARGETS, runnable_reason
from planner.errors import InvalidRequest
from planner.export_base import Export, LaunchOptions, _Plan, describe
from planner.plan import Plan
from planner.validity import MAX_HOURS, MAX_STEPS, check_number

__all__ = ["FORMATS", "Export", "LaunchOptions", "export_plan", "describe"]

FORMATS = ("torchrun", "deepspeed", "accelerate", "torchtitan", "megatron", "slurm")
EXECUTOR_MODULE = "executor.train"


def export_plan(plan: Plan, fmt: str, options: LaunchOptions | None = None) -> Export:
    """Render a Plan in one of FORMATS, or refuse what the format's engine cannot run."""
    from planner import export_engines as engines

    if fmt not in FORMATS:
        raise InvalidRequest(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    target = FORMAT_TARGETS[fmt]
    reason = runnable_reason(target, plan.config, plan.model, plan.workload, plan.hardware)
    if reason:
        raise InvalidRequest(f"{reason}; or re-plan with `planner suggest --target {target} --save-plan`")
    wrapped = _Plan(plan)
    options = options or LaunchOptions()
    _check_options(options)
    render, suffix = {"torchrun": (torchrun_script, ".sh"), "deepspeed": (engines.deepspeed_json, ".json"),
                      "accelerate": (engines.accelerate_yaml, ".yaml"), "torchtitan": (engines.torchtitan_module, ".py"),
                      "megatron": (engines.megatron_args, ".sh"), "slurm": (slurm_script, ".sbatch")}[fmt]
    text = render(wrapped, options)
    if target != "executor":
        wrapped.notes += workload_notes(plan, fmt)
    return Export(text=text, notes=tuple(wrapped.notes), suffix=suffix)


# workload choices each engine's own config expresses; the rest live in training code and are said
MAPPED = {"deepspeed": {"precision"}, "accelerate": {"precision", "compile"},
          "torchtitan": {"precision", "compile", "loss_parallel"},
          "megatron": {"precision", "attention", "optimizer", "loss_parallel"}}


def workload_notes(plan: Plan, fmt: str) -> list[str]:
    """One note per workload choice the format cannot hold, so that none is dropped silently."""
    w, mapped = plan.workload, MAPPED.get(fmt, set())
    said = {
        "method": w.method != "full" and f"{w.method} (peft, rank {w.lora_rank} on {','.join(w.lora_targets)}"
                  f"{', NF4 base' if w.method == 'qlora' else ''}) is applied in the training code",
        "attention": w.attention != "sdpa" and f"attention {w.attention}: build the model with that attention "
                     "implementation in the training code",
        "optimizer": w.optimizer != "adamw" and f"optimizer {w.optimizer} is chosen in the training code",
        "optimizer_impl": w.optimizer == "adamw" and w.optimizer_impl != "foreach"
                          and f"AdamW implementation {w.optimizer_impl} is chosen in the training code",
        "master_dtype": w.master_dtype == "bf16" and "bf16 master weights and AdamW states: build the model in bf16 "
                        "in the training code",
        "loss_chunks": w.loss_chunks > 1 and f"cross-entropy in {w.loss_chunks} chunks is the training code's loss",
        "loss_parallel": w.loss_parallel and "vocabulary-parallel cross-entropy is the training code's loss",
        "compile": w.compile and "torch.compile is applied in the training code",
    }
    return [note for key, note in said.items() if note and key not in mapped and
            not (key == "compile" and fmt == "deepspeed")]


def _check_options(options: LaunchOptions) -> None:
    """What a person typed for the launch: printable paths, a real port, bounded steps and time."""
    for name in ("plan_path", "data", "output"):
        value = getattr(options, name)
        if not isinstance(value, str) or not value or not value.isprintable():
            flag = {"plan_path": "the plan path", "data": "--data", "output": "--run-dir"}[name]
            raise InvalidRequest(f"{flag} {value!r:.80} is empty or holds control characters; give a plain path")
    if isinstance(options.port, bool) or not isinstance(options.port, int) or not 1 <= options.port <= 65535:
        raise InvalidRequest(f"--port must be a TCP port from 1 to 65535, got {options.port!r:.40}")
    if options.steps is not None:
        check_number(options.steps, "--steps", MAX_STEPS, integer=True)
    if options.time_limit_s is not None:
        check_number(options.time_limit_s / 3600, "--time-limit-hours", MAX_HOURS)


def safe_name(name: str) -> str:
    """A model name as one path component or Slurm job name: [A-Za-z0-9_.-], never '.' or '..'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", str(name)).strip(".-") or "model"


# -- torchrun and Slurm ------------------------------------------------------------------------

# plain characters, and variable references that expand to a value and run nothing
_PLAIN = r"[A-Za-z0-9_./:=,+@%-]"
# a name runs to its end (the lookahead), so each text splits one way only: no backtracking blow-up
_VARIABLE = r"\$[A-Za-z_][A-Za-z0-9_]*(?![A-Za-z0-9_])|\$\{[A-Za-z_][A-Za-z0-9_]*(?::\?[A-Za-z0-9 _.,=-]*)?\}"
_EXPANDABLE = re.compile(rf"(?:{_PLAIN}|{_VARIABLE})*")


def shell_word(value: str) -> str:
    """A shell word: `$VAR`-style references stay expandable (double quotes around plain text and
    variables only); anything else is single-quoted by shlex.quote and reaches the program verbatim."""
    if "$" in value and _EXPANDABLE.fullmatch(value):
        return f'"{value}"'
    return shlex.quote(value)


def shell_join(words: list[str]) -> str:
    return " ".join(shell_word(w) for w in words)


def executor_args(options: LaunchOptions) -> list[str]:
    args = ["--plan", options.plan_path, "--data", options.data, "--output", options.output]
    return args + (["--steps", str(options.steps)] if options.steps is not None else [])


def torchrun_words(plan: _Plan, options: LaunchOptions, nnodes: str, endpoint: str, rdzv_id: str) -> list[str]:
    """torchrun's own options (torch.distributed.run): one agent per node, c10d rendezvous."""
    return ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={plan.cluster.devices_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            "-m", EXECUTOR_MODULE, *executor_args(options)]


def torchrun_script(plan: _Plan, options: LaunchOptions) -> str:
    nodes = plan.cluster.num_nodes
    if nodes == 1:
        endpoint, where = f"localhost:{options.port}", "Run on the node:"
    else:
        endpoint = "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" + f":{options.port}"
        where = f"Run the same line on each of the {nodes} nodes (MASTER_ADDR = one node's address):"
    words = torchrun_words(plan, options, str(nodes), endpoint, "llm-planner")
    return f"# Plan: {describe(plan)}\n# {where}\n{dry_run_line(options)}\n{shell_join(words)}\n"


def dry_run_line(options: LaunchOptions) -> str:
    """The executor's own checks of the plan (`planner train --dry-run`) before anything starts."""
    return shell_join(["python", "-m", "planner.cli", "train", "--plan", options.plan_path, "--dry-run"]) + " || exit 2"


def _slurm_time(plan: _Plan, options: LaunchOptions) -> str | None:
    seconds = options.time_limit_s
    step_s = plan.step_s
    if not isinstance(step_s, (int, float)) or isinstance(step_s, bool) or not 0 < step_s < math.inf:
        step_s = None  # a plan without a usable prediction: no time from it
    if seconds is None and options.steps is not None and step_s:
        seconds = step_s * options.steps * (1 + options.time_margin_fraction) + options.time_startup_s
        if seconds > MAX_HOURS * 3600:
            raise InvalidRequest(f"--steps {options.steps} at the predicted {step_s:.3g} s a step take over "
                                 f"{MAX_HOURS:.0e} hours; use fewer steps or set --time-limit-hours")
    if seconds is None:
        return None
    minutes = max(1, int(-(-seconds // 60)))
    return f"{minutes // (24 * 60)}-{minutes // 60 % 24:02d}:{minutes % 60:02d}:00"


def slurm_script(plan: _Plan, options: LaunchOptions) -> str:
    """sbatch script: one task per node, each a torchrun agent (Slurm docs: sbatch, srun)."""
    cluster = plan.cluster
    directives = [f"--job-name=llm-planner-{safe_name(plan.spec.name)}",
                  f"--nodes={cluster.num_nodes}", "--ntasks-per-node=1", f"--gpus-per-node={cluster.devices_per_node}",
                  "--exclusive", "--output=%x-%j.out"]
    time_limit = _slurm_time(plan, options)
    if time_limit:
        directives.append(f"--time={time_limit}")
    else:
        plan.notes.append("no --time set: pass --steps (time from the predicted step time) or --time-limit-hours")
    endpoint = "$head_node:" + str(options.port)
    words = torchrun_words(plan, options, "$SLURM_NNODES", endpoint, "$SLURM_JOB_ID")
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], f"# Plan: {describe(plan)}",
             "set -euo pipefail"]
    variable = re.match(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", options.data)
    if variable:
        name = variable.group(1)
        lines.append(f': "${{{name}:?set {name} to the training data}}"')
    lines += [dry_run_line(options), 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "srun " + shell_join(words)]
    return "\n".join(lines) + "\n"
