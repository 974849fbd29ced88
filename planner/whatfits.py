""""What fits?" for a model on a device type: per method, the largest micro-batch and the longest
sequence that some configuration of the given devices holds, and the fewest devices that hold
the workload at all. Each answer is a search over configurations (memory decides), bisected
over the quantity asked."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.api import Request, resolve
from planner.errors import InvalidRequest
from planner.search import Pins, search

MAX_MICRO_BATCH = 1024
MAX_DEVICES = 16384


def _feasible(request: Request, pins: Pins) -> dict[str, Any] | None:
    """The fastest fitting candidate's prediction, or None."""
    try:
        r = resolve(request)
    except InvalidRequest:
        return None
    result = search(r.context, pins)
    if not result.feasible:
        return None
    best = result.estimates.prediction(r.context, int(result.order[0]))
    return best if best["fits_with_margin"] else None  # the search ranks margin-keeping candidates first


def _largest(ok, low: int, high: int) -> int:
    """Largest power-of-two-bisected value in [low, high] for which ok(value) holds (0 if none)."""
    if not ok(low):
        return 0
    good, step = low, low
    while step * 2 <= high and ok(step * 2):
        step *= 2
        good = step
    bad = min(step * 2, high + 1)
    while bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def largest_micro_batch(request: Request, pins: Pins) -> int:
    devices = resolve(request).cluster.num_devices

    def ok(b: int) -> bool:
        return _feasible(replace(request, global_batch=b * devices), replace(pins, micro_batch_size=b)) is not None

    return _largest(ok, 1, MAX_MICRO_BATCH)


def longest_sequence(request: Request, pins: Pins, limit: int) -> int:
    devices = resolve(request).cluster.num_devices

    def ok(s: int) -> bool:
        return _feasible(replace(request, seq_len=s, global_batch=devices), replace(pins, micro_batch_size=1)) is not None

    return _largest(ok, 128, limit)


def fewest_devices(request: Request, pins: Pins) -> int | None:
    r = resolve(request)
    per_node = r.cluster.devices_per_node
    count = 1
    while count <= MAX_DEVICES:
        gb = max(request.workload.global_batch or count, count)
        trial = replace(request, gpus=count, gpus_per_node=min(per_node, count), global_batch=gb, flavor=None,
                        gpu=r.hardware.name)
        if _feasible(trial, pins) is not None:
            return count
        count *= 2
    return None


def what_fits(request: Request, pins: Pins | None = None, methods: tuple[str, ...] = ("full", "lora", "qlora")) -> dict[str, Any]:
    pins = pins or Pins()
    r = resolve(request)
    limit = max(r.spec.max_position_embeddings, request.workload.seq_len) * 4
    rows = []
    for method in methods:
        trial = replace(request, method=method)
        method_pins = pins
        best = _feasible(trial, method_pins)
        rows.append({
            "method": method,
            "fits": best is not None,
            "best": best,
            "largest_micro_batch": largest_micro_batch(trial, method_pins),
            "longest_seq_len": longest_sequence(trial, method_pins, limit),
            "fewest_devices": fewest_devices(trial, method_pins),
        })
    return {"model": r.spec.name, "hardware": r.hardware.name, "gpus": r.cluster.num_devices,
            "seq_len": request.workload.seq_len, "global_batch": r.workload.global_batch,
            "memory_margin": r.context.memory_margin, "methods": rows,
            "uncalibrated": r.context.uncalibrated}
