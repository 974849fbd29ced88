"""The memory oracle: trace a real training step of the transformers model on fake tensors and
report the peak tensor bytes of the most loaded rank, by category.

What is traced is what the executor runs, built by the executor's own functions
(calibration/fake_model.py) — the semantics the planner shares (planner/cost/memory.py):

* parameters: fp32 master weights (bf16 with --master-dtype bf16); a LoRA base frozen in the
  compute dtype with fp32 adapters (peft's autocast_adapter_dtype); AdamW states in the
  parameters' dtype.
* numerics (executor/train.py `_forward_context`, executor/parallelize.py): `torch.autocast` over
  fp32 weights for ZeRO 0/1 and for LoRA; FSDP2 (ZeRO 2/3) `fully_shard` per decoder layer and at
  the root with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` and no autocast;
  ZeRO 3 reshards after forward, ZeRO 2 does not.
* optimizer: torch AdamW with foreach=True (the GPU default), fused or the for-loop; plain SGD.
* loss: `model(input_ids, labels=labels, num_items_in_batch=n).loss` (the output is not kept).
* recompute: full = each decoder layer checkpointed (non-reentrant); selective = torchtitan's
  per-op policy (executor/parallelize.py).
* tensor parallel: the executor's Megatron plan on DTensors (logits gathered for the loss).
* steady state: the optimizer states exist before the traced forward (one untraced step runs
  first), and gradients are held during the forward when micro-batches accumulate.

CPU stand-ins for GPU behaviour (each keeps what a GPU keeps): attention runs the CPU flash
kernel, which saves q, k, v, the output and the log-sum-exp like the CUDA flash kernel (checked
on every trace); CUDA autocast's fp32 op policy and fused dropout's boolean mask are replayed
(calibration/cuda_behaviour.py);
attention dropout is off (the CUDA flash kernel keeps only an RNG state for it); DTensor's
global-shape metadata computations are not counted (calibration/memtrace.py).

Speed: within each position in the model (calibration/memtrace.py LayerPosition) memory is affine
in the number of decoder layers, so a config is traced with 3 and 4 layers and extrapolated
(tests/test_oracle_extrapolation.py proves it exact on small models).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.progress import progress
from planner.specs import ModelSpec, Workload

TRACED_LAYERS = (3, 4)  # both have a first, a middle and a last layer
FLASH_OPS = ("aten._scaled_dot_product_flash_attention_for_cpu.default",)
MATH_ATTENTION_OPS = ("aten._scaled_dot_product_attention_math.default",)
# the memory-efficient kernel a GPU runs where q/k and v head dims differ (MLA); see calibration/gpu_kernels.py
EFFICIENT_OPS = ("aten._scaled_dot_product_efficient_attention.default",)

# How MemTracker's and FSDPMemTracker's categories (calibration/memtrace.py adds "Param copy" and
# "Optimizer temp") add up to the planner's breakdown (planner/cost/memory.py CATEGORIES).
PLANNER_GROUP = {
    "Parameter": "params", "Sharded Param": "params",
    "Gradient": "grads", "Sharded Grad": "grads",
    "Optstate": "optimizer", "OptState": "optimizer", "Optimizer temp": "optimizer",
    "Param copy": "buffers", "Unsharded Param": "buffers", "All Gather": "buffers",
    "Reduce Scatter": "buffers", "Buffer": "buffers",
    # a layer's unsharded gradients are temporaries of its backward (FSDPMemTracker names them only
    # when FSDP2's post-backward starts reducing them)
    "Unsharded Grad": "activations",
    "Activation": "activations", "Temp": "activations", "Inputs": "activations", "Other": "activations",
}
PLANNER_GROUPS = ("params", "grads", "optimizer", "buffers", "activations")


def planner_groups(categories: dict[str, int]) -> dict[str, int]:
    """Sum tracker categories into the planner's breakdown keys."""
    groups = dict.fromkeys(PLANNER_GROUPS, 0)
    for name, nbytes in categories.items():
        groups[PLANNER_GROUP[name]] += nbytes
    return groups


def uses_autocast(workload: Workload, config: ParallelConfig) -> bool:
    """executor/train.py `_forward_context`: autocast over fp32 weights for DDP / ZeRO-1 and LoRA."""
    return (workload.precision != "fp32" and workload.master_dtype == "fp32"
            and (config.zero <= 1 or workload.method != "full"))


def check_traceable(spec: ModelSpec, workload: Workload, config: ParallelConfig) -> None:
    """InvalidRequest naming what the oracle cannot trace."""
    unsupported = [
        (config.pp > 1, "pipeline parallelism"),
        (config.offload != "none", "host offload"),
        (config.zero in (0, 1) and config.dp * config.cp > 1, "data parallelism without FSDP (use --zero 2 or 3)"),
        (config.ep > 1 and config.zero < 2, "expert parallelism without FSDP"),
        (config.ep > 1 and spec.experts_per_token * config.ep > spec.num_experts,
         "ep above experts / top-k (each rank's model routes over its own experts)"),
        (workload.method == "qlora", "QLoRA (bitsandbytes NF4 does not run on fake tensors)"),
        (workload.optimizer == "adamw8bit", "8-bit AdamW (bitsandbytes)"),
        (workload.precision == "fp8", "fp8 precision"),
        (workload.activation_offload, "activation offload"),
        (workload.optimizer_in_backward, "optimizer in backward"),
        (getattr(workload, "compile", False), "torch.compile"),
        (workload.method != "full" and (config.tp > 1 or config.zero >= 2), "LoRA with TP or FSDP"),
        (spec.is_moe and config.tp > 1, "tensor-parallel experts"),
        # transformers' grouped_mm experts take bf16 weights only; autocast leaves them fp32
        (spec.is_moe and workload.method == "full" and uses_autocast(workload, config),
         "MoE experts under autocast (grouped_mm takes bf16 weights only)"),
    ]
    reasons = [text for bad, text in unsupported if bad]
    if reasons:
        raise InvalidRequest(f"the oracle cannot trace {', '.join(reasons)}; choose a configuration without it")
    if not spec.hf_config:
        raise InvalidRequest(f"model {spec.name} carries no config.json (hf_config); the oracle needs one")


@dataclass
class LayerTrace:
    """One traced step of a model cut to `num_layers` decoder layers."""

    num_layers: int
    phases: dict[str, dict[str, Any]]  # position -> {"total_bytes", "categories"}
    attention_ops: list[str]
    seconds: float


def trace_layers(spec: ModelSpec, workload: Workload, config: ParallelConfig, num_layers: int) -> LayerTrace:
    """Trace one steady-state step of `spec` cut to `num_layers` layers, on rank 0 of the plan's world."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from calibration import fake_model
    from calibration.gpu_kernels import gpu_kernels
    from calibration.memtrace import fsdp_unshard_tagged, untracked_dtensor_metadata
    from executor.context_parallel import unpacked_sequences
    from executor.model import decoder_layers

    check_traceable(spec, workload, config)
    started = time.perf_counter()
    torch.manual_seed(0)
    autocast = uses_autocast(workload, config)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
    model = fake_model.build_model(spec, workload, num_layers, fake_mode, config.ep)
    layers = decoder_layers(model)  # before FSDP2 renames their classes
    fake_model.parallelize(model, layers, spec, workload, config)
    with fake_mode:
        optimizer = fake_model.build_optimizer(model, workload, config)
        _reach_steady_state(model, optimizer, config.num_micro_batches > 1)
        # context parallelism: this rank's seq_len / cp tokens (calibration/ring_attention.py)
        ids = torch.randint(0, spec.vocab_size, (config.micro_batch_size, workload.seq_len // config.cp))
        items = torch.tensor(float(ids.numel()))
        tracker = _tracker(model, optimizer, ids, config)
        tracker.watch_layers(layers)
        with tracker, untracked_dtensor_metadata(tracker), fsdp_unshard_tagged(tracker), \
                unpacked_sequences(), gpu_kernels():
            tracker.phase("forward")
            loss = _forward(model, ids, items, workload, autocast)
            tracker.phase("backward")
            loss.backward()
            del loss
            tracker.phase("optimizer-step")
            optimizer.step()
    attention = sorted(op for op in tracker.ops_seen if "attention" in op or "sdpa" in op)
    _check_attention_kernel(attention, tracker.attention_calls, spec, workload, config)
    phases = {name: peak.to_dict() for name, peak in tracker.phases.items()}
    return LayerTrace(num_layers, phases, attention, time.perf_counter() - started)


def _reach_steady_state(model, optimizer, grads_held: bool) -> None:
    """One untraced step creates the optimizer states exactly as torch does; then the gradients
    go (set_to_none, as the executor's step does) unless earlier micro-batches' are held."""
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not grads_held)


def _tracker(model, optimizer, ids, config: ParallelConfig):
    from calibration.memtrace import OracleFSDPMemTracker, OracleMemTracker

    if config.zero >= 2:
        tracker = OracleFSDPMemTracker(model, optimizer)
        tracker.track_inputs((ids,))
        return tracker
    tracker = OracleMemTracker()
    tracker.track_external(model, optimizer, ids)
    return tracker


def _forward(model, ids, items, workload: Workload, autocast: bool):
    """executor/train.py `_micro_batches`: the loss of one micro-batch, forward under autocast
    when the executor uses it (the backward runs outside)."""
    import torch

    from calibration.cuda_behaviour import CudaBehaviour
    from executor.model import compute_dtype

    context = torch.autocast("cpu", dtype=compute_dtype(workload)) if autocast else contextlib.nullcontext()
    with context, CudaBehaviour():
        return model(input_ids=ids, labels=ids, num_items_in_batch=items).loss


def _check_attention_kernel(attention_ops: list[str], calls: set[tuple[int, int, bool]], spec: ModelSpec,
                            workload: Workload, config: ParallelConfig) -> None:
    """The planner models SDPA as a GPU runs it: a flash kernel, causal without a mask and with
    native GQA, saving q, k, v, the output and the log-sum-exp; where transformers needs a mask
    (a sliding window no longer than the sequence: masking_utils._ignore_causal_mask_sdpa) it
    passes one and repeats k and v for every head (sdpa_attention.use_gqa_in_sdpa), on a GPU too.
    A trace that ran otherwise is not ground truth."""
    if workload.attention != "sdpa":
        return
    expected = expected_attention_calls(spec, workload, config)
    kernels = FLASH_OPS + EFFICIENT_OPS
    flash = any(op in attention_ops for op in kernels) and not any(op in attention_ops for op in MATH_ATTENTION_OPS)
    if not flash or calls != expected:
        raise RuntimeError(f"SDPA did not run the flash kernel causally with native GQA (ops {', '.join(attention_ops)}; "
                           f"calls (q heads, kv heads, masked) {sorted(calls)}); the trace would not match a GPU's")


def expected_attention_calls(spec: ModelSpec, workload: Workload, config: ParallelConfig) -> set[tuple[int, int, bool]]:
    """(query heads, key heads, masked) of each kind of softmax-attention layer: masked where its
    window or chunk is no longer than the sequence (planner/ops.py masked_by_window)."""
    from planner.gemma4 import layer_heads, repeats_kv
    from planner.ops import masked_attention, masked_by_window

    heads = spec.num_heads // config.tp
    spans = {"sliding_attention": spec.sliding_window or 0, "chunked_attention": spec.attention_chunk_size or 0}
    expected = set()
    for kind, _ in spec.layer_kinds():
        if kind.attention == "full_attention":
            masked = masked_attention(spec, workload)
        elif kind.attention in spans:
            masked = masked_by_window(workload, spans[kind.attention])
        else:
            continue  # linear attention, Mamba-2, no mixer
        kv_heads = layer_heads(spec, kind)[1] // config.tp  # Gemma 4's global layers have their own
        expected.add((heads, heads if repeats_kv(spec, kind, masked) else kv_heads, masked))
    return expected


# -- extrapolation ------------------------------------------------------------------------------

def extrapolate(first: LayerTrace, second: LayerTrace, num_layers: int) -> dict[str, dict[str, Any]]:
    """Each position's peak and categories, continued linearly in the layer count from two traces."""
    span = second.num_layers - first.num_layers
    steps = num_layers - second.num_layers
    if set(first.phases) != set(second.phases):
        raise AssertionError(f"traces differ in positions: {sorted(first.phases)} vs {sorted(second.phases)}")
    result = {}
    for name in sorted(first.phases):
        a, b = first.phases[name], second.phases[name]
        keys = set(a["categories"]) | set(b["categories"])
        categories = {k: _affine(a["categories"].get(k, 0), b["categories"].get(k, 0), span, steps) for k in keys}
        result[name] = {"total_bytes": _affine(a["total_bytes"], b["total_bytes"], span, steps),
                        "categories": {k: v for k, v in sorted(categories.items()) if v}}
    return result


def _affine(at_first: int, at_second: int, span: int, steps: int) -> int:
    per_layer, remainder = divmod(at_second - at_first, span)
    if remainder:
        raise AssertionError(f"per-layer bytes not whole: {at_second - at_first} over {span} layers")
    return at_second + steps * per_layer


def trace(spec: ModelSpec, workload: Workload, config: ParallelConfig,
          layers: tuple[int, int] = TRACED_LAYERS) -> dict[str, Any]:
    """The oracle's answer for the whole model: per-position peaks, the overall peak and its
    breakdown in the planner's categories."""
    started = time.perf_counter()
    # a stack of several kinds of layer is not affine in its depth: it is traced whole
    whole = spec.num_layers <= layers[1] or len(spec.layer_kinds()) > 1
    traced = [spec.num_layers] if whole else list(layers)
    traces = []
    with progress(len(traced), f"tracing {spec.name}: {' and '.join(map(str, traced))} layers") as advance:
        for num_layers in traced:
            traces.append(trace_layers(spec, workload, config, num_layers))
            advance()
    phases = traces[0].phases if len(traces) == 1 else extrapolate(traces[0], traces[1], spec.num_layers)
    peak_at = max(phases, key=lambda name: phases[name]["total_bytes"])
    return {
        "peak_bytes": phases[peak_at]["total_bytes"],
        "peak_phase": "optimizer-step" if peak_at == "optimizer-step" else "forward-backward",
        "peak_at": peak_at,
        "breakdown": planner_groups(phases[peak_at]["categories"]),
        "phases": phases,
        "layers_traced": traced,
        "autocast": uses_autocast(workload, config),
        "trace_seconds": round(time.perf_counter() - started, 2),
    }
