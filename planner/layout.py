"""How a job is laid out over devices: the parallel configuration of one candidate and what follows
from it (micro-batches, the layers of each pipeline stage, the rank order, the dtypes). Everything
here is derived from the degrees; the Plan (planner/plan.py) writes the derived values out so that
the executor and the exports read them instead of re-deriving them, and checks them when it loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from planner.errors import InvalidRequest
from planner.specs import Workload

RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")
ZERO = (0, 1, 2, 3)
# torch.distributed DeviceMesh dimension order, outermost first (executor/mesh.py builds this mesh):
# pipeline stages across the slowest links, tensor parallel ranks adjacent (one node's NVLink), context
# parallel ranks next to them (torchtitan's ParallelDims order: pp, dp_replicate, dp_shard, cp, tp)
RANK_ORDER = ("pp", "dp", "cp", "tp")
# fp8: float8 matmuls (torchao) over bf16 activations and weights
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}


@dataclass(frozen=True)
class ParallelConfig:
    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    num_micro_batches: int  # derived: global batch / (dp x micro_batch_size); checked by check_config
    recompute: str = "none"
    zero: int = 0
    offload: str = "none"
    sequence_parallel: bool = False
    vpp: int = 1
    # FSDP2: the embedding and the LM head are units of their own, gathered only around their use,
    # instead of part of the root unit that stays gathered for the whole step (torchtune's
    # custom_sharded_layers: ['tok_embeddings', 'output'] for large-vocabulary models)
    shard_ends: bool = False
    cp: int = 1  # context parallel degree (the sequence split over cp ranks)
    ep: int = 1  # expert parallel degree (routed experts over ep ranks carved out of dp x cp)

    @property
    def devices(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        from planner.strict import strict_dataclass

        return strict_dataclass(cls, data, "config")


def num_micro_batches(global_batch: int, dp: int, micro_batch_size: int) -> int:
    return global_batch // (dp * micro_batch_size)


def stage_layers(num_layers: int, pp: int, vpp: int) -> list[list[int]]:
    """Layer indices of each (virtual) pipeline stage, in stage order.

    Of the pp x vpp stages, stages 1..rest get one extra layer (base, rest = divmod(layers, pp x vpp)),
    never the first, which also holds the embedding (planner/cost/context.py `virtual_stage_span`
    costs the same split); virtual stage c x pp + r lives on rank r (the looped order of
    torch.distributed.pipelining's ScheduleInterleaved1F1B). Where the layers do not divide, the first
    and last stages hold fewer: Llama 3.1 405B's 126 layers over 64 stages give 1 + 62 x 2 + 1, the
    split Megatron-Core makes with account_for_embedding/loss_in_pipeline_split."""
    stages = pp * vpp
    if stages > num_layers:
        raise InvalidRequest(f"pp x vpp = {stages} stages exceed the {num_layers} layers; choose a smaller --pp/--vpp")
    base, rest = divmod(num_layers, stages)
    counts = [base + (1 if 1 <= i <= rest else 0) for i in range(stages)]
    starts = [sum(counts[:i]) for i in range(stages)]
    return [list(range(start, start + count)) for start, count in zip(starts, counts)]


def schedule_name(config: ParallelConfig) -> str:
    """The pipeline schedule torch.distributed.pipelining runs (executor/pipeline.py)."""
    if config.pp == 1:
        return "none"
    return "Interleaved1F1B" if config.vpp > 1 else "1F1B"


@dataclass(frozen=True)
class Dtypes:
    """What each kind of state is stored and computed in (torch dtype names), as the executor
    builds it (executor/model.py param_dtype / compute_dtype, executor/parallelize.py's FSDP2
    MixedPrecisionPolicy, executor/optim.py)."""

    trained: str  # the trained (master) weights, their gradients and AdamW moments
    frozen: str  # the frozen base of LoRA / QLoRA ("none" for full training)
    compute: str  # matmul inputs: autocast's or FSDP2's param_dtype
    optimizer_state: str  # AdamW moments ("uint8": bitsandbytes' 8-bit blocks; "none": plain SGD)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def dtypes_for(workload: Workload) -> Dtypes:
    compute = _DTYPE_NAMES[workload.precision]
    # bf16 master weights keep everything in the compute dtype (torchtune's default); peft's
    # adapters stay fp32 (autocast_adapter_dtype) over a base stored in the compute dtype
    trained = compute if workload.method == "full" and workload.master_dtype == "bf16" else "float32"
    frozen = {"full": "none", "lora": compute, "qlora": "nf4"}[workload.method]
    state = {"adamw": trained, "adamw8bit": "uint8", "sgd": "none"}[workload.optimizer]
    return Dtypes(trained=trained, frozen=frozen, compute=compute, optimizer_state=state)
