"""The flat run schema: one run per CSV row or JSONL line, for people's own measurements and for
`planner runs export --format csv`. Every column is optional except model, gpu, gpus, seq_len,
global_batch and one measured value of a finished run; COLUMNS says what each means (the README's
"Measured runs" section lists them too).

A row is checked the way `planner predict` checks its options (planner.api.resolve, then
planner.plan.check_config), and an error names the column: `runs.csv:7: tp: ...`.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from planner.errors import InvalidRequest, PlannerError
from planner.hardware import load_hardware, make_cluster, presets
from planner.models import catalog, load_model
from planner.plan import ParallelConfig, check_config
from planner.runfields import (FieldError, blank, choice, flag, json_object, number, optional_text, utc_timestamp,
                               whole)
from planner.runrecord import ORIGINS, STATUSES, Measured, Run
from planner.specs import OPTIMIZER_IMPLS, Hardware, ModelSpec, Workload

GIB = 2**30

COLUMNS: dict[str, str] = {
    "run_id": "unique id (default: derived from the row's content, so importing a row twice stores it once)",
    "when": "when the run happened, ISO-8601 (taken as UTC without an offset)",
    "origin": "user (default); published or executor in rows that `planner runs export` wrote",
    "source": "where the numbers come from (default FILE:LINE)",
    "status": "finished (default), failed or oom",
    "error": "what went wrong, for failed / oom runs",
    "excluded": "why the run must not be used for fitting (stored, flagged; other columns may then be empty)",
    "model": "catalog name (`planner models`) or a config.json / folder path (relative to the file)",
    "model_spec": "instead of a catalog model: the model as JSON (a Plan's 'model')",
    "gpu": "hardware preset (`planner hardware`) or a hardware JSON path",
    "hardware_spec": "instead of a preset: the hardware as JSON (a Plan's 'hardware')",
    "gpus": "total number of devices",
    "gpus_per_node": "devices per node (default from the preset)",
    # the workload's columns and their meanings are the Workload's own fields (planner/specs.py)
    **{f.name: f.metadata["help"] for f in fields(Workload)},
    "dp": "data parallel degree (default gpus / (tp x pp x cp))", "tp": "tensor parallel degree (default 1)",
    "pp": "pipeline stages (default 1)", "micro_batch_size": "sequences per micro-batch (default 1)",
    "num_micro_batches": "micro-batches per step (default global_batch / (dp x micro_batch_size))",
    "recompute": "none (default), selective or full", "zero": "0 (default), 1, 2 or 3",
    "offload": "none (default), optimizer or params", "sequence_parallel": "true or false (default)",
    "vpp": "virtual pipeline stages (default 1)",
    "cp": "context parallel degree (default 1)", "ep": "expert parallel degree (default 1)",
    "shard_ends": "true or false (default): zero 3 with the embedding and LM head as FSDP units of their own",
    "steps": "measured optimizer steps",
    "tokens_per_s": "measured tokens/s of the whole job",
    "tokens_per_s_per_device": "measured tokens/s per device",
    "step_s": "measured seconds per optimizer step",
    "peak_allocated_bytes": "peak tensor bytes of the most loaded device (torch.cuda.max_memory_allocated)",
    "peak_reserved_bytes": "peak reserved bytes of the most loaded device (torch.cuda.max_memory_reserved)",
    "peak_memory_gib": "instead of peak_reserved_bytes: the same in GiB",
    "loss_first": "loss of the first step", "loss_last": "loss of the last step",
    "prediction": "the planner's prediction made at the time, as JSON (default: predicted at import)",
    "calibration": "the calibration profile summary of that prediction, as JSON",
    "environment": "software and machine facts, as JSON", "details": "other facts, as JSON",
    "input": "the original record, as JSON (written by export so that nothing is lost)",
}
WORKLOAD_COLUMNS = tuple(f.name for f in fields(Workload))
CONFIG_COLUMNS = tuple(f.name for f in fields(ParallelConfig))
MEASURED_COLUMNS = tuple(f.name for f in fields(Measured))
WHOLE = {"seq_len": 1, "global_batch": 1, "lora_rank": 1, "loss_chunks": 1, "dp": 1, "tp": 1, "pp": 1,
         "micro_batch_size": 1, "num_micro_batches": 1, "vpp": 1, "zero": 0, "gpus": 1, "gpus_per_node": 1,
         "cp": 1, "ep": 1}
FLAGS = ("activation_offload", "optimizer_in_backward", "compile", "loss_parallel", "fp32_logits", "sequence_parallel",
         "shard_ends", "fused_loss", "fused_norm")


def run_from_flat(row: dict[str, Any], where: str, base_dir: Path | None = None) -> Run:
    """Check one row and type it (no prediction yet: the importer adds it for every origin)."""
    check_columns(row)
    values = {name: (None if blank(value) else value) for name, value in row.items()}
    excluded = optional_text(values.get("excluded"), "excluded")
    parts = _lenient_parts(values, base_dir) if excluded else _checked_parts(values, base_dir)
    spec, hardware, workload, config, num_devices, per_node = parts
    measured = _measured(values, num_devices)
    status = choice(values.get("status") or "finished", "status", STATUSES)
    origin = choice(values.get("origin") or "user", "origin", ORIGINS)
    if origin == "user" and status == "finished" and not excluded and not measured.has_throughput_or_memory:
        raise FieldError("tokens_per_s_per_device", "a finished run needs a measured value: give tokens_per_s"
                         "(_per_device), step_s, peak_reserved_bytes, peak_allocated_bytes or peak_memory_gib")
    run = Run(run_id="", origin=origin, status=status,
              model_name=spec.name if spec else str(values.get("model") or "?"),
              hardware_name=hardware.name if hardware else str(values.get("gpu") or "?"),
              num_devices=num_devices, devices_per_node=per_node, spec=spec, hardware=hardware, workload=workload,
              config=config, measured=measured, when=utc_timestamp(values.get("when")),
              source=optional_text(values.get("source"), "source") or where,
              error=optional_text(values.get("error"), "error"), excluded=excluded,
              prediction=json_object(values.get("prediction"), "prediction"),
              calibration=json_object(values.get("calibration"), "calibration"),
              environment=json_object(values.get("environment"), "environment") or {},
              details=json_object(values.get("details"), "details") or {},
              input=_original(values.get("input"), row))
    run_id = optional_text(values.get("run_id"), "run_id") or f"user-{run.content_sha256()[:16]}"
    return replace(run, run_id=run_id)


def check_columns(names) -> None:
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], COLUMNS, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; see the README's Measured runs"
        raise FieldError(unknown[0], f"unknown column{hint}")


def _original(given: Any, row: dict[str, Any]) -> Any:
    """The record as first given: an exported row carries it in `input`; otherwise the row itself."""
    if given is None:
        return dict(row)
    if isinstance(given, str):
        try:
            return json.loads(given)
        except json.JSONDecodeError as exc:
            raise FieldError("input", f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
        except (RecursionError, ValueError):  # nested 100,000 deep; an integer of over 4300 digits
            raise FieldError("input", "is nested too deep or holds an unreadable number") from None
    return given


def _checked_parts(values: dict[str, Any], base_dir: Path | None) -> tuple:
    """Model, hardware, workload and config, checked as `planner predict` checks its options."""
    from planner.api import Request, resolve

    spec, hardware = _spec(values, base_dir), _hardware(values, base_dir)
    if values.get("gpus") is None:
        raise FieldError("gpus", "missing; give the total number of devices")
    for name in ("seq_len", "global_batch"):
        if values.get(name) is None:
            raise FieldError(name, "missing; a run needs seq_len and global_batch")
    typed = _typed(values)
    workload = {name: typed[name] for name in WORKLOAD_COLUMNS if typed.get(name) is not None}
    request = Request(model=spec, gpu=hardware, gpus=typed["gpus"], gpus_per_node=typed.get("gpus_per_node"),
                      **workload)
    try:
        resolved = resolve(request)
        config = _config(typed, resolved.workload.global_batch, resolved.cluster.num_devices)
        check_config(resolved.spec, resolved.workload, resolved.cluster, config)
    except FieldError:
        raise
    except InvalidRequest as exc:
        raise FieldError(_column_named_in(str(exc)), str(exc)) from None
    cluster = resolved.cluster
    return spec, hardware, resolved.workload, config, cluster.num_devices, cluster.devices_per_node


def _lenient_parts(values: dict[str, Any], base_dir: Path | None) -> tuple:
    """An excluded run keeps whatever parts can be read; the rest stays None."""
    def attempt(make):
        try:
            return make()
        except (PlannerError, TypeError, ValueError):
            return None

    spec, hardware = attempt(lambda: _spec(values, base_dir)), attempt(lambda: _hardware(values, base_dir))
    typed = _typed(values)
    workload = attempt(lambda: Workload(**{n: typed[n] for n in WORKLOAD_COLUMNS if typed.get(n) is not None}))
    config = None
    if workload is not None and typed.get("gpus") and typed.get("dp"):
        config = attempt(lambda: _config(typed, workload.global_batch, typed["gpus"]))
    per_node = typed.get("gpus_per_node")
    if hardware is not None and typed.get("gpus"):
        cluster = attempt(lambda: make_cluster(hardware, typed["gpus"], per_node))
        per_node = cluster.devices_per_node if cluster else per_node
    return spec, hardware, workload, config, typed.get("gpus"), per_node


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for name in WORKLOAD_COLUMNS + CONFIG_COLUMNS + ("gpus", "gpus_per_node"):
        value = values.get(name)
        if name in WHOLE:
            typed[name] = whole(value, name, minimum=WHOLE[name])
        elif name in FLAGS:
            typed[name] = flag(value, name)
        elif name == "lora_targets" and isinstance(value, str):
            typed[name] = tuple(t.strip() for t in value.split(",") if t.strip())
        elif name == "lora_targets" and value is not None:
            typed[name] = tuple(value) if isinstance(value, list) else value
        else:
            typed[name] = value
    if typed.get("optimizer_impl") is not None:
        choice(typed["optimizer_impl"], "optimizer_impl", OPTIMIZER_IMPLS)
    return typed


def _config(typed: dict[str, Any], global_batch: int, devices: int) -> ParallelConfig:
    """Unset degrees as `planner predict` fills them: pure data parallelism, micro-batch 1."""
    tp, pp, mbs = typed.get("tp") or 1, typed.get("pp") or 1, typed.get("micro_batch_size") or 1
    cp = typed.get("cp") or 1
    if devices % (tp * pp * cp):
        raise FieldError("tp", f"tp x pp x cp = {tp} x {pp} x {cp} does not divide the {devices} devices (gpus)")
    dp = typed.get("dp") or devices // (tp * pp * cp)
    if global_batch % (dp * mbs):
        raise FieldError("global_batch", f"{global_batch} is not divisible by dp x micro_batch_size = {dp} x {mbs}")
    micro_batches = global_batch // (dp * mbs)
    if typed.get("num_micro_batches") not in (None, micro_batches):
        raise FieldError("num_micro_batches", f"is {typed['num_micro_batches']} but global_batch / (dp x "
                         f"micro_batch_size) = {micro_batches}; leave it empty or fix it")
    options = ("recompute", "zero", "offload", "sequence_parallel", "vpp", "shard_ends", "cp", "ep")
    given = {name: typed[name] for name in options if typed.get(name) is not None}
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=micro_batches, **given)


def _spec(values: dict[str, Any], base_dir: Path | None) -> ModelSpec:
    return _described(values, "model", "model_spec", base_dir, lambda ref: load_model(ref), ModelSpec.from_dict)


def _hardware(values: dict[str, Any], base_dir: Path | None) -> Hardware:
    return _described(values, "gpu", "hardware_spec", base_dir, lambda ref: load_hardware(ref), Hardware.from_dict)


def _described(values: dict[str, Any], name_column: str, spec_column: str, base_dir: Path | None,
               by_name, from_dict) -> Any:
    """A model or hardware by name / path, or as a JSON spec (whose name must then agree)."""
    name = values.get(name_column)
    try:
        if values.get(spec_column) is not None:
            made = from_dict(json_object(values[spec_column], spec_column))
            if name is not None and str(name) != made.name:
                raise FieldError(name_column, f"{name!r} differs from {spec_column}'s name {made.name!r}; "
                                 "give one of them")
            return made
        if name is None:
            raise FieldError(name_column, f"missing; give {name_column} or {spec_column}")
        ref = str(name)
        if base_dir is not None and not Path(ref).is_absolute() and (base_dir / ref).exists():
            ref = str(base_dir / ref)
        return by_name(ref)
    except FieldError:
        raise
    except (InvalidRequest, TypeError) as exc:
        column = spec_column if values.get(spec_column) is not None else name_column
        raise FieldError(column, str(exc)) from None


def _measured(values: dict[str, Any], num_devices: int | None) -> Measured:
    data = {name: values.get(name) for name in MEASURED_COLUMNS}
    gib = number(values.get("peak_memory_gib"), "peak_memory_gib", positive=True)
    if gib is not None:
        if data["peak_reserved_bytes"] is not None:
            raise FieldError("peak_memory_gib", "give peak_memory_gib or peak_reserved_bytes, not both")
        data["peak_reserved_bytes"] = gib * GIB
    return Measured.from_dict(data, num_devices, where="")


def _column_named_in(message: str) -> str:
    """The column a planner message is about: its `--option`, else its first word."""
    found = re.search(r"--([a-z][a-z-]*)", message)
    candidates = [found.group(1).replace("-", "_")] if found else []
    candidates.append(message.split(" ", 1)[0].strip(":"))
    return next((c for c in candidates if c in COLUMNS), "row")


# -- export -------------------------------------------------------------------------------------

def flat_row(run: Run) -> dict[str, str]:
    """The run as one CSV row of COLUMNS (without peak_memory_gib); importing it gives the run back."""
    values: dict[str, Any] = {
        "run_id": run.run_id, "when": run.when, "origin": run.origin, "source": run.source, "status": run.status,
        "error": run.error, "excluded": run.excluded, "model": run.model_name, "gpu": run.hardware_name,
        "model_spec": _unless_preset(run.spec, _catalog_spec(run.spec)),
        "hardware_spec": _unless_preset(run.hardware, presets().get(run.hardware.name) if run.hardware else None),
        "gpus": run.num_devices, "gpus_per_node": run.devices_per_node,
        **(run.workload.to_dict() if run.workload else {}), **(run.config.to_dict() if run.config else {}),
        **run.measured.to_dict(), "prediction": run.prediction, "calibration": run.calibration,
        "environment": run.environment or None, "details": run.details or None, "input": run.input,
    }
    return {name: _cell(values.get(name)) for name in COLUMNS if name != "peak_memory_gib"}


def _catalog_spec(spec: ModelSpec | None) -> ModelSpec | None:
    if spec is None or spec.name.lower() not in catalog():
        return None
    return load_model(spec.name.lower())


def _unless_preset(made: ModelSpec | Hardware | None, preset: ModelSpec | Hardware | None) -> dict | None:
    if made is None or (preset is not None and preset.to_dict() == made.to_dict()):
        return None
    return made.to_dict()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)
