"""ZeRO-3 as DeepSpeed runs it, where it differs from FSDP2's layer units (planner/framework_memory.py
`zero3 = "module"`): the parts of a step that planner/cost/memory.py builds for FSDP2, rewritten for
the candidates with ZeRO 3.

DeepSpeed's partitioned parameter coordinator (deepspeed/runtime/zero/partitioned_param_coordinator.py)
gathers the parameters of each leaf module as it runs and releases them after it (release_sub_module);
its prefetch (fetch_sub_module) all-gathers upcoming parameters until `prefetch_bucket_size` elements
are in flight, overshooting by at most one tensor, and never past `max_live_parameters`. So at any
moment the gathered parameters are the running module's (at most the largest tensor) and the
prefetch (at most the bucket and one tensor): a unit of min(layer, largest tensor + bucket) counted
twice (the running one and the prefetched one, as memory.py counts FSDP2's own and next layer) —
an upper bound. The root (embedding, head) is gathered only while it runs: at most one such unit.
Tensors of at most `param_persistence_threshold` elements (biases, norms) stay gathered all step.

Gradients (deepspeed/runtime/zero/stage3.py): each is copied, as it is made, into the contiguous
reduce bucket of `reduce_bucket_size` elements in the compute dtype, allocated once for the whole
run (stage3.py 731-735), and reduce-scattered when full into fp32 partitions (gradient_accumulation_dtype);
a tensor larger than the bucket is reduced from its own gradient. No layer's unsharded gradients
wait for the layer's backward to end, as FSDP2's do, and routed experts are modules like any other
(not FSDP units of their own, as torchtitan makes them).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context, Regime
from planner.cost.moments import StepParts
from planner.framework_memory import framework_memory


def zero3_by_module(ctx: Context, regime: Regime, c: Candidates, parts: StepParts) -> StepParts:
    """`parts` with DeepSpeed's ZeRO-3 buffers for the candidates with ZeRO 3; unchanged for a framework
    whose ZeRO 3 is FSDP2's layer units (the executor, torchtitan, ...)."""
    fw = framework_memory(ctx.workload.framework)
    if fw.zero3 != "module" or fw.deepspeed is None:
        return parts
    ds, cb = fw.deepspeed, parts.compute_bytes
    on = np.asarray((c.zero == 3) & parts.fsdp)
    layer_dims = regime.layer.params.dims
    all_dims = layer_dims + regime.embedding.params.dims + regime.head.params.dims
    largest = max((n for _, n in all_dims), default=0.0) / c.tp
    persistent = sum(n for _, n in layer_dims if n <= ds.param_persistence_threshold)
    unit = cb * (largest + ds.prefetch_bucket_size)
    trained = (regime.layer.params.trainable + regime.embedding.params.trainable + regime.head.params.trainable) > 0
    bucket = cb * ds.reduce_bucket_size * trained
    whole_step = cb * parts.layers * persistent + bucket  # persistent tensors and the reduce bucket

    def capped(value):
        return np.where(on, np.minimum(value, unit), value)

    def zero(value):
        return np.where(on, 0.0, value)

    gathered_at = None if parts.gathered_at is None else {k: capped(v) for k, v in parts.gathered_at.items()}
    scatter_at = None if parts.scatter_at is None else {k: zero(v) for k, v in parts.scatter_at.items()}
    unsharded_at = None if parts.unsharded_at is None else {k: zero(v) for k, v in parts.unsharded_at.items()}
    root = np.where(on, np.minimum(parts.gathered_root + parts.gathered_head + parts.gathered_embedding, unit)
                    + whole_step, parts.gathered_root)
    steps = [(alive, weights, zero(before)) for alive, weights, before in parts.steps]
    kind_steps = None if parts.kind_steps is None else [
        [(alive, weights, zero(before)) for alive, weights, before in s] for s in parts.kind_steps]
    return replace(parts, gathered_layer=capped(parts.gathered_layer), gathered_at=gathered_at,
                   gathered_root=root, gathered_head=zero(parts.gathered_head),
                   gathered_embedding=zero(parts.gathered_embedding),
                   scatter_layer=zero(parts.scatter_layer), scatter_at=scatter_at, scatter_root=zero(parts.scatter_root),
                   root_grads=zero(parts.root_grads), root_grads_all=zero(parts.root_grads_all),
                   layer_grads_unsharded=zero(parts.layer_grads_unsharded), unsharded_at=unsharded_at,
                   steps=steps, kind_steps=kind_steps,
                   experts_gathered=zero(parts.experts_gathered), experts_scatter=zero(parts.experts_scatter))
