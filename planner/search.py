"""Search = a generator of valid candidates + a pure evaluation + top-k, with every rejection
counted by reason (STYLE.md lesson 4).

Structure is checked per (tp, pp, micro-batch) in Python — a few hundred combinations — and the
remaining options (recompute, ZeRO, offload, sequence parallel, vpp) are expanded as arrays and
costed in one vectorised pass.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context
from planner.cost.estimate import Estimates, evaluate
from planner.factor import divisors
from planner.plan import OFFLOAD, RECOMPUTE, ZERO, structural_reason
from planner.validity import check_degrees

VPP_CHOICES = (1, 2, 4)
BATCH_REASON = "global batch not divisible by dp x micro-batch"  # structural_reason's only micro-batch one


@dataclass
class Pins:
    """Dimensions the user fixed; None leaves a dimension free."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    micro_batch_size: int | None = None
    recompute: str | None = None
    zero: int | None = None
    offload: str | None = None
    sequence_parallel: bool | None = None
    vpp: int | None = None
    shard_ends: bool | None = None  # not searched: False unless pinned


@dataclass
class SearchResult:
    searched: int
    evaluated: int
    estimates: Estimates | None
    order: np.ndarray  # indices of feasible candidates, fastest first
    rejected: Counter = field(default_factory=Counter)

    @property
    def feasible(self) -> int:
        return len(self.order)


def _options(pins: Pins, name: str, choices):
    value = getattr(pins, name)
    return [value] if value is not None else list(choices)


def search(ctx: Context, pins: Pins) -> SearchResult:
    spec, workload, n_dev = ctx.spec, ctx.workload, ctx.cluster.num_devices
    check_degrees(dp=pins.dp, tp=pins.tp, pp=pins.pp, micro_batch_size=pins.micro_batch_size, vpp=pins.vpp)
    rejected: Counter = Counter()
    recompute = [RECOMPUTE.index(r) for r in _options(pins, "recompute", RECOMPUTE)]
    zeros = _options(pins, "zero", ZERO)
    offloads = [OFFLOAD.index(o) for o in _options(pins, "offload", OFFLOAD)]
    sps = _options(pins, "sequence_parallel", (False, True))
    vpps = _options(pins, "vpp", VPP_CHOICES)
    per_triple = len(recompute) * len(zeros) * len(offloads) * len(sps) * len(vpps)
    triples = []
    batches = divisors(workload.global_batch) if pins.micro_batch_size is None else [pins.micro_batch_size]
    for tp in _options(pins, "tp", divisors(n_dev)):
        for pp in _options(pins, "pp", divisors(n_dev // tp) if n_dev % tp == 0 else [1]):
            dp = n_dev // (tp * pp) if n_dev % (tp * pp) == 0 else 0
            if pins.dp is not None and dp != pins.dp:
                rejected["does not match the pinned dp"] += per_triple
                continue
            first = structural_reason(spec, workload, n_dev, tp, pp, batches[0])
            if first and first != BATCH_REASON:  # a reason of (tp, pp) alone holds for every micro-batch
                rejected[first] += per_triple * len(batches)
                continue
            for b in batches:
                reason = structural_reason(spec, workload, n_dev, tp, pp, b)
                if reason:
                    rejected[reason] += per_triple
                else:
                    triples.append((dp, tp, pp, b))
    grid = list(itertools.product(recompute, zeros, offloads, sps, vpps))
    candidates, option_rejects = _expand(spec, workload, triples, grid, dedupe_zero1=pins.zero is None,
                                         shard_ends=bool(pins.shard_ends))
    rejected.update(option_rejects)
    searched = sum(rejected.values()) + len(candidates)
    if not len(candidates):
        return SearchResult(searched, 0, None, np.array([], int), rejected)
    estimates = evaluate(ctx, candidates)
    oom = ~estimates.fits
    rejected["out of memory"] += int(oom.sum())
    host = estimates.fits & ~estimates.host_fits
    rejected["out of host memory (offload)"] += int(host.sum())
    ok = np.nonzero(estimates.fits & estimates.host_fits)[0]
    # prefer candidates that fit with the safety margin, then the fastest
    order = ok[np.lexsort((estimates.step_s[ok], ~estimates.fits_with_margin[ok]))]
    rejected = Counter({k: v for k, v in rejected.items() if v})
    return SearchResult(searched, len(candidates), estimates, order, rejected)


def _expand(spec, workload, triples, grid, dedupe_zero1: bool, shard_ends: bool = False) -> tuple[Candidates, Counter]:
    """Cross (dp, tp, pp, b) with the option grid; drop invalid option combinations by reason."""
    rejected: Counter = Counter()
    if not triples:
        return Candidates(*[np.array([], int) for _ in range(10)]), rejected
    t = np.array(triples, dtype=np.int64)
    g = np.array([(r, z, o, int(s), v) for r, z, o, s, v in grid], dtype=np.int64)
    ti = np.repeat(np.arange(len(t)), len(g))
    gi = np.tile(np.arange(len(g)), len(t))
    dp, tp, pp, b = (t[ti, k] for k in range(4))
    r, z, o, sp, v = (g[gi, k] for k in range(5))
    m = workload.global_batch // (dp * b)
    reasons = np.full(len(ti), "", dtype=object)
    checks = [
        ("sequence parallel needs tp > 1", (sp == 1) & (tp == 1)),
        ("offloading params needs zero 3", (o == OFFLOAD.index("params")) & (z != 3)),
        ("offloading the optimizer needs zero >= 1", (o == OFFLOAD.index("optimizer")) & (z == 0)),
        ("zero 1 equals zero 0 with one data-parallel rank", (z == 1) & (dp == 1) & dedupe_zero1),
        ("vpp needs pp > 1", (v > 1) & (pp == 1)),
        ("layers not divisible by pp x vpp", (v > 1) & (spec.num_layers % (pp * v) != 0)),
        ("interleaved schedule needs micro-batches divisible by pp", (v > 1) & (m % pp != 0)),
        ("optimizer in backward needs one micro-batch per step", (m > 1) & workload.optimizer_in_backward),
        ("sharding the embedding and head separately needs zero 3", shard_ends & (z != 3)),
        ("tied embeddings cannot be sharded apart from the head", np.full(len(z), shard_ends and spec.tie_word_embeddings)),
    ]
    for reason, mask in checks:
        fresh = mask & (reasons == "")
        reasons[fresh] = reason
        if fresh.any():
            rejected[reason] += int(fresh.sum())
    keep = reasons == ""
    candidates = Candidates(dp=dp[keep], tp=tp[keep], pp=pp[keep], micro_batch_size=b[keep],
                            num_micro_batches=m[keep], recompute=r[keep], zero=z[keep], offload=o[keep],
                            sequence_parallel=sp[keep].astype(bool), vpp=v[keep],
                            shard_ends=np.full(int(keep.sum()), shard_ends))
    return candidates, rejected

