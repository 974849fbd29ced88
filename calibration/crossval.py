"""Honest error figures: leave-one-source-out cross-validation, and prediction intervals derived
from out-of-sample residuals.

Each publication (source file) is held out in turn: the profile is fitted on all the others and
the held-out runs are predicted with it. Residuals r = log(measured / predicted) of those
out-of-sample predictions give the intervals: the 5th and 95th percentiles of r. Coverage is itself checked out-of-sample (nested: the interval used
for a source is built from the other sources' residuals only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.cases import Case
from calibration.fitting import fit_profile, predictions, prepare
from calibration.validate import error_stats
from planner.profile import Profile
from planner.progress import progress

# a nominal 95 % interval: out of sample (nested leave-one-source-out), a 90 % one covered only
# 80 % of held-out throughputs and 79 % of held-out memory peaks, a 95 % one 89 % and 84 %
INTERVAL_QUANTILES = (2.5, 97.5)


def leave_one_source_out(cases: list[Case], base: Profile, jobs: int = 1) -> list[dict[str, Any]]:
    """One row per usable case with its out-of-sample predictions (folds run in `jobs` processes;
    a bar over the folds advances as each one ends)."""
    sources = sorted({c.publication for c in cases if c.usable})
    parts: dict[str, list[dict[str, Any]]] = {}
    with progress(len(sources), "cross-validation folds") as advance:
        if jobs <= 1:
            for source in sources:
                parts[source] = _held_out_rows(cases, base, source)
                advance()
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(jobs) as pool:
                futures = {pool.submit(_held_out_rows, cases, base, source): source for source in sources}
                for future in as_completed(futures):
                    parts[futures[future]] = future.result()
                    advance()
    return [row for source in sources for row in parts[source]]  # in source order, however they ended


def _held_out_rows(cases: list[Case], base: Profile, source: str) -> list[dict[str, Any]]:
    """Fit on every source but `source`, predict `source`'s runs."""
    training = [c for c in cases if c.usable and c.publication != source]
    held_out = [c for c in cases if c.usable and c.publication == source]
    data = fit_profile(training, base)
    prepared = prepare(held_out, base)
    tps, reserved, allocated = predictions(prepared, data)
    rows = []
    for item, t, r, a in zip(prepared, tps, reserved, allocated):
        case = item.case
        memory = a if case.memory_kind == "allocated" else r
        rows.append({"id": case.id, "source": source, "hardware": case.hardware_name, "vendor": _vendor(case),
                     "framework": item.context.workload.framework,
                     "throughput_residual": _log_ratio(case.tokens_per_s_per_device, t),
                     "memory_residual": _log_ratio(case.memory_bytes, memory)})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / p90 of |relative error| out of sample, by source and hardware, and the intervals."""
    def rel(values):
        return [float(np.expm1(-v)) if v is not None else None for v in values]  # predicted/measured - 1

    out: dict[str, Any] = {
        "throughput": error_stats(rel([r["throughput_residual"] for r in rows])),
        "memory": error_stats(rel([r["memory_residual"] for r in rows])),
        "by_source": {}, "by_hardware": {}, "by_framework": {},
    }
    for key, table in (("source", out["by_source"]), ("hardware", out["by_hardware"]),
                       ("framework", out["by_framework"])):
        for name in sorted({r.get(key, "executor") for r in rows}):
            members = [r for r in rows if r.get(key, "executor") == name]
            table[name] = {"throughput": error_stats(rel([r["throughput_residual"] for r in members])),
                           "memory": error_stats(rel([r["memory_residual"] for r in members]))}
    out["uncertainty"] = intervals(rows)
    out["coverage"] = nested_coverage(rows)
    return out


def intervals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Quantiles of log(measured / predicted): throughput overall, memory per vendor (with a
    default over all vendors for those with fewer than five runs)."""
    throughput = [r["throughput_residual"] for r in rows if r["throughput_residual"] is not None]
    memory_all = [r["memory_residual"] for r in rows if r["memory_residual"] is not None]
    result = {"quantiles": list(INTERVAL_QUANTILES), "throughput_log_residual": _quantiles(throughput),
              "memory_log_residual": {"default": _quantiles(memory_all)},
              "memory_margin": {"default": _margin(memory_all)}}
    for vendor in sorted({r["vendor"] for r in rows}):
        values = [r["memory_residual"] for r in rows if r["vendor"] == vendor and r["memory_residual"] is not None]
        if len(values) >= 5:
            result["memory_log_residual"][vendor] = _quantiles(values)
            result["memory_margin"][vendor] = _margin(values)
    result["uncalibrated_log_sd"] = {"chip": {"memory": _spread_of_medians(rows, "hardware")},
                                     "framework": {"memory": _spread_of_medians(rows, "framework")}}
    return result


def _spread_of_medians(rows: list[dict[str, Any]], key: str) -> float | None:
    """Root mean square, around 0, of each hardware's (framework's) median held-out memory residual:
    how far memory predictions of an unmeasured one may be off, beyond the residuals' own spread."""
    medians = []
    for name in sorted({r.get(key, "executor") for r in rows}):
        values = [r["memory_residual"] for r in rows if r.get(key, "executor") == name and r["memory_residual"] is not None]
        if values:
            medians.append(float(np.median(values)))
    return float(np.sqrt(np.mean(np.square(medians)))) if len(medians) >= 2 else None


def _margin(values: list[float]) -> float | None:
    """Headroom that covers 9 runs in 10 out of sample: the 90th percentile of how much the measured
    peak exceeded the prediction (0 when predictions err high)."""
    if len(values) < 3:
        return None
    return max(0.0, float(np.expm1(np.percentile(values, 90.0))))


def nested_coverage(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Share of runs whose measured value falls in an interval built without their source."""
    out = {}
    for key in ("throughput_residual", "memory_residual"):
        hits = total = 0
        for row in rows:
            if row[key] is None:
                continue
            others = [r[key] for r in rows if r["source"] != row["source"] and r[key] is not None]
            if len(others) < 5:
                continue
            low, high = np.percentile(others, INTERVAL_QUANTILES)
            hits += int(low <= row[key] <= high)
            total += 1
        out[key.replace("_residual", "")] = hits / total if total else None
    return out


def _quantiles(values: list[float]) -> list[float] | None:
    if len(values) < 3:
        return None
    return [float(v) for v in np.percentile(values, INTERVAL_QUANTILES)]


def _log_ratio(measured: float | None, predicted: float) -> float | None:
    if not measured or not predicted or not np.isfinite(predicted):
        return None
    return float(np.log(measured / predicted))


def _vendor(case: Case) -> str:
    from planner.hardware import load_hardware
    return load_hardware(case.hardware).vendor if case.hardware else "?"
