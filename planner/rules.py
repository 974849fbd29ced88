"""Which configurations are valid: one table of rules, read by the search (vectorised over thousands
of candidates), by `check_config` (one configuration, from the CLI, the API or a Plan file) and by
the executor's checks. A rule is either an invalid *pairing* of options (sequence parallel without
tp: never worth showing to a person) or a real reason, which says what would change it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.cost.candidates import Candidates
from planner.errors import InvalidRequest
from planner.layout import OFFLOAD, ParallelConfig
from planner.specs import Cluster, ModelSpec, Workload

Mask = Callable[[Candidates, ModelSpec, Workload], Any]


@dataclass(frozen=True)
class Rule:
    reason: str  # also the rejection-count key in `suggest`
    applies: Mask  # True where the candidate breaks the rule (numpy arrays or scalars)
    fix: str = ""  # what would change it; "" for an invalid pairing of options
    pairing: bool = False


def _offload(name: str) -> int:
    return OFFLOAD.index(name)


OPTION_RULES: tuple[Rule, ...] = (
    Rule("sequence parallel needs tp > 1", lambda c, s, w: c.sequence_parallel & (c.tp == 1), pairing=True),
    Rule("offloading params needs zero 3", lambda c, s, w: (c.offload == _offload("params")) & (c.zero != 3),
         pairing=True),
    Rule("offloading the optimizer needs zero >= 1",
         lambda c, s, w: (c.offload == _offload("optimizer")) & (c.zero == 0), pairing=True),
    Rule("vpp needs pp > 1", lambda c, s, w: (c.vpp > 1) & (c.pp == 1), pairing=True),
    Rule("sharding the embedding and head separately needs zero 3", lambda c, s, w: c.shard_ends & (c.zero != 3),
         pairing=True),
    Rule("more virtual stages (pp x vpp) than layers", lambda c, s, w: c.pp * c.vpp > s.num_layers,
         fix="a smaller --pp or --vpp"),
    Rule("interleaved schedule needs micro-batches divisible by pp",
         lambda c, s, w: (c.vpp > 1) & (c.num_micro_batches % c.pp != 0),
         fix="a global batch whose micro-batch count is a multiple of pp, or --vpp 1"),
    Rule("optimizer in backward needs one micro-batch per step",
         lambda c, s, w: (c.num_micro_batches > 1) & w.optimizer_in_backward,
         fix="a global batch of dp x micro-batch sequences, or no --optimizer-in-backward"),
    Rule("tied embeddings cannot be sharded apart from the head",
         lambda c, s, w: c.shard_ends & s.tie_word_embeddings, fix="no --shard-ends for a model with tied embeddings"),
    # torch's context_parallel load-balances a causal sequence by giving each rank chunks i and
    # 2·cp-1-i of 2·cp equal chunks (_HeadTailLoadBalancer; torchtitan's headtail default)
    Rule("sequence not divisible into 2 x cp chunks", lambda c, s, w: (c.cp > 1) & (w.seq_len % (2 * c.cp) != 0),
         fix="a --cp with 2 x cp dividing --seq-len"),
    # context_parallel dispatches only SDPA's flash / efficient / cuDNN kernels (_context_parallel/_attention.py)
    Rule("context parallelism needs sdpa attention", lambda c, s, w: (c.cp > 1) & (w.attention != "sdpa"),
         fix="--attention sdpa, or --cp 1"),
    Rule("expert parallelism needs a mixture-of-experts model", lambda c, s, w: (c.ep > 1) & (not s.is_moe),
         fix="--ep 1 for a dense model"),
    Rule("ep does not divide the routed experts", lambda c, s, w: (c.ep > 1) & (s.num_experts % c.ep != 0),
         fix="an --ep that divides the number of routed experts"),
    # the expert-parallel ranks are carved out of the data ranks (torchtitan: ep divides dp_shard x cp;
    # Megatron-Core: expert-model-parallel size divides data-parallel x context-parallel)
    Rule("ep does not divide dp x cp", lambda c, s, w: (c.dp * c.cp) % c.ep != 0,
         fix="an --ep that divides dp x cp (more data-parallel ranks, or a smaller --ep)"),
)

# real structural reasons (checked per (tp, pp, micro-batch) in the search) and what changes them
STRUCTURAL_FIXES = {
    "tp x pp does not divide the device count": "tp and pp whose product divides the device count",
    "tp x pp x cp does not divide the device count": "tp, pp and cp whose product divides the device count",
    "tp does not divide heads": "a tp that divides the attention heads",
    "tp does not divide kv heads": "a tp that divides the key/value heads",
    "tp does not divide the ffn size": "a tp that divides the MLP's intermediate size",
    "qlora (bitsandbytes NF4) does not run with tp": "--tp 1, or --method lora",
    "more pipeline stages than layers": "fewer pipeline stages",
    "global batch not divisible by dp x micro-batch": "a global batch that is a multiple of dp x micro-batch",
    "out of memory": "more devices, recomputation, LoRA/QLoRA, a shorter sequence or a smaller micro-batch",
    "out of host memory (offload)": "less offload, or nodes with more host memory",
}


def structural_reason(spec: ModelSpec, workload: Workload, num_devices: int, tp: int, pp: int,
                      micro_batch_size: int, cp: int = 1) -> str | None:
    """Why (tp, pp, micro-batch, cp) cannot work for this model and cluster, or None.

    The wording doubles as the rejection-count key in `suggest`."""
    if num_devices % (tp * pp):
        return "tp x pp does not divide the device count"
    if num_devices % (tp * pp * cp):
        return "tp x pp x cp does not divide the device count"
    dp = num_devices // (tp * pp * cp)
    if tp > spec.num_heads or spec.num_heads % tp:
        return "tp does not divide heads"
    if spec.num_kv_heads % tp or spec.global_kv_heads % tp:  # Gemma 4's full layers have their own KV heads
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


def rule_masks(rules: tuple[Rule, ...], candidates: Candidates, spec: ModelSpec,
               workload: Workload) -> list[tuple[Rule, np.ndarray]]:
    """Each rule's mask over the candidates (a scalar result is broadcast)."""
    n = len(candidates)
    return [(rule, np.broadcast_to(np.asarray(rule.applies(candidates, spec, workload), dtype=bool), (n,)))
            for rule in rules]


def first_broken(rules: tuple[Rule, ...], config: ParallelConfig, spec: ModelSpec, workload: Workload) -> Rule | None:
    one = Candidates.from_configs([config])
    return next((rule for rule, mask in rule_masks(rules, one, spec, workload) if mask[0]), None)


def option_reason(spec: ModelSpec, config: ParallelConfig, workload: Workload) -> str | None:
    """Why the remaining options cannot go together, or None."""
    rule = first_broken(OPTION_RULES, config, spec, workload)
    return rule.reason if rule else None


def check_config(spec: ModelSpec, workload: Workload, cluster: Cluster, config: ParallelConfig) -> None:
    """Raise InvalidRequest (exit 2) naming what to change if `config` cannot run."""
    from planner.layout import OFFLOAD as offloads, RECOMPUTE, ZERO

    for name in ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "vpp", "cp", "ep"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    for name, choices in (("recompute", RECOMPUTE), ("offload", offloads), ("zero", ZERO)):
        if getattr(config, name) not in choices:
            raise InvalidRequest(f"--{name} must be one of {', '.join(map(str, choices))}, got {getattr(config, name)!r}")
    if config.devices != cluster.num_devices:
        raise InvalidRequest(f"dp x tp x pp x cp = {config.dp} x {config.tp} x {config.pp} x {config.cp} = "
                             f"{config.devices}, but there are {cluster.num_devices} devices; make the product equal --gpus")
    reason = structural_reason(spec, workload, cluster.num_devices, config.tp, config.pp, config.micro_batch_size,
                               config.cp)
    if reason is None:
        expected = workload.global_batch // (config.dp * config.micro_batch_size)
        if config.num_micro_batches != expected:
            raise InvalidRequest(f"num_micro_batches {config.num_micro_batches} does not make the global batch: "
                                 f"{workload.global_batch} / (dp {config.dp} x micro-batch {config.micro_batch_size}) "
                                 f"= {expected}; write the plan again with --save-plan")
        reason = option_reason(spec, config, workload)
    if reason is not None:
        raise InvalidRequest(_explain(reason, spec, workload, config))


def _explain(reason: str, spec: ModelSpec, workload: Workload, config: ParallelConfig) -> str:
    detail = {
        "tp does not divide heads": f"--tp {config.tp} does not divide the {spec.num_heads} attention heads",
        "tp does not divide kv heads": f"--tp {config.tp} does not divide the {spec.num_kv_heads} key/value heads"
                                       + (f" (full-attention layers: {spec.global_kv_heads})" if spec.global_kv_heads else ""),
        "tp does not divide the ffn size": f"--tp {config.tp} does not divide the ffn size {spec.intermediate_size}",
        "more pipeline stages than layers": f"--pp {config.pp} exceeds the {spec.num_layers} layers",
        "more virtual stages (pp x vpp) than layers":
            f"pp x vpp = {config.pp} x {config.vpp} stages exceed the {spec.num_layers} layers",
        "sequence not divisible into 2 x cp chunks":
            f"--seq-len {workload.seq_len} does not split into 2 x cp = {2 * config.cp} equal chunks",
        "ep does not divide the routed experts": f"--ep {config.ep} does not divide the {spec.num_experts} routed experts",
        "ep does not divide dp x cp": f"--ep {config.ep} does not divide dp x cp = {config.dp} x {config.cp}",
        "expert parallelism needs a mixture-of-experts model":
            f"--ep {config.ep}: {spec.name} is a dense model (no routed experts); use --ep 1",
        "global batch not divisible by dp x micro-batch":
            f"--global-batch {workload.global_batch} is not divisible by dp x micro-batch = "
            f"{config.dp} x {config.micro_batch_size}",
    }.get(reason, reason)
    return f"{detail}; choose other degrees"
