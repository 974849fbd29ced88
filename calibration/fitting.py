"""Fit the calibration profile's free parameters to measured runs (the fitting itself; fit.py
reads the runs, cross-validates with crossval.py and writes the profile).

Throughput: `scipy.optimize.least_squares` on log(predicted / measured) tokens/s per device,
with bounds and a Gaussian prior on every parameter (in log space for scales) so that a few runs
move the parameters sensibly and many runs pin them down. Memory: the allocator/framework
overhead (reserved = allocated × (1 + fragmentation) + fixed) on runs with a measured reserved peak.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from calibration.case import request_for
from calibration.cases import Case
from calibration.scope import FRAMEWORK_PARAMS, Scope, record, runs_of_parameter, scope_of, spread
from calibration.validate import ran_within_device
from planner.api import resolve
from planner.cost.candidates import Candidates
from planner.cost.context import Context
from planner.cost.estimate import evaluate, tokens_per_second
from planner.errors import PlannerError
from planner.hardware import chip_of, presets
from planner.plan import check_config
from planner.profile import Profile
from planner.progress import progress

INITIAL_PROFILE = Path(__file__).resolve().parent / "profiles" / "initial.json"


@dataclass(frozen=True)
class Parameter:
    path: tuple[str, ...]  # where it lives in the profile JSON
    initial: float
    lower: float
    upper: float
    prior_sigma: float  # of log(value) for scales, of the value otherwise
    log: bool = True
    # hierarchical: value = (the parameter at this path) x exp(internal), prior centred on 0, so a
    # hardware with no runs takes the shared value and one with few runs is shrunk towards it
    relative_to: tuple[str, ...] | None = None

    def to_internal(self, value: float) -> float:
        return float(np.log(value)) if self.log else value

    def to_value(self, internal: float) -> float:
        return float(np.exp(internal)) if self.log else internal


# what each chip has of its own: (lower, upper, prior sigma of log(chip / shared))
PER_CHIP_KEYS = {"matmul_efficiency_max": (0.05, 1.0, 0.3), "attention_efficiency": (0.05, 1.0, 0.3),
                 "memory_efficiency": (0.05, 1.0, 0.3), "layer_overhead_s": (1e-6, 1e-2, 1.0)}
# the prior sigma of log(chip / shared) for a CPU (the executor's CPU runs): the shared values are
# the GPUs', from which a CPU core's efficiencies and launch overhead differ by several times
CPU_CHIP_PRIOR_SIGMA = 1.0


def time_parameters(scope: Scope) -> list[Parameter]:
    """Compute efficiency per chip and per part, per framework factors, and (when the runs span
    enough chips: calibration/scope.py) the shared shape and link/overlap parameters."""
    chips = scope.chips
    # Each chip's efficiencies are the shared ones times exp(delta), delta ~ N(0, 0.3^2): chips
    # differ by tens of percent; with the data's 10 % noise one run of a new chip moves its delta
    # 90 % of the way, and a chip never measured takes the shared value.
    # The per-layer launch overhead differs more (a CPU core vs a GPU's launch queue: milliseconds
    # vs tens of microseconds), hence its wider prior.
    shared = {key: ("compute", "default", "*", key) for key in PER_CHIP_KEYS}
    params = [Parameter(shared["matmul_efficiency_max"], 0.7, 0.05, 1.0, 0.5),
              Parameter(shared["attention_efficiency"], 0.4, 0.05, 1.0, 0.5),
              Parameter(shared["memory_efficiency"], 0.6, 0.05, 1.0, 0.5),
              Parameter(shared["layer_overhead_s"], 5e-4, 1e-6, 1e-2, 1.0)] if scope.shared else []
    for chip in sorted(set(chips.values())):
        # a CPU core against the GPUs' shared values differs by integer factors, not tens of percent
        widen = CPU_CHIP_PRIOR_SIGMA if _is_cpu(chip, chips) else 0.0
        params += [Parameter(("compute", chip, "*", key), 1.0, lower, upper, max(sigma, widen), relative_to=shared[key])
                   for key, (lower, upper, sigma) in PER_CHIP_KEYS.items()]
    # Parts of one chip (H100 80GB, H100 96GB at 500 W, H200) run the same kernels on the same
    # silicon; their peaks and bandwidths are in their hardware files, so they differ from their
    # chip by a few percent (power limits, clocks): without that tight prior, a source that is
    # alone on a part (one framework and vintage) would set that part's efficiency by itself. Launch
    # overhead belongs to the host, not the chip.
    per_part_sigma = {"matmul_efficiency_max": 0.05, "attention_efficiency": 0.05, "memory_efficiency": 0.05,
                      "layer_overhead_s": 1.0}
    for name, chip in sorted(chips.items()):
        if name in scope.parts_apart:
            params += [Parameter(("compute", name, "*", key), 1.0, lower, upper, per_part_sigma[key],
                                 relative_to=("compute", chip, "*", key))
                       for key, (lower, upper, _) in PER_CHIP_KEYS.items()]
    params += _framework_parameters(scope)
    return params + (_shared_parameters() if scope.shared else [])


def _is_cpu(chip: str, chips: dict[str, str]) -> bool:
    parts = [presets().get(name) for name, of in chips.items() if of == chip]
    return any(part is not None and part.vendor == "cpu" for part in parts)


def _framework_parameters(scope: Scope) -> list[Parameter]:
    """Each identified framework's factors on its chips' values (fp8 only where it ran float8)."""
    return [Parameter(("frameworks", framework, key), 1.0, lower, upper, sigma)
            for framework in scope.frameworks for key, (lower, upper, sigma) in FRAMEWORK_PARAMS.items()
            if key != "fp8_factor" or framework in scope.fp8_frameworks]


def _shared_parameters() -> list[Parameter]:
    return [
        Parameter(("compute", "default", "*", "matmul_half_flops"), 2e9, 1e7, 1e12, 2.0),
        Parameter(("compute", "default", "*", "compiled_io_factor"), 0.6, 0.1, 1.0, 0.5),
        Parameter(("compute", "default", "fp8", "matmul_dtype_factor"), 0.65, 0.1, 1.5, 0.5),
        Parameter(("links", "intra", "efficiency"), 0.75, 0.1, 1.0, 0.5),
        Parameter(("links", "inter", "efficiency"), 0.7, 0.05, 1.0, 0.5),
        # seconds per ring step: NCCL's own model puts microseconds on NVLink and several on the network
        # (src/graph/tuning.cc, hwLat / baseLat); what large groups lose to them pins it
        Parameter(("links", "intra", "latency_s"), 1e-5, 1e-7, 1e-3, 1.0),
        Parameter(("links", "inter", "latency_s"), 2e-5, 1e-7, 1e-3, 1.0),
        Parameter(("overlap", "tp"), 0.1, 0.0, 0.95, 0.3, log=False),
        Parameter(("overlap", "dp"), 0.8, 0.0, 1.0, 0.3, log=False),
        Parameter(("overlap", "zero"), 0.8, 0.0, 1.0, 0.3, log=False),
        Parameter(("overlap", "pp"), 0.5, 0.0, 1.0, 0.3, log=False),
        Parameter(("overlap", "hidden_cost"), 0.2, 0.0, 1.0, 0.3, log=False),
    ] + MOE_PARAMETERS


# Mixture-of-experts: moving only the runs of MoE models (planner/cost/compute.py, cpep.py).
# expert_imbalance: routed tokens on the busiest expert-parallel rank over the mean, >= 1; load-balanced
# routers keep it near 1.1 (GShard's capacity factors 1.0-1.25), forced balancing at 1.
# overhead_factor: an MoE block's host-side time (router, permutation, dispatcher bookkeeping; the
# dropless dispatcher's device-to-host sync of the per-expert counts leaves the GPU idle while the
# host launches) in units of a layer's launch overhead: it launches several times a dense MLP's kernels.
MOE_PARAMETERS = [Parameter(("moe", "expert_imbalance"), 1.1, 1.0, 2.0, 0.1),
                  Parameter(("moe", "overhead_factor"), 2.0, 0.01, 50.0, 1.0)]


# Typical relative error of one measured run against a good model (timing noise, framework details):
# data residuals are divided by it, so that priors (in the same units) weigh against the data
# as a Gaussian prior would.
MEASUREMENT_SIGMA = {"throughput": 0.1, "memory": 0.05}

MEMORY_PARAMETERS = [Parameter(("memory", "default", "fixed_bytes"), 1.0e9, 1e8, 8e9, 1.0),
                     Parameter(("memory", "default", "fragmentation"), 0.05, 0.0, 0.5, 0.1, log=False),
                     Parameter(("memory", "default", "largest_block_factor"), 0.5, 0.0, 3.0, 0.5, log=False)]


@dataclass
class Prepared:
    case: Case
    context: Context
    candidates: Candidates


def prepare(cases: list[Case], base: Profile) -> list[Prepared]:
    """Build each usable case's graph summaries once; fitting only swaps profiles."""
    ready = []
    for case in cases:
        if not case.usable:
            continue
        try:
            resolved = resolve(request_for(case, base.path))
            check_config(resolved.spec, resolved.workload, resolved.cluster, case.config)
        except PlannerError:
            continue
        ready.append(Prepared(case, resolved.context.with_profile(base), Candidates.from_configs([case.config])))
    return ready


def with_values(data: dict[str, Any], params: list[Parameter], values: np.ndarray) -> dict[str, Any]:
    """The profile data with the parameters set (shared ones first, then those relative to them:
    a chip's before its parts', as `time_parameters` lists them)."""
    out = copy.deepcopy(data)
    ordered = sorted(zip(params, values, strict=True), key=lambda pv: pv[0].relative_to is not None)
    for param, value in ordered:
        node = out
        for key in param.path[:-1]:
            node = node.setdefault(key, {})
        if param.relative_to is None:
            node[param.path[-1]] = param.to_value(value)
        else:
            shared = _get(out, param.relative_to, param.initial)
            node[param.path[-1]] = float(np.clip(shared * np.exp(value), param.lower, param.upper))
    return out


def _profile(data: dict[str, Any]) -> Profile:
    return Profile(name=str(data.get("name", "fit")), path="(fitting)", data=data)


def predictions(prepared: list[Prepared], data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens/s per device, reserved bytes, allocated bytes) for every prepared case."""
    profile = _profile(data)
    tps, reserved, allocated = [], [], []
    for item in prepared:
        est = evaluate(item.context.with_profile(profile), item.candidates)
        tps.append(est.tokens_per_s[0] / item.case.devices)
        reserved.append(est.memory["reserved"][0])
        allocated.append(est.memory["allocated"][0])
    return np.array(tps), np.array(reserved), np.array(allocated)


def throughputs(prepared: list[Prepared], data: dict[str, Any]) -> np.ndarray:
    """Tokens/s per device only: the throughput fit's inner loop."""
    profile = _profile(data)
    return np.array([tokens_per_second(item.context.with_profile(profile), item.candidates)[0] / item.case.devices
                     for item in prepared])


def _prior_centre(param: Parameter, data: dict[str, Any]) -> float:
    """The base profile's value: a chip's (part's) own ratio to the shared (chip's) value where the
    base has fitted one (`planner calibrate` on the shipped profile), else the shared value itself."""
    if param.relative_to is not None:
        if not _measured_in(data, param.path[1]):  # a value no run calibrated says nothing beyond the shared prior
            return 0.0
        own, shared = _get(data, param.path, np.nan), _get(data, param.relative_to, np.nan)
        return float(np.log(own / shared)) if np.isfinite(own) and np.isfinite(shared) and own > 0 < shared else 0.0
    return param.to_internal(_get(data, param.path, param.initial))


def _measured_in(data: dict[str, Any], name: str) -> bool:
    """Whether the profile records runs of this chip or part (fitted_on.chips / .hardware); a profile
    that does not record them (older ones) counts every entry as measured."""
    fitted = data.get("fitted_on")
    if not isinstance(fitted, dict) or "chips" not in fitted:
        return True
    return name in fitted["chips"] or name in fitted.get("hardware", [])


def _residual_fn(prepared, base_data, params, target: str, on_evaluation: Callable[[], None] | None = None):
    x0 = np.array([_prior_centre(p, base_data) for p in params])
    sigma = np.array([p.prior_sigma for p in params])
    if target == "throughput":
        measured = np.array([p.case.tokens_per_s_per_device or np.nan for p in prepared])
    else:
        measured = np.array([p.case.memory_bytes if p.case.memory_kind == "reserved" else np.nan
                             for p in prepared], dtype=float)
    # a run that ran with no memory figure held at most its device: a one-sided residual (calibration/validate.py)
    bound = np.array([ran_within_device(p.case) for p in prepared], dtype=bool) if target == "memory" else None
    if bound is not None:
        measured = np.where(bound, [p.context.hardware.memory_bytes for p in prepared], measured)
    rows = np.isfinite(measured) & (measured > 0)
    kept = [p for p, keep in zip(prepared, rows, strict=True) if keep]

    def residuals(x: np.ndarray) -> np.ndarray:
        data = with_values(base_data, params, x)
        predicted = throughputs(kept, data) if target == "throughput" else predictions(kept, data)[1]
        fit = np.log(predicted / measured[rows]) / MEASUREMENT_SIGMA[target]
        if bound is not None:
            fit = np.where(bound[rows], np.maximum(fit, 0.0), fit)
        if on_evaluation is not None:
            on_evaluation()
        return np.concatenate([fit, (x - x0) / sigma])

    return residuals, x0, _jacobian_sparsity(kept, params)


def _jacobian_sparsity(prepared, params) -> np.ndarray:
    """A chip's, a part's or a framework's own parameters move only its runs' residuals;
    least_squares then perturbs several of them at once when estimating the Jacobian."""
    data_rows = np.ones((len(prepared), len(params)), dtype=bool)
    for j, param in enumerate(params):
        if param.path[0] == "compute" and param.path[1] != "default" or param.path[0] in ("frameworks", "moe"):
            moved = {id(p) for p in runs_of_parameter(param.path, prepared)}
            data_rows[:, j] = [id(p) in moved for p in prepared]
    return np.vstack([data_rows, np.eye(len(params), dtype=bool)])


def fit_parameters(prepared, base_data, params, target: str,
                   on_evaluation: Callable[[], None] | None = None) -> np.ndarray:
    """The parameters' internal values that fit `target`; `on_evaluation` is called after each
    evaluation of the residuals (a progress bar's count)."""
    residuals, x0, sparsity = _residual_fn(prepared, base_data, params, target, on_evaluation)
    lower = np.array([-3.0 if p.relative_to else p.to_internal(p.lower) if not (p.log and p.lower <= 0) else -50
                      for p in params])
    upper = np.array([3.0 if p.relative_to else p.to_internal(p.upper) for p in params])
    start = np.clip(x0, lower + 1e-9, upper - 1e-9)
    result = least_squares(residuals, start, bounds=(lower, upper), x_scale="jac", max_nfev=200,
                           jac_sparsity=sparsity, tr_solver="lsmr")
    return result.x


def _parts_follow_their_chips(before: dict[str, Any], after: dict[str, Any], fitted: dict[str, str],
                              apart: frozenset[str]) -> dict[str, Any]:
    """Parts whose own values the runs did not fit (`apart`: those fitted apart from their chip),
    but whose chip they did (an H200 in the shipped profile when `planner calibrate` fits H100
    runs; the H100 itself when it is its chip's only measured part), move by the factor their chip
    moved: the part's own entry would otherwise hide the chip's new values from it."""
    for name, entry in after["compute"].items():
        part = presets().get(name)
        # a chip's own entry (named as its chip) is what the fit set: it does not follow itself
        if part is None or name in apart or name == chip_of(part) or chip_of(part) not in fitted.values():
            continue
        # the chip's values as the planner reads them (falling back to the shared ones)
        old, new = (_profile(d).compute(chip_of(part), part.vendor, "*", framework="") for d in (before, after))
        for key, value in entry.get("*", {}).items():
            if key in PER_CHIP_KEYS:
                lower, upper, _ = PER_CHIP_KEYS[key]
                entry["*"][key] = float(np.clip(value * getattr(new, key) / getattr(old, key), lower, upper))
    return after


def _get(data: dict[str, Any], path: tuple[str, ...], default: float) -> float:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return float(node)


def fit_profile(cases: list[Case], base: Profile) -> dict[str, Any]:
    """Fit throughput parameters, then memory overheads; returns the new profile's data."""
    with progress(None, "fitting the profile: least-squares evaluations") as advance:
        return _fit_profile(cases, base, advance)


def _fit_profile(cases: list[Case], base: Profile, advance: Callable[[], None]) -> dict[str, Any]:
    prepared = prepare(cases, base)
    with_tps = [p for p in prepared if p.case.tokens_per_s_per_device]
    with_mem = [p for p in prepared if (p.case.memory_bytes and p.case.memory_kind == "reserved")
                or ran_within_device(p.case)]
    data = copy.deepcopy(base.data)
    data.pop("validation", None)  # out-of-sample figures are the base's: recomputed by fit.py or absent
    if data.get("uncertainty") and "source" not in data["uncertainty"]:
        # the base's intervals stay the prior's (so that unmeasured chips predict as before), labelled
        data["uncertainty"]["source"] = (f"cross-validation of profile '{base.name}' ({base.data.get('version')}); "
                                         "not recomputed on the runs of this fit")
    scope = scope_of(with_tps)
    time_params = time_parameters(scope) if with_tps else []
    if time_params:
        for name, chip in scope.chips.items():  # a chip's only measured part reads its chip's values
            if name != chip and name not in scope.parts_apart:
                data["compute"].pop(name, None)
        data = with_values(data, time_params, fit_parameters(with_tps, data, time_params, "throughput", advance))
        data = _parts_follow_their_chips(base.data, data, scope.chips, scope.parts_apart)
    memory_params = memory_parameters(with_mem, base)
    if memory_params:
        fitted = fit_parameters(with_mem, data, memory_params, "memory", advance)
        data = _same_memory_for_parts(with_values(data, memory_params, fitted), with_mem)
    sources = sorted({p.case.publication for p in with_tps + with_mem})
    bounds = sum(ran_within_device(p.case) for p in with_mem)
    summary = (f"{len(with_tps)} throughput and {len(with_mem) - bounds} memory measurements "
               f"(and {bounds} runs bounded by their devices' memory) from {len(sources)} sources")
    data["description"] = f"Fitted by calibration.fit from profile '{base.name}' on {summary}"
    data["fitted_on"] = _fitted_on(base.data.get("fitted_on"), summary, sources, with_tps, with_mem, scope,
                                   time_params, memory_params)
    _keep_spread(data, scope)
    return data


def memory_parameters(with_mem: list[Prepared], base: Profile) -> list[Parameter]:
    """The allocator/framework overheads: shared (memory.default) when the runs span two chips or
    more, else those of the one measured chip's first part (copied to its other measured parts),
    starting from what the base profile gives that part."""
    if len({chip_of(p.context.hardware) for p in with_mem}) >= 2 or not with_mem:
        return MEMORY_PARAMETERS if with_mem else []
    hardware = with_mem[0].context.hardware
    start = base.memory(hardware.name, hardware.vendor)
    return [replace(param, path=("memory", hardware.name, param.path[-1]),
                    initial=float(getattr(start, param.path[-1]))) for param in MEMORY_PARAMETERS]


def _same_memory_for_parts(data: dict[str, Any], with_mem: list[Prepared]) -> dict[str, Any]:
    names = sorted({p.context.hardware.name for p in with_mem})
    first = with_mem[0].context.hardware.name if with_mem else None
    if first in data["memory"] and len({chip_of(p.context.hardware) for p in with_mem}) == 1:
        for name in names:
            data["memory"][name] = dict(data["memory"][first])
    return data


def _fitted_on(before: Any, summary: str, sources: list[str], with_tps: list[Prepared], with_mem: list[Prepared],
               scope: Scope, time_params: list[Parameter], memory_params: list[Parameter]) -> dict[str, Any]:
    """What was fitted on what; the chips and frameworks calibrated are this fit's and the base's."""
    before = before if isinstance(before, dict) else {}
    measured = with_tps + with_mem
    chips = set(before.get("chips", [])) | {chip_of(p.context.hardware) for p in measured}
    parts = set(before.get("hardware", [])) | {p.context.hardware.name for p in measured}
    frameworks = set(before.get("frameworks", [])) | set(scope.frameworks)
    parameters = {**(before.get("parameters") or {}), **record([p.path for p in time_params], with_tps),
                  **record([p.path for p in memory_params], with_mem)}
    out = {"summary": summary, "sources": sources, "cases": sorted({p.case.id for p in measured}),
           "date": _dt.date.today().isoformat(), "chips": sorted(chips), "hardware": sorted(parts),
           "frameworks": sorted(frameworks), "parameters": parameters}
    if before and "chips" not in before:  # a fitted base that did not record them: unknown, nothing flagged
        for key in ("chips", "hardware", "frameworks"):
            out.pop(key)
    return out


def _keep_spread(data: dict[str, Any], scope: Scope) -> None:
    """The spread across chips and frameworks that widens the intervals of unmeasured ones: refitted
    with the shared parameters (a fit that spans chips), else the base's, so that a fit of one
    chip's runs leaves every other chip's predictions, intervals included, as they were."""
    if not scope.shared:
        return
    uncertainty = data.setdefault("uncertainty", {})
    sd = uncertainty.setdefault("uncalibrated_log_sd", {})
    for what, value in spread(data, set(data["fitted_on"]["chips"])).items():
        sd.setdefault(what, {})["throughput"] = value
