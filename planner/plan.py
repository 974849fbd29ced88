"""The parallel configuration of a candidate, its validity rules, and the Plan document that the
executor consumes (the contract between planner/ and executor/: the executor checks a Plan but
never re-derives it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from planner.errors import InvalidRequest, read_json
from planner.specs import Cluster, Hardware, ModelSpec, Workload

RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")
ZERO = (0, 1, 2, 3)
PLAN_FORMAT = "llm-planner/plan@1"


@dataclass(frozen=True)
class ParallelConfig:
    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    num_micro_batches: int
    recompute: str = "none"
    zero: int = 0
    offload: str = "none"
    sequence_parallel: bool = False
    vpp: int = 1
    # FSDP2: the embedding and the LM head are units of their own, gathered only around their use,
    # instead of part of the root unit that stays gathered for the whole step (torchtune's
    # custom_sharded_layers: ['tok_embeddings', 'output'] for large-vocabulary models)
    shard_ends: bool = False

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"config: unknown key(s) {', '.join(unknown)}")
        return cls(**data)


def structural_reason(spec: ModelSpec, workload: Workload, num_devices: int, tp: int, pp: int,
                      micro_batch_size: int) -> str | None:
    """Why (tp, pp, micro-batch) cannot work for this model and cluster, or None.

    The wording doubles as the rejection-count key in `suggest`."""
    if num_devices % (tp * pp):
        return "tp x pp does not divide the device count"
    dp = num_devices // (tp * pp)
    if tp > spec.num_heads or spec.num_heads % tp:
        return "tp does not divide heads"
    if spec.num_kv_heads % tp:
        return "tp does not divide kv heads"
    if spec.intermediate_size % tp:
        return "tp does not divide the ffn size"
    if workload.method == "qlora" and tp > 1:
        return "qlora (bitsandbytes NF4) does not run with tp"
    if pp > spec.num_layers:
        return "more pipeline stages than layers"
    if workload.global_batch % (dp * micro_batch_size):
        return "global batch not divisible by dp x micro-batch"
    return None


def option_reason(spec: ModelSpec, config: ParallelConfig, workload: Workload | None = None) -> str | None:
    """Why the remaining options cannot go together, or None."""
    if workload is not None and workload.optimizer_in_backward and config.num_micro_batches > 1:
        return "optimizer in backward needs one micro-batch per step"
    if config.recompute not in RECOMPUTE:
        return f"recompute must be one of {', '.join(RECOMPUTE)}"
    if config.offload not in OFFLOAD:
        return f"offload must be one of {', '.join(OFFLOAD)}"
    if config.zero not in ZERO:
        return "zero must be 0, 1, 2 or 3"
    if config.sequence_parallel and config.tp == 1:
        return "sequence parallel needs tp > 1"
    if config.offload == "params" and config.zero != 3:
        return "offloading params needs zero 3"
    if config.offload == "optimizer" and config.zero == 0:
        return "offloading the optimizer needs zero >= 1"
    if config.shard_ends and config.zero != 3:
        return "sharding the embedding and head separately needs zero 3"
    if config.shard_ends and spec.tie_word_embeddings:
        return "tied embeddings cannot be sharded apart from the head"
    if config.vpp > 1 and config.pp == 1:
        return "vpp needs pp > 1"
    if config.vpp > 1 and spec.num_layers % (config.pp * config.vpp):
        return "layers not divisible by pp x vpp"
    if config.vpp > 1 and config.num_micro_batches % config.pp:
        return "interleaved schedule needs micro-batches divisible by pp"
    return None


def check_config(spec: ModelSpec, workload: Workload, cluster: Cluster, config: ParallelConfig) -> None:
    """Raise InvalidRequest (exit 2) naming what to change if `config` cannot run."""
    for name in ("dp", "tp", "pp", "micro_batch_size", "vpp"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    if config.devices != cluster.num_devices:
        raise InvalidRequest(f"dp x tp x pp = {config.dp} x {config.tp} x {config.pp} = {config.devices}, "
                             f"but there are {cluster.num_devices} devices; make the product equal --gpus")
    reason = structural_reason(spec, workload, cluster.num_devices, config.tp, config.pp, config.micro_batch_size)
    if reason is None:
        reason = option_reason(spec, config, workload)
    if reason is not None:
        raise InvalidRequest(_explain(reason, spec, workload, config))


def _explain(reason: str, spec: ModelSpec, workload: Workload, config: ParallelConfig) -> str:
    detail = {
        "tp does not divide heads": f"--tp {config.tp} does not divide the {spec.num_heads} attention heads",
        "tp does not divide kv heads": f"--tp {config.tp} does not divide the {spec.num_kv_heads} key/value heads",
        "tp does not divide the ffn size": f"--tp {config.tp} does not divide the ffn size {spec.intermediate_size}",
        "more pipeline stages than layers": f"--pp {config.pp} exceeds the {spec.num_layers} layers",
        "global batch not divisible by dp x micro-batch":
            f"--global-batch {workload.global_batch} is not divisible by dp x micro-batch = "
            f"{config.dp} x {config.micro_batch_size}",
    }.get(reason, reason)
    return f"{detail}; choose other degrees"


def num_micro_batches(global_batch: int, dp: int, micro_batch_size: int) -> int:
    return global_batch // (dp * micro_batch_size)


# -- the Plan document -----------------------------------------------------------------------

def plan_document(spec: ModelSpec, hardware: Hardware, cluster: Cluster, workload: Workload,
                  config: ParallelConfig, prediction: dict[str, Any], profile_summary: dict[str, Any],
                  runner_ups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "model": spec.to_dict(),
        "hardware": hardware.to_dict(),
        "cluster": {"num_devices": cluster.num_devices, "devices_per_node": cluster.devices_per_node,
                    "num_nodes": cluster.num_nodes},
        "workload": workload.to_dict(),
        "config": config.to_dict(),
        "prediction": prediction,
        "calibration": profile_summary,
        "runner_ups": runner_ups or [],
    }


def save_plan(path: str, document: dict[str, Any]) -> None:
    from planner.outfile import write_text

    write_text(path, json.dumps(document, indent=2) + "\n", "plan")


def load_plan(path: str) -> dict[str, Any]:
    """Read and check a Plan file; returns the document with typed parts under `_typed`."""
    document = read_json(path, "plan")
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise InvalidRequest(f"{path} is not a plan (format {PLAN_FORMAT!r}); write one with "
                             "`planner suggest ... --save-plan PATH`")
    for key in ("model", "hardware", "cluster", "workload", "config"):
        if key not in document:
            raise InvalidRequest(f"plan {path} lacks {key!r}; write it again with --save-plan")
    return document


def typed_plan(document: dict[str, Any]) -> tuple[ModelSpec, Hardware, Cluster, Workload, ParallelConfig]:
    spec = ModelSpec.from_dict(document["model"])
    hardware = Hardware.from_dict(document["hardware"])
    cluster = Cluster(hardware=hardware, num_devices=document["cluster"]["num_devices"],
                      devices_per_node=document["cluster"]["devices_per_node"])
    workload = Workload.from_dict(document["workload"])
    config = ParallelConfig.from_dict(document["config"])
    return spec, hardware, cluster, workload, config
