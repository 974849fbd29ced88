"""What a set of measured runs can calibrate, so that a fit stays where its data is.

Runs of one chip move that chip's (and its parts') parameters; runs of one framework move that
framework's factors (planner/profile.py frameworks.<name>) when the data can tell them apart from
its chips; the parameters every chip shares move only when the runs span enough chips to say
something about chips in general. A chip or framework the runs never measured keeps its values,
bit for bit, and is flagged as uncalibrated by the planner (its intervals widened by the spread
across the calibrated ones: `spread`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.hardware import chip_of

# Shared (default-level) efficiencies, link and overlap parameters are fitted only on runs of at
# least this many chips: with one or two, what looks general may be the chip's own.
MIN_CHIPS_FOR_SHARED = 3

# what each framework has of its own: (lower, upper, prior sigma of log(factor)). The prior centre
# is the base profile's factor (1 in calibration/profiles/initial.json: the chip's own values), so
# a framework with few runs is shrunk towards its chips' values, as a chip is towards the shared
# ones. GEMM efficiency differs between stacks by tens of percent at most (the same cuBLAS /
# CUTLASS kernels; fusion and layouts differ), attention and fp8 recipes more (flash-attn vs
# cuDNN vs SDPA; TE's delayed scaling vs torchao's tensorwise casts), launch overhead by orders of
# magnitude (CUDA graphs vs eager Python).
FRAMEWORK_PARAMS = {"matmul_factor": (0.3, 2.0, 0.2), "attention_factor": (0.3, 2.0, 0.3),
                    "fp8_factor": (0.3, 2.5, 0.3), "layer_overhead_factor": (0.01, 100.0, 1.0)}


@dataclass(frozen=True)
class Scope:
    chips: dict[str, str]  # each measured part -> its chip
    frameworks: tuple[str, ...]  # frameworks whose own factors the runs identify
    fp8_frameworks: tuple[str, ...]  # of those, the ones with float8 runs
    shared: bool  # the runs span enough chips to fit the shared parameters

    @property
    def chip_names(self) -> set[str]:
        return set(self.chips.values())

    @property
    def parts_apart(self) -> frozenset[str]:
        """Parts whose own values are fitted apart from their chip's: those of a chip measured on
        two parts or more (on one, the part and its chip are the same unknowns)."""
        return frozenset(name for name, chip in self.chips.items()
                         if chip != name and sum(c == chip for c in self.chips.values()) >= 2)


def scope_of(items: list[Any]) -> Scope:
    """The scope of prepared throughput runs (calibration/fitting.py Prepared)."""
    chips = {p.context.hardware.name: chip_of(p.context.hardware) for p in items}
    seen: dict[str, set[str]] = {}  # framework -> chips it ran on
    for p in items:
        seen.setdefault(p.context.workload.framework, set()).add(chip_of(p.context.hardware))
    identified = tuple(sorted(f for f, on in seen.items() if _identified(f, on, seen)))
    fp8 = tuple(sorted({p.context.workload.framework for p in items if p.context.workload.precision == "fp8"}
                       & set(identified)))
    return Scope(chips, identified, fp8, len(set(chips.values())) >= MIN_CHIPS_FOR_SHARED)


def _identified(framework: str, on: set[str], seen: dict[str, set[str]]) -> bool:
    """A framework's factors are told apart from its chips' efficiencies when it ran on two chips,
    or on a chip that other frameworks ran on too."""
    return len(on) >= 2 or any(other != framework and on & chips for other, chips in seen.items())


def runs_of_parameter(path: tuple[str, ...], items: list[Any]) -> list[Any]:
    """The runs whose residuals a parameter moves: a chip's or part's runs, a framework's runs, the MoE
    models' runs, or all."""
    if path[0] == "frameworks":
        return [p for p in items if p.context.workload.framework == path[1]
                and (path[-1] != "fp8_factor" or p.context.workload.precision == "fp8")]
    if path[0] == "compute" and path[1] != "default":
        return [p for p in items if path[1] in (p.context.hardware.name, chip_of(p.context.hardware))]
    if path[0] == "moe":  # the MoE costs move only the runs of MoE models
        return [p for p in items if p.context.spec.is_moe]
    return list(items)


def record(paths: list[tuple[str, ...]], items: list[Any]) -> dict[str, dict[str, Any]]:
    """What each fitted parameter was fitted on: its runs' count, hardware and frameworks."""
    out = {}
    for path in paths:
        runs = runs_of_parameter(path, items)
        out[".".join(path)] = {"runs": len(runs), "hardware": sorted({p.context.hardware.name for p in runs}),
                               "frameworks": sorted({p.context.workload.framework for p in runs})}
    return out


def spread(data: dict[str, Any], chips: set[str]) -> dict[str, float | None]:
    """Standard deviations of log(efficiency) across the calibrated chips (around the shared value)
    and of log(factor) across the calibrated frameworks (around 1): how far an unmeasured chip or
    framework may lie from what the planner assumes for it. None with fewer than two."""
    compute, shared = data["compute"], data["compute"]["default"]["*"]["matmul_efficiency_max"]
    chip_logs = [np.log(compute[c]["*"]["matmul_efficiency_max"] / shared) for c in sorted(chips)
                 if "matmul_efficiency_max" in compute.get(c, {}).get("*", {})]
    factors = data.get("frameworks") or {}
    framework_logs = [np.log(entry.get("matmul_factor", 1.0)) for entry in factors.values()]
    return {"chip": _rms(chip_logs), "framework": _rms(framework_logs)}


def _rms(logs: list[float]) -> float | None:
    """Root mean square around 0 (the value assumed for an unmeasured one), not around the mean."""
    return float(np.sqrt(np.mean(np.square(logs)))) if len(logs) >= 2 else None
