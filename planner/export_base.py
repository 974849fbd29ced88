"""What every export of a Plan shares: the launch options, the rendered text with its notes, the
plan being exported and the one-line description written into each file."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.plan import ParallelConfig, Plan
from planner.specs import Cluster, ModelSpec, Workload
from planner.validity import printable


@dataclass(frozen=True)
class LaunchOptions:
    """What the launch needs besides the plan. `$VAR` values stay shell variables."""

    plan_path: str = "plan.json"
    data: str = "$DATA"
    output: str = "runs/llm-planner"
    steps: int | None = None
    port: int = 29500
    time_limit_s: float | None = None  # Slurm --time; default: predicted step time x steps, plus margins below
    time_margin_fraction: float = 0.25  # predictions err (see `planner validate`); a job killed at 99% is lost
    time_startup_s: float = 900.0  # model load, rendezvous, first-step compilation, final checkpoint


@dataclass(frozen=True)
class Export:
    text: str
    notes: tuple[str, ...] = ()
    suffix: str = ".txt"


@dataclass
class _Plan:
    """A Plan being exported, and the notes its export collects."""

    plan: Plan
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> ModelSpec:
        return self.plan.model

    @property
    def config(self) -> ParallelConfig:
        return self.plan.config

    @property
    def workload(self) -> Workload:
        return self.plan.workload

    @property
    def cluster(self) -> Cluster:
        return self.plan.cluster

    @property
    def step_s(self) -> float | None:
        return (self.plan.prediction or {}).get("time", {}).get("step_s")


def describe(plan: _Plan) -> str:
    """One line, printable (a comment's text in every format: no newline can end it)."""
    c = plan.config
    return printable(f"{plan.spec.name} on {plan.cluster.num_devices} x {plan.cluster.hardware.name} "
                     f"({plan.cluster.num_nodes} node(s) of {plan.cluster.devices_per_node}): dp {c.dp}, tp {c.tp}, "
                     f"pp {c.pp}, micro-batch {c.micro_batch_size} x {c.num_micro_batches}, recompute {c.recompute}, "
                     f"zero {c.zero}, offload {c.offload}, {plan.workload.method}, {plan.workload.precision}")
