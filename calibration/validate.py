"""Predicted vs measured on published runs: per case error, median and 90th percentile, and a
plausibility check of each claim against the hardware's peak FLOP/s and memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.case import Case, fraction_of_peak, memory_floor_bytes, request_for
from planner.api import predict
from planner.errors import PlannerError
from planner.hardware import load_hardware


@dataclass
class Row:
    case: Case
    predicted_tokens_per_s: float | None = None
    predicted_memory_bytes: float | None = None
    fits: bool | None = None
    capacity_bytes: float | None = None
    error: str | None = None  # why no prediction was made

    @property
    def ran_but_predicted_not_to_fit(self) -> bool:
        """Every case with a prediction is a run that trained (published, or stored and usable): it
        fit in its devices, so a prediction above their memory is a failure, memory figure or not."""
        return self.fits is False

    @property
    def capacity_error(self) -> float | None:
        """For a run that ran without a memory figure, how far the prediction exceeds the device: a
        lower bound of its memory error (the run held at most the device's memory); None when it fits."""
        if not self.ran_but_predicted_not_to_fit or self.case.memory_bytes or not self.capacity_bytes:
            return None
        return self.predicted_memory_bytes / self.capacity_bytes - 1

    @property
    def throughput_error(self) -> float | None:
        if self.predicted_tokens_per_s is None or not self.case.tokens_per_s_per_device:
            return None
        return self.predicted_tokens_per_s / self.case.tokens_per_s_per_device - 1

    @property
    def memory_error(self) -> float | None:
        if self.predicted_memory_bytes is None or not self.case.memory_bytes:
            return None
        return self.predicted_memory_bytes / self.case.memory_bytes - 1


def ran_within_device(case: Case) -> bool:
    """A usable run with no memory figure: it trained, so it held at most its device's memory (a
    bound for fitting). Not for a paged optimizer, whose states may have left the device."""
    return case.usable and not case.memory_bytes and not case.paged_optimizer


def predict_case(case: Case, calibration: str | None = None) -> Row:
    row = Row(case)
    if not case.usable:
        row.error = case.excluded
        return row
    try:
        p = predict(request_for(case, calibration), case.config)
    except PlannerError as exc:
        row.error = f"planner refused it: {exc}"
        return row
    row.predicted_tokens_per_s = p["time"]["tokens_per_s_per_device"]
    key = "allocated_peak_bytes" if case.memory_kind == "allocated" else "peak_bytes"
    row.predicted_memory_bytes = p["memory"][key]
    row.capacity_bytes = p["memory"]["capacity_bytes"]
    row.fits = p["fits"] or (case.paged_optimizer and _fits_without_paged_states(p))
    return row


def _fits_without_paged_states(prediction: dict[str, Any]) -> bool:
    """A paged optimizer's states can leave the device (bitsandbytes' paged optimizers: CUDA managed
    memory, evicted to host under pressure): the run fits when the rest does."""
    memory = prediction["memory"]
    return memory["peak_bytes"] - memory["breakdown"]["optimizer"] <= memory["capacity_bytes"]


def validate(cases: list[Case], calibration: str | None = None) -> dict[str, Any]:
    rows = [predict_case(c, calibration) for c in cases]
    return {"rows": rows, "throughput": error_stats([r.throughput_error for r in rows]),
            "memory": memory_stats(rows),
            "ran_but_predicted_not_to_fit": [r.case.id for r in rows if r.ran_but_predicted_not_to_fit],
            "by_source": _by_group(rows, lambda r: r.case.publication),
            "by_hardware": _by_group(rows, lambda r: r.case.hardware_name)}


def error_stats(errors: list[float | None]) -> dict[str, Any]:
    values = np.abs([e for e in errors if e is not None])
    if not len(values):
        return {"n": 0, "median_abs": None, "p90_abs": None}
    return {"n": int(len(values)), "median_abs": float(np.median(values)), "p90_abs": float(np.percentile(values, 90))}


def memory_stats(rows: list[Row]) -> dict[str, Any]:
    """Memory errors: measured peaks, and for runs that ran with no memory figure but were predicted
    above their devices, the excess over the device (a lower bound of the error) — a failure, not a
    row without error. `failed_to_fit` counts every run that ran but was predicted not to fit."""
    stats = error_stats([r.memory_error if r.memory_error is not None else r.capacity_error for r in rows])
    return {**stats, "failed_to_fit": sum(r.ran_but_predicted_not_to_fit for r in rows)}


def _by_group(rows: list[Row], key) -> dict[str, Any]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {name: {"throughput": error_stats([r.throughput_error for r in members]),
                   "memory": memory_stats(members)} for name, members in groups.items()}


def plausibility(case: Case) -> dict[str, Any] | None:
    """A claim needs at least 6·N FLOPs per token (no attention, no recomputation; 4·N when LoRA /
    QLoRA freeze the weights, which then get no weight gradients): flag it when that exceeds the
    devices' peak, when the memory claimed exceeds the device, or when it is below what its own
    configuration must hold (`memory_floor_bytes`)."""
    if case.spec is None or case.hardware is None:
        return None
    flags = {}
    if case.claimed_tokens_per_s_per_device:
        frozen = case.workload is not None and case.workload.method != "full"
        flags["fraction_of_peak_min_flops"] = fraction_of_peak(case, 4 if frozen else 6)
    if case.memory_bytes:
        flags["fraction_of_memory"] = case.memory_bytes / load_hardware(case.hardware).memory_bytes
        floor = memory_floor_bytes(case)
        if floor is not None:
            flags["fraction_floor_of_claim"] = floor / case.memory_bytes
    flags["plausible"] = all(v <= 1.0 for k, v in flags.items() if k.startswith("fraction"))
    return flags
