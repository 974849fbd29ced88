"""Which layers each pipeline stage holds, for stacks of several kinds of layer (dense-first MoE,
interleaved MoE, alternating sliding / global attention): a stage's layer is the mean of the kinds
it holds, weighted by how many of each it holds, so that a stage's sums are exact.

The split follows the executor (executor/pipeline.py, planner/layout.py stage_layers) and
stage_layout: of the S = p·v (virtual) stages, stage s holds a contiguous run of base + (1 <= s <= rest)
layers (base, rest = divmod(L, S)), and rank i holds the stages i, i + p, ..., i + (v - 1)·p.
"""

from __future__ import annotations

import numpy as np

from planner.cost.context import ROLES, Regime, StageLayout, virtual_stage_span
from planner.cost.summary import PartSummary, mean_layer


def role_layer(regime: Regime, layout: StageLayout, role: str, num_layers: int) -> PartSummary:
    """The mean layer of the stage `role` plays, per candidate; a uniform stack's one layer."""
    if not regime.kinds:
        return regime.layer
    key = (id(regime), role)
    if key not in layout.role_layers:
        layout.role_layers[key] = _stage_mean(regime, layout, role, num_layers)
    return layout.role_layers[key]


def _stage_mean(regime: Regime, layout: StageLayout, role: str, num_layers: int) -> PartSummary:
    counts = [kind_count(indices, num_layers, layout.stage_index[role], layout.pp, layout.vpp)
              for _, indices in regime.kinds]
    held = np.maximum(sum(counts), 1)
    shares = [count / held for count in counts]
    return mean_layer([(part, share) for (part, _), share in zip(regime.kinds, shares)], dims=regime.layer.params.dims)


def role_layers(regime: Regime, layout: StageLayout, num_layers: int) -> dict[str, PartSummary]:
    return {role: role_layer(regime, layout, role, num_layers) for role in ROLES}


def kind_count(indices: tuple[int, ...], num_layers: int, stage: np.ndarray, pp: np.ndarray,
               vpp: np.ndarray) -> np.ndarray:
    """How many of the layers `indices` rank `stage` holds over its vpp virtual stages, per candidate."""
    before = np.zeros(num_layers + 1, dtype=np.int64)  # before[j]: layers of this kind among the first j
    before[np.asarray(indices, dtype=np.int64) + 1] = 1
    before = np.cumsum(before)
    held = np.zeros(np.broadcast(stage, pp, vpp).shape, dtype=np.int64)
    for chunk in range(int(np.max(vpp, initial=1))):
        first, count = virtual_stage_span(num_layers, chunk * pp + stage, pp * vpp)
        first = np.minimum(first, num_layers)
        held = held + np.where(chunk < vpp, before[np.minimum(first + count, num_layers)] - before[first], 0)
    return held


POSITIONS = ("first", "second", "below_last", "last")  # of a stage's layers, in forward order
SIZED = (*POSITIONS, "max", "partner")  # role_layer_sizes' entries


def role_layer_sizes(regime: Regime, layout: StageLayout, role: str, num_layers: int,
                     tp: np.ndarray) -> dict | None:
    """(parameters, trained parameters) on one TP rank of the layer at each of POSITIONS of the
    stage, and of its largest kind ("max"), per candidate, with the kind at each position
    ("kind_first", ..., "kind_max"), which kinds the stage holds ("kind_held") and which kinds hold
    routed experts ("kind_experts", by kind): what FSDP2 gathers and reduce-scatters
    for the layer it runs is that layer's own size, not the stage's mean (a dense first layer is
    small, the MoE layers after it large). None for a uniform stack."""
    if not regime.kinds:
        return None
    kind_of = np.zeros(num_layers, dtype=np.int64)
    sizes, trained = [], []
    for k, (part, indices) in enumerate(regime.kinds):
        kind_of[np.asarray(indices, dtype=np.int64)] = k
        p = part.params
        trained.append(p.trainable_tp / tp + p.trainable_rep)
        sizes.append(trained[-1] + p.frozen_tp / tp + p.frozen_rep + p.quantized_tp / tp)
    sizes, trained = np.stack(np.broadcast_arrays(*sizes)), np.stack(np.broadcast_arrays(*trained))
    first, last = _stage_ends(layout, role, num_layers)
    at = {"first": first, "second": np.minimum(first + 1, last), "below_last": np.maximum(last - 1, first), "last": last}
    result = {}
    for name, index in at.items():
        kind = np.broadcast_to(kind_of[np.clip(index, 0, num_layers - 1)], sizes.shape[1:])
        result[name] = (np.take_along_axis(sizes, kind[None], 0)[0], np.take_along_axis(trained, kind[None], 0)[0])
        result[f"kind_{name}"] = kind
    held = np.stack([np.broadcast_to(kind_count(ix, num_layers, layout.stage_index[role], layout.pp, layout.vpp) > 0,
                                     sizes.shape[1:]) for _, ix in regime.kinds])
    result["max"] = (np.where(held, sizes, 0).max(axis=0), np.where(held, trained, 0).max(axis=0))
    result["kind_max"] = np.where(held, sizes, -1).argmax(axis=0)
    result["partner"] = tuple(_partner(v, m, kind_of) for v, m in zip((sizes, trained), result["max"]))
    result["kind_partner"] = result["kind_max"]
    result["kind_held"] = held
    # which kinds hold routed experts (under ep x ZeRO 3 FSDP2 units of their own: planner/cost/moments.py)
    experts = np.asarray(regime.expert_kinds, dtype=bool).reshape(-1, *[1] * (sizes.ndim - 1))
    result["kind_experts"] = np.broadcast_to(experts, sizes.shape)
    return result


def _stage_ends(layout: StageLayout, role: str, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """The global indices of the stage's first and last layers (kind_count's split)."""
    stage, pp, vpp = layout.stage_index[role], layout.pp, layout.vpp
    first, _ = virtual_stage_span(num_layers, stage, pp * vpp)
    last_start, last_count = virtual_stage_span(num_layers, (vpp - 1) * pp + stage, pp * vpp)
    return first, np.maximum(last_start + last_count - 1, first)


def _partner(sizes: np.ndarray, largest: np.ndarray, kind_of: np.ndarray) -> np.ndarray:
    """The largest layer that runs beside the stage's largest kind (FSDP2 prefetches the one below):
    the model's largest sum of two adjacent layers less the largest kind, at most the largest kind.
    Alternating kinds (Nemotron-H's Mamba-2 / experts) never put two of the largest side by side."""
    pairs = {(int(a), int(b)) for a, b in zip(kind_of[:-1], kind_of[1:])}
    if not pairs:
        return largest
    pair = np.max(np.stack([sizes[a] + sizes[b] for a, b in pairs]), axis=0)
    return np.minimum(np.maximum(pair - largest, 0.0), largest)
