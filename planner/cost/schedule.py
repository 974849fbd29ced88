"""Pipeline schedules: the 1F1B schedule as a DAG whose critical path is the step time (the
ground truth), and the closed form the vectorised search uses, proven equal on tests.

1F1B (PipeDream-Flush; Narayanan et al. 2021 §2.2): stage i runs min(p-i-1, m) warm-up
forwards, then alternates one forward and one backward, then drains its backwards. With stage
times f_i, b_i (per micro-batch), the step takes  Σ_i (f_i + b_i) + (m-1)·max_i (f_i + b_i),
i.e. (m + p - 1)(f + b) for equal stages: a bubble of (p-1)/m. The interleaved schedule with v
chunks per device divides the bubble by v (Narayanan et al. 2021 §2.2.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np


def one_f_one_b_order(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, micro_batches)
    order = [("F", j) for j in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        order.append(("F", forward))
        forward += 1
        order.append(("B", backward))
        backward += 1
    order.extend(("B", j) for j in range(backward, micro_batches))
    return order


def schedule_graph(forward_s: Sequence[float], backward_s: Sequence[float], micro_batches: int,
                   p2p_s: float = 0.0) -> nx.DiGraph:
    """Nodes (kind, stage, micro-batch) weighted by duration; edges are data and device-order
    dependencies; a send between stages adds `p2p_s` on the edge."""
    stages = len(forward_s)
    graph = nx.DiGraph()
    for i in range(stages):
        order = one_f_one_b_order(i, stages, micro_batches)
        for kind, j in order:
            graph.add_node((kind, i, j), duration=forward_s[i] if kind == "F" else backward_s[i])
        for before, after in zip(order, order[1:]):
            graph.add_edge((before[0], i, before[1]), (after[0], i, after[1]), delay=0.0)
    for j in range(micro_batches):
        for i in range(1, stages):
            graph.add_edge(("F", i - 1, j), ("F", i, j), delay=p2p_s)
            graph.add_edge(("B", i, j), ("B", i - 1, j), delay=p2p_s)
        graph.add_edge(("F", stages - 1, j), ("B", stages - 1, j), delay=0.0)
    return graph


def critical_path_seconds(graph: nx.DiGraph) -> float:
    """Longest path where a node costs its duration and an edge its delay."""
    finish: dict = {}
    for node in nx.topological_sort(graph):
        start = max((finish[u] + graph.edges[u, node]["delay"] for u in graph.predecessors(node)), default=0.0)
        finish[node] = start + graph.nodes[node]["duration"]
    return max(finish.values())


def pipeline_seconds(stage_sum_s, stage_max_s, micro_batches, vpp):
    """Closed form of the 1F1B critical path (vectorised): the slowest stage runs every
    micro-batch; the others add their own time once (the fill and drain), divided by v when
    interleaved. Returns (steady, bubble)."""
    steady = micro_batches * stage_max_s
    bubble = (stage_sum_s - stage_max_s) / np.asarray(vpp)
    return steady, bubble
