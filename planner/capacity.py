"""Capacity planning: for each device count (or MoAI flavor), the fastest plan that fits, the time
to train a token budget, GPU-hours and cost; then the option that meets a deadline at least cost,
or the fastest one under a budget.

Time to train T tokens = steps x step time, with steps = ceil(T / (seq_len x global_batch)): the
global batch is a training hyper-parameter, so it stays the same at every device count (default:
one sequence per device of the largest count considered, so every count can use pure data
parallelism). GPU-hours = hours x devices; cost = GPU-hours x price per device-hour (one GCD for
MoAI flavors). With a single price per device-hour, least cost and fewest GPU-hours are the same
order, so recommendations work without a price too.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

from planner.api import DEFAULT_GPU, Request, resolve
from planner.errors import Infeasible, InvalidRequest
from planner.explain import seed_summary
from planner.hardware import FLAVOR_DEVICE, MOAI_FLAVORS, flavor_devices, load_hardware
from planner.search import Pins, search
from planner.validity import check_capacity

PRICES_FILE = Path(__file__).parent / "presets" / "prices.json"
DEFAULT_MAX_GPUS = 1024
FLAVOR_FAMILIES = ("moai",)
SECONDS_PER_HOUR = 3600.0


@cache
def price_offers() -> tuple[dict[str, Any], ...]:
    """Example list prices (presets/prices.json), each with provider, date and source."""
    return tuple(json.loads(PRICES_FILE.read_text())["offers"])


def default_price(hardware_name: str) -> dict[str, Any] | None:
    """The first offer listed for this hardware preset, or None when there is none."""
    return next((o for o in price_offers() if o["hardware"] == hardware_name), None)


def device_counts(devices_per_node: int, max_gpus: int) -> list[int]:
    """1, 2, 4, ... up to one node, then whole nodes doubling, and `max_gpus` itself when it is a
    whole number of nodes (a cluster is bought by the node)."""
    counts, n = [], 1
    while n <= max_gpus:
        if n < devices_per_node or n % devices_per_node == 0:
            counts.append(n)
        n *= 2
    if max_gpus not in counts and (max_gpus < devices_per_node or max_gpus % devices_per_node == 0):
        counts.append(max_gpus)
    return sorted(counts)


def _fastest(request: Request, pins: Pins) -> tuple[dict[str, Any] | None, str | None]:
    """The fastest fitting candidate's prediction, or (None, why nothing fits)."""
    try:
        r = resolve(request)
    except InvalidRequest as exc:
        return None, str(exc)
    result = search(r.context, pins)
    if result.feasible:
        return result.estimates.prediction(r.context, int(result.order[0])), None
    if result.evaluated:
        estimates = result.estimates
        if estimates.fits.any():  # some fit the device, but only by offloading more than the host holds
            host_bytes = float(estimates.memory["host"][estimates.fits].min()) * r.cluster.devices_per_node
            return None, (f"out of host memory: offloading needs {host_bytes / 2**30:,.0f} GiB per node, the node has "
                          f"{r.hardware.host_memory_bytes_per_node / 2**30:,.0f} GiB")
        least_bytes = float(estimates.memory["reserved"].min())
        return None, (f"out of memory: the leanest configuration needs {least_bytes / 2**30:.1f} GiB per device, "
                      f"{r.hardware.name} has {r.hardware.memory_bytes / 2**30:.1f} GiB")
    return None, result.rejected.most_common(1)[0][0] if result.rejected else "no valid configuration"


def _option(request: Request, pins: Pins, tokens: int, price: float | None, flavor: str | None) -> dict[str, Any]:
    r = resolve(request)
    gpus = r.cluster.num_devices
    best, reason = _fastest(request, pins)
    row: dict[str, Any] = {"gpus": gpus, "nodes": r.cluster.num_nodes, "hardware": r.hardware.name, "flavor": flavor,
                           "fits": best is not None, "reason": reason, "summary": None, "config": None,
                           "step_s": None, "tokens_per_s": None, "mfu": None, "peak_bytes": None,
                           "steps": math.ceil(tokens / r.workload.tokens_per_step),
                           "hours": None, "gpu_hours": None, "cost": None}
    if best is None:
        return row
    hours = row["steps"] * best["time"]["step_s"] / SECONDS_PER_HOUR
    row.update(summary=seed_summary(best["config"]), config=best["config"], step_s=best["time"]["step_s"],
               tokens_per_s=best["time"]["tokens_per_s"], mfu=best["time"]["mfu"],
               peak_bytes=best["memory"]["peak_bytes"], hours=hours, gpu_hours=hours * gpus,
               cost=None if price is None else hours * gpus * price)
    return row


def _requests(request: Request, max_gpus: int, flavor_family: str | None) -> list[tuple[Request, str | None]]:
    """One request per device count (or flavor), the workload unchanged."""
    if flavor_family is not None:
        if flavor_family not in FLAVOR_FAMILIES:
            raise InvalidRequest(f"--flavor-family must be one of {', '.join(FLAVOR_FAMILIES)}; got {flavor_family!r}")
        if request.gpu not in (None, FLAVOR_DEVICE):
            raise InvalidRequest(f"--flavor-family moai sets the hardware to {FLAVOR_DEVICE}; drop --gpu {request.gpu}")
        per_node = request.gpus_per_node or load_hardware(FLAVOR_DEVICE).devices_per_node
        flavors = [f for f in MOAI_FLAVORS if flavor_devices(f) <= max_gpus]
        # a 1.5xLarge (12 GCDs) spans one and a half 8-GCD nodes: count it as three 4-GCD nodes
        return [(replace(request, gpu=None, gpus=None, flavor=f, gpus_per_node=math.gcd(flavor_devices(f), per_node)), f)
                for f in flavors]
    hardware = load_hardware(request.gpu or DEFAULT_GPU)
    per_node = request.gpus_per_node or hardware.devices_per_node
    return [(replace(request, gpus=n, gpus_per_node=min(per_node, n), flavor=None), None)
            for n in device_counts(per_node, max_gpus)]


def _mark_pareto(options: list[dict[str, Any]]) -> None:
    """An option is dominated when another is no slower and uses no more GPU-hours, one strictly."""
    fitting = [o for o in options if o["fits"]]
    for o in options:
        o["dominated"] = o["fits"] and any(
            p["hours"] <= o["hours"] and p["gpu_hours"] <= o["gpu_hours"]
            and (p["hours"] < o["hours"] or p["gpu_hours"] < o["gpu_hours"]) for p in fitting)


def recommend(options: list[dict[str, Any]], deadline_hours: float | None,
              budget: float | None) -> tuple[dict[str, Any] | None, str]:
    """(the recommended option, the rule in words). Least cost meeting the deadline (and budget);
    with only a budget, the fastest within it; with neither, the least cost."""
    fitting = [o for o in options if o["fits"]]
    ok = [o for o in fitting if (deadline_hours is None or o["hours"] <= deadline_hours)
          and (budget is None or o["cost"] <= budget)]
    cheapest_first = sorted(ok, key=lambda o: (o["gpu_hours"], o["hours"]))
    fastest_first = sorted(ok, key=lambda o: (o["hours"], o["gpu_hours"]))
    if deadline_hours is not None:
        rule = f"least cost that finishes within {deadline_hours:g} h" + (
            f" and {budget:,.0f} USD" if budget is not None else "")
        return (cheapest_first[0] if ok else None), rule
    if budget is not None:
        return (fastest_first[0] if ok else None), f"fastest within {budget:,.0f} USD"
    return (cheapest_first[0] if ok else None), "least cost (set a deadline or a budget to trade cost for time)"


def _price(hardware_name: str, price_per_gpu_hour: float | None, budget: float | None) -> tuple[float | None, str | None]:
    if price_per_gpu_hour is not None:
        if not price_per_gpu_hour > 0:
            raise InvalidRequest(f"--price-per-gpu-hour must be a positive number, got {price_per_gpu_hour!r}")
        return float(price_per_gpu_hour), "given"
    offer = default_price(hardware_name)
    if offer is None:
        if budget is not None:
            raise InvalidRequest(f"--budget needs a price: there is no default price for {hardware_name}; "
                                 "pass --price-per-gpu-hour")
        return None, None
    return float(offer["usd_per_gpu_hour"]), (f"{offer['provider']} {offer['offer']}, as of {offer['as_of']} "
                                             "(example default; pass --price-per-gpu-hour)")


def _check_numbers(tokens: float, deadline_hours: float | None, budget: float | None, max_gpus: int) -> None:
    for option, value in (("--tokens", tokens), ("--deadline-hours", deadline_hours), ("--budget", budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise InvalidRequest(f"{option} must be a positive number, got {value!r}")
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus <= 0:
        raise InvalidRequest(f"--max-gpus must be a positive whole number, got {max_gpus!r}")


def plan_capacity(request: Request, tokens: float, price_per_gpu_hour: float | None = None,
                  deadline_hours: float | None = None, budget: float | None = None,
                  max_gpus: int = DEFAULT_MAX_GPUS, flavor_family: str | None = None,
                  pins: Pins | None = None) -> dict[str, Any]:
    """The capacity curve and the recommendation. Raises Infeasible when no count fits."""
    _check_numbers(tokens, deadline_hours, budget, max_gpus)
    check_capacity(tokens, price_per_gpu_hour, deadline_hours, budget, max_gpus)  # upper bounds too
    requests = _requests(request, max_gpus, flavor_family)
    if not requests:
        raise InvalidRequest(f"--max-gpus {max_gpus} leaves no device count (or flavor) to consider; raise it")
    global_batch = request.workload.global_batch or max(resolve(r).cluster.num_devices for r, _ in requests)
    requests = [(replace(r, global_batch=global_batch), f) for r, f in requests]
    head = resolve(requests[0][0])
    price, price_source = _price(head.hardware.name, price_per_gpu_hour, budget)
    options = [_option(r, pins or Pins(), int(tokens), price, f) for r, f in requests]
    if not any(o["fits"] for o in options):
        largest = options[-1]
        raise Infeasible(f"no device count up to {largest['gpus']} x {largest['hardware']} fits {head.spec.name} "
                         f"(at {largest['gpus']}: {largest['reason']}); raise --max-gpus, use --method lora/qlora, "
                         f"or shorten --seq-len")
    _mark_pareto(options)
    chosen, rule = recommend(options, deadline_hours, budget)
    fitting = [o for o in options if o["fits"]]
    return {
        "model": head.spec.name, "hardware": head.hardware.name, "tokens": int(tokens),
        "seq_len": head.workload.seq_len, "global_batch": global_batch, "tokens_per_step": head.workload.tokens_per_step,
        "method": head.workload.method, "price_per_gpu_hour": price, "price_source": price_source,
        "deadline_hours": deadline_hours, "budget": budget, "rule": rule,
        "recommendation": chosen,
        "unmet": None if chosen else _unmet(fitting, deadline_hours, budget),
        "fastest": min(fitting, key=lambda o: (o["hours"], o["gpu_hours"])),
        "cheapest": min(fitting, key=lambda o: (o["gpu_hours"], o["hours"])),
        "options": options,
        "uncalibrated": head.context.uncalibrated,
    }


def _unmet(fitting: list[dict[str, Any]], deadline_hours: float | None, budget: float | None) -> str:
    fastest = min(fitting, key=lambda o: o["hours"])
    cheapest = min(fitting, key=lambda o: o["gpu_hours"])
    parts = []
    if deadline_hours is not None:
        parts.append(f"the fastest option ({fastest['gpus']} devices) needs {fastest['hours']:.1f} h, "
                     f"more than the {deadline_hours:g} h deadline")
    if budget is not None and cheapest["cost"] is not None:
        parts.append(f"the cheapest option ({cheapest['gpus']} devices) costs {cheapest['cost']:,.0f} USD")
    return "; ".join(parts) + "; raise --max-gpus, relax the deadline or budget, or train fewer tokens"
