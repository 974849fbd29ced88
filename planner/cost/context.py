"""What the cost functions need about one request, built once and shared by every candidate:
the graph summaries for both numerics regimes, hardware and calibration parameters, and the
per-stage layout of a pipeline (which stage holds which layers, how many micro-batches it keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.summary import KindSummaries, ParamGroups, PartSummary, mean_layer, summarize_ops, summarize_parts
from planner.graph import build_graph, numerics_for
from planner.hardware import chip_of
from planner.ops import Numerics
from planner.profile import ComputeParams, Profile
from planner.specs import Cluster, ModelSpec, Workload

# The dtype of every GEMM that is not a float8 linear (attention, the LM head, LoRA adapters): under
# fp8 training only the decoder layers' linears run in float8 (torchao Float8Linear via torchtitan,
# TransformerEngine's te.Linear via llm-foundry); the rest stays bf16.
COMPUTE_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp8": "bf16", "fp32": "fp32"}
FLOAT8 = "fp8"


@dataclass(frozen=True)
class Regime:
    """The graph summaries for one numerics regime (autocast over fp32 params, or params already
    in the compute dtype under FSDP2 / a frozen bf16 base)."""

    numerics: Numerics
    layer: PartSummary
    embedding: PartSummary
    head: PartSummary
    kinds: KindSummaries = ()  # a stack of several kinds of layer: each kind's summary and layers
    # the routed experts' share of one layer's parameters (zero for a dense model): what expert
    # parallelism divides over its ranks
    experts: ParamGroups = ParamGroups()
    # a stack of several kinds: whether each kind's layers hold routed experts (in the order of `kinds`)
    expert_kinds: tuple[bool, ...] = ()


def _expert_kinds(graph) -> tuple[bool, ...]:
    """Whether each kind of layer of a stack of several kinds holds routed experts (a dense-first
    MoE's first layers do not); empty for a uniform stack, as `Regime.kinds` is."""
    kinds = tuple(any(op.kind == "experts" for op in ops) for ops, _ in graph.kind_ops())
    return kinds if len(kinds) > 1 else ()


def _experts(graph, workload: Workload) -> ParamGroups:
    """The routed experts' parameters of one layer, averaged over the stack's kinds as the layer
    itself is (planner/cost/summary.py mean_layer): what expert parallelism divides over its ranks."""
    quantized = workload.method == "qlora"
    parts = [(summarize_ops([op for op in ops if op.kind == "experts"], quantized, None).params,
              len(indices) / graph.spec.num_layers) for ops, indices in graph.kind_ops()]
    if len(parts) == 1:
        return parts[0][0]
    total = ParamGroups()
    for params, share in parts:
        total = total + replace(params, dims=()).scale(share)
    return total


def _regime(spec: ModelSpec, workload: Workload, numerics) -> Regime:
    graph = build_graph(spec, workload, numerics)
    layer, embedding, head, kinds = summarize_parts(graph)
    return Regime(numerics, layer, embedding, head, experts=_experts(graph, workload), kinds=kinds,
                  expert_kinds=_expert_kinds(graph))


class Context:
    def __init__(self, spec: ModelSpec, workload: Workload, cluster: Cluster, profile: Profile,
                 memory_margin: float | None = None) -> None:
        self.spec, self.workload, self.cluster, self.profile = spec, workload, cluster, profile
        self.memory_margin_override = memory_margin
        self.hardware = cluster.hardware
        self.regimes: dict[bool, Regime] = {}
        # what the memory model costs: the framework's own layers where its memory row says so
        # (planner/framework_memory.py), else the same regime as the time model's
        self.memory_regimes: dict[bool, Regime] = {}
        for params_sharded in (False, True):
            self.regimes[params_sharded] = _regime(spec, workload, numerics_for(workload, params_sharded))
            memory_numerics = numerics_for(workload, params_sharded, for_memory=True)
            self.memory_regimes[params_sharded] = (self.regimes[params_sharded] if not memory_numerics.framework_layers
                                                   else _regime(spec, workload, memory_numerics))

    def regime(self, params_sharded: bool) -> Regime:
        return self.regimes[params_sharded]

    def memory_regime(self, params_sharded: bool) -> Regime:
        return self.memory_regimes[params_sharded]

    def with_profile(self, profile: Profile) -> Context:
        """The same request under other calibration parameters (the graph summaries are shared)."""
        other = Context.__new__(Context)
        other.spec, other.workload, other.cluster, other.profile = self.spec, self.workload, self.cluster, profile
        other.hardware, other.regimes, other.memory_regimes = self.hardware, self.regimes, self.memory_regimes
        other.memory_margin_override = self.memory_margin_override
        return other

    @property
    def memory_margin(self) -> float:
        """Fraction of headroom a candidate must leave to fit with margin (configurable; default
        from the profile's cross-validated memory residuals)."""
        if self.memory_margin_override is not None:
            return self.memory_margin_override
        return self.profile.memory_margin(self.hardware.vendor)

    @cached_property
    def compute_params(self) -> ComputeParams:
        """Calibration of the GEMMs, attention and memory-bound ops in the compute dtype."""
        return self._params(COMPUTE_DTYPE[self.workload.precision])

    @cached_property
    def compute_peak_flops(self) -> float:
        return self.hardware.peak(COMPUTE_DTYPE[self.workload.precision])

    @cached_property
    def float8_params(self) -> ComputeParams:
        return self._params(FLOAT8)

    @cached_property
    def float8_peak_flops(self) -> float:
        return self.hardware.peak(FLOAT8)

    @cached_property
    def mfu_peak_flops(self) -> float:
        """The peak MFU is quoted against: the training precision's (fp8's under fp8, as
        llm-foundry's benchmark table quotes it)."""
        return self.hardware.peak(self.workload.precision)

    @cached_property
    def memory_bytes_per_s(self) -> float:
        """What memory-bound kernels reach of HBM bandwidth (fitted efficiency)."""
        return self.hardware.hbm_bandwidth_bytes_per_s * self.compute_params.memory_efficiency

    def _params(self, dtype: str) -> ComputeParams:
        return self.profile.compute(self.hardware.name, self.hardware.vendor, dtype, chip_of(self.hardware),
                                    self.workload.framework)

    @property
    def uncalibrated(self) -> list[str]:
        """The chip and framework no measured run of the profile calibrated (intervals widen)."""
        return self.profile.uncalibrated(self.hardware.name, chip_of(self.hardware), self.workload.framework)


@dataclass
class StageLayout:
    """Per candidate, the three stage roles whose maximum decides memory and time: the first stage
    (embedding, most micro-batches in flight), a middle stage, and the last (head and loss).

    Layers are split as evenly as possible; the remainder goes to stages 1, 2, ... so that the
    first stage, which keeps the most activations, is never the one with an extra layer."""

    layers: dict[str, np.ndarray]  # role -> layers on that stage
    in_flight: dict[str, np.ndarray]  # role -> layer-micro-batches of activations kept
    chunks_in_flight: dict[str, np.ndarray]  # role -> micro-batches (chunks) in flight
    exists: dict[str, np.ndarray]  # role -> bool (a middle stage needs pp >= 3)
    has_embedding: dict[str, np.ndarray]
    has_head: dict[str, np.ndarray]
    stage_index: dict[str, np.ndarray] = field(default_factory=dict)  # role -> pipeline rank it stands for
    pp: np.ndarray | None = None
    vpp: np.ndarray | None = None
    role_layers: dict = field(default_factory=dict)  # (regime, role) -> that stage's mean layer (stages.py)


ROLES = ("first", "middle", "last")


def virtual_stage_span(num_layers: int, stage: np.ndarray, stages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first layer, layer count) of virtual stage `stage` of `stages`: base + (1 <= stage <= rest)
    layers, never an extra one on the first stage (it holds the embedding) — planner/layout.py
    stage_layers, vectorised."""
    stages = np.maximum(stages, 1)
    base, rest = num_layers // stages, num_layers % stages
    start = stage * base + np.maximum(0, np.minimum(stage - 1, rest))
    return start, base + ((stage >= 1) & (stage <= rest))


def stage_layout(num_layers: int, c: Candidates) -> StageLayout:
    p, m, v = c.pp, c.num_micro_batches, c.vpp
    index = {"first": np.zeros_like(p), "middle": np.minimum(1, p - 1), "last": p - 1}
    layers, in_flight, chunks = {}, {}, {}
    for role, i in index.items():
        layers[role] = sum(np.where(k < v, virtual_stage_span(num_layers, k * p + i, p * v)[1], 0)
                           for k in range(int(np.max(v, initial=1))))
        # 1F1B keeps min(m, p - i) micro-batches on stage i. Megatron's interleaved schedule warms up
        # 2(p - i - 1) + (v - 1)p chunks (schedules.py), i.e. L(1 + (p-1)/(pv)) layer-micro-batches on
        # the first stage (Korthikanti et al. 2022, §4.2.3).
        plain = np.minimum(m, p - i)
        interleaved = np.minimum(m * v, 2 * (p - i - 1) + (v - 1) * p + 1)
        chunks[role] = np.where(v > 1, interleaved, plain)
        per_chunk = np.where(v > 1, num_layers / (p * v), layers[role])
        in_flight[role] = chunks[role] * per_chunk
    exists = {"first": np.ones(len(p), bool), "middle": p >= 3, "last": p >= 2}
    has_embedding = {"first": np.ones(len(p), bool), "middle": np.zeros(len(p), bool), "last": p == 1}
    has_head = {"first": p == 1, "middle": np.zeros(len(p), bool), "last": np.ones(len(p), bool)}
    # with one stage, "first" is the whole model and also carries the head
    return StageLayout(layers, in_flight, chunks, exists, has_embedding, has_head, index, p, v)
