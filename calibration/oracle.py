"""The memory oracle: trace a real training step of the transformers model on fake tensors and
report the peak tensor bytes of the most loaded rank, by category.

What is traced — the executor's semantics, shared with the planner (planner/cost/memory.py):

* precision bf16/fp16, method full: fp32 parameters, gradients and AdamW states.
  - ZeRO 0 (one device or tensor parallel): `torch.autocast` over the fp32 model; each linear
    casts its weight (autocast caches the cast until the forward ends) and its input.
  - ZeRO 2/3: FSDP2 `fully_shard` per decoder layer and at the root, with
    `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` and no autocast; ZeRO 3
    reshards after forward, ZeRO 2 does not (`reshard_after_forward=False`).
* master dtype bf16: the model, gradients and AdamW states all in bf16, no autocast.
* precision fp32: everything fp32, no autocast.
* LoRA (peft): the base model in the compute dtype and frozen, adapters in fp32
  (`autocast_adapter_dtype=True`), no autocast.
* optimizer: `torch.optim.AdamW` with foreach=True (the GPU default), fused=True, or the
  for-loop; SGD without momentum. Loss: the model's own `labels=` path
  (`loss = model(input_ids, labels=labels).loss`; the output is not kept).
* recompute: full = every decoder layer checkpointed (non-reentrant); selective = torchtitan's
  per-op policy (calibration/fake_model.py).
* tensor parallel: Megatron/torchtitan plan on a DTensor mesh with `loss_parallel`.
* steady state: the optimizer states exist before the traced forward (one untraced step is
  run first), and gradients are held during the forward when micro-batches accumulate.

CPU stand-ins for GPU behaviour (each keeps the GPU's memory): attention runs the CPU flash
kernel, which saves q, k, v, the output and the log-sum-exp like the CUDA flash kernel (checked
on every trace); CUDA autocast's fp32 op policy is replayed (calibration/cuda_autocast.py);
attention dropout is off (the CUDA flash kernel keeps only an RNG state for it).

Speed: memory is affine in the number of decoder layers, so a config is traced with 2 and 3
layers and extrapolated per layer, phase by phase (tests/test_oracle_extrapolation.py proves
the extrapolation exact on small models).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload

TRACED_LAYERS = (3, 4)  # both have a first, a middle and a last layer
FLASH_OPS = ("aten._scaled_dot_product_flash_attention_for_cpu.default",)
MATH_ATTENTION_OPS = ("aten._scaled_dot_product_attention_math.default",)


@dataclass(frozen=True)
class TraceSetup:
    """How the executor runs a (workload, config): every dtype and wrapper the trace applies."""

    model_dtype: str  # dtype the transformers model is built in
    autocast_dtype: str | None  # torch.autocast dtype, or None
    fsdp: bool
    fsdp_param_dtype: str | None  # MixedPrecisionPolicy.param_dtype
    fsdp_reduce_dtype: str | None
    reshard_after_forward: bool
    dp: int
    tp: int
    recompute: str
    lora_rank: int | None
    lora_targets: tuple[str, ...]
    optimizer: str
    optimizer_impl: str
    grads_held: bool  # gradients of earlier micro-batches alive during the forward
    attention: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data


def setup_for(spec: ModelSpec, workload: Workload, config: ParallelConfig) -> TraceSetup:
    """The semantics above for one configuration; InvalidRequest for what the oracle cannot trace."""
    _check_supported(spec, workload, config)
    compute = workload.precision if workload.precision != "fp32" else "fp32"
    fsdp = config.zero >= 2
    lora = workload.method == "lora"
    master = "bf16" if workload.master_dtype == "bf16" else "fp32"
    if lora:
        model_dtype = compute
    else:
        model_dtype = compute if master == "bf16" or compute == "fp32" else "fp32"
    mixed = model_dtype == "fp32" and compute != "fp32"
    return TraceSetup(
        model_dtype=model_dtype, autocast_dtype=compute if mixed and not fsdp else None, fsdp=fsdp,
        fsdp_param_dtype=compute if fsdp and mixed else None,
        fsdp_reduce_dtype="fp32" if fsdp and mixed else None, reshard_after_forward=config.zero == 3,
        dp=config.dp, tp=config.tp, recompute=config.recompute,
        lora_rank=workload.lora_rank if lora else None, lora_targets=tuple(workload.lora_targets) if lora else (),
        optimizer=workload.optimizer, optimizer_impl=workload.optimizer_impl,
        grads_held=config.num_micro_batches > 1, attention=workload.attention)


def _check_supported(spec: ModelSpec, workload: Workload, config: ParallelConfig) -> None:
    unsupported = [
        (config.pp > 1, "pipeline parallelism (trace one stage's layers instead)"),
        (config.offload != "none", "host offload"),
        (config.sequence_parallel, "sequence parallelism"),
        (config.zero in (0, 1) and config.dp > 1, "data parallelism without FSDP (use --zero 2 or 3)"),
        (workload.method == "qlora", "QLoRA (bitsandbytes NF4 does not run on fake tensors)"),
        (workload.optimizer == "adamw8bit", "8-bit AdamW (bitsandbytes)"),
        (workload.precision == "fp8", "fp8 precision"),
        (workload.loss_chunks > 1, "chunked loss"),
        (workload.activation_offload, "activation offload"),
        (workload.optimizer_in_backward, "optimizer in backward"),
        (workload.method == "lora" and (config.tp > 1 or config.zero >= 2), "LoRA with TP or FSDP"),
        (spec.is_moe and config.tp > 1, "tensor parallel experts"),
        # transformers' grouped_mm experts need bf16 weights; autocast leaves them fp32
        (spec.is_moe and workload.method == "full" and config.zero < 2 and workload.precision != "fp32"
         and workload.master_dtype == "fp32", "MoE experts under autocast (grouped_mm takes bf16 weights only)"),
    ]
    reasons = [text for bad, text in unsupported if bad]
    if reasons:
        raise InvalidRequest(f"the oracle cannot trace {', '.join(reasons)}; choose a configuration without it")


@dataclass
class LayerTrace:
    """One traced step of a model cut to `num_layers` decoder layers."""

    num_layers: int
    phases: dict[str, dict[str, Any]]  # phase -> {"total_bytes", "categories", "where"}
    attention_ops: list[str]
    seconds: float


def trace_layers(spec: ModelSpec, workload: Workload, config: ParallelConfig, num_layers: int) -> LayerTrace:
    """Trace one steady-state step of `spec` cut to `num_layers` layers, on rank 0 of the plan's world."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from calibration import fake_model
    from calibration.memtrace import untracked_dtensor_metadata

    setup = setup_for(spec, workload, config)
    if not spec.hf_config:
        raise InvalidRequest(f"model {spec.name} carries no config.json (hf_config); the oracle needs one")
    started = time.perf_counter()
    torch.manual_seed(0)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads meta tensors
    hf = fake_model.hf_config(spec.hf_config, num_layers, workload.attention)
    hf.use_cache = False
    lora = (setup.lora_rank, setup.lora_targets) if setup.lora_rank else None
    model = fake_model.build_model(hf, fake_model.DTYPES[setup.model_dtype], lora, fake_mode)
    _parallelize(model, setup)
    with fake_mode:
        optimizer = _optimizer(model, setup)
        ids = torch.randint(0, spec.vocab_size, (config.micro_batch_size, workload.seq_len))
        _reach_steady_state(model, optimizer, setup)
        tracker = _tracker(model, optimizer, ids, setup)
        tracker.watch_layers(fake_model.decoder_layers(model))
        with tracker, untracked_dtensor_metadata(tracker):
            with _step_context(setup):
                tracker.phase("forward")
                loss = _forward(model, ids, setup)
                tracker.phase("backward")
                loss.backward()
                del loss
            tracker.phase("optimizer-step")
            optimizer.step()
    attention = sorted(op for op in tracker.ops_seen if "attention" in op or "sdpa" in op)
    _check_attention_kernel(attention, workload)
    phases = {name: peak.to_dict() for name, peak in tracker.phases.items()}
    return LayerTrace(num_layers, phases, attention, time.perf_counter() - started)


def _parallelize(model, setup: TraceSetup) -> None:
    from calibration import fake_model

    mesh = fake_model.device_mesh(setup.dp, setup.tp) if setup.dp * setup.tp > 1 else None
    if setup.tp > 1:
        fake_model.apply_tensor_parallel(model, mesh["tp"])
    fake_model.enable_checkpointing(model, setup.recompute)
    if setup.fsdp:
        dtypes = fake_model.DTYPES
        fake_model.apply_fsdp(model, mesh["dp"] if mesh is not None else fake_model.device_mesh(1, 1)["dp"],
                              dtypes.get(setup.fsdp_param_dtype), dtypes.get(setup.fsdp_reduce_dtype),
                              setup.reshard_after_forward)


def _optimizer(model, setup: TraceSetup):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}[setup.optimizer_impl]
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, **({} if setup.optimizer_impl == "fused" else impl))
    return torch.optim.AdamW(params, lr=1e-4, **impl)


def _reach_steady_state(model, optimizer, setup: TraceSetup) -> None:
    """One untraced step creates the optimizer states exactly as torch does; then the gradients
    go (set_to_none) unless earlier micro-batches' gradients are held during this forward."""
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not setup.grads_held)


def _tracker(model, optimizer, ids, setup: TraceSetup):
    from calibration.memtrace import OracleFSDPMemTracker, OracleMemTracker

    if setup.fsdp:
        tracker = OracleFSDPMemTracker(model, optimizer)
        tracker.track_inputs((ids,))
        return tracker
    tracker = OracleMemTracker()
    tracker.track_external(model, optimizer, ids)
    return tracker


def _forward(model, ids, setup: TraceSetup):
    """loss = model(input_ids, labels=labels).loss; the backward runs outside autocast."""
    import torch

    from calibration.fake_model import DTYPES

    if not setup.autocast_dtype:
        return model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=DTYPES[setup.autocast_dtype]):
        return model(input_ids=ids, labels=ids).loss


def _step_context(setup: TraceSetup) -> contextlib.ExitStack:
    """Around forward and backward: CUDA autocast's fp32 policy (it acts only where autocast is
    on, which includes checkpoint recomputation in the backward); with tensor parallelism,
    `loss_parallel`, as the logits stay vocabulary-sharded (torchtitan's loss_parallel option)."""
    from torch.distributed.tensor.parallel import loss_parallel

    from calibration.cuda_autocast import CudaAutocastFp32Policy

    stack = contextlib.ExitStack()
    stack.enter_context(CudaAutocastFp32Policy())
    if setup.tp > 1:
        stack.enter_context(loss_parallel())
    return stack


def _check_attention_kernel(attention_ops: list[str], workload: Workload) -> None:
    """The planner models the flash kernel's saved tensors; a math-kernel trace would not be ground truth."""
    if workload.attention != "sdpa":
        return
    if any(op in attention_ops for op in MATH_ATTENTION_OPS) or not any(op in attention_ops for op in FLASH_OPS):
        raise RuntimeError(f"SDPA did not run the flash kernel ({', '.join(attention_ops) or 'no attention op'}); "
                           "the trace would not match a GPU's")


# -- extrapolation ------------------------------------------------------------------------------

def extrapolate(first: LayerTrace, second: LayerTrace, num_layers: int) -> dict[str, dict[str, Any]]:
    """Each phase's peak and categories, continued linearly in the layer count from two traces."""
    span = second.num_layers - first.num_layers
    steps = num_layers - second.num_layers
    if set(first.phases) != set(second.phases):
        raise AssertionError(f"traces differ in phases: {sorted(first.phases)} vs {sorted(second.phases)}")
    result = {}
    for name in sorted(first.phases):
        a, b = first.phases[name], second.phases[name]
        keys = set(a["categories"]) | set(b["categories"])
        categories = {k: _affine(a["categories"].get(k, 0), b["categories"].get(k, 0), span, steps) for k in keys}
        result[name] = {"total_bytes": _affine(a["total_bytes"], b["total_bytes"], span, steps),
                        "categories": {k: v for k, v in sorted(categories.items()) if v},
                        "where": b["where"]}
    return result


def _affine(at_first: int, at_second: int, span: int, steps: int) -> int:
    per_layer, remainder = divmod(at_second - at_first, span)
    if remainder:
        raise AssertionError(f"per-layer bytes not whole: {at_second - at_first} over {span} layers")
    return at_second + steps * per_layer


def trace(spec: ModelSpec, workload: Workload, config: ParallelConfig,
          layers: tuple[int, int] = TRACED_LAYERS) -> dict[str, Any]:
    """The oracle's answer for the whole model: per-phase peaks, the overall peak and its
    breakdown in the planner's categories."""
    from calibration.oracle_check import planner_groups

    started = time.perf_counter()
    if spec.num_layers <= layers[1]:
        whole = trace_layers(spec, workload, config, spec.num_layers)
        phases, traced = whole.phases, [spec.num_layers]
    else:
        first, second = (trace_layers(spec, workload, config, n) for n in layers)
        phases, traced = extrapolate(first, second, spec.num_layers), list(layers)
    peak_at = max(phases, key=lambda name: phases[name]["total_bytes"])
    return {
        "peak_bytes": phases[peak_at]["total_bytes"],
        "peak_phase": "optimizer-step" if peak_at == "optimizer-step" else "forward-backward",
        "peak_at": peak_at,
        "breakdown": planner_groups(phases[peak_at]["categories"]),
        "phases": phases,
        "layers_traced": traced,
        "setup": setup_for(spec, workload, config).to_dict(),
        "trace_seconds": round(time.perf_counter() - started, 2),
    }
