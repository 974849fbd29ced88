"""A measured run: what was trained (ModelSpec), where (Hardware, devices), how (Workload,
ParallelConfig), what was measured, and what the planner predicted at the time with which
calibration profile. One typed row serves every origin:

  executor   the training backend's DIR/summary.json (format `llm-planner/run@1`, below)
  published  a case of validation/cases.json (calibration/cases.py adapts it)
  user       a person's own CSV/JSONL row (calibration/flat.py)

The record form (`to_record` / `from_record`) is what the executor writes and what
`planner runs export --format jsonl` writes; it round-trips through the store. Like the Plan
(plan.py) it is part of the contract between the floors: the executor writes it, calibration reads
it, so it lives in planner, below both. Pure Python: no torch.
"""

from __future__ import annotations

import copy
import hashlib
import math
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from planner.errors import InvalidRequest, PlannerError
from planner.hardware import make_cluster
from planner.plan import PLAN_FORMAT, ParallelConfig, check_config, is_plan_format
from planner.runfields import (FieldError, canonical_json, choice, json_object, now_utc, number, optional_text,
                               text, utc_timestamp, whole)
from planner.specs import Cluster, Hardware, ModelSpec, Workload
from planner.validity import (MAX_DEVICE_MEMORY_BYTES, MAX_HOURS, MAX_STEPS, MAX_TOKENS_PER_S,
                              check_hardware_numbers, check_model, check_name, check_workload, show)

RUN_FORMAT = "llm-planner/run@1"
ORIGINS = ("executor", "published", "user")
STATUSES = ("finished", "failed", "oom")


MEASURED_BOUNDS = {"steps": MAX_STEPS, "tokens_per_s": MAX_TOKENS_PER_S, "tokens_per_s_per_device": MAX_TOKENS_PER_S,
                   "step_s": MAX_HOURS * 3600, "peak_allocated_bytes": MAX_DEVICE_MEMORY_BYTES,
                   "peak_reserved_bytes": MAX_DEVICE_MEMORY_BYTES}


@dataclass(frozen=True)
class Measured:
    """What a run measured. Memory as torch.cuda.max_memory_allocated / max_memory_reserved
    (TORCH-NOTES 'Measuring memory of real runs'); throughput over the timed steps."""

    steps: int | None = None
    tokens_per_s: float | None = None  # whole job
    tokens_per_s_per_device: float | None = None
    step_s: float | None = None
    peak_allocated_bytes: float | None = None  # tensor bytes of the most loaded device
    peak_reserved_bytes: float | None = None  # allocator reserve of the most loaded device
    loss_first: float | None = None
    loss_last: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_throughput_or_memory(self) -> bool:
        return any(getattr(self, name) is not None for name in ("tokens_per_s", "tokens_per_s_per_device", "step_s",
                                                                 "peak_allocated_bytes", "peak_reserved_bytes"))

    @classmethod
    def from_dict(cls, data: Any, num_devices: int | None, where: str = "measured") -> Measured:
        """Check every value; fill tokens_per_s from tokens_per_s_per_device or back (x devices)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise FieldError(where, "must be an object of measured values")
        prefix = f"{where}." if where else ""
        values: dict[str, Any] = {"steps": whole(data.get("steps"), f"{prefix}steps", minimum=0)}
        for name in ("tokens_per_s", "tokens_per_s_per_device", "step_s", "peak_allocated_bytes",
                     "peak_reserved_bytes"):
            values[name] = number(data.get(name), f"{prefix}{name}", positive=True)
        for name in ("loss_first", "loss_last"):  # a diverged run's NaN loss is kept as unknown
            loss = number(data.get(name), f"{prefix}{name}", minimum=None, finite=False)
            values[name] = loss if loss is None or math.isfinite(loss) else None
        for name, upper in MEASURED_BOUNDS.items():  # an overflowing value is a typo, not a measurement
            if values[name] is not None and values[name] > upper:
                raise FieldError(f"{prefix}{name}", f"{show(values[name])} is beyond any real measurement "
                                                   f"(at most {upper:.4g}); check the unit")
        return cls(**values)._with_totals(num_devices, prefix)

    def _with_totals(self, num_devices: int | None, prefix: str) -> Measured:
        total, per_device = self.tokens_per_s, self.tokens_per_s_per_device
        if not num_devices or (total is None and per_device is None):
            return self
        if total is None:
            return replace(self, tokens_per_s=per_device * num_devices)
        if per_device is None:
            return replace(self, tokens_per_s_per_device=total / num_devices)
        if not math.isclose(total / num_devices, per_device, rel_tol=0.01):
            raise FieldError(f"{prefix}tokens_per_s_per_device",
                             f"{per_device:g} is not tokens_per_s / devices = {total:g} / {num_devices} = "
                             f"{total / num_devices:g}; give one of the two")
        return self


@dataclass(frozen=True)
class Run:
    """One stored run. `spec`, `hardware`, `workload`, `config` are None only for `excluded`
    runs (kept so nothing is lost, e.g. a published case of an architecture we do not model)."""

    run_id: str
    origin: str
    status: str
    model_name: str
    hardware_name: str
    num_devices: int | None
    devices_per_node: int | None
    spec: ModelSpec | None
    hardware: Hardware | None
    workload: Workload | None
    config: ParallelConfig | None
    measured: Measured
    when: str | None = None  # when the run happened, ISO-8601 UTC; None if unknown
    source: str = ""  # where it came from: a file and line, a published table, ...
    error: str | None = None  # what went wrong, for failed / oom runs
    excluded: str | None = None  # why it cannot be used for fitting
    prediction: dict[str, Any] | None = None  # `planner predict --json` object made at the time
    calibration: dict[str, Any] | None = None  # the profile's summary (name, version, path)
    environment: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # origin-specific facts (published claims, ...)
    input: Any = None  # the row or record exactly as it was given
    recorded_at: str | None = None  # when it entered the store

    @property
    def usable(self) -> bool:
        """Can be used for fitting: finished, not excluded, fully described."""
        return (self.status == "finished" and self.excluded is None and None not in
                (self.spec, self.hardware, self.workload, self.config))

    @property
    def cluster(self) -> Cluster | None:
        if self.hardware is None or not self.num_devices or not self.devices_per_node:
            return None
        return Cluster(hardware=self.hardware, num_devices=self.num_devices, devices_per_node=self.devices_per_node)

    def request(self, calibration: str | None = None):
        """The planner.api.Request that describes this run (for predict, and for refitting)."""
        from planner.api import Request

        if self.spec is None or self.hardware is None or self.workload is None:
            reason = self.excluded or "no model or workload"
            raise InvalidRequest(f"run {self.run_id} is not fully described ({reason})")
        return Request(model=self.spec, gpu=self.hardware, gpus=self.num_devices,
                       gpus_per_node=self.devices_per_node, calibration=calibration, workload=self.workload)

    def predicted(self, *path: str) -> Any:
        """A value of the stored prediction, e.g. predicted("time", "tokens_per_s_per_device")."""
        value: Any = self.prediction
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    def content_sha256(self) -> str:
        """Identity of what ran and what was measured; not where it was read from, not the
        prediction (recomputed at import for published and user rows)."""
        facts = {"origin": self.origin, "status": self.status, "when": self.when, "error": self.error,
                 "excluded": self.excluded, "model_name": self.model_name, "hardware_name": self.hardware_name,
                 "num_devices": self.num_devices, "devices_per_node": self.devices_per_node,
                 **_parts(self), "measured": self.measured.to_dict()}
        if facts["workload"] and facts["workload"].get("framework") == "executor":
            del facts["workload"]["framework"]  # the default: ids of runs stored before it existed stay
        if facts["workload"] and not facts["workload"].get("fused_norm", True):
            del facts["workload"]["fused_norm"]  # likewise
        if facts["workload"] and facts["workload"].get("expert_dispatcher") == "alltoall":
            del facts["workload"]["expert_dispatcher"]  # likewise
        for key, default in (("recompute_modules", ""), ("moments_dtype", "fp32")):
            if facts["workload"] and facts["workload"].get(key, default) == default:
                facts["workload"].pop(key, None)  # likewise
        return hashlib.sha256(canonical_json(facts).encode()).hexdigest()


def _parts(run: Run) -> dict[str, Any]:
    return {"model": run.spec.to_dict() if run.spec else None,
            "hardware": run.hardware.to_dict() if run.hardware else None,
            "workload": run.workload.to_dict() if run.workload else None,
            "config": run.config.to_dict() if run.config else None}


def with_prediction(run: Run, calibration: str | None = None) -> Run:
    """The run with the planner's prediction for it, unless it already carries the one made at the
    time. A run the planner refuses keeps no prediction and says why in details."""
    if run.prediction is not None or run.spec is None or run.config is None or run.workload is None:
        return run
    from planner.api import predict
    from planner.profile import load_profile

    try:
        prediction = predict(run.request(calibration), run.config)
    except PlannerError as exc:
        return replace(run, details={**run.details, "prediction_error": str(exc)})
    return replace(run, prediction=prediction, calibration=load_profile(calibration).summary())


# -- the record form (executor's summary.json, JSONL export) ----------------------------------

def new_record(plan: dict[str, Any], measured: dict[str, Any], status: str = "finished", error: str | None = None,
               environment: dict[str, Any] | None = None, run_id: str | None = None,
               when: str | None = None) -> dict[str, Any]:
    """A run record as the executor writes it to DIR/summary.json (and passes to record_run)."""
    return {"format": RUN_FORMAT, "run_id": run_id or f"run-{uuid.uuid4().hex[:16]}", "when": when or now_utc(),
            "origin": "executor", "status": status, "error": error, "plan": plan, "measured": measured,
            "environment": environment or {}}


def to_record(run: Run) -> dict[str, Any]:
    cluster = {"num_devices": run.num_devices, "devices_per_node": run.devices_per_node,
               "num_nodes": run.cluster.num_nodes if run.cluster else None}
    plan = {"format": PLAN_FORMAT, **_parts(run), "cluster": cluster, "prediction": run.prediction,
            "calibration": run.calibration}
    return {"format": RUN_FORMAT, "run_id": run.run_id, "when": run.when, "origin": run.origin,
            "status": run.status, "error": run.error, "plan": plan, "measured": run.measured.to_dict(),
            "environment": run.environment, "source": run.source, "excluded": run.excluded,
            "model_name": run.model_name, "hardware_name": run.hardware_name, "details": run.details,
            "recorded_at": run.recorded_at, "input": run.input}


def from_record(record: Any, default_source: str = "") -> Run:
    """Check a run@1 record and type it. Keys beyond the format are kept in `input`, never refused:
    a run that cost GPU-hours is not lost over a key the executor added."""
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise FieldError("format", f"not a run record (expected format {RUN_FORMAT!r})")
    excluded = optional_text(record.get("excluded"), "excluded")
    plan = record.get("plan")
    if not isinstance(plan, dict) or not is_plan_format(plan.get("format")):
        raise FieldError("plan", f"must be a Plan document (format {PLAN_FORMAT!r})")
    spec, hardware, workload, config = _typed_parts(plan, lenient=excluded is not None)
    cluster = plan.get("cluster") if isinstance(plan.get("cluster"), dict) else {}
    num_devices = whole(cluster.get("num_devices"), "plan.cluster.num_devices")
    per_node = whole(cluster.get("devices_per_node"), "plan.cluster.devices_per_node")
    if excluded is None:
        per_node = _check_runnable(spec, hardware, workload, config, num_devices, per_node).devices_per_node
    origin = choice(record.get("origin"), "origin", ORIGINS)
    return Run(run_id=text(record.get("run_id"), "run_id"), origin=origin,
               status=choice(record.get("status"), "status", STATUSES),
               model_name=_name(record.get("model_name"), "model_name") or (spec.name if spec else "?"),
               hardware_name=_name(record.get("hardware_name"), "hardware_name") or (hardware.name if hardware else "?"),
               num_devices=num_devices, devices_per_node=per_node, spec=spec, hardware=hardware,
               workload=workload, config=config,
               measured=Measured.from_dict(record.get("measured"), num_devices),
               when=utc_timestamp(record.get("when")), error=optional_text(record.get("error"), "error"),
               source=optional_text(record.get("source"), "source") or default_source, excluded=excluded,
               prediction=json_object(plan.get("prediction"), "plan.prediction"),
               calibration=json_object(plan.get("calibration"), "plan.calibration"),
               environment=json_object(record.get("environment"), "environment") or {},
               details=json_object(record.get("details"), "details") or {},
               input=copy.deepcopy(record["input"] if "input" in record else record))


def _checked_spec(value: Any) -> ModelSpec:
    spec = ModelSpec.from_dict(value)
    check_model(spec)  # bounded sizes, a printable name (planner/validity.py)
    return spec


def _checked_hardware(value: Any) -> Hardware:
    hardware = Hardware.from_dict(value)
    check_hardware_numbers(hardware, "hardware")  # finite, positive, bounded: NaN cannot reach the store
    return hardware


def _name(value: Any, field_name: str) -> str | None:
    value = optional_text(value, field_name)
    if value is not None:
        try:
            check_name(value, field_name)  # names are printed in tables and written to exports
        except InvalidRequest as exc:
            raise FieldError(field_name, str(exc)) from None
    return value


def _typed_parts(plan: dict[str, Any], lenient: bool) -> tuple:
    readers = (("model", _checked_spec), ("hardware", _checked_hardware),
               ("workload", Workload.from_dict), ("config", ParallelConfig.from_dict))
    parts = []
    for key, reader in readers:
        value = plan.get(key)
        if value is None and lenient:
            parts.append(None)
            continue
        try:
            parts.append(reader(value))
        except (InvalidRequest, TypeError) as exc:
            raise FieldError(f"plan.{key}", str(exc)) from None
    return tuple(parts)


def _check_runnable(spec: ModelSpec, hardware: Hardware, workload: Workload, config: ParallelConfig,
                    num_devices: int | None, per_node: int | None) -> Cluster:
    if num_devices is None:
        raise FieldError("plan.cluster.num_devices", "missing; give the number of devices")
    try:
        cluster = make_cluster(hardware, num_devices, per_node)
        check_workload(workload, cluster.num_devices)
        check_config(spec, workload, cluster, config)
    except InvalidRequest as exc:
        raise FieldError("plan.config", str(exc)) from None
    return cluster
