"""What the Streamlit app shows, as plain Python (no streamlit, no cost model): the page turns
widgets into `fields`, calls these, and draws the rows. Kept here so it is tested without a browser.

Everything is computed through planner.api, planner.whatfits, planner.capacity and planner.export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from planner.api import Request, make_plan, resolve, suggest
from planner.capacity import default_price, plan_capacity
from planner.errors import Infeasible, InvalidRequest, parse_json
from planner.export import export_plan
from planner.plan import Plan
from planner.format import duration, uncalibrated_note
from planner.hardware import FLAVOR_DEVICE, flavor_devices
from planner.models import SUPPORTED_TYPES, spec_from_hf_config
from planner.profile import load_profile
from planner.whatfits import what_fits

GIB = 2**30
CATEGORY_WORDS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
                  "activations": "activations", "logits": "logits / loss", "buffers": "gathered params & buffers",
                  "overhead": "allocator & framework"}
REQUEST_FIELDS = ("model", "gpu", "gpus", "flavor", "seq_len", "global_batch", "method", "lora_rank",
                  "lora_targets", "precision", "target", "framework")
TARGET_ENGINES = ("executor", "deepspeed", "accelerate", "torchtitan", "megatron")
FRAMEWORK_WORDS = {"executor": "this project's executor", "torchtitan": "torchtitan",
                   "megatron": "Megatron-Core / NeMo (Transformer Engine)", "deepspeed": "DeepSpeed",
                   "hf": "HF Trainer / TRL / Accelerate", "llm-foundry": "llm-foundry", "torchtune": "torchtune"}
METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def has_target() -> bool:
    """Whether planner.api.Request takes a target engine (the page shows the select only then)."""
    return any(f.name == "target" for f in dataclasses.fields(Request))


def upload_hint() -> str:
    """What the upload box takes: every model_type the planner reads."""
    return f"Upload a Hugging Face config.json (model_type one of: {', '.join(SUPPORTED_TYPES)})."


def uncalibrated_warning(missing: list[str] | None) -> str | None:
    """The page's flag for a chip or framework that no measured run calibrated."""
    note = uncalibrated_note(missing)
    return note[0].upper() + note[1:] if note else None


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def headline(fields: dict[str, Any], config_text: str | None = None) -> str:
    """The page title from the widgets alone (no cost model), drawn before the computation starts."""
    model = fields.get("model") or fields.get("upload_name") or "uploaded config"
    if config_text is not None:
        try:
            model = json.loads(config_text).get("_name_or_path") or model
        except (json.JSONDecodeError, AttributeError):
            pass  # the computation reports the bad upload
    if fields.get("flavor"):
        return f"{model} on {flavor_devices(fields['flavor'])} x {FLAVOR_DEVICE}"
    return f"{model} on {fields.get('gpus') or 1} x {fields.get('gpu')}"


def request_summary(fields: dict[str, Any]) -> str:
    """The request in words, e.g. "sequences of 4,096 tokens, global batch 64, full fine-tuning, bf16"."""
    words = [f"sequences of {fields.get('seq_len', 4096):,} tokens",
             f"global batch {fields['global_batch']:,}" if fields.get("global_batch") else "one sequence per device",
             METHOD_WORDS.get(fields.get("method", "full"), str(fields.get("method")))]
    if fields.get("method", "full") != "full":
        words[-1] += f" (rank {fields.get('lora_rank', 16)} on {', '.join(fields.get('lora_targets') or ()) or 'nothing'})"
    words.append(fields.get("precision", "bf16"))
    if fields.get("flavor"):
        words.append(f"MoAI flavor {fields['flavor']}")
    if fields.get("target"):
        words.append(f"for {fields['target']}")
    return ", ".join(words)


def request_from(fields: dict[str, Any], config_text: str | None = None) -> Request:
    """A Request from the page's widget values; `config_text` is an uploaded config.json."""
    values = {k: fields[k] for k in REQUEST_FIELDS if k in fields and (k != "target" or has_target())}
    values["lora_targets"] = tuple(values.get("lora_targets") or ())
    if not values["lora_targets"] and values.get("method", "full") == "full":
        del values["lora_targets"]  # full training: the Workload's default (unused) targets
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


def memory_interval_rows(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The predicted peak per candidate and its ~80 % interval (calibration cross-validation), in GiB;
    empty when the calibration profile carries no interval."""
    rows = []
    for rank, c in enumerate(candidates, start=1):
        low_high = c["memory"].get("peak_bytes_range")
        if low_high:
            rows.append({"candidate": f"#{rank}", "peak GiB": c["memory"]["peak_bytes"] / GIB,
                         "low GiB": low_high[0] / GIB, "high GiB": low_high[1] / GIB})
    return rows


def candidate_rows(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full layout per candidate (dp, tp, pp, cp, ep, vpp, SP, ZeRO, offload, recompute,
    micro-batch) and what it costs, with the ~80 % intervals in words."""
    rows = []
    for rank, c in enumerate(candidates, start=1):
        cfg, mem, time = c["config"], c["memory"], c["time"]
        rows.append({"#": rank, "DP": cfg["dp"], "TP": cfg["tp"], "PP": cfg["pp"], "CP": cfg.get("cp", 1),
                     "EP": cfg.get("ep", 1), "VPP": cfg.get("vpp", 1),
                     "SP": "yes" if cfg.get("sequence_parallel") else "no", "ZeRO": _distribution(cfg),
                     "offload": cfg.get("offload", "none"), "recompute": cfg["recompute"],
                     "micro-batch": cfg["micro_batch_size"], "micro-batches": cfg["num_micro_batches"],
                     "GiB per device": _with_span(mem["peak_bytes"], mem.get("peak_bytes_range"), GIB, ".1f"),
                     "tokens/s": _with_span(time["tokens_per_s"], time.get("tokens_per_s_range"), 1, ",.0f", _thousands),
                     "MFU": f"{time['mfu']:.1%}"})
    return rows


def _with_span(value: float, low_high: list[float] | None, unit: float, spec: str,
               bound: Callable[[float], str] | None = None) -> str:
    """e.g. "64.1 (55.5–77.7)" or "237,859 (175k–330k)": the prediction and its ~80 % interval
    (each bound through `bound`, else like the value), or the prediction alone."""
    text = f"{value / unit:{spec}}"
    if not low_high:
        return text
    low, high = (bound(v / unit) if bound else f"{v / unit:{spec}}" for v in low_high)
    return f"{text} ({low}–{high})"


def _thousands(value: float) -> str:
    """A rough bound, short: 174,980 -> "175k", 48,145 -> "48.1k", 950 -> "950"."""
    if value >= 1e4:
        return f"{value / 1e3:,.0f}k"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def _distribution(cfg: dict[str, Any]) -> str:
    return {0: "0 (replicated)", 1: "1 (optimizer)", 2: "2 (+grads)", 3: "3 (FSDP)"}[cfg["zero"]]


def rejected_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"reason": reason, "candidates": count} for reason, count in result["rejected"].items()]


def scaling_rows(capacity: dict[str, Any], price_per_gpu_hour: float | None,
                 throughput_log_interval: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """tokens/s (total, per device, its ~80 % interval) and the cost of a million tokens
    (price x devices / tokens per hour) per device count; `linear` is perfect scaling from the
    smallest count. The interval is value x exp(quantiles of log(measured / predicted)), as
    planner/cost/estimate.py's _range."""
    fitting = [o for o in capacity["options"] if o["fits"]]
    rows = []
    for o in fitting:
        gpu_hours_per_mtok = o["gpus"] * 1e6 / (o["tokens_per_s"] * 3600)
        low_high = o.get("tokens_per_s_range") or (
            [o["tokens_per_s"] * math.exp(q) for q in throughput_log_interval] if throughput_log_interval else None)
        rows.append({"devices": o["gpus"], "tokens/s": o["tokens_per_s"], "tokens/s per device": o["tokens_per_s"] / o["gpus"],
                     "tokens/s low": low_high[0] if low_high else None, "tokens/s high": low_high[1] if low_high else None,
                     "linear": fitting[0]["tokens_per_s"] * o["gpus"] / fitting[0]["gpus"],
                     "GPU-hours per M tokens": gpu_hours_per_mtok,
                     "USD per M tokens": None if price_per_gpu_hour is None else gpu_hours_per_mtok * price_per_gpu_hour})
    return rows


def capacity_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The capacity table for people: every number formatted with its unit, "-" where it does not fit."""
    rows = []
    for o in result["options"]:
        fits = o["fits"]
        rows.append({"option": o["flavor"] or plural(o["gpus"], "device"), "devices": o["gpus"],
                     "fits": "yes" if fits else "no",
                     "time": duration(o["hours"] * 3600) if fits else "-",
                     "GPU-hours": f"{o['gpu_hours']:,.0f}" if fits else "-",
                     "cost USD": f"{o['cost']:,.0f}" if fits and o["cost"] is not None else "-",
                     "tokens/s": f"{o['tokens_per_s']:,.0f}" if fits else "-",
                     "MFU": f"{o['mfu']:.1%}" if fits else "-",
                     "GiB per device": f"{o['peak_bytes'] / GIB:.1f}" if fits else "-",
                     "why not": o["reason"] or ""})
    return rows


def capacity_chart_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Time and cost (USD, or GPU-hours without a price) against devices, one row per fitting option and measure."""
    rows = []
    for o in result["options"]:
        if not o["fits"]:
            continue
        label = o["flavor"] or plural(o["gpus"], "device")
        rows.append({"devices": o["gpus"], "option": label, "measure": "time (hours)", "value": o["hours"]})
        cost = ("cost (USD)", o["cost"]) if o["cost"] is not None else ("GPU-hours", o["gpu_hours"])
        rows.append({"devices": o["gpus"], "option": label, "measure": cost[0], "value": cost[1]})
    return rows


def recommendation_text(result: dict[str, Any]) -> str | None:
    best = result["recommendation"]
    if best is None:
        return None
    cost = "" if best["cost"] is None else f", {best['cost']:,.0f} USD"
    return (f"Recommended ({result['rule']}): {best['flavor'] or plural(best['gpus'], 'device')} — "
            f"{duration(best['hours'] * 3600)}, {best['gpu_hours']:,.0f} GPU-hours{cost}")


def launch_text(plan: Plan) -> str:
    """How to run the plan on the engine it was ranked for: the executor's torchrun line, or the
    engine's own config; the export's notes follow as comments where the format has them."""
    fmt = {"executor": "torchrun"}.get(plan.target, plan.target)
    result = export_plan(plan, fmt)
    if fmt == "deepspeed":  # JSON has no comments
        return result.text
    return result.text + "".join(f"# note: {note}\n" for note in result.notes)


def what_fits_page(fields: dict[str, Any], config_text: str | None = None) -> dict[str, Any]:
    """Everything the "What fits?" page shows. Bad input raises InvalidRequest; when nothing fits
    the result has `infeasible` (the planner's message, with what would fit) instead of candidates."""
    request = request_from(fields, config_text)
    resolved = resolve(request)
    page: dict[str, Any] = {"model": resolved.spec.name, "hardware": resolved.hardware.name,
                            "gpus": resolved.cluster.num_devices, "capacity_bytes": resolved.hardware.memory_bytes,
                            "uncalibrated": uncalibrated_warning(resolved.context.uncalibrated)}
    limits = what_fits(request, methods=(request.workload.method,))["methods"][0]
    page["limits"] = {"largest_micro_batch": limits["largest_micro_batch"], "longest_seq_len": limits["longest_seq_len"],
                      "fewest_devices": limits["fewest_devices"]}
    try:
        result = suggest(request, top=int(fields.get("top", 5)))
    except Infeasible as exc:
        page["infeasible"] = str(exc)
        return page
    best = result["candidates"][0]
    plan = make_plan(request, best, runner_ups=result["candidates"][1:])
    page.update(result=result, verdict=verdict(best), summary=result["summary"], plan=plan.to_dict(),
                memory=memory_rows(result["candidates"]), memory_intervals=memory_interval_rows(result["candidates"]),
                candidates=candidate_rows(result["candidates"]),
                rejected=rejected_rows(result), launch=launch_text(plan))
    return page


def scaling_page(fields: dict[str, Any], config_text: str | None, price_per_gpu_hour: float | None) -> list[dict[str, Any]]:
    """The scaling curve around the chosen cluster: device counts up to four times it."""
    request = request_from(fields, config_text)
    gpus = resolve(request).cluster.num_devices
    try:
        curve = plan_capacity(request, tokens=1e9, price_per_gpu_hour=price_per_gpu_hour, max_gpus=gpus * 4)
    except Infeasible:
        return []
    return scaling_rows(curve, curve["price_per_gpu_hour"], load_profile(request.calibration).log_interval("throughput"))


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
