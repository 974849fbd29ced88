"""Collapse the operator graph into per-token coefficients that the vectorised evaluation uses.

The graph is the source of truth; a summary is the exact sum of its ops' quantities grouped by
how they scale (per token, per token per sequence position) and shard (tp / sp / none). Tests
check that evaluating a summary equals walking the graph op by op.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from planner.graph import ModelGraph
from planner.ops import BackwardPart, Op, Saved

RECOMPUTE_POLICIES = ("none", "selective", "full")


@dataclass(frozen=True)
class Bytes:
    """Bytes per token, split by sharding: value(T, s, t, sp) = tp·T/t + sp_part·T/(t if sp) +
    none·T + seq·T·s/t, with T = tokens in the micro-batch."""

    tp: float = 0.0
    sp: float = 0.0
    none: float = 0.0
    seq: float = 0.0

    def __add__(self, other: Bytes) -> Bytes:
        return Bytes(self.tp + other.tp, self.sp + other.sp, self.none + other.none, self.seq + other.seq)

    def __sub__(self, other: Bytes) -> Bytes:
        return Bytes(self.tp - other.tp, self.sp - other.sp, self.none - other.none, self.seq - other.seq)

    def scale(self, factor: float) -> Bytes:
        return Bytes(self.tp * factor, self.sp * factor, self.none * factor, self.seq * factor)

    def evaluate(self, tokens, seq_len, tp, sp_divisor):
        """Works on floats and numpy arrays alike."""
        return (self.tp * tokens / tp + self.sp * tokens / sp_divisor + self.none * tokens
                + self.seq * tokens * seq_len / tp)


@dataclass(frozen=True)
class Matmul:
    name: str
    flops_per_token: float  # forward, unsharded
    in_features: int
    out_features: int
    tokens_factor: float
    trainable: bool
    tp_split: bool
    recomputed_selective: bool  # re-run in backward under selective recomputation
    row_parallel: bool = False  # TP splits its input features, not its output's
    float8: bool = False
    quantized: bool = False  # a frozen base linear stored in NF4 (QLoRA): dequantized at every use
    share: float = 1.0  # of a mixed stack's layers, the share that have this matmul (flops_per_token includes it)


@dataclass(frozen=True)
class ParamGroups:
    """Parameter counts (unsharded) by how they are stored."""

    trainable_tp: float = 0.0  # trained, sharded by TP
    trainable_rep: float = 0.0  # trained, replicated across TP ranks (norms, router)
    frozen_tp: float = 0.0  # frozen base weights (LoRA), compute dtype
    frozen_rep: float = 0.0
    quantized_tp: float = 0.0  # frozen base linears stored in NF4 (QLoRA)
    largest_tensor: float = 0.0  # the largest single trained parameter tensor (for-loop optimizer temps)
    dims: tuple[tuple[int, int], ...] = ()  # (dim 0, elements) of every tensor, for FSDP2's padding

    def __add__(self, o: ParamGroups) -> ParamGroups:
        return ParamGroups(self.trainable_tp + o.trainable_tp, self.trainable_rep + o.trainable_rep,
                           self.frozen_tp + o.frozen_tp, self.frozen_rep + o.frozen_rep,
                           self.quantized_tp + o.quantized_tp, max(self.largest_tensor, o.largest_tensor),
                           self.dims + o.dims)

    def scale(self, factor: float) -> ParamGroups:
        return ParamGroups(self.trainable_tp * factor, self.trainable_rep * factor, self.frozen_tp * factor,
                           self.frozen_rep * factor, self.quantized_tp * factor, self.largest_tensor,
                           tuple((d, n * factor) for d, n in self.dims))

    def padding(self, ranks):
        """FSDP2 shards every tensor along dim 0 and pads dim 0 to a multiple of the ranks
        (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, `_init_sharded_param`): the padded
        size over the true one, for an array of rank counts."""
        total = sum(n for _, n in self.dims)
        if not total:
            return ranks * 0 + 1.0
        padded = sum(n * (-(-d // ranks) * ranks) / d for d, n in self.dims)
        return padded / total

    @property
    def total(self) -> float:
        return self.trainable_tp + self.trainable_rep + self.frozen_tp + self.frozen_rep + self.quantized_tp

    @property
    def trainable(self) -> float:
        return self.trainable_tp + self.trainable_rep


@dataclass(frozen=True)
class BackwardStep:
    """One op's backward inside a layer: the layer's saved tensors still alive (every one saved
    without recomputation: a checkpointed layer has just been recomputed), the gradients the op
    holds, and the trained weights whose gradients it makes."""

    name: str
    alive: Bytes
    weight_params_tp: float = 0.0  # divided by the TP degree
    weight_params_rep: float = 0.0
    done_params_tp: float = 0.0  # weights whose gradients the layer's earlier steps made
    done_params_rep: float = 0.0
    weight_share: float = 1.0  # the share of the op's weights whose gradients this step makes (BackwardPart)


@dataclass(frozen=True)
class PartSummary:
    """One layer, or the model's ends, reduced to coefficients."""

    params: ParamGroups
    matmuls: tuple[Matmul, ...]
    attention_flops_per_token_seq: float
    io_bytes: Bytes
    saved: dict[str, Bytes] = field(default_factory=dict)  # by recompute policy
    backward: tuple[BackwardStep, ...] = ()  # the layer's backward, op by op

    @property
    def matmul_flops_per_token(self) -> float:
        return sum(m.flops_per_token for m in self.matmuls)


# each kind of layer's summary with the indices of its layers (planner/cost/stages.py)
KindSummaries = tuple[tuple[PartSummary, tuple[int, ...]], ...]


def summarize_ops(ops: list[Op], quantized: bool, layer_input: Saved | None) -> PartSummary:
    """`quantized`: QLoRA stores frozen base linears in NF4. `layer_input`: the tensor a
    checkpointed layer keeps (its input) under full and selective recomputation."""
    kept = selective_kept_matmuls(ops)
    return PartSummary(
        params=_param_groups(ops, quantized),
        matmuls=tuple(Matmul(op.name, op.flops_per_token, op.gemm[0], op.gemm[1], op.tokens_factor,
                             op.trainable, op.tp_split, recomputed_selective=op.name not in kept and not op.lora_of,
                             row_parallel=op.row_parallel, float8=op.float8,
                             quantized=quantized and op.quantizable and not op.trainable)
                      for op in ops if op.kind in ("matmul", "experts")),
        attention_flops_per_token_seq=sum(op.flops_per_token_seq for op in ops),
        io_bytes=sum((_shard(op.io_bytes_per_token, "tp" if op.tp_split else "sp") + Bytes(seq=op.io_bytes_per_token_seq)
                      for op in ops), Bytes()),
        saved={policy: _saved_bytes(ops, policy, layer_input) for policy in RECOMPUTE_POLICIES},
        backward=backward_steps(ops, layer_input) if layer_input is not None else (),
    )


def summarize(graph: ModelGraph) -> tuple[PartSummary, PartSummary, PartSummary]:
    """(layer, embedding side, head side) of a model graph. The layer of a stack with several kinds
    of layer is their mean (`mean_layer`)."""
    return summarize_parts(graph)[:3]


def summarize_parts(graph: ModelGraph) -> tuple[PartSummary, PartSummary, PartSummary, KindSummaries]:
    """`summarize` and, for a stack of several kinds of layer, each kind's summary with the indices
    of its layers (empty for a uniform stack)."""
    quantized = graph.workload.method == "qlora"
    r, h = graph.numerics.residual_bytes, graph.spec.residual_width  # hc_mult streams (DeepSeek-V4)
    layer_input = Saved("layer_in", r * h, "sp")
    kinds = tuple((summarize_ops(ops, quantized, layer_input), indices) for ops, indices in graph.kind_ops())
    layer = mean_layer([(part, len(indices) / graph.spec.num_layers) for part, indices in kinds])
    ends = graph.end_ops()
    head_names = {"hc_head", "final_norm", "lm_head", "logit_softcap"}
    embedding = summarize_ops([op for op in ends if op.name not in head_names], quantized, None)
    head = summarize_ops([op for op in ends if op.name in head_names], quantized, None)
    return layer, embedding, head, kinds if len(kinds) > 1 else ()


def mean_layer(kinds: list[tuple[PartSummary, Any]], dims: tuple[tuple[int, float], ...] | None = None) -> PartSummary:
    """One layer standing for a stack of several kinds, each with its share of the layers (a number,
    or an array over candidates for one pipeline stage): every quantity that adds up over layers
    (parameters, matmul FLOPs, attention FLOPs, memory traffic, saved tensors) is the share-weighted
    sum, so that L times it is the stack's exact sum; each matmul keeps its own GEMM shape (its
    efficiency) with its FLOPs times its share; the backward steps are every kind's, so the largest
    step is the largest of any kind. `dims`: the parameter tensors' shapes to keep (for arrays of
    shares). A uniform stack's layer is returned as is."""
    if len(kinds) == 1:
        return kinds[0][0]
    params, io, attention = ParamGroups(), Bytes(), 0.0
    saved = {policy: Bytes() for policy in RECOMPUTE_POLICIES}
    matmuls: list[Matmul] = []
    backward: list[BackwardStep] = []
    for part, share in kinds:
        params = params + replace(part.params, dims=()).scale(share)
        io = io + part.io_bytes.scale(share)
        attention = attention + part.attention_flops_per_token_seq * share
        for policy in RECOMPUTE_POLICIES:
            saved[policy] = saved[policy] + part.saved[policy].scale(share)
        matmuls += [replace(m, flops_per_token=m.flops_per_token * share, share=m.share * share) for m in part.matmuls]
        backward += part.backward
    if dims is None:  # tensors with the same dim 0 pad alike: one entry each (ParamGroups.padding)
        merged: dict[int, float] = {}
        for part, share in kinds:
            for d, n in part.params.dims:
                merged[d] = merged.get(d, 0.0) + n * share
        dims = tuple(merged.items())
    return PartSummary(replace(params, dims=dims), tuple(matmuls), attention, io, saved, _undominated(backward))


def _undominated(steps: list[BackwardStep]) -> tuple[BackwardStep, ...]:
    """The steps that can hold the layer's peak: memory at a step grows with every one of its
    quantities (planner/cost/moments.py, _largest_step), so a step no larger than another in all of
    them never decides it."""
    def key(step: BackwardStep) -> tuple[float, ...]:
        a = step.alive
        return (a.tp, a.sp, a.none, a.seq, step.weight_params_tp, step.weight_params_rep,
                step.done_params_tp, step.done_params_rep)

    keys = [key(step) for step in steps]
    kept = [step for i, step in enumerate(steps)
            if not any(j != i and all(x <= y for x, y in zip(keys[i], other)) and (keys[i] != other or j < i)
                       for j, other in enumerate(keys))]
    return tuple(kept)


def selective_kept_matmuls(ops: list[Op]) -> set[str]:
    """Selective recomputation follows torchtitan's per-op policy (torchtitan
    parallelize_llama.py, _save_list): save the outputs of SDPA and of every other matmul
    (the 1st, 3rd, ... of the layer), recompute the rest. LoRA adapters keep what they save."""
    base = [op.name for op in ops if op.kind in ("matmul", "experts", "router") and not op.lora_of]
    return set(base[0::2])


def _saved_bytes(ops: list[Op], policy: str, layer_input: Saved | None) -> Bytes:
    """Tensors kept for backward, each counted once (by key).

    none: everything autograd saves. full: only the checkpointed layer's input. selective: the
    layer input, the outputs of SDPA (with its log-sum-exp) and of every other matmul, and what
    LoRA adapters save; norms, activations, rotary and the other matmuls are recomputed."""
    checkpointed = layer_input is not None
    if policy == "full" and checkpointed:
        return _shard(layer_input.bytes_per_token, layer_input.split)
    kept: dict[str, Saved] = {}
    if policy == "selective" and checkpointed:
        kept[layer_input.key] = layer_input
        keep = selective_kept_matmuls(ops) | {op.name for op in ops if op.kind == "attention"}
        for op in ops:
            if op.name in keep:
                kept.setdefault(f"{op.name}.out", Saved(f"{op.name}.out", op.out_bytes_per_token * op.tokens_factor,
                                                        "tp" if op.tp_split else "sp"))
            for tensor in op.saved:
                if tensor.selective or op.lora_of:
                    kept.setdefault(tensor.key, tensor)
    else:
        for op in ops:
            for tensor in op.saved:
                if not (tensor.for_weight_grad and not op.trainable):
                    kept.setdefault(tensor.key, tensor)
    total = Bytes()
    for tensor in kept.values():
        part = _shard(tensor.bytes_per_token, tensor.split)
        total = total + (Bytes(seq=part.tp + part.sp + part.none) if tensor.times_seq else part)
    return total


def backward_steps(ops: list[Op], layer_input: Saved) -> tuple[BackwardStep, ...]:
    """Walk a layer's backward op by op (reverse order): autograd frees a saved tensor once the
    last node that needs it has run, i.e. after the backward of the first op (in forward order)
    that saved it; the gradient of the residual stream (the layer input's size) is held
    throughout, as each branch's result is added to it. An op with `backward_parts` takes one step
    per part, freeing its own saved tensors as its nodes finish."""
    first_user: dict[str, int] = {}
    tensors: dict[str, Saved] = {}
    for index, op in enumerate(ops):
        for tensor in op.saved:
            if not (tensor.for_weight_grad and not op.trainable):
                first_user.setdefault(tensor.key, index)
                tensors.setdefault(tensor.key, tensor)
    residual = _shard(layer_input.bytes_per_token, layer_input.split)
    alive = dict(tensors)
    done_tp = done_rep = 0.0
    steps = []
    for index in reversed(range(len(ops))):
        op = ops[index]
        trained = op.params if op.trainable and op.kind in ("matmul", "experts", "router") else 0.0
        tp, rep = (trained, 0.0) if op.tp_split else (0.0, trained)
        for part in op.backward_parts or (BackwardPart(op.grads, 1.0),):
            held = sum((_saved(t) for t in alive.values()), Bytes()) + residual
            held = held + sum((_saved(g) for g in part.grads), Bytes())  # a score-sized gradient: × seq
            share = part.weight_share
            steps.append(BackwardStep(op.name, held, tp * share, rep * share, done_tp, done_rep, share))
            done_tp, done_rep = done_tp + (op.params * share if op.trainable and op.tp_split else 0.0), \
                done_rep + (op.params * share if op.trainable and not op.tp_split else 0.0)
            for key in part.releases:  # a node of the op's own backward was their last user
                if first_user.get(key) == index:
                    alive.pop(key, None)
        for key in [k for k, user in first_user.items() if user == index]:
            alive.pop(key, None)
    return tuple(steps)


def _saved(tensor: Saved) -> Bytes:
    part = _shard(tensor.bytes_per_token, tensor.split)
    return Bytes(seq=part.tp + part.sp + part.none) if tensor.times_seq else part


def _shard(value: float, split: str) -> Bytes:
    if split == "tp":
        return Bytes(tp=value)
    if split == "sp":
        return Bytes(sp=value)
    return Bytes(none=value)


def _param_groups(ops: list[Op], quantized: bool) -> ParamGroups:
    groups = ParamGroups(dims=tuple(dim for op in ops for dim in op.param_dims))
    for op in ops:
        if not op.params:
            continue
        if op.trainable:
            part = ParamGroups(trainable_tp=op.params if op.tp_split else 0,
                               trainable_rep=0 if op.tp_split else op.params,
                               largest_tensor=_largest_tensor(op))
        elif quantized and op.quantizable:
            part = ParamGroups(quantized_tp=op.params)
        else:
            part = ParamGroups(frozen_tp=op.params if op.tp_split else 0, frozen_rep=0 if op.tp_split else op.params)
        groups = groups + part
    return groups


def _largest_tensor(op: Op) -> float:
    if op.kind == "experts":
        return op.params / 3  # MixtralExperts: gate_up_proj holds 2/3, down_proj 1/3
    if op.kind == "matmul" and op.gemm != (0, 0):
        return op.gemm[0] * op.gemm[1]
    return op.params
