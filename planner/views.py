"""What the Streamlit app shows, as plain Python (no streamlit, no cost model): the page turns
widgets into `fields`, calls these, and draws the rows. Kept here so it is tested without a browser.

Everything is computed through planner.api, planner.whatfits, planner.capacity and planner.export.
"""

from __future__ import annotations

from typing import Any

from planner.api import Request, make_plan, resolve, suggest
from planner.capacity import default_price, plan_capacity
from planner.errors import Infeasible, InvalidRequest, parse_json
from planner.export import export_plan
from planner.models import spec_from_hf_config
from planner.whatfits import what_fits

GIB = 2**30
CATEGORY_WORDS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
                  "activations": "activations", "logits": "logits / loss", "buffers": "gathered params & buffers",
                  "overhead": "allocator & framework"}
REQUEST_FIELDS = ("model", "gpu", "gpus", "flavor", "seq_len", "global_batch", "method", "lora_rank",
                  "lora_targets", "precision")


def request_from(fields: dict[str, Any], config_text: str | None = None) -> Request:
    """A Request from the page's widget values; `config_text` is an uploaded config.json."""
    values = {k: fields[k] for k in REQUEST_FIELDS if k in fields}
    values["lora_targets"] = tuple(values.get("lora_targets") or ())
    if config_text is not None:
        config = parse_json(config_text, "the uploaded config.json")
        if not isinstance(config, dict):
            raise InvalidRequest("the uploaded config.json must hold a JSON object")
        name = str(config.get("_name_or_path") or fields.get("upload_name") or "uploaded-config")
        values["model"] = spec_from_hf_config(config, name=name, source="uploaded config.json")
    if values.get("flavor"):
        values["gpu"], values["gpus"] = None, None
    return Request(**values)


def verdict(best: dict[str, Any]) -> str:
    mem = best["memory"]
    spare = mem["capacity_bytes"] - mem["peak_bytes"]
    return (f"Fits. The fastest plan needs {mem['peak_bytes'] / GIB:.1f} GiB of the {mem['capacity_bytes'] / GIB:.1f} GiB "
            f"per device ({spare / GIB:.1f} GiB, {spare / mem['capacity_bytes']:.0%} to spare) and trains "
            f"{best['time']['tokens_per_s']:,.0f} tokens/s at {best['time']['mfu']:.0%} MFU.")


def memory_rows(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stacked-bar rows: one per (candidate, category), in GiB per device."""
    return [{"candidate": f"#{rank}", "category": CATEGORY_WORDS.get(k, k), "GiB": v / GIB}
            for rank, c in enumerate(candidates, start=1) for k, v in c["memory"]["breakdown"].items() if v > 0]


def candidate_rows(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rank, c in enumerate(candidates, start=1):
        cfg = c["config"]
        rows.append({"#": rank, "stages (pp)": cfg["pp"], "TP": cfg["tp"], "DP": cfg["dp"],
                     "micro-batches": cfg["num_micro_batches"], "batch per device": cfg["micro_batch_size"],
                     "recompute": cfg["recompute"], "param distribution": _distribution(cfg),
                     "GiB per device": round(c["memory"]["peak_bytes"] / GIB, 1),
                     "tokens/s": round(c["time"]["tokens_per_s"]), "MFU": f"{c['time']['mfu']:.1%}"})
    return rows


def _distribution(cfg: dict[str, Any]) -> str:
    words = {0: "replicated", 1: "ZeRO-1 (optimizer)", 2: "ZeRO-2 (+grads)", 3: "ZeRO-3 / FSDP (+params)"}[cfg["zero"]]
    return words + (f", offload {cfg['offload']}" if cfg["offload"] != "none" else "")


def rejected_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"reason": reason, "candidates": count} for reason, count in result["rejected"].items()]


def scaling_rows(capacity: dict[str, Any], price_per_gpu_hour: float | None) -> list[dict[str, Any]]:
    """tokens/s and the cost of a million tokens (price x devices / tokens per hour) per device count."""
    rows = []
    for o in capacity["options"]:
        if not o["fits"]:
            continue
        gpu_hours_per_mtok = o["gpus"] * 1e6 / (o["tokens_per_s"] * 3600)
        rows.append({"devices": o["gpus"], "tokens/s": o["tokens_per_s"], "GPU-hours per M tokens": gpu_hours_per_mtok,
                     "USD per M tokens": None if price_per_gpu_hour is None else gpu_hours_per_mtok * price_per_gpu_hour})
    return rows


def what_fits_page(fields: dict[str, Any], config_text: str | None = None) -> dict[str, Any]:
    """Everything the "What fits?" page shows. Bad input raises InvalidRequest; when nothing fits
    the result has `infeasible` (the planner's message, with what would fit) instead of candidates."""
    request = request_from(fields, config_text)
    resolved = resolve(request)
    page: dict[str, Any] = {"model": resolved.spec.name, "hardware": resolved.hardware.name,
                            "gpus": resolved.cluster.num_devices, "capacity_bytes": resolved.hardware.memory_bytes}
    limits = what_fits(request, methods=(request.method,))["methods"][0]
    page["limits"] = {"largest_micro_batch": limits["largest_micro_batch"], "longest_seq_len": limits["longest_seq_len"],
                      "fewest_devices": limits["fewest_devices"]}
    try:
        result = suggest(request, top=int(fields.get("top", 5)))
    except Infeasible as exc:
        page["infeasible"] = str(exc)
        return page
    best = result["candidates"][0]
    plan = make_plan(request, best, runner_ups=result["candidates"][1:])
    page.update(result=result, verdict=verdict(best), summary=result["summary"], plan=plan,
                memory=memory_rows(result["candidates"]), candidates=candidate_rows(result["candidates"]),
                rejected=rejected_rows(result), launch=export_plan(plan, "torchrun").text)
    return page


def scaling_page(fields: dict[str, Any], config_text: str | None, price_per_gpu_hour: float | None) -> list[dict[str, Any]]:
    """The scaling curve around the chosen cluster: device counts up to four times it."""
    request = request_from(fields, config_text)
    gpus = resolve(request).cluster.num_devices
    try:
        curve = plan_capacity(request, tokens=1e9, price_per_gpu_hour=price_per_gpu_hour, max_gpus=gpus * 4)
    except Infeasible:
        return []
    return scaling_rows(curve, curve["price_per_gpu_hour"])


def capacity_page(fields: dict[str, Any], config_text: str | None, tokens: float, price_per_gpu_hour: float | None,
                  deadline_hours: float | None, budget: float | None, max_gpus: int, moai: bool) -> dict[str, Any]:
    request = request_from({**fields, "gpus": None, "flavor": None}, config_text)
    return plan_capacity(request, tokens=tokens, price_per_gpu_hour=price_per_gpu_hour, deadline_hours=deadline_hours,
                         budget=budget, max_gpus=max_gpus, flavor_family="moai" if moai else None)


def price_hint(hardware_name: str) -> tuple[float | None, str]:
    offer = default_price(hardware_name)
    if offer is None:
        return None, "no example price for this hardware: enter yours"
    return float(offer["usd_per_gpu_hour"]), f"example: {offer['provider']} {offer['offer']} ({offer['as_of']})"
