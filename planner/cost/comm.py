"""Collectives as alpha-beta costs over the slowest link of the group's ring.

Ring algorithms (Thakur et al. 2005; NCCL): all-reduce moves 2(n-1)/n of the buffer through each
link in 2(n-1) steps; all-gather and reduce-scatter (n-1)/n in n-1 steps; a point-to-point send
the whole buffer in one step. Time = volume / (bandwidth × efficiency) + steps × latency.

Ranks are laid out TP innermost, then CP, then DP, then PP (Megatron's order; torchtitan's mesh
pp, dp, cp, tp), so a TP group stays in a node while tp <= devices per node, a CP group while
tp·cp does, a DP (x CP) group while tp·cp·dp does, and pipeline neighbours while the whole grid
does. An expert-parallel group is the ep innermost data ranks (torchtitan carves ep out of
dp_shard x cp): it spans tp·ep ranks.
"""

from __future__ import annotations

import numpy as np

from planner.profile import Profile
from planner.specs import Cluster

# all-to-all (NCCL's send/recv pairs, torch all_to_all_single): each rank sends (n-1)/n of its buffer
COLLECTIVES = {"all_reduce": (2.0, 2.0), "all_gather": (1.0, 1.0), "reduce_scatter": (1.0, 1.0),
               "all_to_all": (1.0, 1.0)}


def link_bandwidth(cluster: Cluster, profile: Profile, span: np.ndarray,
                   group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes/s, latency s per ring step) for a group of `group` ranks spanning `span` consecutive
    ranks. Bandwidth is the slowest link's. Latency follows NCCL's ring model (src/graph/tuning.cc:
    of a ring's n-1 steps, nNodes-1 cross the network and pay its latency, the rest the
    intra-node link's); a point-to-point (no `group`) pays the slower link's."""
    hw = cluster.hardware
    intra, inter = profile.link("intra"), profile.link("inter")
    inside = span <= cluster.devices_per_node
    bandwidth = np.where(inside, hw.intra_node_bandwidth_bytes_per_s * intra.efficiency,
                         hw.inter_node_bandwidth_bytes_per_s * inter.efficiency)
    latency = np.where(inside, intra.latency_s, inter.latency_s)
    if group is not None:
        steps = np.maximum(np.asarray(group) - 1, 1)
        network_steps = np.minimum(np.ceil(span / cluster.devices_per_node) - 1, steps)
        latency = ((steps - network_steps) * intra.latency_s + network_steps * inter.latency_s) / steps
    return bandwidth, latency


def collective_seconds(kind: str, nbytes: np.ndarray, group: np.ndarray, bandwidth: np.ndarray,
                       latency: np.ndarray, count: np.ndarray | float = 1) -> np.ndarray:
    """`count`: the bytes move as that many separate collectives (FSDP units, DDP buckets), each
    paying the ring's latency."""
    volume_factor, step_factor = COLLECTIVES[kind]
    n = np.maximum(group, 1)
    seconds = volume_factor * (n - 1) / n * nbytes / bandwidth + step_factor * (n - 1) * latency * count
    return np.where(group > 1, seconds, 0.0)


def p2p_seconds(nbytes: np.ndarray, bandwidth: np.ndarray, latency: np.ndarray) -> np.ndarray:
    return nbytes / bandwidth + latency


def pcie_seconds(cluster: Cluster, profile: Profile, nbytes: np.ndarray) -> np.ndarray:
    link = profile.link("pcie")
    return nbytes / (cluster.hardware.pcie_bandwidth_bytes_per_s * link.efficiency) + link.latency_s
