"""Search = a generator of valid candidates + a pure evaluation + top-k, with every rejection
counted by reason (STYLE.md lesson 4).

Structure is checked per (tp, pp, cp, micro-batch) in Python — a few hundred combinations — and the
remaining options (recompute, ZeRO, offload, sequence parallel, vpp, ep) are expanded as arrays and
costed in one vectorised pass. Context-parallel degrees are the divisors of the devices left by tp x pp
whose 2 x cp chunks divide the sequence; expert-parallel degrees (MoE models only) the divisors of
the routed experts, kept where they divide dp x cp (planner/rules.py).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from planner.cost.candidates import Candidates
from planner.cost.context import Context
from planner.cost.estimate import Estimates, evaluate
from planner.capabilities import not_runnable
from planner.factor import divisors
from planner.layout import OFFLOAD, RECOMPUTE, ZERO
from planner.rules import OPTION_RULES, STRUCTURAL_FIXES, rule_masks, structural_reason
from planner.validity import check_degrees

VPP_CHOICES = (1, 2, 4)
CP_PAIRING = "even cp with an even micro-batch (half of each and twice the dp do the same with a shorter ring)"
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
    cp: int | None = None  # context parallel degree
    ep: int | None = None  # expert parallel degree (MoE models)


@dataclass
class SearchResult:
    searched: int
    evaluated: int
    estimates: Estimates | None
    order: np.ndarray  # indices of feasible candidates, fastest first
    rejected: Counter = field(default_factory=Counter)  # real reasons, each with a fix in `fixes`
    pairings: Counter = field(default_factory=Counter)  # invalid pairings of options: not worth showing
    fixes: dict[str, str] = field(default_factory=dict)  # reason -> what would change it

    @property
    def feasible(self) -> int:
        return len(self.order)


def _options(pins: Pins, name: str, choices):
    value = getattr(pins, name)
    return [value] if value is not None else list(choices)


def search(ctx: Context, pins: Pins, target: str = "executor") -> SearchResult:
    spec, workload, n_dev = ctx.spec, ctx.workload, ctx.cluster.num_devices
    check_degrees(dp=pins.dp, tp=pins.tp, pp=pins.pp, micro_batch_size=pins.micro_batch_size, vpp=pins.vpp)
    rejected: Counter = Counter()
    pinned_out: Counter = Counter()
    recompute = [RECOMPUTE.index(r) for r in _options(pins, "recompute", RECOMPUTE)]
    zeros = _options(pins, "zero", ZERO)
    offloads = [OFFLOAD.index(o) for o in _options(pins, "offload", OFFLOAD)]
    sps = _options(pins, "sequence_parallel", (False, True))
    vpps = _options(pins, "vpp", VPP_CHOICES)
    eps = _options(pins, "ep", divisors(spec.num_experts) if spec.is_moe else [1])
    per_triple = len(recompute) * len(zeros) * len(offloads) * len(sps) * len(vpps) * len(eps)
    triples = []
    batches = divisors(workload.global_batch) if pins.micro_batch_size is None else [pins.micro_batch_size]
    for tp in _options(pins, "tp", divisors(n_dev)):
        for pp in _options(pins, "pp", divisors(n_dev // tp) if n_dev % tp == 0 else [1]):
            left = n_dev // (tp * pp) if n_dev % (tp * pp) == 0 else 1
            for cp in _options(pins, "cp", divisors(left)):
                dp = n_dev // (tp * pp * cp) if n_dev % (tp * pp * cp) == 0 else 0
                if pins.dp is not None and dp != pins.dp:
                    pinned_out["does not match the pinned dp"] += per_triple * len(batches)
                    continue
                if cp > 1 and workload.seq_len % (2 * cp):
                    rejected["sequence not divisible into 2 x cp chunks"] += per_triple * len(batches)
                    continue
                # even cp and b: (cp / 2, b / 2, 2 dp) gives each rank the same tokens, micro-batches, ZeRO
                # and expert groups with a shorter ring, so (cp, b) is never better: not worth costing
                free = pins.micro_batch_size is None and pins.dp is None
                cp_batches = [b for b in batches if not (free and cp % 2 == 0 and b % 2 == 0)]
                pinned_out[CP_PAIRING] += per_triple * (len(batches) - len(cp_batches))
                first = structural_reason(spec, workload, n_dev, tp, pp, cp_batches[0], cp) if cp_batches else None
                if first and first != BATCH_REASON:  # a reason of (tp, pp, cp) alone holds for every micro-batch
                    rejected[first] += per_triple * len(cp_batches)
                    continue
                for b in cp_batches:
                    reason = structural_reason(spec, workload, n_dev, tp, pp, b, cp)
                    if reason:
                        rejected[reason] += per_triple
                    else:
                        triples.append((dp, tp, pp, b, cp))
    grid = list(itertools.product(recompute, zeros, offloads, sps, vpps, eps))
    candidates, pairings, option_rejects, fixes = _expand(ctx, triples, grid, dedupe_zero=pins.zero is None,
                                                          shard_ends=bool(pins.shard_ends), target=target)
    rejected.update(option_rejects)
    pairings.update(pinned_out)
    fixes.update({k: v for k, v in STRUCTURAL_FIXES.items() if k in rejected or k.startswith("out of")})
    if "sequence not divisible into 2 x cp chunks" in rejected:
        fixes["sequence not divisible into 2 x cp chunks"] = "a --cp with 2 x cp dividing --seq-len"

    searched = sum(rejected.values()) + sum(pairings.values()) + len(candidates)
    if not len(candidates):
        return SearchResult(searched, 0, None, np.array([], int), _nonzero(rejected), _nonzero(pairings), fixes)
    estimates = evaluate(ctx, candidates)
    oom = ~estimates.fits
    rejected["out of memory"] += int(oom.sum())
    host = estimates.fits & ~estimates.host_fits
    rejected["out of host memory (offload)"] += int(host.sum())
    ok = np.nonzero(estimates.fits & estimates.host_fits)[0]
    # prefer candidates that fit with the safety margin, then the fastest
    order = ok[np.lexsort((estimates.step_s[ok], ~estimates.fits_with_margin[ok]))]
    return SearchResult(searched, len(candidates), estimates, order, _nonzero(rejected), _nonzero(pairings), fixes)


def _nonzero(counts: Counter) -> Counter:
    return Counter({k: v for k, v in counts.items() if v})


def _expand(ctx: Context, triples, grid, dedupe_zero: bool, shard_ends: bool,
            target: str) -> tuple[Candidates, Counter, Counter, dict[str, str]]:
    """Cross (dp, tp, pp, b) with the option grid; drop invalid option pairings, invalid options
    (planner/rules.py OPTION_RULES) and what `target` cannot run (planner/capabilities.py), by reason."""
    spec, workload = ctx.spec, ctx.workload
    pairings, rejected, fixes = Counter(), Counter(), {}
    if not triples:
        return Candidates(*[np.array([], int) for _ in range(10)]), pairings, rejected, fixes
    t = np.array(triples, dtype=np.int64)
    g = np.array([(r, z, o, int(s), v, e) for r, z, o, s, v, e in grid], dtype=np.int64)
    ti = np.repeat(np.arange(len(t)), len(g))
    gi = np.tile(np.arange(len(g)), len(t))
    dp, tp, pp, b, cp = (t[ti, k] for k in range(5))
    r, z, o, sp, v, ep = (g[gi, k] for k in range(6))
    everything = Candidates(dp=dp, tp=tp, pp=pp, micro_batch_size=b, num_micro_batches=workload.global_batch // (dp * b),
                            recompute=r, zero=z, offload=o, sequence_parallel=sp.astype(bool), vpp=v,
                            shard_ends=np.full(len(dp), shard_ends), cp=cp, ep=ep)
    taken = np.zeros(len(dp), dtype=bool)
    for rule, mask in rule_masks(OPTION_RULES, everything, spec, workload):
        _count(pairings if rule.pairing else rejected, rule.reason, mask, taken)
        if not rule.pairing:
            fixes[rule.reason] = rule.fix
    # one data rank (dp x cp): ZeRO 1/2/3 shard over one rank and ZeRO 2 = 3 (nothing is resharded)
    if dedupe_zero:
        single = (dp * cp == 1) & (o != OFFLOAD.index("params"))
        _count(pairings, "zero 1 equals zero 0 with one data-parallel rank", single & (z == 1), taken)
        _count(pairings, "zero 3 equals zero 2 with one data-parallel rank", single & (z == 3) & (not shard_ends), taken)
    for reason, fix, mask in not_runnable(target, everything, spec, workload, ctx.cluster.hardware):
        _count(rejected, reason, mask, taken)
        fixes[reason] = fix
    return everything.take(np.nonzero(~taken)[0]), pairings, rejected, fixes


def _count(counter: Counter, reason: str, mask: np.ndarray, taken: np.ndarray) -> None:
    """Count the candidates `mask` rejects that no earlier rule took, and take them."""
    fresh = mask & ~taken
    if fresh.any():
        counter[reason] += int(fresh.sum())
        taken |= fresh
