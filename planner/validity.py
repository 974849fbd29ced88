"""Where input enters: bounds, finiteness and buildability, each refused with one line (exit 2).

Three kinds of check live here so that every entry point shares them:
- names that end up in scripts and config files (`check_name`): printable text only;
- numbers (`check_hardware_numbers`, `check_model`, `check_workload`, `check_degrees`): finite, positive
  and below bounds chosen far above anything real, so that the arithmetic downstream (numpy int64
  and float64) can neither overflow nor enumerate forever;
- a model shape transformers can build and run (`check_model`, `check_sequence`): the divisibility,
  position and activation rules of the transformers classes the executor instantiates.

The bounds are not physics: each is at least ten times the largest value in use today, and small
enough that the integer products the search forms in int64 (pp x vpp, dp x micro-batch) stay far
below 2**63 and every float64 time and byte count stays finite (tests/test_estimate_invariants.py).
"""

from __future__ import annotations

import math
from typing import Any

from planner.errors import InvalidRequest

# -- bounds (each at least 10x the largest in use) ------------------------------------------------
# devices: the largest announced training clusters hold ~2e5 accelerators
MAX_DEVICES = 2**20
# devices per node: an NVL72 rack is 72, the largest scale-up domains announced are ~576
MAX_DEVICES_PER_NODE = 2**13
# tokens per sequence: the longest trained context windows are ~1e7 tokens
MAX_SEQ_LEN = 2**24
# sequences per step: published global batches are at most ~1e4 sequences (~6e7 tokens)
MAX_GLOBAL_BATCH = 2**24
# model dims: hidden 2**18 (largest dense models ~2.5e4), ffn 2**21, vocab 2**24 (largest ~1e6),
# layers / heads / experts 2**14 (largest ~200 layers, 128 heads, 256 experts), head dim 2**14
MODEL_INT_BOUNDS = {"hidden_size": 2**18, "intermediate_size": 2**21, "vocab_size": 2**24,
                    "num_layers": 2**14, "num_heads": 2**14, "num_kv_heads": 2**14, "head_dim": 2**14,
                    "num_experts": 2**14, "experts_per_token": 2**14, "max_position_embeddings": 2**40}
# Gemma 4's per-layer shapes (0: not used), bounded as the dims above
ZERO_OR_INT_BOUNDS = {"global_head_dim": 2**14, "global_kv_heads": 2**14, "kv_shared_layers": 2**14,
                      "per_layer_input_size": 2**18, "per_layer_input_vocab": 2**24,
                      # DeepSeek-V4 (4 streams, 20 Sinkhorn iterations, 8 groups of rank 1024, rates 4 and 128)
                      "hc_mult": 2**10, "hc_sinkhorn_iters": 2**14, "o_groups": 2**14, "o_lora_rank": 2**18,
                      "csa_compress_rate": 2**20, "hca_compress_rate": 2**20,
                      "moe_latent_size": 2**18}  # a width, bounded as hidden_size
MAX_LORA_RANK = 2**16
# hardware: memory 2**50 B (1 PiB; devices hold ~2e11), FLOP/s 1e21 (devices reach ~1e16),
# bandwidths 1e16 B/s (HBM ~1e13), host memory 2**56 B per node (nodes hold ~2**41)
MAX_DEVICE_MEMORY_BYTES = 2**50
MAX_PEAK_FLOPS = 1e21
MAX_BANDWIDTH_BYTES_PER_S = 1e16
MAX_HOST_MEMORY_BYTES = 2**56
# and below: 1 MiB, 1 MFLOP/s, 1 kB/s (a 1980s machine); with the upper bounds of the model and the
# workload these keep every predicted time finite in float64 (at most ~1e60 s)
MIN_MEMORY_BYTES = 2**20
MIN_PEAK_FLOPS = 1e6
MIN_BANDWIDTH_BYTES_PER_S = 1e3
# optimizer steps and tokens: trainings run ~1e6 steps and ~3e13 tokens
MAX_STEPS = 10**12
MAX_TOKENS = 1e18
# measured throughput: the largest clusters reach ~1e8 tokens/s
MAX_TOKENS_PER_S = 1e12
# money and time: a device-hour costs ~1-10 USD; the largest trainings cost ~1e9 USD and run ~1e4 hours
MAX_PRICE_PER_HOUR = 1e6
MAX_BUDGET = 1e15
MAX_HOURS = 1e6

# transformers' ACT2FN names (transformers 5.x activations.py): what `hidden_act` /
# `activation_function` may say; any other name fails when the model is built
ACTIVATIONS = frozenset({
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu",
    "relu", "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu"})
# families whose attention splits one fused qkv projection (or checks) by hidden_size // heads:
# GPT2Attention raises unless embed_dim % num_heads == 0; gpt_neox, mpt and baichuan reshape
# the fused output into (heads, hidden // heads) and fail otherwise
DIVISIBLE_HEAD_FAMILIES = ("gpt2", "gpt_neox", "mpt", "baichuan")
# families whose position table has max_position_embeddings rows: GPT-2's learned wpe, MPT's
# ALiBi bias built for max_seq_len (MptModel.forward); a longer sequence indexes past it
BOUNDED_POSITION_FAMILIES = ("gpt2", "mpt")


def check_name(value: Any, what: str) -> str:
    """A name that reaches comments, scripts and config files: printable text only (a newline ends a
    `# Plan:` comment, NUL truncates, U+2028 is a YAML line break). Refused, not rewritten."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text, got {type(value).__name__} {value!r:.60}")
    bad = next((ch for ch in value if not ch.isprintable()), None)
    if bad is not None:
        raise InvalidRequest(f"{what} {value!r:.80} holds the control character {bad!r}; use printable text")
    return value


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, CR, NUL, U+2028, bidi controls, lone
    surrogates) replaced by '?': safe in a comment line of any format."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def show(value: Any) -> str:
    """A number for a one-line message: huge integers by their size (str() of an int over 4300
    digits raises), everything else as repr, cut to 60 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    return f"{value!r:.60}"


def check_number(value: Any, what: str, upper: float, integer: bool = False, allow_zero: bool = False,
                 lower: float = 0.0) -> None:
    """A finite, positive (or zero, if allowed) number from `lower` to `upper`; else one line."""
    kind = "whole number" if integer else "number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidRequest(f"{what} must be a positive {kind}, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{what} must be a finite positive {kind}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidRequest(f"{what} must be a positive {kind}, got {show(value)}")
    if value > upper:
        raise InvalidRequest(f"{what} {show(value)} is beyond any real value (at most {upper:.4g}); check the unit")
    if value < lower:
        raise InvalidRequest(f"{what} {show(value)} is below any real value (at least {lower:.4g}); check the unit")


MAX_HOST_CPU_CORES = 4096


def check_hardware_numbers(hardware: Any, where: str) -> None:
    """Every number of a hardware description: finite, positive, of the right type, bounded."""
    check_name(hardware.name, f"{where}: name")
    bounds = {"memory_bytes": MAX_DEVICE_MEMORY_BYTES, "hbm_bandwidth_bytes_per_s": MAX_BANDWIDTH_BYTES_PER_S,
              "intra_node_bandwidth_bytes_per_s": MAX_BANDWIDTH_BYTES_PER_S,
              "inter_node_bandwidth_bytes_per_s": MAX_BANDWIDTH_BYTES_PER_S,
              "pcie_bandwidth_bytes_per_s": MAX_BANDWIDTH_BYTES_PER_S,
              "host_memory_bytes_per_node": MAX_HOST_MEMORY_BYTES,
              "host_memory_bandwidth_bytes_per_s": MAX_BANDWIDTH_BYTES_PER_S}
    for key, upper in bounds.items():
        lower = MIN_MEMORY_BYTES if "memory_bytes" in key else MIN_BANDWIDTH_BYTES_PER_S
        check_number(getattr(hardware, key), f"{where}: {key}", upper, lower=lower)
    check_number(hardware.devices_per_node, f"{where}: devices_per_node", MAX_DEVICES_PER_NODE, integer=True)
    check_number(hardware.host_cpu_cores_per_node, f"{where}: host_cpu_cores_per_node", MAX_HOST_CPU_CORES, integer=True)
    if not isinstance(hardware.peak_flops, dict) or not hardware.peak_flops:
        raise InvalidRequest(f"{where}: peak_flops must map dtypes (bf16, fp32, ...) to FLOP/s")
    for dtype, value in hardware.peak_flops.items():
        check_number(value, f"{where}: peak_flops.{dtype}", MAX_PEAK_FLOPS, lower=MIN_PEAK_FLOPS)
    fp8, bf16 = hardware.peak_flops.get("fp8"), hardware.peak_flops.get("bf16")
    if fp8 is not None and bf16 is not None and fp8 < bf16:
        # fp8 training runs its other work in bf16 and quotes MFU against the fp8 peak
        raise InvalidRequest(f"{where}: peak_flops.fp8 ({fp8:.4g}) is below peak_flops.bf16 ({bf16:.4g}); "
                             "fp8 matmuls are never slower: check the figures")


def check_profile_numbers(data: dict, where: Any) -> None:
    """A calibration profile's fitted numbers: finite; in the cost sections also non-negative, with
    efficiencies and overlap fractions in (0, 1] / [0, 1] (an efficiency above 1 predicts MFU above 100 %)."""
    def walk(node: Any, path: str, section: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}", section)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", section)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            efficiency = path.endswith(("efficiency", "efficiency_max"))
            fraction = efficiency or section == "overlap"
            if not math.isfinite(node) or (section != "uncertainty" and node < 0) or (fraction and not node <= 1) \
                    or (efficiency and node == 0):
                limits = "in (0, 1]" if efficiency else "in [0, 1]" if fraction else "finite and >= 0"
                raise InvalidRequest(f"calibration profile {where}: {path[1:]} must be {limits}, got {node!r}")

    for section in ("compute", "links", "overlap", "memory", "attention", "uncertainty", "frameworks"):
        walk(data.get(section), f".{section}", section)


def check_model(spec: Any) -> None:
    """A ModelSpec that transformers can build: bounded positive sizes, a known activation, a
    dropout probability, heads that split the hidden size where the family needs it."""
    where = spec.source or spec.name
    check_name(spec.name, f"{where}: model name")
    for key, upper in MODEL_INT_BOUNDS.items():
        check_number(getattr(spec, key), f"{where}: {key}", upper, integer=True)
    for key, upper in ZERO_OR_INT_BOUNDS.items():
        check_number(getattr(spec, key), f"{where}: {key}", upper, integer=True, allow_zero=True)
    if spec.activation not in ACTIVATIONS:
        raise InvalidRequest(f"{where}: activation {spec.activation!r} is not one transformers knows "
                             f"(e.g. silu, gelu, gelu_new, relu)")
    if isinstance(spec.dropout, bool) or not isinstance(spec.dropout, (int, float)) or not 0 <= spec.dropout <= 1:
        raise InvalidRequest(f"{where}: dropout must be a probability from 0 to 1, got {show(spec.dropout)}")
    if spec.family in DIVISIBLE_HEAD_FAMILIES and spec.hidden_size % spec.num_heads:
        raise InvalidRequest(f"{where}: hidden size {spec.hidden_size} is not divisible by the {spec.num_heads} "
                             f"attention heads ({spec.family} splits it evenly); change one of them")
    if spec.positions == "rotary" and spec.family != "gpt_neox" and spec.head_dim % 2:
        raise InvalidRequest(f"{where}: rotary embeddings need an even head dimension, got {spec.head_dim}; "
                             "set head_dim or hidden_size / heads to an even number")


def check_sequence(spec: Any, seq_len: int) -> None:
    """A sequence the model can run: learned (or ALiBi-table) positions end at max_position_embeddings."""
    limited = spec.positions == "learned" or spec.family in BOUNDED_POSITION_FAMILIES
    if limited and seq_len > spec.max_position_embeddings:
        raise InvalidRequest(f"--seq-len {seq_len} exceeds {spec.name}'s {spec.max_position_embeddings} positions "
                             f"({spec.family} has a fixed position table); use --seq-len <= "
                             f"{spec.max_position_embeddings}")


def check_workload(workload: Any, num_devices: int) -> None:
    """Sizes of a request, before any search enumerates them."""
    check_number(num_devices, "--gpus", MAX_DEVICES, integer=True)
    check_number(workload.seq_len, "--seq-len", MAX_SEQ_LEN, integer=True)
    check_number(workload.global_batch, "--global-batch", MAX_GLOBAL_BATCH, integer=True)
    check_number(workload.lora_rank, "--lora-rank", MAX_LORA_RANK, integer=True)
    check_number(workload.loss_chunks, "--loss-chunks", MAX_SEQ_LEN, integer=True)
    if workload.loss_chunks > workload.seq_len:
        raise InvalidRequest(f"--loss-chunks {workload.loss_chunks} exceeds the {workload.seq_len} tokens of a "
                             "sequence; use at most --seq-len chunks")


def check_capacity(tokens: float, price_per_hour: float | None, deadline_hours: float | None,
                   budget: float | None, max_gpus: int) -> None:
    """`planner capacity`'s numbers: bounded so that hours, GPU-hours and costs stay finite."""
    check_number(tokens, "--tokens", MAX_TOKENS)
    check_number(max_gpus, "--max-gpus", MAX_DEVICES, integer=True)
    for option, value, upper in (("--price-per-gpu-hour", price_per_hour, MAX_PRICE_PER_HOUR),
                                 ("--deadline-hours", deadline_hours, MAX_HOURS), ("--budget", budget, MAX_BUDGET)):
        if value is not None:
            check_number(value, option, upper)


def check_degrees(**degrees: int | None) -> None:
    """Pinned or explicit degrees and micro-batch sizes (None = not given)."""
    for name, value in degrees.items():
        if value is not None:
            upper = MAX_GLOBAL_BATCH if name == "micro_batch_size" else MAX_DEVICES
            check_number(value, f"--{name.replace('_', '-')}", upper, integer=True)
