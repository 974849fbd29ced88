"""The Plan's model against what transformers will build, before any process starts.

`preflight_reason` builds the Plan's model on the meta device with the executor's own
`build_model` (no memory, no data, no device) and refuses, in one line, what would otherwise fail
only inside torchrun or train nonsense: a config transformers rejects, a hidden size the heads do
not divide, an unknown activation, a dropout that is not a probability, a sequence longer than
learned position embeddings hold, a learning rate that is not a finite positive number, and a
Plan whose config.json is not the model its spec (and so its prediction) describes: another
model_type, or another parameter count than planner.graph.count_params.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload

REMOTE_CODE_FAMILIES = ("baichuan",)  # executor.checks refuses them with its own reason
BUILDABLE_ATTENTION = ("sdpa", "eager")
FIX = "write the plan again with `planner suggest --save-plan` from a config transformers can build"


def preflight_reason(spec: ModelSpec, workload: Workload, config: ParallelConfig,
                     options: Any = None) -> str | None:
    """Why the executor must not start this Plan, or None. Pure: reads no data files, touches no
    device (the model is built on the meta device). `options`: RunOptions, for the learning rate."""
    checks = (lambda: _options_reason(options), lambda: _batch_reason(workload, config), lambda: _spec_reason(spec),
              lambda: _model_reason(spec, workload))
    for check in checks:
        reason = check()
        if reason:
            return reason
    return None


def _options_reason(options: Any) -> str | None:
    if options is None:
        return None
    lr = getattr(options, "lr", None)
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        return f"--lr must be a finite positive number, got {lr}"
    decay = getattr(options, "weight_decay", None)
    if decay is not None and not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 0):
        return f"--weight-decay must be a finite number >= 0, got {decay}"
    return None


def _batch_reason(workload: Workload, config: ParallelConfig) -> str | None:
    """dp x micro-batch x micro-batches is the global batch (a hand-edited plan may break it; the
    workers would fail in a collective)."""
    rows = config.dp * config.micro_batch_size * config.num_micro_batches
    if rows != workload.global_batch:
        return (f"the plan's dp {config.dp} x micro-batch {config.micro_batch_size} x {config.num_micro_batches} "
                f"micro-batches is {rows} rows, not its global batch {workload.global_batch}; write the plan "
                "again with `planner suggest --save-plan`")
    return None


def _spec_reason(spec: ModelSpec) -> str | None:
    if not spec.hf_config:
        return f"the plan's model carries no hf_config (config.json); {FIX}"
    model_type = spec.hf_config.get("model_type")
    if model_type != spec.family:
        return (f"the plan's hf_config is model_type {model_type!r} but its model spec (and prediction) is "
                f"{spec.family!r}; {FIX}")
    return None


def _model_reason(spec: ModelSpec, workload: Workload) -> str | None:
    if spec.family in REMOTE_CODE_FAMILIES:
        return None
    from executor.model import hf_config

    try:
        config = hf_config(spec, workload)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation, said in one line
        return f"transformers cannot build the plan's config ({_first_line(exc)}); {FIX}"
    reason = _config_reason(config, workload) or _sequence_reason(config, spec, workload)
    if reason:
        return reason
    return _count_reason(spec, workload)


def _config_reason(config: Any, workload: Workload) -> str | None:
    """What transformers checks only when it builds or runs the model."""
    from transformers.activations import ACT2FN

    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    # glm4_moe, qwen3, gemma: heads x head_dim; a heterogeneous config (Gemma 4) sets it per layer and
    # refuses the global read (transformers' AmbiguousGlobalPerLayerAttributeError)
    explicit_head_dim = getattr(config, "is_heterogeneous", False) or getattr(config, "head_dim", None) is not None
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads and not explicit_head_dim:
        return f"hidden size {hidden} is not divisible by {heads} attention heads; {FIX}"
    for key in ("hidden_act", "activation_function"):
        act = getattr(config, key, None)
        if isinstance(act, str) and act not in ACT2FN:
            return f"the config's {key} {act!r} is not an activation transformers knows; {FIX}"
    for key, value in sorted(config.to_dict().items()):
        if (key.endswith("dropout") or key.endswith("_pdrop")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and not (math.isfinite(value) and 0 <= value < 1):
            return f"the config's {key} is {value}; a dropout must be a probability in [0, 1); {FIX}"
    return None


def _sequence_reason(config: Any, spec: ModelSpec, workload: Workload) -> str | None:
    """Learned position embeddings (GPT-2's wpe, n_positions rows) hold a fixed number of positions;
    rotary ones (Llama) have no table to run past."""
    limit = getattr(config, "max_position_embeddings", None)  # GPT2Config maps it to n_positions
    learned = spec.positions == "learned" or getattr(config, "position_embedding_type", "") == "absolute"
    if learned and isinstance(limit, int) and workload.seq_len > limit:
        return (f"the plan's seq-len {workload.seq_len} exceeds the model's {limit} learned positions "
                f"(n_positions); plan with --seq-len {limit} or less")
    return None


def _count_reason(spec: ModelSpec, workload: Workload) -> str | None:
    """The meta model's parameters against the spec the prediction was made for."""
    import torch

    from executor.model import build_model
    from planner.graph import count_params

    attention = workload.attention if workload.attention in BUILDABLE_ATTENTION else "sdpa"
    base = replace(workload, method="full", loss_chunks=1, attention=attention)
    state = torch.random.get_rng_state()  # build_model seeds the global generator
    try:
        model = build_model(spec, base, torch.device("meta"), seed=0)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, said in one line
        return f"transformers cannot build the plan's model ({_first_line(exc)}); {FIX}"
    finally:
        torch.random.set_rng_state(state)
    built = sum(p.numel() for p in model.parameters())
    expected = count_params(spec)
    if built != expected:
        return (f"the plan's hf_config builds a model of {built:,} parameters but its model spec (and "
                f"prediction) has {expected:,}; {FIX}")
    return None


def _first_line(exc: BaseException) -> str:
    """The first sentence of the error's first line (transformers' messages run on with advice)."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
