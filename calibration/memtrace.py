"""PyTorch's MemTracker / FSDPMemTracker, with the refinements the oracle needs.

1. Categories that separate what the planner separates. MemTracker files every tensor made in
   the forward as an activation, so autocast's bf16 weight casts look like activations, and
   everything allocated inside `optimizer.step()` as optimizer state. Here a cast of a parameter
   is a "Param copy" and a tensor born inside the step is an "Optimizer temp".
2. Peaks per position: the peak (with the categories at that moment) is kept separately for
   each position in the model (LayerPosition), forward and backward, and for the optimizer step,
   so that each can be extrapolated per layer.
3. Frozen parameters (LoRA bases) get no gradient hooks, which PyTorch refuses to install on
   tensors that do not require grad (TORCH-NOTES).
4. DTensor's metadata computations on global-shape fake tensors are not counted
   (untracked_dtensor_metadata).

Everything else (storage accounting by weak references, the AC-aware forward/backward split)
is PyTorch's own: torch/distributed/_tools/mem_tracker.py and fsdp2_mem_tracker.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _RefType

TOTAL = "Total"
ATTENTION_OPS = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                 torch.ops.aten._scaled_dot_product_efficient_attention.default)  # MLA (calibration/gpu_kernels.py)


class OracleRef(_RefType):
    """Categories MemTracker does not have."""

    PARAM_COPY = "Param copy"
    OPT_TEMP = "Optimizer temp"


@dataclass
class PhasePeak:
    """The largest total seen at one position, and the categories at that moment."""

    total_bytes: int = 0
    categories: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "categories": dict(self.categories)}


class LayerPosition:
    """Which part of the model the step is in: the embedding end, the first, a middle or the last
    decoder layer, or the head end (final norm, LM head, loss), forward or backward.

    Forward hooks on the decoder layers, and gradient hooks on each layer's output (its backward
    starts) and input (its backward ends); not ModTracker's backward bookkeeping, which can lag.
    Within one position the peak is affine in the number of layers (per-layer state grows
    linearly with the layer index), which is what makes per-layer extrapolation exact."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.num_layers = len(layers)
        self.forward_layer: int | None = None
        self.backward_layer: int | None = None
        self.forward_done = 0
        self.backward_started = False
        self.in_backward = False
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, i=index: self._forward_start(i))
            layer.register_forward_hook(lambda m, a, k, out, i=index: self._forward_end(i, a, k, out), with_kwargs=True)

    def where(self, direction: str) -> str:
        if direction == "forward":
            if self.forward_layer is not None:
                return self._layer_class(self.forward_layer)
            return "embedding" if self.forward_done == 0 else "head"
        if self.backward_layer is not None:
            return self._layer_class(self.backward_layer)
        return "embedding" if self.backward_started else "head"

    def _layer_class(self, index: int) -> str:
        if index == 0:
            return "layer:first"
        return "layer:last" if index == self.num_layers - 1 else "layer:middle"

    def _forward_start(self, index: int) -> None:
        if not self.in_backward:
            self.forward_layer = index

    def _forward_end(self, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        if self.in_backward:  # a recomputation
            return
        self.forward_layer = None
        self.forward_done += 1
        out = output[0] if isinstance(output, (tuple, list)) else output
        inp = args[0] if args else kwargs.get("hidden_states")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self._backward_start(index))
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            inp.register_hook(lambda grad: self._backward_end(index))

    def _backward_start(self, index: int) -> None:
        self.backward_layer, self.backward_started = index, True

    def _backward_end(self, index: int) -> None:
        # a layer's position lasts until the next one starts (what runs on its input's gradient, such
        # as FSDP2's post-backward reduce-scatter, belongs to it); after the first layer: the embedding
        if index == 0:
            self.backward_layer = None


class _OracleMixin:
    """Mixed into MemTracker and FSDPMemTracker (see the module docstring)."""

    def _oracle_init(self) -> None:
        self.phases: dict[str, PhasePeak] = {}
        self._phase: str | None = None
        self._position: LayerPosition | None = None
        self._dispatching: tuple[Any, tuple] | None = None
        self._untracked = 0
        self._fsdp_tag: _RefType | None = None  # set while FSDP2 allocates its gather / reduce-scatter buffers
        self.ops_seen: set[str] = set()
        self.attention_calls: set[tuple[int, int, bool]] = set()  # (query heads, key heads, masked)

    # -- phases ---------------------------------------------------------------------------------
    def watch_layers(self, layers: list[torch.nn.Module]) -> None:
        """Split the forward and backward peaks by position in the model (see LayerPosition)."""
        self._position = LayerPosition(layers)

    def phase(self, name: str) -> None:
        """Start phase `name` (forward, backward, optimizer-step) from what is allocated now."""
        self._phase = name
        if self._position is not None:
            self._position.in_backward = name == "backward"
        self._record(self._device_snapshot(), force=True)

    def _key(self) -> str:
        if self._position is None or self._phase not in ("forward", "backward"):
            return self._phase
        return f"{self._phase} {self._position.where(self._phase)}"

    def _device_snapshot(self) -> dict[str, int]:
        snapshot = self._curr_mem_snap  # type: ignore[attr-defined]
        if len(snapshot) > 1:
            raise AssertionError(f"the oracle traces one device, saw {list(snapshot)}")
        return next(iter(snapshot.values()), {TOTAL: 0})

    def _record(self, snapshot: dict[str, int], force: bool = False) -> None:
        if self._phase is None:
            return
        key = self._key()
        peak = self.phases.setdefault(key, PhasePeak())
        total = snapshot.get(TOTAL, 0)
        if force or total > peak.total_bytes:
            peak.total_bytes = total
            peak.categories = {_value(k): v for k, v in snapshot.items() if k != TOTAL and v}

    def _update_peak_stats(self, peak_state) -> None:  # MemTracker hook, after every op
        super()._update_peak_stats(peak_state)  # type: ignore[misc]
        self._record(self._device_snapshot())

    # -- categories -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._untracked:  # DTensor deriving an output's global metadata (see untracked_dtensor_metadata)
            return func(*args, **(kwargs or {}))
        self._dispatching = (func, args)
        self.ops_seen.add(str(func))
        if func in ATTENTION_OPS:
            mask = (kwargs or {}).get("attn_mask", args[3] if func is ATTENTION_OPS[1] else None)
            self.attention_calls.add((args[0].shape[1], args[1].shape[1], mask is not None))
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)  # type: ignore[misc]
        finally:
            self._dispatching = None

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self._in_opt:  # type: ignore[attr-defined]
            reftype = OracleRef.OPT_TEMP  # states exist before a steady-state step; re-tagged after it
        elif self._fsdp_tag is not None:
            reftype = self._fsdp_tag
        elif self._casts_a_parameter():
            reftype = OracleRef.PARAM_COPY
        super()._track(reftype, t)  # type: ignore[misc]

    def _casts_a_parameter(self) -> bool:
        if self._dispatching is None:
            return False
        func, args = self._dispatching
        if func is not torch.ops.aten._to_copy.default or not args or not isinstance(args[0], torch.Tensor):
            return False
        info = self._WINFO.get(args[0].untyped_storage(), (None, None))[0]  # type: ignore[attr-defined]
        return info is not None and _value(info.reftype) in ("Parameter", "Sharded Param")

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        snapshot = self._curr_mem_snap.setdefault(  # type: ignore[attr-defined]
            winfo.device, dict.fromkeys(self._ref_class, 0))  # type: ignore[attr-defined]
        for key in (winfo.reftype, old_reftype):
            if key is not None:
                snapshot.setdefault(key, 0)
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)  # type: ignore[misc]

@contextmanager
def untracked_dtensor_metadata(tracker: _OracleMixin):
    """DTensor derives each op's output layout by running the op on fake tensors of the *global*
    shape, in the active fake mode if there is one (torch/distributed/tensor/_sharding_prop.py,
    `_propagate_tensor_meta_non_cached`). On a GPU that costs no device memory; under the oracle's
    fake mode MemTracker would count it (whole unsharded parameters inside a sharded optimizer
    step). Those ops are left untracked."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        tracker._untracked += 1
        try:
            return original(self, op_schema)
        finally:
            tracker._untracked -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


@contextmanager
def _allocations_tagged(tracker: _OracleMixin, reftype: _RefType):
    """Whatever is allocated inside is filed under `reftype`."""
    previous, tracker._fsdp_tag = tracker._fsdp_tag, reftype
    try:
        yield
    finally:
        tracker._fsdp_tag = previous


@contextmanager
def fsdp_unshard_tagged(tracker: _OracleMixin):
    """FSDPMemTracker tags the parameters FSDP2 gathers only inside a module's pre-forward; FSDP2
    also gathers elsewhere (the prefetch for backward at the end of forward, the pre-backward
    unshard), and those would count as activations. Here whatever `FSDPParamGroup.unshard`
    allocates is an all-gather buffer and whatever `wait_for_unshard` allocates (the copy-out
    into the parameters' own storage) an unsharded parameter. The reduce-scatter input is tagged
    too (_reduce_scatter_input_tagged)."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    def tagged(original, reftype):
        def run(group, *args, **kwargs):
            with _allocations_tagged(tracker, reftype):
                return original(group, *args, **kwargs)
        return run

    originals = {"unshard": FSDPParamGroup.unshard, "wait_for_unshard": FSDPParamGroup.wait_for_unshard}
    FSDPParamGroup.unshard = tagged(originals["unshard"], _FSDPRefType.ALL_GATHER)
    FSDPParamGroup.wait_for_unshard = tagged(originals["wait_for_unshard"], _FSDPRefType.UNSHARDED_PARAM)
    try:
        with _reduce_scatter_input_tagged(tracker):
            yield
    finally:
        for name, method in originals.items():
            setattr(FSDPParamGroup, name, method)


class _FirstAllocationTagged:
    """A reduce-scatter communication object whose first allocation (in `foreach_reduce`: the
    reduce-scatter input; the second is the output, which becomes the sharded gradient) is
    filed as a reduce-scatter buffer."""

    def __init__(self, comm, tracker: _OracleMixin) -> None:
        self._comm, self._tracker, self._first = comm, tracker, True

    def allocate(self, *args, **kwargs):
        if not self._first:
            return self._comm.allocate(*args, **kwargs)
        from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

        self._first = False
        with _allocations_tagged(self._tracker, _FSDPRefType.REDUCE_SCATTER):
            return self._comm.allocate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._comm(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._comm, name)


@contextmanager
def _reduce_scatter_input_tagged(tracker: _OracleMixin):
    """FSDPMemTracker tags FSDP2's reduce-scatter input only once the collective runs; the input
    already exists (as a temporary) while the gradients are copied into it, which can be the
    peak (the root's post-backward, after the embedding's backward). Here it is a reduce-scatter
    buffer from its allocation on (`foreach_reduce`, torch/distributed/fsdp/_fully_shard/
    _fsdp_collectives.py: `reduce_scatter_comm.allocate` then `foreach_reduce_scatter_copy_in`)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    original = _fsdp_param_group.foreach_reduce

    def foreach_reduce(fsdp_params, unsharded_grads, group, stream, comm, *args, **kwargs):
        return original(fsdp_params, unsharded_grads, group, stream, _FirstAllocationTagged(comm, tracker),
                        *args, **kwargs)

    _fsdp_param_group.foreach_reduce = foreach_reduce
    try:
        yield
    finally:
        _fsdp_param_group.foreach_reduce = original


class OracleMemTracker(_OracleMixin, MemTracker):
    def __init__(self) -> None:
        super().__init__()
        self._oracle_init()

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        """MemTracker's own (mem_tracker.py), except that frozen parameters get no gradient hooks."""

        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        params_bytes = buffers_bytes = 0
        for param in module.parameters():
            params_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(param, _MemRefType.PARAM))
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
        for buffer in module.buffers():
            buffers_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER))
        return params_bytes, buffers_bytes


class OracleFSDPMemTracker(_OracleMixin, FSDPMemTracker):
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(module, optimizer)
        self._oracle_init()


def _value(key) -> str:
    return key.value if isinstance(key, _RefType) else str(key)
