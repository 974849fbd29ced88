"""Memory at the moments of a training step where the peak can fall, by category.

A step's memory rises through the forward, falls through the backward as saved activations are
released while gradients appear, and is highest at one of a few moments (the same positions the
oracle traces, calibration/memtrace.py):

  forward head           the loss: every saved activation, the logits and their fp32 copies
  backward head          the loss's backward (12 bytes per vocabulary entry per token), or the LM
                         head's weight gradient (its compute-dtype result and the cast to fp32)
  backward layer:last    the first layer to run its backward (all activations still held)
  backward layer:middle  a layer between: the highest or the lowest (memory is linear in the index)
  backward layer:first   the last layer to run its backward (the other layers' gradients exist)
  backward embedding     the embedding's gradient (every other gradient exists)
  optimizer-step         parameters, gradients, states and the optimizer's temporaries

Inside a layer's backward the op-by-op walk of planner/cost/summary.py (backward_steps) gives what
is alive; the largest step counts. Parameter copies follow the numerics: autocast keeps each
weight's bf16 cast until that layer's backward has used it; FSDP2 (ZeRO 3) holds the root module
(embedding, final norm, head) gathered for the whole step, the layer it runs, the next layer's
all-gather buffer (prefetched, also at the end of the forward for the first backward layer), and
the previous layer's fp32 reduce-scatter input; ZeRO 2 keeps every layer gathered until its
backward is done. Parameters and optimizer states are the same at every moment (memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

MOMENTS = ("forward head", "backward head", "backward layer:last", "backward layer:middle",
           "backward layer:first", "backward embedding", "optimizer-step")


@dataclass
class StepParts:
    """The building blocks of one stage role's moments, per candidate (bytes, per rank)."""

    layers: np.ndarray  # decoder layers on the stage
    others: np.ndarray  # saved activations of the other micro-batches in flight
    kept_layer: np.ndarray  # saved activations of one layer under the recompute policy
    embedding: np.ndarray  # saved by the embedding side (ids, masks) of the micro-batches in flight
    head: np.ndarray  # saved by the final norm and the LM head
    held_output: np.ndarray  # the final norm's output, held by the model while the loss runs
    loss_forward: np.ndarray
    loss_backward: np.ndarray
    grad_logits: np.ndarray  # the logits' gradient in the compute dtype
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (alive, weights made here, made before)
    grads_held: np.ndarray  # gradients alive from the start (accumulation)
    grad_layer: np.ndarray  # one layer's gradients as stored (sharded under ZeRO 2/3)
    grad_head: np.ndarray  # the LM head's and final norm's gradients as stored
    grad_all: np.ndarray  # every gradient of the stage as stored
    grad_bytes: np.ndarray  # bytes per gradient element in the optimizer's view (master dtype)
    head_weights: np.ndarray  # LM head weights on this rank (elements)
    embedding_grad: np.ndarray  # the embedding's dense gradient as made (bytes; whole under TP: replicated)
    incoming_grad: np.ndarray  # the gradient flowing into the embedding
    tied_grad: np.ndarray  # a tied LM head's gradient, buffered by autograd until the embedding's joins it
    compute_bytes: int
    autocast_casts: bool  # autocast keeps compute-dtype casts of the trained weights
    cast_layer: np.ndarray  # one layer's weight casts (autocast) in bytes
    cast_head: np.ndarray
    fsdp: np.ndarray  # ZeRO 2/3 candidates (bool)
    zero2: np.ndarray
    gathered_layer: np.ndarray  # one layer's parameters gathered (FSDP2, padded)
    gathered_root: np.ndarray  # the root unit, gathered for the whole step
    gathered_head: np.ndarray  # the LM head's own unit (shard_ends), gathered around its use
    gathered_embedding: np.ndarray  # the embedding's own unit (shard_ends)
    ends: np.ndarray  # shard_ends candidates (bool): the head's gradients are reduce-scattered at once
    scatter_layer: np.ndarray  # one layer's reduce-scatter input (reduce dtype, padded)
    scatter_root: np.ndarray
    root_grads: np.ndarray  # the LM head's unsharded gradients (FSDP2 root, compute dtype) during the layers
    root_grads_all: np.ndarray  # the root's unsharded gradients once the embedding's exist
    layer_grads_unsharded: np.ndarray  # one layer's unsharded gradients (compute dtype)
    boundary: np.ndarray  # pipeline send/receive buffers
    layers_resident: np.ndarray  # layers whose saved activations stay on the device (activation offload)
    checkpointed: np.ndarray  # layers recompute their forward in the backward (bool)
    ring: np.ndarray | float = 0.0  # context parallelism's K/V gather and dK/dV buffers in a layer's backward
    # FSDP2's gathered / reduce-scatter bytes of the stage's layer at each position (first, second,
    # below_last, last) and of its largest kind (max): a stack of several kinds gathers each its own size
    gathered_at: dict[str, np.ndarray] | None = None
    scatter_at: dict[str, np.ndarray] | None = None
    # a stack of several kinds: each kind's backward steps, the kind at each position, which kinds
    # the stage holds (kind_at["held"]), so a layer's own backward is that of its kind, and which
    # kinds hold routed experts (kind_at["experts"])
    unsharded_at: dict[str, np.ndarray] | None = None  # FSDP2: the layer's unsharded gradients (compute dtype)
    kind_steps: list | None = None
    kind_at: dict[str, np.ndarray] | None = None
    kept_at: dict[str, np.ndarray] | None = None  # activations kept by the layer at each position
    grad_at: dict[str, np.ndarray] | None = None  # gradients stored by the layer at each position
    # FSDP2 root holding a tied head: its buffered gradient, the embedding's and their sum (compute dtype)
    tied_sum: np.ndarray | float = 0.0
    # expert parallelism under FSDP2: the routed experts are units of their own (torchtitan apply_fsdp),
    # gathered at their own backward and reduce-scattered when it ends: the share of `gathered_layer` and
    # `scatter_layer` that is neither prefetched with the layer below nor still reducing above
    experts_gathered: np.ndarray | float = 0.0
    experts_scatter: np.ndarray | float = 0.0


def moments(x: StepParts) -> dict[str, dict[str, np.ndarray]]:
    """Every moment's grads, buffers, activations and logits (parameters and states come on top)."""
    last, first = x.layers - 1, np.zeros_like(x.layers)
    middle_high, middle_low = np.maximum(x.layers - 2, 0), np.minimum(1, x.layers - 1)
    step = {where: _position_step(x, where) for where in ("first", "last", "max")}
    middle = _larger(_backward_layer(x, middle_high, step["max"], "middle_high"),
                     _backward_layer(x, middle_low, step["max"], "middle_low"))
    table = {"forward head": _forward_head(x), "backward head": _backward_head(x),
             "backward layer:last": _backward_layer(x, last, step["last"], "last"), "backward layer:middle": middle,
             "backward layer:first": _backward_layer(x, first, step["first"], "first"),
             "backward embedding": _backward_embedding(x)}
    for moment in table.values():
        moment["buffers"] = moment["buffers"] + x.boundary
    return table


def _moment(grads=0.0, buffers=0.0, activations=0.0, logits=0.0) -> dict[str, np.ndarray]:
    return {"grads": grads, "buffers": buffers, "activations": activations, "logits": logits}


def _larger(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a_wins = sum(a.values()) >= sum(b.values())
    return {k: np.where(a_wins, a[k], b[k]) for k in a}


def _forward_copies(x: StepParts, backward: bool = False, head_gathered: bool = False) -> np.ndarray:
    """Parameter copies alive from the end of the forward until the first layer's backward. The
    autocast cache holds every weight's cast until the forward ends; after it, only the casts a
    saved tensor refers to remain (none of a checkpointed layer's: they are recomputed)."""
    layer_casts = np.where(backward & x.checkpointed, 0.0, x.layers * x.cast_layer)
    casts = layer_casts + x.cast_head
    # the first backward layer, prefetched. A separately sharded head stays gathered from its forward to its
    # backward, which prefetches that layer (FSDP2: as traced by the oracle)
    layer = np.where(x.ends & (not head_gathered), 0.0, _gathered(x, "last"))
    zero3 = x.gathered_root + layer + x.gathered_head
    zero2 = x.gathered_root + x.layers * x.gathered_layer
    return np.where(x.zero2, zero2, np.where(x.fsdp, zero3, casts))


def _forward_head(x: StepParts) -> dict[str, np.ndarray]:
    saved = x.others + x.layers_resident * x.kept_layer + x.embedding + x.head + x.held_output
    return _moment(x.grads_held, _forward_copies(x), saved, x.loss_forward)


def _backward_head(x: StepParts) -> dict[str, np.ndarray]:
    """The larger of the loss's backward and the LM head's weight gradient: its compute-dtype
    result (autocast: then cast to fp32, the stored gradient; FSDP2: kept unsharded)."""
    saved = x.others + x.layers_resident * x.kept_layer + x.embedding
    loss = _moment(x.grads_held, _forward_copies(x, backward=True), saved + x.head, x.loss_backward)
    c = x.compute_bytes
    grads, made = _stored(x, 0.0, x.grad_bytes * x.head_weights)
    temp = np.where(x.fsdp | x.autocast_casts, c * x.head_weights, 0.0) + made
    copies = _forward_copies(x, backward=True, head_gathered=True) - np.where(x.fsdp, 0.0, x.cast_head)
    weight = _moment(grads, copies, saved + x.grad_logits + temp, 0.0)
    return _larger(loss, weight)


def _stored(x: StepParts, before: np.ndarray, now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored gradients, temporary ones) once `before` bytes of gradients exist and `now` more are
    being made. While micro-batches accumulate every gradient already exists, and a new one is a
    temporary added into it (AccumulateGrad); FSDP2 stores gradients only once reduce-scattered."""
    held = x.grads_held > 0
    stored = np.where(held, x.grads_held, np.where(x.fsdp, before, before + now))
    return stored, np.where(held & ~x.fsdp, now, 0.0)


def _position_step(x: StepParts, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The largest backward step of the layer at `where` (first, last), or of the stage's largest
    kind (max); a uniform stack's one layer."""
    if not x.kind_steps:
        return _largest_step(x)
    per_kind = [_largest_step(replace(x, steps=steps)) for steps in x.kind_steps]
    grads = np.stack(np.broadcast_arrays(*[g for g, _ in per_kind]))
    activations = np.stack(np.broadcast_arrays(*[a for _, a in per_kind]))
    if where == "max":
        totals = np.where(np.broadcast_to(x.kind_at["held"], grads.shape), grads + activations, -np.inf)
        kind = totals.argmax(axis=0)
    else:
        kind = np.broadcast_to(x.kind_at[where], grads.shape[1:])
    return np.take_along_axis(grads, kind[None], 0)[0], np.take_along_axis(activations, kind[None], 0)[0]


def _largest_step(x: StepParts) -> tuple[np.ndarray, np.ndarray]:
    """(gradients, activations) of the layer's own largest backward step, as parts added to what
    the layers above and below contribute (which is the same for every step of a layer)."""
    c, held = x.compute_bytes, x.grads_held > 0
    best = None
    for alive, weights, before in x.steps:
        made, now = x.grad_bytes * before, x.grad_bytes * weights
        # stored: nothing new while accumulating or under FSDP2 (it stores only reduce-scattered ones)
        grads = np.where(held | x.fsdp, 0.0, made + now)
        temp = np.where(held & ~x.fsdp, now, 0.0)  # accumulating: the new gradient, added into the held one
        if_cast = np.where(x.autocast_casts, c * weights, 0.0)  # the compute-dtype result before its cast
        fsdp_temp = c * (weights + before) + x.root_grads  # FSDP2: unsharded layer and root gradients
        activations = alive + temp + np.where(x.fsdp, fsdp_temp, if_cast)
        if best is None:
            best = (grads, activations)
        else:
            wins = grads + activations > best[0] + best[1]
            best = (np.where(wins, grads, best[0]), np.where(wins, activations, best[1]))
    return best


def _backward_layer(x: StepParts, index: np.ndarray, step: tuple[np.ndarray, np.ndarray],
                    at: str) -> dict[str, np.ndarray]:
    """Layer `index` (0 = the first in the forward) runs its backward: the layers above have
    their gradients, the layers below still hold their activations; `step` is its largest step;
    `at` the position it stands at (first, last, middle_high: the one below the last,
    middle_low: the second; a layer between runs as the stage's largest kind)."""
    where = "max" if at.startswith("middle") else at
    above = x.layers - 1 - index
    kept_below, grads_above = _around(x, index, above, at)
    below = x.others + kept_below + x.embedding + x.tied_grad
    stored = np.where(x.fsdp & ~x.ends, grads_above, x.grad_head + grads_above)
    grads = np.where(x.grads_held > 0, x.grads_held, stored + step[0])
    running = _moment(grads, _layer_copies(x, index, above, where) + x.ring, below + step[1], 0.0)
    if where != "last" or x.unsharded_at is None:
        return running
    # FSDP2 (ZeRO 3): the last layer's post-backward, its unsharded gradients cast into its own
    # reduce-scatter input while the layer below is prefetched (the layers between meet the one above's)
    post = _moment(np.where(x.grads_held > 0, x.grads_held, stored),
                   x.gathered_root + _gathered(x, "below_last") + _scatter(x, "last"),
                   below + x.unsharded_at["last"], 0.0)
    return {k: np.where(x.fsdp & ~x.zero2, _larger(running, post)[k], running[k]) for k in running}


def _around(x: StepParts, index: np.ndarray, above: np.ndarray, at: str) -> tuple[np.ndarray, np.ndarray]:
    """(activations kept by the layers below, gradients stored by the layers above) of the layer at
    `at`: in a stack of several kinds, the stage's sum less the layers at the known positions."""
    mean = (np.minimum(index, x.layers_resident) * x.kept_layer, above * x.grad_layer)
    if x.kept_at is None:
        return mean
    k, g = x.kept_at, x.grad_at
    total_kept, total_grads = x.layers * x.kept_layer, x.layers * x.grad_layer
    exact = {"first": (0.0, total_grads - g["first"]),
             "last": (total_kept - k["last"], 0.0),
             "middle_high": (total_kept - k["below_last"] - k["last"], g["last"]),
             "middle_low": (k["first"], total_grads - g["first"] - g["second"])}[at]
    known = (x.layers >= 3) & (x.layers_resident >= x.layers)  # positions distinct, nothing offloaded
    return tuple(np.where(known, e, m) for e, m in zip(exact, mean))


# the layer running its backward, the one below (prefetched) and the one above (reduce-scattering); a layer
# between runs as the largest kind beside the largest layer the stack puts next to it (stages.py _partner)
NEIGHBOURS = {"first": ("first", "first", "second"), "last": ("last", "below_last", "last"),
              "max": ("max", "partner", "max")}


def _gathered(x: StepParts, where: str) -> np.ndarray:
    return x.gathered_layer if x.gathered_at is None else x.gathered_at[where]


def _scatter(x: StepParts, where: str) -> np.ndarray:
    return x.scatter_layer if x.scatter_at is None else x.scatter_at[where]


def _holds_experts(x: StepParts, where: str) -> np.ndarray | bool:
    """Whether the layer at `where` (first, second, below_last, last, or max: the stage's largest kind)
    holds routed experts: in a stack of several kinds, its kind's (a dense-first MoE's dense layers
    hold none, and keep their whole layer gathered); every layer of a uniform stack."""
    if x.kind_at is None:
        return True
    experts, kind = x.kind_at["experts"], x.kind_at[where]
    return np.take_along_axis(experts, np.broadcast_to(kind, experts.shape[1:])[None], 0)[0]


def _layer_copies(x: StepParts, index: np.ndarray, above: np.ndarray, where: str) -> np.ndarray:
    own, below, upper = NEIGHBOURS[where]
    casts = np.where(x.checkpointed, 1, index + 1) * x.cast_layer  # a checkpointed layer recasts its own
    # experts that are FSDP2 units of their own are neither prefetched nor still reducing
    prefetch = np.where(index > 0, _gathered(x, below) - _holds_experts(x, below) * x.experts_gathered, 0.0)
    scatter = np.where(above > 0, _scatter(x, upper) - _holds_experts(x, upper) * x.experts_scatter, 0.0)
    zero3 = x.gathered_root + _gathered(x, own) + prefetch + scatter
    zero2 = x.gathered_root + (index + 1) * x.gathered_layer + scatter
    return np.where(x.zero2, zero2, np.where(x.fsdp, zero3, casts))


def _backward_embedding(x: StepParts) -> dict[str, np.ndarray]:
    """The embedding's gradient is made while every other exists. FSDP2: the first layer's
    post-backward (its unsharded gradients, cast into the reduce-scatter input), then the root's."""
    tied = x.tied_grad > 0
    before = x.grad_all - np.where(tied, x.tied_grad, x.embedding_grad)
    grads = np.where(x.grads_held > 0, x.grads_held, before)
    # untied: the dense gradient, then stored; tied: added to the LM head's buffered one
    made = np.where(tied, 3 * x.tied_grad, x.embedding_grad)
    plain = _moment(grads, 0.0, made + x.incoming_grad, 0.0)
    head = np.where(x.ends, x.grad_head, 0.0)  # already reduce-scattered
    sharded, _ = _stored(x, (x.layers - 1) * x.grad_layer + head, 0.0)
    # a separately sharded embedding is gathered (prefetched) while the first layer's backward ends
    first_layer = _moment(sharded, x.gathered_root + x.gathered_embedding + _gathered(x, "first") + _scatter(x, "second"),
                          np.where(x.ends, 0.0, x.root_grads_all) + x.layer_grads_unsharded, 0.0)
    all_layers, _ = _stored(x, x.layers * x.grad_layer + head, 0.0)
    root = _moment(all_layers, x.scatter_root + x.gathered_embedding, x.root_grads_all, 0.0)
    tied_sum = _moment(all_layers, x.gathered_root + _scatter(x, "first"), x.tied_sum, 0.0)
    fsdp = _larger(_larger(first_layer, root), tied_sum)
    return {k: np.where(x.fsdp, fsdp[k], plain[k]) for k in plain}
