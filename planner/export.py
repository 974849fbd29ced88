"""Exports of a Plan to what people already run: a torchrun launch line, a DeepSpeed JSON config,
an Accelerate FSDP config (YAML), a torchtitan job config (TOML) and a Slurm batch script.

Pure Python (no torch, no yaml/toml libraries): the YAML and TOML here are small block mappings
whose keys are ours and whose scalars are written as JSON scalars (YAML) or TOML basic strings,
which both formats read as the same values. Tests load every output with the format's own parser
(json, yaml.safe_load, tomllib, torchrun's argparse).

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

When an engine cannot express part of a plan exactly, the export either refuses with what to
change (the degrees, sharding and offload: a different layout would not be the planned one) or
says so in a note (recomputation and kernels that live in the training code).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig, typed_plan
from planner.specs import Cluster, ModelSpec, Workload
from planner.validity import (MAX_HOURS, MAX_STEPS, check_number, check_sequence, check_spec_matches_config,
                              printable)

FORMATS = ("torchrun", "deepspeed", "accelerate", "torchtitan", "slurm")
EXECUTOR_MODULE = "executor.train"

# torchtitan's llama3 flavors (torchtitan v0.2.2, torchtitan/models/llama3/__init__.py):
# (hidden, layers, heads, kv heads) -> flavor name.
TORCHTITAN_LLAMA3_FLAVORS = {(4096, 32, 32, 8): "8B", (8192, 80, 64, 8): "70B", (16384, 126, 128, 8): "405B"}


@dataclass(frozen=True)
class LaunchOptions:
    """What the launch needs besides the plan. `$VAR` values stay shell variables."""

    plan_path: str = "plan.json"
    data: str = "$DATA"
    output: str = "runs/llm-planner"
    steps: int | None = None
    port: int = 29500
    time_limit_s: float | None = None  # Slurm --time; default: predicted step time x steps, plus margins below
    time_margin_fraction: float = 0.25  # predictions err (see `planner validate`); a job killed at 99% is lost
    time_startup_s: float = 900.0  # model load, rendezvous, first-step compilation, final checkpoint


@dataclass(frozen=True)
class Export:
    text: str
    notes: tuple[str, ...] = ()
    suffix: str = ".txt"


@dataclass
class _Plan:
    spec: ModelSpec
    cluster: Cluster
    workload: Workload
    config: ParallelConfig
    step_s: float | None
    notes: list[str] = field(default_factory=list)


def export_plan(document: dict[str, Any], fmt: str, options: LaunchOptions | None = None) -> Export:
    """Render a Plan document (as from load_plan / make_plan) in one of FORMATS."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    spec, _hardware, cluster, workload, config = typed_plan(document)
    check_spec_matches_config(spec)
    check_sequence(spec, workload.seq_len)
    step_s = (document.get("prediction") or {}).get("time", {}).get("step_s")
    plan = _Plan(spec, cluster, workload, config, step_s)
    options = options or LaunchOptions()
    _check_options(options)
    render, suffix = {"torchrun": (torchrun_script, ".sh"), "deepspeed": (deepspeed_json, ".json"),
                      "accelerate": (accelerate_yaml, ".yaml"), "torchtitan": (torchtitan_toml, ".toml"),
                      "slurm": (slurm_script, ".sbatch")}[fmt]
    text = render(plan, options)
    return Export(text=text, notes=tuple(plan.notes), suffix=suffix)


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


def describe(plan: _Plan) -> str:
    """One line, printable (a comment's text in every format)."""
    c = plan.config
    return printable(f"{plan.spec.name} on {plan.cluster.num_devices} x {plan.cluster.hardware.name} "
            f"({plan.cluster.num_nodes} node(s) of {plan.cluster.devices_per_node}): dp {c.dp}, tp {c.tp}, pp {c.pp}, "
            f"micro-batch {c.micro_batch_size} x {c.num_micro_batches}, recompute {c.recompute}, zero {c.zero}, "
            f"offload {c.offload}, {plan.workload.method}, {plan.workload.precision}")


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
    return f"# Plan: {describe(plan)}\n# {where}\n{shell_join(words)}\n"


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
    lines += ['head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "srun " + shell_join(words)]
    return "\n".join(lines) + "\n"


# -- DeepSpeed -----------------------------------------------------------------------------------

def deepspeed_json(plan: _Plan, options: LaunchOptions) -> str:
    """DeepSpeed config JSON (https://www.deepspeed.ai/docs/config-json/). DeepSpeed checks
    train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x dp."""
    c, w = plan.config, plan.workload
    if w.precision == "fp8":
        raise InvalidRequest("DeepSpeed's config has no fp8 mode; re-plan with --precision bf16, or export "
                             "--format accelerate or torchtitan")
    if c.pp > 1 and (c.zero > 1 or c.tp > 1):
        raise InvalidRequest(f"DeepSpeed's pipeline engine runs with ZeRO stage 0 or 1 and no AutoTP; the plan has "
                             f"pp {c.pp}, zero {c.zero}, tp {c.tp}: re-plan with --zero 1 --tp 1, or export --format torchtitan")
    zero: dict[str, Any] = {"stage": c.zero}
    if c.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if c.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": w.global_batch,
        "train_micro_batch_size_per_gpu": c.micro_batch_size,
        "gradient_accumulation_steps": c.num_micro_batches,
        "bf16": {"enabled": w.precision == "bf16"},
        "fp16": {"enabled": w.precision == "fp16"},
        "zero_optimization": zero,
    }
    if c.tp > 1:
        config["tensor_parallel"] = {"autotp_size": c.tp}  # AutoTP training (DeepSpeed >= 0.16.4)
    if c.pp > 1:
        plan.notes.append(f"build the model as deepspeed.pipe.PipelineModule(num_stages={c.pp}); "
                          "the engine runs gradient_accumulation_steps micro-batches per step")
    _training_code_notes(plan, "DeepSpeed")
    return json.dumps(config, indent=2) + "\n"


def _training_code_notes(plan: _Plan, engine: str) -> None:
    c = plan.config
    if c.recompute != "none":
        plan.notes.append(f"{c.recompute} activation recomputation is switched on in the training code, not in the {engine} config")
    if c.sequence_parallel:
        plan.notes.append(f"the plan uses sequence parallelism with tp; {engine} has no switch for it")
    if c.vpp > 1:
        plan.notes.append(f"the plan's interleaved schedule (vpp {c.vpp}) has no {engine} equivalent")


# -- Accelerate (FSDP2) ----------------------------------------------------------------------------

def accelerate_config(plan: _Plan) -> dict[str, Any]:
    """`accelerate launch --config_file` YAML keys (accelerate ClusterConfig and the
    --fsdp_* / --parallelism_config_* options of `accelerate launch`, accelerate >= 1.10)."""
    c, w, cluster = plan.config, plan.workload, plan.cluster
    if c.pp > 1:
        raise InvalidRequest(f"Accelerate's FSDP has no pipeline parallelism and the plan has pp {c.pp}; re-plan with "
                             "--pp 1, or export --format torchtitan or deepspeed")
    if c.offload == "optimizer":
        raise InvalidRequest("FSDP offloads parameters, gradients and optimizer together, not the optimizer alone; "
                             "re-plan with --offload params or none, or export --format deepspeed")
    doc: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0,
                           "num_machines": cluster.num_nodes, "num_processes": cluster.num_devices,
                           "mixed_precision": {"fp32": "no"}.get(w.precision, w.precision),
                           "rdzv_backend": "c10d" if cluster.num_nodes > 1 else "static", "same_network": True,
                           "main_training_function": "main", "use_cpu": False}
    if cluster.num_nodes > 1:
        doc.update(main_process_ip="MASTER_ADDR", main_process_port=29500)
        plan.notes.append("set main_process_ip to node 0's address and machine_rank to each node's rank")
    sharded = c.zero >= 1 or c.tp > 1
    doc["distributed_type"] = "FSDP" if sharded else ("MULTI_GPU" if cluster.num_devices > 1 else "NO")
    if sharded:
        doc["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                              "fsdp_reshard_after_forward": c.zero == 3, "fsdp_offload_params": c.offload == "params",
                              "fsdp_activation_checkpointing": c.recompute == "full",
                              "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True}
        if c.zero == 1:
            plan.notes.append("FSDP has no ZeRO-1; zero 1 becomes reshard_after_forward false (ZeRO-2-like, less memory)")
        if c.zero == 0:
            plan.notes.append("zero 0 with tp: dp ranks replicate (dp_shard_size 1)")
    if c.tp > 1:
        doc["parallelism_config"] = {"parallelism_config_dp_replicate_size": 1 if c.zero >= 1 else c.dp,
                                     "parallelism_config_dp_shard_size": c.dp if c.zero >= 1 else 1,
                                     "parallelism_config_tp_size": c.tp, "parallelism_config_cp_size": 1}
    if c.recompute == "selective":
        plan.notes.append("selective recomputation is switched on in the training code, not in the Accelerate config")
    return doc


def accelerate_yaml(plan: _Plan, options: LaunchOptions) -> str:
    return f"# Plan: {describe(plan)}\n" + _yaml(accelerate_config(plan))


def _yaml(mapping: dict[str, Any], indent: int = 0) -> str:
    """Block mapping; scalars as JSON scalars (valid YAML 1.2 flow scalars)."""
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:\n" + _yaml(value, indent + 2).rstrip("\n"))
        else:
            lines.append(" " * indent + f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


# -- torchtitan ------------------------------------------------------------------------------------

def torchtitan_config(plan: _Plan, options: LaunchOptions) -> dict[str, dict[str, Any]]:
    """torchtitan job config sections and keys (v0.2.2 torchtitan/config/job_config.py)."""
    c, w, spec = plan.config, plan.workload, plan.spec
    flavor = TORCHTITAN_LLAMA3_FLAVORS.get((spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads))
    if spec.family != "llama" or flavor is None:
        raise InvalidRequest(f"torchtitan ships llama3 model code in the 8B/70B/405B shapes; {spec.name} is not one "
                             "of them: export --format accelerate or deepspeed")
    if w.method != "full":
        raise InvalidRequest(f"torchtitan trains full models only; the plan uses {w.method}: export --format accelerate")
    if w.precision == "fp16":
        raise InvalidRequest("torchtitan has no fp16 mixed precision; re-plan with --precision bf16, or export --format deepspeed")
    if c.offload == "optimizer":
        raise InvalidRequest("torchtitan (FSDP2) cannot offload the optimizer alone; re-plan with --offload none or "
                             "params, or export --format deepspeed")
    pipelined = c.pp > 1
    training = {"local_batch_size": c.micro_batch_size * (c.num_micro_batches if pipelined else 1),
                "global_batch_size": w.global_batch, "seq_len": w.seq_len,
                "mixed_precision_param": "float32" if w.precision == "fp32" else "bfloat16",
                "enable_cpu_offload": c.offload == "params"}
    if options.steps is not None:
        training["steps"] = options.steps
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": 1 if c.zero >= 1 else c.dp,
        "data_parallel_shard_degree": c.dp if c.zero >= 1 else 1,
        "fsdp_reshard_after_forward": "always" if c.zero == 3 else "never",
        "tensor_parallel_degree": c.tp, "pipeline_parallel_degree": c.pp,
        "pipeline_parallel_schedule": "Interleaved1F1B" if c.vpp > 1 else "1F1B",
        "pipeline_parallel_microbatch_size": c.micro_batch_size}
    if c.vpp > 1:
        parallelism["pipeline_parallel_layers_per_stage"] = spec.num_layers // (c.pp * c.vpp)
    if c.zero == 1:
        plan.notes.append("FSDP has no ZeRO-1; zero 1 becomes fsdp_reshard_after_forward never (ZeRO-2-like)")
    if c.tp > 1 and not c.sequence_parallel:
        plan.notes.append("torchtitan always uses sequence parallelism with tp (slightly less memory than planned)")
    model: dict[str, Any] = {"name": "llama3", "flavor": flavor}
    if w.precision == "fp8":
        model["converters"] = ["quantize.linear.float8"]
    return {"job": {"dump_folder": options.output, "description": describe(plan)}, "model": model,
            "optimizer": {"name": "AdamW", "implementation": {"forloop": "for-loop"}.get(w.optimizer_impl, w.optimizer_impl)},
            "training": training, "parallelism": parallelism,
            "activation_checkpoint": {"mode": c.recompute, "selective_ac_option": "op"}}


def torchtitan_toml(plan: _Plan, options: LaunchOptions) -> str:
    sections = torchtitan_config(plan, options)
    lines = ["# torchtitan job config (TOML, torchtitan 0.2.x: --job.config_file this.toml);",
             "# torchtitan >= 0.3 takes the same keys as overrides, e.g. --parallelism.tensor_parallel_degree"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_char(ch: str) -> str:
    code = ord(ch)
    if ch in '"\\':
        return "\\" + ch
    if code < 0x20 or code == 0x7F:
        return f"\\u{code:04x}"
    return "?" if 0xD800 <= code <= 0xDFFF else ch  # a lone surrogate cannot be written as UTF-8


def _toml_value(value: Any) -> str:
    """A TOML value: strings as basic strings (TOML 1.0: the quote, the backslash and every control
    character escaped), lists of them, and numbers and booleans as JSON writes them (the same in TOML)."""
    if isinstance(value, str):
        return '"' + "".join(_toml_char(ch) for ch in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, (bool, int, float)) and math.isfinite(value), value
    return json.dumps(value)
