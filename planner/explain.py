"""Words for people: the seed-style summary line of a configuration, why runner-ups lost, and
what would make an infeasible request fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

TIME_WORDS = {"compute": "compute", "recompute": "recomputation", "tp_comm": "tensor-parallel communication",
              "pp_bubble": "pipeline bubble", "pp_comm": "pipeline sends", "dp_comm": "data-parallel/ZeRO communication",
              "optimizer": "optimizer step", "offload": "host offload traffic",
              "cp_comm": "context-parallel ring attention", "ep_comm": "expert-parallel all-to-alls"}
CONFIG_KEYS = ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "recompute", "zero", "offload",
               "sequence_parallel", "vpp", "cp", "ep")


def seed_summary(config: dict[str, Any]) -> str:
    """MoAI Advanced Parallelism's line, e.g. `num_stages : 8, num_micro_batches : 64,
    batch_per_device : 1, No TP, recomputation : full, distribute_param : true`."""
    tp = "No TP" if config["tp"] == 1 else f"TP : {config['tp']}" + (" (sequence parallel)" if config["sequence_parallel"] else "")
    parts = [f"num_stages : {config['pp']}", f"num_micro_batches : {config['num_micro_batches']}",
             f"batch_per_device : {config['micro_batch_size']}", tp, f"recomputation : {config['recompute']}",
             f"distribute_param : {str(config['zero'] >= 2).lower()}", f"zero : {config['zero']}",
             f"data_parallel : {config['dp']}"]
    if config["vpp"] > 1:
        parts.append(f"virtual_stages : {config['vpp']}")
    if config.get("cp", 1) > 1:
        parts.append(f"context_parallel : {config['cp']}")
    if config.get("ep", 1) > 1:
        parts.append(f"expert_parallel : {config['ep']}")
    if config["offload"] != "none":
        parts.append(f"offload : {config['offload']}")
    return ", ".join(parts)


def config_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    names = {"micro_batch_size": "mbs", "num_micro_batches": "micro-batches", "sequence_parallel": "sp"}
    return ", ".join(f"{names.get(k, k)} {b[k]}" for k in CONFIG_KEYS if a[k] != b[k] and k != "num_micro_batches") or "same layout"


def explain_runner_ups(predictions: list[dict[str, Any]]) -> list[str]:
    """For each runner-up: how much slower than the winner, and where the time goes."""
    if not predictions:
        return []
    best = predictions[0]
    lines = []
    for rank, other in enumerate(predictions[1:], start=2):
        slower = other["time"]["step_s"] / best["time"]["step_s"] - 1
        deltas = {k: other["time"]["breakdown"][k] - best["time"]["breakdown"][k] for k in TIME_WORDS}
        worst = max(deltas, key=deltas.get)
        memory_gib = other["memory"]["peak_bytes"] / 2**30
        lines.append(f"#{rank} ({config_difference(best['config'], other['config'])}): {slower:+.1%} step time, "
                     f"mostly {TIME_WORDS[worst]} (+{deltas[worst]:.3f} s); {memory_gib:.1f} GiB per device")
    return lines


def what_would_fit(request, resolved, pins, fits: Callable[[Any, Any], bool]) -> str:
    """Try the usual ways out, cheapest first, and say which work, with the numbers."""
    ideas = ways_out(request, resolved, pins, fits)
    if not ideas:
        return "Nothing simple makes it fit: try a larger device or many more devices."
    return "It would fit with " + "; or ".join(ideas) + "."


def ways_out(request, resolved, pins, fits: Callable[[Any, Any], bool]) -> list[str]:
    """The usual ways out that work, cheapest first: another engine, more devices, LoRA/QLoRA, a
    shorter sequence, freeing pinned options."""
    from planner.capabilities import TARGETS

    ideas = []
    for target in TARGETS:  # another engine that runs what this one cannot (context parallelism, ...)
        if target != request.target and fits(replace(request, target=target), pins):
            engine = "this project's executor" if target == "executor" else target
            ideas.append(f"--target {target} (planned for {engine}; its own export)")
            break
    devices = resolved.cluster.num_devices
    for factor in (2, 4, 8, 16, 32, 64):
        more = replace(request, gpus=devices * factor, flavor=None, gpu=resolved.hardware.name,
                       global_batch=max(request.workload.global_batch or 0, devices * factor))
        if fits(more, pins):
            ideas.append(f"{devices * factor} devices instead of {devices}")
            break
    for method in ("lora", "qlora"):
        if request.workload.method == "full" or (request.workload.method == "lora" and method == "qlora"):
            if method == "qlora" and (pins.tp or 1) > 1:
                continue
            if fits(replace(request, method=method), replace(pins, tp=None) if method == "qlora" else pins):
                ideas.append(f"--method {method}")
                break
    seq = request.workload.seq_len
    while seq > 128:
        seq //= 2
        if fits(replace(request, seq_len=seq), pins):
            ideas.append(f"--seq-len {seq}")
            break
    if pins.offload == "none" or pins.zero not in (None, 3) or pins.recompute not in (None, "full"):
        free = replace(pins, offload=None, zero=None, recompute=None)
        if fits(request, free):
            ideas.append("letting the search choose --zero, --recompute and --offload")
    return ideas + _eager_ways_out(request, resolved, pins, fits)


def _eager_ways_out(request, resolved, pins, fits: Callable[[Any, Any], bool]) -> list[str]:
    """A model transformers runs without sdpa (planner/capabilities.py SDPA_LESS_FAMILIES) asked with
    sdpa: eager attention, alone or with the first way out that then works."""
    from planner.capabilities import SDPA_LESS_FAMILIES

    if request.workload.attention != "sdpa" or resolved.spec.family not in SDPA_LESS_FAMILIES:
        return []
    eager = replace(request, attention="eager")
    if fits(eager, pins):
        return ["--attention eager"]
    return [f"--attention eager and {idea}" for idea in ways_out(eager, resolved, pins, fits)[:1]]
