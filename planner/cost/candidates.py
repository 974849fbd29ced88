"""A batch of candidates as parallel numpy arrays, so that thousands are costed in one pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.layout import OFFLOAD, RECOMPUTE, ParallelConfig


@dataclass
class Candidates:
    dp: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    micro_batch_size: np.ndarray
    num_micro_batches: np.ndarray
    recompute: np.ndarray  # index into RECOMPUTE
    zero: np.ndarray
    offload: np.ndarray  # index into OFFLOAD
    sequence_parallel: np.ndarray  # bool
    vpp: np.ndarray
    shard_ends: np.ndarray | None = None  # bool; None: all False
    cp: np.ndarray | None = None  # context parallel degree; None: all 1
    ep: np.ndarray | None = None  # expert parallel degree (carved out of dp x cp); None: all 1

    def __post_init__(self) -> None:
        if self.shard_ends is None:
            self.shard_ends = np.zeros(len(self.dp), dtype=bool)
        if self.cp is None:
            self.cp = np.ones(len(self.dp), dtype=np.int64)
        if self.ep is None:
            self.ep = np.ones(len(self.dp), dtype=np.int64)

    @property
    def data_ranks(self) -> np.ndarray:
        """Ranks that hold the same parameters and shard them under ZeRO / FSDP: dp x cp
        (torchtitan's dp_shard_cp mesh, parallel_dims.py; Megatron's data-parallel-with-cp group)."""
        return self.dp * self.cp

    def __len__(self) -> int:
        return len(self.dp)

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})

    def config(self, i: int) -> ParallelConfig:
        return ParallelConfig(
            dp=int(self.dp[i]), tp=int(self.tp[i]), pp=int(self.pp[i]),
            micro_batch_size=int(self.micro_batch_size[i]), num_micro_batches=int(self.num_micro_batches[i]),
            recompute=RECOMPUTE[int(self.recompute[i])], zero=int(self.zero[i]),
            offload=OFFLOAD[int(self.offload[i])], sequence_parallel=bool(self.sequence_parallel[i]),
            vpp=int(self.vpp[i]), shard_ends=bool(self.shard_ends[i]), cp=int(self.cp[i]), ep=int(self.ep[i]))

    @classmethod
    def from_configs(cls, configs: list[ParallelConfig]) -> Candidates:
        def column(get, dtype=np.int64):
            return np.array([get(c) for c in configs], dtype=dtype)
        return cls(dp=column(lambda c: c.dp), tp=column(lambda c: c.tp), pp=column(lambda c: c.pp),
                   micro_batch_size=column(lambda c: c.micro_batch_size),
                   num_micro_batches=column(lambda c: c.num_micro_batches),
                   recompute=column(lambda c: RECOMPUTE.index(c.recompute)), zero=column(lambda c: c.zero),
                   offload=column(lambda c: OFFLOAD.index(c.offload)),
                   sequence_parallel=column(lambda c: c.sequence_parallel, bool), vpp=column(lambda c: c.vpp),
                   shard_ends=column(lambda c: c.shard_ends, bool), cp=column(lambda c: c.cp),
                   ep=column(lambda c: c.ep))
