"""What a run measured: DIR/metrics.jsonl (one object per step), peak memory, and the run record
DIR/summary.json (format llm-planner/run@1) that the calibration store imports."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WARMUP_STEPS = 2  # excluded from the steady-state medians (allocator warm-up, compilation)


class MetricsLog:
    """Append-only JSONL, flushed every line; on resume the lines after the checkpoint go."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.attempt = os.environ.get("EXECUTOR_ATTEMPT")  # the launcher's tag: whose rows these are

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "attempt": self.attempt} if self.attempt else record) + "\n")


@dataclass
class Recorder:
    """Per-step numbers kept for the run record."""

    tokens_per_step: int
    world_size: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None

    def add(self, step: int, loss: float, seconds: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.step_s.append(seconds)

    def note_memory(self, allocated: int | None, reserved: int | None) -> None:
        if allocated is not None:
            self.peak_allocated_bytes = max(self.peak_allocated_bytes or 0, int(allocated))
        if reserved is not None:
            self.peak_reserved_bytes = max(self.peak_reserved_bytes or 0, int(reserved))

    def measured(self) -> dict[str, Any]:
        steady = self.step_s[WARMUP_STEPS:] if len(self.step_s) > 2 * WARMUP_STEPS else self.step_s
        step_s = statistics.median(steady) if steady else None
        tokens_per_s = self.tokens_per_step / step_s if step_s else None
        return {"steps": len(self.steps), "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / self.world_size if tokens_per_s else None,
                "step_s": step_s, "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


def cuda_peaks(device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


class CpuMemoryProbe:
    """Tensor bytes of one real training step on the CPU, by torch's MemTracker (the same numbers
    as the fake-tensor oracle; RSS and tracemalloc do not see tensor memory).

    MemTracker follows one root forward per tracker; before each micro-batch's root forward its
    per-module statistics are cleared (the device peak is kept), which a global pre-hook does,
    registered before the tracker's own hooks so that it runs first."""

    def __init__(self, roots: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.roots, self.optimizers = roots, optimizers
        self.error: str | None = None

    def track(self, run_step) -> int | None:
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.nn.modules.module import register_module_forward_pre_hook

        tracker = MemTracker()
        for root in self.roots:  # frozen weights (LoRA) take no gradient hook: mark them as hooked
            for param in root.parameters():
                if not param.requires_grad:
                    tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
        tracker.track_external(*self.roots, *self.optimizers)
        root_ids = {id(m) for m in self.roots}
        handle = register_module_forward_pre_hook(
            lambda module, args: tracker.reset_mod_stats() if id(module) in root_ids else None)
        try:
            with tracker:
                run_step()
        except Exception as exc:  # the tracker does not know every wrapper; the run goes on without it
            self.error = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            handle.remove()
        peaks = tracker.get_tracker_snapshot("peak")
        return max((int(cats.get("Total", 0)) for cats in peaks.values()), default=None)


class _NoHook:
    def remove(self) -> None:
        pass


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": name,
            "world_size": world_size, "hostname": socket.gethostname()}


def run_record(status: str, error: str | None, plan: dict[str, Any], measured: dict[str, Any],
               env: dict[str, Any], details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run@1 record (planner/runrecord.py `new_record`, which the store reads back); executor
    facts (options, data report, notes) go under `details`, which the store keeps as they are."""
    from planner.runrecord import new_record

    return {**new_record(plan, measured, status=status, error=error, environment=env), "details": details or {}}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def comparison_lines(plan: dict[str, Any], measured: dict[str, Any]) -> list[str]:
    """Predicted vs measured, side by side, for what `planner train` prints at the end."""
    prediction = plan.get("prediction") or {}
    time, memory = prediction.get("time", {}), prediction.get("memory", {})
    rows = [("tokens/s (job)", time.get("tokens_per_s"), measured.get("tokens_per_s"), "{:,.0f}"),
            ("tokens/s per device", time.get("tokens_per_s_per_device"), measured.get("tokens_per_s_per_device"), "{:,.0f}"),
            ("step s", time.get("step_s"), measured.get("step_s"), "{:.3f}"),
            ("peak tensor GiB", _gib(memory.get("allocated_peak_bytes")), _gib(measured.get("peak_allocated_bytes")), "{:.3f}"),
            ("peak reserved GiB", _gib(memory.get("peak_bytes")), _gib(measured.get("peak_reserved_bytes")), "{:.3f}")]
    lines = [f"{'':22}{'predicted':>14}{'measured':>14}{'measured/predicted':>20}"]
    for label, predicted, got, fmt in rows:
        ratio = f"{got / predicted:.2f}" if predicted and got else "-"
        lines.append(f"{label:22}{_fmt(predicted, fmt):>14}{_fmt(got, fmt):>14}{ratio:>20}")
    return lines


def _gib(value: float | None) -> float | None:
    return None if value is None else value / 2**30


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
