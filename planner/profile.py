"""Calibration profiles: every free parameter of the cost model, as data.

`calibration/` fits and writes profiles; the planner only reads them. A profile is JSON:

  compute.<hardware>.<dtype>: matmul_efficiency_max, matmul_half_flops (GEMM size at which half
      the maximum is reached), attention_efficiency, memory_efficiency (fraction of HBM bandwidth
      that memory-bound ops reach), compiled_io_factor (share of that traffic left under
      torch.compile), layer_overhead_s (launching a layer's kernels, per micro-batch). <hardware> is
      a part (h100-sxm-80gb), its chip (GH100: what the parts of one silicon share) or a vendor;
      lookup falls back hardware.dtype -> hardware.* -> chip.dtype -> chip.* -> vendor.dtype ->
      vendor.* -> default.dtype -> default.*
  links.<tier>: efficiency (fraction of nominal bandwidth), latency_s — tiers intra, inter, pcie
  overlap: fraction of a communication's time that hides behind compute (tp, dp, zero, pp, offload;
      cp: the ring's K/V exchange behind the blockwise attention, ep: the MoE all-to-alls)
  moe: expert_imbalance (the busiest expert-parallel rank's routed tokens over the mean),
      overhead_factor (host time of an MoE block's router, permutation and dispatch, exposed by the
      dispatcher's device-to-host sync of the per-expert token counts, in units of the part's
      layer_overhead_s), source
  memory.<vendor or hardware>: fixed_bytes (framework + allocator), fragmentation (reserved /
      allocated - 1), largest_block_factor (reserved beyond that, in units of the step's largest
      single allocation), cpu memory for the executor's runs
  frameworks.<framework>: the software stack's factors on its chip's values (fitted, 1 when absent):
      matmul_factor (GEMM efficiency), attention_factor, fp8_factor (its float8 recipe: Transformer
      Engine's vs torchao's), layer_overhead_factor (kernel launches per layer)
  attention: causal_fraction (share of the score matrix a causal kernel computes),
      backward_factor (backward / forward FLOPs of flash attention)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from planner.errors import InvalidRequest, read_json
from planner.validity import check_profile_numbers

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "calibration" / "profiles" / "default.json"

COMPUTE_KEYS = ("matmul_efficiency_max", "matmul_half_flops", "attention_efficiency", "memory_efficiency",
                "compiled_io_factor", "layer_overhead_s")
TOP_KEYS = {"name", "version", "description", "fitted_on", "validation", "uncertainty", "compute", "links",
            "overlap", "memory", "attention", "moe", "frameworks"}
FRAMEWORK_KEYS = ("matmul_factor", "attention_factor", "fp8_factor", "layer_overhead_factor")
# a 95 % interval's half-width in standard deviations of a normal distribution
Z_95 = 1.96


@dataclass(frozen=True)
class ComputeParams:
    matmul_efficiency_max: float
    matmul_half_flops: float
    attention_efficiency: float
    memory_efficiency: float
    compiled_io_factor: float  # memory-bound traffic (and kernel launches) left after torch.compile's fusion
    layer_overhead_s: float  # host time to launch one layer's forward kernels, per micro-batch


@dataclass(frozen=True)
class LinkParams:
    efficiency: float
    latency_s: float


@dataclass(frozen=True)
class MemoryParams:
    fixed_bytes: float
    fragmentation: float
    largest_block_factor: float = 0.0


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    data: dict[str, Any]

    def compute(self, hardware: str, vendor: str, dtype: str, chip: str = "",
                framework: str = "executor") -> ComputeParams:
        table = self.data["compute"]
        merged: dict[str, float] = {}
        for key in (("default", "*"), ("default", dtype), (vendor, "*"), (vendor, dtype),
                    (chip, "*"), (chip, dtype), (hardware, "*"), (hardware, dtype)):
            merged.update(table.get(key[0], {}).get(key[1], {}))
        params = {k: float(merged[k]) for k in COMPUTE_KEYS}
        # A dtype's GEMMs reach a fraction of its own peak that is this factor times what the part's
        # bf16 GEMMs reach of theirs (compute.<level>.<dtype>.matmul_dtype_factor): a factor, not an
        # efficiency, so that it still applies on a chip whose own efficiency was fitted.
        params["matmul_efficiency_max"] *= float(merged.get("matmul_dtype_factor", 1.0))
        return ComputeParams(**self._framework_scaled(params, dtype, framework))

    def framework_factors(self, framework: str) -> dict[str, float]:
        """The framework's fitted factors on its chip's values (1 for any it lacks)."""
        entry = (self.data.get("frameworks") or {}).get(framework) or {}
        return {key: float(entry.get(key, 1.0)) for key in FRAMEWORK_KEYS}

    def _framework_scaled(self, params: dict[str, float], dtype: str, framework: str) -> dict[str, float]:
        factors = self.framework_factors(framework)
        matmul = factors["matmul_factor"] * (factors["fp8_factor"] if dtype == "fp8" else 1.0)
        params["matmul_efficiency_max"] = min(1.0, params["matmul_efficiency_max"] * matmul)
        params["attention_efficiency"] = min(1.0, params["attention_efficiency"] * factors["attention_factor"])
        params["layer_overhead_s"] *= factors["layer_overhead_factor"]
        return params

    def uncalibrated(self, hardware: str, chip: str, framework: str) -> list[str]:
        """What of a prediction no measured run calibrated: the chip (a part counts as measured when
        a part of its chip was) and the framework. Empty for profiles that do not record it."""
        fitted = self.data.get("fitted_on")
        if not isinstance(fitted, dict) or "chips" not in fitted:
            return []
        missing = [] if (chip or hardware) in fitted["chips"] or hardware in fitted.get("hardware", []) \
            else [f"chip {chip or hardware}"]
        return missing + ([] if framework in fitted.get("frameworks", []) else [f"framework {framework}"])

    def link(self, tier: str) -> LinkParams:
        entry = self.data["links"][tier]
        return LinkParams(efficiency=float(entry["efficiency"]), latency_s=float(entry["latency_s"]))

    def overlap(self, kind: str) -> float:
        return float(self.data["overlap"][kind])

    def parallel_overlap(self, kind: str) -> float:
        """Overlap of context- ("cp") or expert-parallel ("ep") traffic; profiles from before
        these existed hide none of it."""
        return float(self.data["overlap"].get(kind, 0.0))

    def expert_imbalance(self) -> float:
        """Routed tokens on the busiest expert-parallel rank over the mean (>= 1)."""
        moe = self.data.get("moe")
        if not isinstance(moe, dict) or "expert_imbalance" not in moe:
            raise InvalidRequest(f"calibration profile {self.path}: moe.expert_imbalance is missing; "
                                 "add it (calibration/profiles/initial.json has the starting value)")
        return float(moe["expert_imbalance"])

    def moe_overhead_factor(self) -> float:
        """An MoE block's extra host-side time per micro-batch in units of the layer's launch overhead;
        0 in profiles from before it existed."""
        moe = self.data.get("moe")
        return float(moe.get("overhead_factor", 0.0)) if isinstance(moe, dict) else 0.0

    def hidden_comm_cost(self) -> float:
        """Seconds a collective hidden behind compute still adds per second it runs (its kernels take
        SMs and HBM bandwidth from the compute); 0 in profiles from before it existed."""
        return float(self.data["overlap"].get("hidden_cost", 0.0))

    def memory(self, hardware: str, vendor: str) -> MemoryParams:
        table = self.data["memory"]
        entry = table.get(hardware) or table.get(vendor) or table["default"]
        return MemoryParams(fixed_bytes=float(entry["fixed_bytes"]), fragmentation=float(entry["fragmentation"]),
                            largest_block_factor=float(entry.get("largest_block_factor", 0.0)))

    def attention(self, key: str) -> float:
        return float(self.data["attention"][key])

    def log_interval(self, kind: str, vendor: str = "default",
                     uncalibrated: list[str] | tuple[str, ...] = ()) -> tuple[float, float] | None:
        """(low, high) quantiles of log(measured / predicted) from cross-validation, or None.
        kind: "throughput" or "memory" (memory per vendor when the profile has enough runs).
        `uncalibrated` (Profile.uncalibrated's list) widens it by the spread across chips and
        across frameworks of their fitted values (calibration/fitting.py spread), added in
        quadrature: the calibrated runs' residuals do not say how far an unmeasured one lies."""
        table = self.data.get("uncertainty") or {}
        if kind == "throughput":
            values = table.get("throughput_log_residual")
        else:
            by_vendor = table.get("memory_log_residual") or {}
            values = (by_vendor.get("default") if uncalibrated else None) or by_vendor.get(vendor) \
                or by_vendor.get("default")
        if not values:
            return None
        low, high = float(values[0]), float(values[1])
        spread = table.get("uncalibrated_log_sd") or {}
        variance = sum(float((spread.get(what.split(" ")[0]) or {}).get(kind) or 0.0) ** 2 for what in uncalibrated)
        if variance:
            widen = (Z_95 ** 2) * variance  # each side's distance from 0 grows in quadrature
            low, high = low - (math.sqrt(low ** 2 + widen) - abs(low)), high + (math.sqrt(high ** 2 + widen) - abs(high))
        return low, high

    def memory_margin(self, vendor: str) -> float:
        """Default safety margin on memory: how far the measured peak exceeded the prediction for
        9 runs in 10 out of sample (calibration/crossval.py; 0 without cross-validation)."""
        margins = (self.data.get("uncertainty") or {}).get("memory_margin") or {}
        value = margins.get(vendor, margins.get("default"))
        return float(value) if value is not None else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.data.get("version"),
                "fitted_on": self.data.get("fitted_on", {}).get("summary") if isinstance(
                    self.data.get("fitted_on"), dict) else self.data.get("fitted_on")}


@cache
def load_profile(path: str | None = None) -> Profile:
    target = Path(path).expanduser() if path else DEFAULT_PROFILE
    data = read_json(target, "calibration profile")
    _check(data, target)
    return Profile(name=str(data.get("name", target.stem)), path=str(target), data=data)


def _check(data: Any, where: Path) -> None:
    if not isinstance(data, dict):
        raise InvalidRequest(f"calibration profile {where} must be a JSON object")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise InvalidRequest(f"calibration profile {where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("compute", "links", "overlap", "memory", "attention"):
        if not isinstance(data.get(key), dict):
            raise InvalidRequest(f"calibration profile {where}: missing section {key!r}")
    default = {**data["compute"].get("default", {}).get("*", {})}
    missing = [k for k in COMPUTE_KEYS if k not in default]
    if missing:
        raise InvalidRequest(f"calibration profile {where}: compute.default.* lacks {', '.join(missing)}")
    for tier in ("intra", "inter", "pcie"):
        if tier not in data["links"]:
            raise InvalidRequest(f"calibration profile {where}: links lacks tier {tier!r}")
    for kind in ("tp", "dp", "zero", "pp", "offload"):
        if kind not in data["overlap"]:
            raise InvalidRequest(f"calibration profile {where}: overlap lacks {kind!r}")
    if "default" not in data["memory"]:
        raise InvalidRequest(f"calibration profile {where}: memory lacks 'default'")
    check_profile_numbers(data, where)
