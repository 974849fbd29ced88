"""Time of context parallelism (the ring attention) and expert parallelism (the MoE all-to-alls),
per decoder layer and micro-batch on one rank.

Context parallelism, as torch.distributed.tensor.experimental.context_parallel runs it (what
torchtitan's apply_cp uses; torch/distributed/tensor/experimental/_context_parallel/_attention.py,
`_templated_ring_attention` and its backward). The default rotate method is ALL_GATHER
(`_ContextParallelOptions.rotate_method`; torchtitan's default too): in the forward each rank
all-gathers its K and V shard over the cp group once, issued before the first (local) block and
awaited before the second, so it hides behind one block of attention; with head-tail load balancing
(each rank holds chunks i and 2·cp-1-i) every one of the cp blocks is 1/cp of the rank's causal
attention. The backward all-gathers K and V again and passes the fp32 dK/dV accumulators round the
ring (ALL_TO_ALL rotater = permute_tensor to the next rank), cp sends of the rank's K/V shard in
fp32, each behind one block's backward. The softmax rescaling (`_SDPAMerger.step`, fp32) is a
memory-bound pass over the rank's output per block; the backward accumulates dQ and dK/dV in fp32
per block. Megatron / TransformerEngine's `cp_comm_type="p2p"` passes K/V blocks point to point
instead; its volume is the same (cp-1 shards per rank), its overlap per block. The share of a
block's compute the exchange can hide behind is the profile's overlap `cp` (hand-set to dp's prior,
0.8, in calibration/profiles/initial.json: no measured cp runs have been fitted yet).

Expert parallelism (torchtitan expert_parallel.py ExpertParallel: all_to_all_single of the routed
tokens to the ranks holding their experts and back; Megatron-Core MoEAlltoAllTokenDispatcher): a
dispatch and a combine all-to-all in the forward and two in the backward, of tokens x top-k x
hidden (a latent MoE's latent) elements in the compute dtype (DeepEP, `--expert-dispatcher deepep`:
tokens x the distinct ranks their experts live on) (x the profile's expert imbalance: the busiest rank
receives that much more), each rank sending 1/ep of them to each other rank, the in-node share over NVLink
and the rest over the network at the same time; each followed (preceded) by the sort of the
received chunks by expert; not overlapped by default (profile overlap `ep`).
"""

from __future__ import annotations

import numpy as np

from planner.cost import comm
from planner.cost.candidates import Candidates
from planner.cost.compute import _attention_seconds, moe_share
from planner.cost.context import Context, Regime

FP32 = 4


def _exposed(ctx: Context, comm_s: np.ndarray, hideable_s: np.ndarray) -> np.ndarray:
    hidden = np.minimum(comm_s, hideable_s)
    return comm_s - hidden + ctx.profile.hidden_comm_cost() * hidden


def cp_seconds(ctx: Context, regime: Regime, c: Candidates) -> dict[str, np.ndarray]:
    """Per layer and micro-batch: `forward_comm`, `backward_comm` (exposed ring traffic) and
    `forward_work`, `backward_work` (the rescaling passes); zero where cp = 1."""
    w, spec = ctx.workload, ctx.spec
    cb = regime.numerics.compute_bytes
    tokens = c.micro_batch_size * w.seq_len / c.cp
    kv_shard = 2 * spec.kv_dim / c.tp * tokens  # K and V elements of this rank
    q_local = spec.q_dim / c.tp * tokens
    attention = regime.layer.attention_flops_per_token_seq * tokens * w.seq_len / c.tp
    fwd_attn, bwd_attn = _attention_seconds(ctx, attention)
    bandwidth, latency = comm.link_bandwidth(ctx.cluster, ctx.profile, c.tp * c.cp, c.cp)
    gather = comm.collective_seconds("all_gather", kv_shard * cb * c.cp, c.cp, bandwidth, latency)
    send = comm.p2p_seconds(kv_shard * FP32, bandwidth, latency)
    overlap = ctx.profile.parallel_overlap("cp")
    block_fwd, block_bwd = fwd_attn / c.cp, bwd_attn / c.cp
    forward = _exposed(ctx, gather, overlap * block_fwd)
    backward = _exposed(ctx, gather, overlap * block_bwd) + c.cp * _exposed(ctx, send, overlap * block_bwd)
    # per block: read the block's output (compute dtype) and the fp32 accumulator, write it back;
    # backward: read and write the fp32 dQ, dK, dV accumulators
    merge_bytes = c.cp * q_local * (cb + 2 * FP32)
    grads_bytes = c.cp * 2 * FP32 * (q_local + kv_shard)
    on = c.cp > 1
    return {"forward_comm": np.where(on, forward, 0.0), "backward_comm": np.where(on, backward, 0.0),
            "forward_work": np.where(on, merge_bytes / ctx.memory_bytes_per_s, 0.0),
            "backward_work": np.where(on, grads_bytes / ctx.memory_bytes_per_s, 0.0)}


def ep_seconds(ctx: Context, regime: Regime, c: Candidates) -> np.ndarray:
    """One all-to-all of a layer's routed tokens (dispatch or combine) and the chunk sort beside it,
    exposed, averaged over the stack's layers (dense layers exchange nothing); zero where ep = 1.
    Each TP rank exchanges its sequence-parallel share of the tokens (all of them without SP)."""
    spec, w = ctx.spec, ctx.workload
    if not spec.is_moe:
        return np.zeros(len(c))
    tokens = c.micro_batch_size * w.seq_len / c.cp / np.where(c.sequence_parallel, c.tp, 1)
    # the busiest rank receives (and sorts) `imbalance` times the mean of the routed copies
    # a latent MoE exchanges its latent tokens: fc1_latent_proj runs before the experts and fc2_latent_proj
    # after them (modeling_nemotron_h.py NemotronHMoE.forward), and shrinking the all-to-all is the latent's
    # purpose (LatentMoE, arXiv 2601.18089: routed tokens projected to the latent before expert parallelism)
    token_bytes = tokens * spec.expert_width * regime.numerics.compute_bytes * ctx.profile.expert_imbalance()
    routed_bytes = token_bytes * spec.experts_per_token
    sent_copies = np.where(ctx.workload.expert_dispatcher == "deepep",
                           ranks_reached_per_token(spec.num_experts, spec.experts_per_token, c.ep),
                           spec.experts_per_token)
    one = all_to_all_seconds(ctx, token_bytes * sent_copies, c.ep, c.tp)
    # Megatron-Core's alltoall dispatcher sorts the received chunks by local expert after the dispatch
    # and back before the combine (moe_utils.sort_chunks_by_idxs); torchtitan permutes them
    # (expert_parallel.py, _permute / generate_permute_indices): a row read and written per copy
    sort_s = 2 * routed_bytes / ctx.memory_bytes_per_s
    share = moe_share(regime.layer)
    return np.where(c.ep > 1, share * (one * (1 - ctx.profile.parallel_overlap("ep")) + sort_s), 0.0)


def ranks_reached_per_token(num_experts: int, top_k: int, ep: np.ndarray) -> np.ndarray:
    """Distinct ep ranks a token's top-k experts live on, on average: DeepEP sends a token once to
    each rank holding any of its experts (Buffer.get_dispatch_layout's is_token_in_rank, used by
    Megatron-Core transformer/moe/fused_a2a.py fused_dispatch) and the combine sums a rank's experts
    before sending back. With the k experts uniformly chosen (the balanced routing of the published
    benchmarks) among E, E/ep per rank, a rank is missed with probability C(E - E/ep, k) / C(E, k)."""
    ep = np.asarray(ep, dtype=float)
    per_rank = num_experts / ep
    missed = np.ones_like(ep)
    for i in range(top_k):  # C(E - E/ep, k) / C(E, k) as a product of k ratios
        missed = missed * np.clip(num_experts - per_rank - i, 0, None) / (num_experts - i)
    return ep * (1 - missed)


def all_to_all_seconds(ctx: Context, nbytes: np.ndarray, ep: np.ndarray, tp: np.ndarray) -> np.ndarray:
    """An all-to-all of `nbytes` per rank over ep ranks at a stride of tp (ep x tp consecutive ranks):
    each rank sends 1/ep of its buffer to every other rank (NCCL's grouped send/recv), those in its
    node over NVLink and the rest over its network link at the same time (NCCL routes remote sends
    through the node's NICs, PXN), so the slower of the two shares sets the time. An ep group inside
    a node uses only the intra-node link; one spread over nodes sends (ep - local)/ep of its buffer
    over the network, not all of it."""
    cluster = ctx.cluster
    intra, inter = ctx.profile.link("intra"), ctx.profile.link("inter")
    hw = cluster.hardware
    local = np.clip(cluster.devices_per_node // np.maximum(tp, 1), 1, ep)  # ep ranks in one node
    inside = nbytes * (local - 1) / ep / (hw.intra_node_bandwidth_bytes_per_s * intra.efficiency)
    outside = nbytes * (ep - local) / ep / (hw.inter_node_bandwidth_bytes_per_s * inter.efficiency)
    latency = (local - 1) * intra.latency_s + (ep - local) * inter.latency_s
    return np.where(ep > 1, np.maximum(inside, outside) + latency, 0.0)
