"""The Plan: the one thing the planner hands to the executor and to every export (the contract
between planner/ and executor/: the executor checks a Plan but never re-derives it).

A Plan is typed and frozen. What can be derived (micro-batches, the layers of each pipeline stage,
the rank order, the dtypes, the node count) is derived, written into the file for the programs
that read it, and checked against the degrees when a file is loaded: a hand-edited plan that
contradicts itself is a one-line error (exit 2), never a half-run job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.errors import InvalidRequest, read_json
from planner.layout import (OFFLOAD, RANK_ORDER, RECOMPUTE, ZERO, Dtypes, ParallelConfig, dtypes_for,
                            num_micro_batches, schedule_name, stage_layers)
from planner.capabilities import TARGETS
from planner.rules import check_config, option_reason, structural_reason
from planner.specs import Cluster, Hardware, ModelSpec, Workload
from planner.models import check_spec_matches_config
from planner.strict import strict_dataclass
from planner.validity import check_sequence

__all__ = ["OFFLOAD", "RECOMPUTE", "ZERO", "ParallelConfig", "Plan", "check_config", "load_plan", "num_micro_batches",
           "option_reason", "save_plan", "structural_reason", "PLAN_FORMAT"]

PLAN_VERSION = 2
PLAN_FORMAT = f"llm-planner/plan@{PLAN_VERSION}"
_FORMAT_RE = re.compile(r"^llm-planner/plan@(\d+)$")
_TOP_KEYS = ("format", "model", "hardware", "cluster", "workload", "config", "layout", "dtypes", "target",
             "prediction", "calibration", "runner_ups")


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    hardware: Hardware
    num_devices: int
    devices_per_node: int
    workload: Workload
    config: ParallelConfig
    target: str = "executor"  # the engine it was ranked for (planner/capabilities.py TARGETS)
    prediction: dict[str, Any] = field(default_factory=dict, compare=False)
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)
    runner_ups: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidRequest(f"plan target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        check_config(self.model, self.workload, self.cluster, self.config)
        check_sequence(self.model, self.workload.seq_len)  # learned positions end where the model's do

    @property
    def cluster(self) -> Cluster:
        return Cluster(hardware=self.hardware, num_devices=self.num_devices, devices_per_node=self.devices_per_node)

    @property
    def stages(self) -> list[list[int]]:
        """Decoder-layer indices of each (virtual) pipeline stage; virtual stage c x pp + r on rank r."""
        return stage_layers(self.model.num_layers, self.config.pp, self.config.vpp)

    @property
    def dtypes(self) -> Dtypes:
        return dtypes_for(self.workload)

    def layout(self) -> dict[str, Any]:
        c = self.config
        return {"stages": self.stages, "schedule": schedule_name(c), "rank_order": list(RANK_ORDER),
                "mesh_shape": [c.pp, c.dp, c.cp, c.tp], "num_nodes": self.cluster.num_nodes}

    def with_runner_up(self, index: int) -> Plan:
        """The plan rewritten for its index-th runner-up (same model, cluster and workload)."""
        candidate = self.runner_ups[index]
        config = ParallelConfig.from_dict({k: v for k, v in (candidate.get("config") or {}).items()
                                           if k in ParallelConfig.__dataclass_fields__})
        return replace(self, config=config, prediction=candidate, runner_ups=self.runner_ups[index + 1:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "cluster": {"num_devices": self.num_devices, "devices_per_node": self.devices_per_node,
                        "num_nodes": self.cluster.num_nodes},
            "workload": self.workload.to_dict(),
            "config": self.config.to_dict(),
            "layout": self.layout(),
            "dtypes": self.dtypes.to_dict(),
            "target": self.target,
            "prediction": self.prediction,
            "calibration": self.calibration,
            "runner_ups": list(self.runner_ups),
        }

    @classmethod
    def from_dict(cls, document: Any, where: str = "plan") -> Plan:
        """Strict: unknown keys, wrong types, a newer format, a layout that contradicts the degrees."""
        if not isinstance(document, dict):
            raise InvalidRequest(f"{where} is not a plan (a JSON object with format {PLAN_FORMAT!r}); "
                                 "write one with `planner suggest ... --save-plan PATH`")
        _check_format(document.get("format"), where)
        unknown = sorted(set(document) - set(_TOP_KEYS))
        if unknown:
            raise InvalidRequest(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
        for key in ("model", "hardware", "cluster", "workload", "config"):
            if key not in document:
                raise InvalidRequest(f"{where} lacks {key!r}; write it again with --save-plan")
        plan = cls(model=strict_dataclass(ModelSpec, document["model"], f"{where}: model"),
                   hardware=strict_dataclass(Hardware, document["hardware"], f"{where}: hardware"),
                   workload=_workload(document["workload"], where),
                   config=strict_dataclass(ParallelConfig, document["config"], f"{where}: config"),
                   target=_typed(document.get("target", "executor"), str, f"{where}: target"),
                   prediction=_typed(document.get("prediction") or {}, dict, f"{where}: prediction"),
                   calibration=_typed(document.get("calibration") or {}, dict, f"{where}: calibration"),
                   runner_ups=tuple(_typed(document.get("runner_ups") or [], list, f"{where}: runner_ups")),
                   **_cluster(document["cluster"], where))
        _check_derived(plan, document, where)
        check_spec_matches_config(plan.model)  # the executor builds the hf_config, not the spec
        return plan


def is_plan_format(value: Any) -> bool:
    """A plan format this planner reads (this version or an older one)."""
    match = _FORMAT_RE.match(value) if isinstance(value, str) else None
    return bool(match) and int(match.group(1)) <= PLAN_VERSION


def _check_format(value: Any, where: str) -> None:
    match = _FORMAT_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise InvalidRequest(f"{where} is not a plan (format {PLAN_FORMAT!r}); write one with "
                             "`planner suggest ... --save-plan PATH`")
    if int(match.group(1)) > PLAN_VERSION:
        raise InvalidRequest(f"{where} has format {value!r}, newer than this planner reads ({PLAN_FORMAT}); "
                             "upgrade llm-planner or write the plan again with this version")


def _typed(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRequest(f"{where} must be {'a list' if kind is list else 'a ' + kind.__name__}, "
                             f"got {type(value).__name__}")
    if kind is list and not all(isinstance(item, dict) for item in value):
        raise InvalidRequest(f"{where} must be a list of candidate objects")
    return value


def _workload(data: Any, where: str) -> Workload:
    workload = strict_dataclass(Workload, data, f"{where}: workload")
    return replace(workload, lora_targets=tuple(workload.lora_targets))


def _cluster(data: Any, where: str) -> dict[str, int]:
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where}: cluster must be a JSON object")
    unknown = sorted(set(data) - {"num_devices", "devices_per_node", "num_nodes", "hardware"})
    if unknown:
        raise InvalidRequest(f"{where}: cluster: unknown key(s) {', '.join(unknown)}")
    values = {}
    for key in ("num_devices", "devices_per_node"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequest(f"{where}: cluster.{key} must be a positive whole number, got {value!r}")
        values[key] = value
    return values


def _check_derived(plan: Plan, document: dict[str, Any], where: str) -> None:
    """Derived values written in the file must be what the degrees give (older files lack them)."""
    written = {"cluster.num_nodes": (document["cluster"].get("num_nodes"), plan.cluster.num_nodes),
               "layout": (_as_written_before_cp(document.get("layout"), plan), plan.layout()),
               "dtypes": (document.get("dtypes"), plan.dtypes.to_dict())}
    for key, (value, derived) in written.items():
        if value is not None and value != derived:
            raise InvalidRequest(f"{where}: {key} {json.dumps(value)[:120]} contradicts the plan's degrees and "
                                 f"workload (they give {json.dumps(derived)[:120]}); write the plan again with --save-plan")


def _as_written_before_cp(layout: Any, plan: Plan) -> Any:
    """Plans written before cp had rank order (pp, dp, tp): read with cp = 1 they are the same mesh."""
    if not isinstance(layout, dict) or layout.get("rank_order") != ["pp", "dp", "tp"] or plan.config.cp != 1:
        return layout
    shape = layout.get("mesh_shape")
    if isinstance(shape, list) and len(shape) == 3:
        shape = [shape[0], shape[1], 1, shape[2]]
    return {**layout, "rank_order": list(RANK_ORDER), "mesh_shape": shape}


def save_plan(path: str, plan: Plan | dict[str, Any]) -> None:
    from planner.outfile import write_text

    document = plan.to_dict() if isinstance(plan, Plan) else plan
    write_text(path, json.dumps(document, indent=2) + "\n", "plan")


def load_plan(path: str) -> Plan:
    """Read and check a Plan file (exit 2 with one line on anything wrong)."""
    return Plan.from_dict(read_json(path, "plan"), f"plan {path}")

