"""The Python API that the CLI and the Streamlit app both call.

    from planner.api import Request, suggest, predict
    result = suggest(Request(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from planner.cost.context import Context
from planner.cost.estimate import evaluate
from planner.cost.candidates import Candidates
from planner.errors import Infeasible, InvalidRequest
from planner.explain import explain_runner_ups, seed_summary, ways_out
from planner.graph import count_params
from planner.hardware import FLAVOR_DEVICE, flavor_devices, load_hardware, make_cluster, presets
from planner.models import catalog, load_model
from planner.capabilities import on_gpu, rules_for, runnable_reason
from planner.plan import ParallelConfig, Plan, check_config
from planner.profile import load_profile
from planner.search import Pins, SearchResult, search
from planner.specs import Cluster, Hardware, ModelSpec, Workload
from planner.validity import check_degrees, check_sequence, check_workload

DEFAULT_GPU = "h100-sxm-80gb"


WORKLOAD_FIELDS = tuple(f.name for f in fields(Workload))
DEFAULT_SEQ_LEN = 4096


@dataclass(init=False)
class Request:
    """What a person asks about: model, hardware, a Workload, and how to judge the answer.

    `Request(model, gpu=..., gpus=..., seq_len=4096, method="lora", ...)` builds the Workload from
    its own fields (planner/specs.py Workload is the one definition); its global batch may stay
    None (one sequence per device, filled in by `resolve`)."""

    model: str | ModelSpec
    gpu: str | Hardware | None
    gpus: int | None
    gpus_per_node: int | None
    flavor: str | None
    workload: Workload
    calibration: str | None
    memory_margin: float | None  # None: from the calibration profile's residuals
    target: str  # the engine that will run the plan (planner/capabilities.py TARGETS)

    def __init__(self, model: str | ModelSpec, gpu: str | Hardware | None = None, gpus: int | None = None,
                 gpus_per_node: int | None = None, flavor: str | None = None, workload: Workload | None = None,
                 calibration: str | None = None, memory_margin: float | None = None, target: str = "executor",
                 **workload_fields: Any) -> None:
        unknown = sorted(set(workload_fields) - set(WORKLOAD_FIELDS))
        if unknown:
            raise TypeError(f"Request() got unexpected keyword argument(s) {', '.join(unknown)}")
        if workload is not None and workload_fields:
            workload = replace(workload, **workload_fields)
        elif workload is None:
            values = {"seq_len": DEFAULT_SEQ_LEN, "global_batch": None, **workload_fields}
            if "lora_targets" in values:
                values["lora_targets"] = tuple(values["lora_targets"])
            workload = Workload(**values)
        self.model, self.gpu, self.gpus, self.gpus_per_node, self.flavor = model, gpu, gpus, gpus_per_node, flavor
        self.workload, self.calibration, self.memory_margin, self.target = workload, calibration, memory_margin, target


@dataclass
class Resolved:
    spec: ModelSpec
    hardware: Hardware
    cluster: Cluster
    workload: Workload
    context: Context = field(repr=False)


def resolve(request: Request) -> Resolved:
    spec = load_model(request.model)
    if request.flavor:
        if request.gpu and request.gpu not in (FLAVOR_DEVICE, load_hardware(FLAVOR_DEVICE)):
            raise InvalidRequest(f"--flavor sets the hardware to {FLAVOR_DEVICE}; drop --gpu {request.gpu}")
        devices = flavor_devices(request.flavor)
        if request.gpus is not None and request.gpus != devices:
            raise InvalidRequest(f"--flavor {request.flavor} has {devices} devices; drop --gpus {request.gpus}")
        hardware, gpus = load_hardware(FLAVOR_DEVICE), devices
        if request.gpus_per_node is None and devices % hardware.devices_per_node:
            # a 1.5xLarge is 12 GCDs: one and a half 8-GCD nodes; count it as nodes of gcd(12, 8) = 4
            request = with_changes(request, gpus_per_node=math.gcd(devices, hardware.devices_per_node))
    else:
        hardware = load_hardware(request.gpu or DEFAULT_GPU)
        gpus = request.gpus if request.gpus is not None else hardware.devices_per_node
    cluster = make_cluster(hardware, gpus, request.gpus_per_node)
    workload = request.workload
    if workload.global_batch is None:
        workload = replace(workload, global_batch=cluster.num_devices)
    check_workload(workload, cluster.num_devices)  # bounds before any search enumerates them
    check_sequence(spec, workload.seq_len)  # learned positions end at max_position_embeddings
    hardware.peak({"fp8": "fp8", "fp32": "fp32", "fp16": "fp16"}.get(workload.precision, "bf16"))
    rules_for(request.target, on_gpu(hardware))  # an unknown --target is a one-line error
    profile = load_profile(request.calibration)
    if request.memory_margin is not None and not 0 <= request.memory_margin < 1:
        raise InvalidRequest(f"--memory-margin must be a fraction in [0, 1), got {request.memory_margin}")
    context = Context(spec, workload, cluster, profile, request.memory_margin)
    return Resolved(spec, hardware, cluster, workload, context)


def predict(request: Request, config: ParallelConfig) -> dict[str, Any]:
    """One explicit configuration. Invalid -> InvalidRequest; valid but too big -> fits: false.
    The prediction says whether the request's target engine can run it (`runnable`, `runnable_reason`)."""
    r = resolve(request)
    check_degrees(dp=config.dp, tp=config.tp, pp=config.pp, micro_batch_size=config.micro_batch_size, vpp=config.vpp)
    check_config(r.spec, r.workload, r.cluster, config)
    estimates = evaluate(r.context, Candidates.from_configs([config]))
    prediction = estimates.prediction(r.context, 0)
    reason = runnable_reason(request.target, config, r.spec, r.workload, r.hardware)
    prediction["runnable"] = {"target": request.target, "reason": reason}
    prediction["uncalibrated"] = r.context.uncalibrated  # the intervals are widened for these
    return prediction


def suggest(request: Request, pins: Pins | None = None, top: int = 5) -> dict[str, Any]:
    """Search every valid candidate the target engine runs, prune what does not fit, rank by step time."""
    if top <= 0:
        raise InvalidRequest(f"--top must be a positive whole number, got {top}")
    started = time.perf_counter()
    r = resolve(request)
    pins = pins or Pins()
    check_pins(r, pins)
    result = search(r.context, pins, request.target)
    seconds = time.perf_counter() - started
    counts = {"searched": result.searched, "evaluated": result.evaluated, "feasible": result.feasible,
              "seconds": round(seconds, 4), "rejected": dict(result.rejected.most_common()),
              "rejected_fixes": {k: result.fixes.get(k, "") for k in result.rejected},
              "invalid_pairings": sum(result.pairings.values()), "target": request.target}
    if not result.feasible:
        ideas = ways_out(request, r, pins, _quick_fits)
        details = {**counts, "candidates": [], "ways_out": ideas, "request": describe(r)}
        raise Infeasible(_no_fit_message(r, result, ideas), details)
    best = _distinct_predictions(r, result, top)
    return {**counts, "summary": seed_summary(best[0]["config"]), "explanation": explain_runner_ups(best),
            "margin_note": _margin_note(r, result, best[0]), "candidates": best, "request": describe(r)}


def check_pins(r: Resolved, pins: Pins) -> None:
    """A pinned degree that cannot work on this cluster or batch is a mistake to name, not a search."""
    devices, batch = r.cluster.num_devices, r.workload.global_batch
    for name in ("dp", "tp", "pp", "cp"):
        value = getattr(pins, name)
        if value is not None and devices % value:
            raise InvalidRequest(f"--{name} {value} does not divide the {devices} devices; choose a --{name} that "
                                 f"divides --gpus, or --gpus a multiple of {value}")
    _check_cp_ep_pins(r, pins)
    fixed = [getattr(pins, n) for n in ("dp", "tp", "pp", "cp") if getattr(pins, n) is not None]
    if len(fixed) >= 2 and devices % math.prod(fixed):
        raise InvalidRequest(f"the pinned degrees multiply to {math.prod(fixed)}, which does not divide the "
                             f"{devices} devices; choose degrees whose product divides --gpus")
    if pins.micro_batch_size is not None and batch % pins.micro_batch_size:
        raise InvalidRequest(f"--micro-batch-size {pins.micro_batch_size} does not divide --global-batch {batch}")


def _check_cp_ep_pins(r: Resolved, pins: Pins) -> None:
    """Pinned context / expert parallel degrees that cannot work for this model and sequence."""
    spec, seq = r.spec, r.workload.seq_len
    if pins.cp is not None and pins.cp > 1 and seq % (2 * pins.cp):
        raise InvalidRequest(f"--cp {pins.cp} does not split --seq-len {seq} into 2 x cp = {2 * pins.cp} equal "
                             "chunks (torch's load-balanced ring attention); choose a --cp with 2 x cp dividing it")
    if pins.ep is not None and pins.ep > 1:
        if not spec.is_moe:
            raise InvalidRequest(f"--ep {pins.ep}: {spec.name} is a dense model (no routed experts); use --ep 1")
        if spec.num_experts % pins.ep:
            raise InvalidRequest(f"--ep {pins.ep} does not divide the {spec.num_experts} routed experts; choose an "
                                 "--ep that divides them")


def _distinct_predictions(r: Resolved, result: SearchResult, top: int) -> list[dict[str, Any]]:
    """The best `top` predictions, each layout once: candidates the cost model cannot tell apart
    (same memory and time to the byte and nanosecond) are shown once."""
    seen, best = set(), []
    for i in result.order:
        prediction = result.estimates.prediction(r.context, int(i))
        key = (prediction["memory"]["peak_bytes"], round(prediction["time"]["step_s"], 9),
               prediction["config"]["dp"], prediction["config"]["tp"], prediction["config"]["pp"],
               prediction["config"]["micro_batch_size"])
        if key not in seen:
            seen.add(key)
            best.append(prediction)
        if len(best) == top:
            break
    return best


def _margin_note(r: Resolved, result: SearchResult, best: dict[str, Any]) -> str | None:
    """When the memory margin ruled out a faster plan that fits without it, say which and by how much."""
    e, order = result.estimates, result.order
    fastest = int(order[np.argmin(e.step_s[order])])
    if e.fits_with_margin[fastest] or e.step_s[fastest] >= best["time"]["step_s"]:
        return None
    other = e.prediction(r.context, fastest)
    margin = r.context.memory_margin
    return (f"{seed_summary(other['config'])} would be {best['time']['step_s'] / other['time']['step_s'] - 1:.1%} "
            f"faster ({other['time']['step_s']:.3f} s per step) but needs {other['memory']['peak_bytes'] / 2**30:.1f} "
            f"of {other['memory']['capacity_bytes'] / 2**30:.1f} GiB, within the {margin:.0%} memory margin kept free "
            f"for prediction error (--memory-margin 0 to allow it)")


def describe(r: Resolved) -> dict[str, Any]:
    return {"model": r.spec.name, "params": count_params(r.spec), "hardware": r.hardware.name,
            "gpus": r.cluster.num_devices, "gpus_per_node": r.cluster.devices_per_node,
            "workload": r.workload.to_dict(),
            "calibration": {**r.context.profile.summary(), "uncalibrated": r.context.uncalibrated}}


def make_plan(request: Request, prediction: dict[str, Any], runner_ups: list[dict[str, Any]] | None = None) -> Plan:
    """The typed Plan of a prediction (from `predict` or `suggest`), checked on construction."""
    r = resolve(request)
    config = ParallelConfig.from_dict(config_of(prediction))
    return Plan(model=r.spec, hardware=r.hardware, num_devices=r.cluster.num_devices,
                devices_per_node=r.cluster.devices_per_node, workload=r.workload, config=config,
                target=request.target, prediction=prediction, calibration=r.context.profile.summary(),
                runner_ups=tuple(runner_ups or ()))


def config_of(prediction: dict[str, Any]) -> dict[str, Any]:
    """The ParallelConfig keys of a prediction's config (which also names the optimizer implementation)."""
    return {k: v for k, v in prediction["config"].items() if k in ParallelConfig.__dataclass_fields__}


def _no_fit_message(r: Resolved, result: SearchResult, ideas: list[str]) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in result.rejected.most_common(3))
    hint = ("It would fit with " + "; or ".join(ideas) + ".") if ideas else \
        "Nothing simple makes it fit: try a larger device or many more devices."
    return f"no configuration of {r.spec.name} fits on {r.cluster.num_devices} x {r.hardware.name} " \
           f"(searched {result.searched}; {reasons}). {hint}"


def _quick_fits(request: Request, pins: Pins) -> bool:
    try:
        r = resolve(request)
        check_pins(r, pins)
    except InvalidRequest:
        return False
    return search(r.context, pins, request.target).feasible > 0


def list_models() -> list[dict[str, Any]]:
    rows = []
    for name, doc in catalog().items():
        spec = load_model(name)
        rows.append({"name": name, "params": count_params(spec), "family": spec.family, "layers": spec.num_layers,
                     "hidden": spec.hidden_size, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                     "vocab": spec.vocab_size, "experts": spec.num_experts, "source": doc["source"]})
    return rows


def list_hardware() -> list[dict[str, Any]]:
    return [{"name": h.name, "chip": h.chip, "memory_bytes": h.memory_bytes, "peak_flops": dict(h.peak_flops),
             "hbm_bandwidth_bytes_per_s": h.hbm_bandwidth_bytes_per_s, "devices_per_node": h.devices_per_node,
             "description": h.description, "source": h.source} for h in presets().values()]


def with_changes(request: Request, **changes: Any) -> Request:
    """A copy with some request or workload fields changed."""
    workload_changes = {k: v for k, v in changes.items() if k in WORKLOAD_FIELDS}
    if "lora_targets" in workload_changes:
        workload_changes["lora_targets"] = tuple(workload_changes["lora_targets"])
    own = {k: getattr(request, k) for k in ("model", "gpu", "gpus", "gpus_per_node", "flavor", "calibration",
                                           "memory_margin", "target")}
    own.update({k: v for k, v in changes.items() if k not in WORKLOAD_FIELDS})
    return Request(workload=replace(request.workload, **workload_changes), **own)
