"""The Python API that the CLI and the Streamlit app both call.

    from planner.api import Request, suggest, predict
    result = suggest(Request(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from planner.cost.context import Context
from planner.cost.estimate import evaluate
from planner.cost.candidates import Candidates
from planner.errors import Infeasible, InvalidRequest
from planner.explain import explain_runner_ups, seed_summary, what_would_fit
from planner.graph import count_params
from planner.hardware import FLAVOR_DEVICE, flavor_devices, load_hardware, make_cluster, presets
from planner.models import catalog, load_model
from planner.plan import ParallelConfig, check_config, plan_document
from planner.profile import load_profile
from planner.search import Pins, SearchResult, search
from planner.specs import Cluster, Hardware, ModelSpec, Workload
from planner.validity import check_degrees, check_sequence, check_workload

DEFAULT_GPU = "h100-sxm-80gb"


@dataclass
class Request:
    """What a person asks about: model, hardware and workload (strings and numbers as typed)."""

    model: str | ModelSpec
    gpu: str | Hardware | None = None
    gpus: int | None = None
    gpus_per_node: int | None = None
    flavor: str | None = None
    seq_len: int = 4096
    global_batch: int | None = None  # default: one sequence per device
    method: str = "full"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    precision: str = "bf16"
    optimizer: str = "adamw"
    optimizer_impl: str = "foreach"
    attention: str = "sdpa"
    master_dtype: str = "fp32"
    loss_chunks: int = 1
    activation_offload: bool = False
    optimizer_in_backward: bool = False
    compile: bool = False
    loss_parallel: bool = False
    fp32_logits: bool = False
    calibration: str | None = None
    memory_margin: float | None = None  # None: from the calibration profile's residuals


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
            request = replace(request, gpus_per_node=math.gcd(devices, hardware.devices_per_node))
    else:
        hardware = load_hardware(request.gpu or DEFAULT_GPU)
        gpus = request.gpus if request.gpus is not None else hardware.devices_per_node
    cluster = make_cluster(hardware, gpus, request.gpus_per_node)
    global_batch = request.global_batch if request.global_batch is not None else cluster.num_devices
    workload = Workload(seq_len=request.seq_len, global_batch=global_batch, method=request.method,
                        precision=request.precision, optimizer=request.optimizer,
                        optimizer_impl=request.optimizer_impl, lora_rank=request.lora_rank,
                        lora_targets=tuple(request.lora_targets), attention=request.attention,
                        master_dtype=request.master_dtype, loss_chunks=request.loss_chunks,
                        activation_offload=request.activation_offload,
                        optimizer_in_backward=request.optimizer_in_backward, compile=request.compile,
                        loss_parallel=request.loss_parallel, fp32_logits=request.fp32_logits)
    check_workload(workload, cluster.num_devices)  # bounds before any search enumerates them
    check_sequence(spec, workload.seq_len)  # learned positions end at max_position_embeddings
    hardware.peak({"fp8": "fp8", "fp32": "fp32", "fp16": "fp16"}.get(workload.precision, "bf16"))
    profile = load_profile(request.calibration)
    if request.memory_margin is not None and not 0 <= request.memory_margin < 1:
        raise InvalidRequest(f"--memory-margin must be a fraction in [0, 1), got {request.memory_margin}")
    context = Context(spec, workload, cluster, profile, request.memory_margin)
    return Resolved(spec, hardware, cluster, workload, context)


def predict(request: Request, config: ParallelConfig) -> dict[str, Any]:
    """One explicit configuration. Invalid -> InvalidRequest; valid but too big -> fits: false."""
    r = resolve(request)
    check_degrees(dp=config.dp, tp=config.tp, pp=config.pp, micro_batch_size=config.micro_batch_size, vpp=config.vpp)
    check_config(r.spec, r.workload, r.cluster, config)
    estimates = evaluate(r.context, Candidates.from_configs([config]))
    return estimates.prediction(r.context, 0)


def suggest(request: Request, pins: Pins | None = None, top: int = 5) -> dict[str, Any]:
    """Search every valid candidate, prune what does not fit, rank by step time."""
    if top <= 0:
        raise InvalidRequest(f"--top must be a positive whole number, got {top}")
    started = time.perf_counter()
    r = resolve(request)
    pins = pins or Pins()
    result = search(r.context, pins)
    seconds = time.perf_counter() - started
    if not result.feasible:
        raise Infeasible(_no_fit_message(request, r, result, pins or Pins()))
    best = [result.estimates.prediction(r.context, int(i)) for i in result.order[:top]]
    return {
        "searched": result.searched,
        "evaluated": result.evaluated,
        "feasible": result.feasible,
        "seconds": round(seconds, 4),
        "rejected": dict(result.rejected.most_common()),
        "summary": seed_summary(best[0]["config"]),
        "explanation": explain_runner_ups(best),
        "candidates": best,
        "request": describe(r),
    }


def describe(r: Resolved) -> dict[str, Any]:
    return {"model": r.spec.name, "params": count_params(r.spec), "hardware": r.hardware.name,
            "gpus": r.cluster.num_devices, "gpus_per_node": r.cluster.devices_per_node,
            "workload": r.workload.to_dict(), "calibration": r.context.profile.summary()}


def make_plan(request: Request, prediction: dict[str, Any], runner_ups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    r = resolve(request)
    config_fields = set(ParallelConfig.__dataclass_fields__)
    config = ParallelConfig(**{k: v for k, v in prediction["config"].items() if k in config_fields})
    return plan_document(r.spec, r.hardware, r.cluster, r.workload, config, prediction,
                         r.context.profile.summary(), runner_ups)


def _no_fit_message(request: Request, r: Resolved, result: SearchResult, pins: Pins) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in result.rejected.most_common(3))
    hint = what_would_fit(request, r, pins, _quick_fits)
    return f"no configuration of {r.spec.name} fits on {r.cluster.num_devices} x {r.hardware.name} " \
           f"(searched {result.searched}; {reasons}). {hint}"


def _quick_fits(request: Request, pins: Pins) -> bool:
    try:
        r = resolve(request)
    except InvalidRequest:
        return False
    return search(r.context, pins).feasible > 0


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
    return replace(request, **changes)
