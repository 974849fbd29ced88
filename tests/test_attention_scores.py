"""Materialised attention scores (planner.ops.score_bytes) against transformers' eager attention.

llama's eager_attention_forward runs on CPU under a dispatch mode that adds up the bytes every
op reads and writes on score-sized tensors (views move nothing), and under saved-tensor hooks
that record what autograd keeps. The CPU upcasts the scores to fp32 in a pass of its own before
the softmax; CUDA's _softmax(half_to_float=True) reads the bf16 scores directly, so the CPU moves
one fp32 copy more (written, then read: 2 x 4 bytes per score).
"""

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from planner.cost.summary import summarize  # noqa: E402
from planner.graph import build_graph, numerics_for  # noqa: E402
from planner.models import load_model  # noqa: E402
from planner.ops import score_bytes  # noqa: E402
from planner.specs import Workload  # noqa: E402

BATCH, HEADS, SEQ, HEAD_DIM = 1, 4, 64, 16
SCORES = BATCH * HEADS * SEQ * SEQ
VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.expand.default", "aten.transpose.int"}
CPU_SEPARATE_UPCAST_BYTES = 2 * 4


class ScoreTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) not in VIEWS:
            tensors = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in tensors
                              if isinstance(t, torch.Tensor) and t.numel() == SCORES)
        return out


def run_eager_attention():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 1
    q, k, v = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bfloat16)
    saved = {}

    def keep(tensor):
        if tensor.numel() == SCORES:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    traffic = ScoreTraffic()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), traffic:
        eager_attention_forward(module, q, k, v, mask, HEAD_DIM**-0.5, dropout=0.0)
    return traffic.bytes / SCORES, sum(saved.values()) / SCORES


def test_eager_attention_traffic_and_saved_scores_match_transformers():
    workload = Workload(seq_len=SEQ, global_batch=1, attention="eager")
    numerics = numerics_for(workload, params_sharded=True)
    planned_saved, planned_traffic = score_bytes(workload, numerics, dropout=False)
    traffic, saved = run_eager_attention()
    assert traffic - CPU_SEPARATE_UPCAST_BYTES == pytest.approx(planned_traffic)
    assert saved == pytest.approx(planned_saved)


@pytest.mark.parametrize("attention", ["eager", "fused-softmax"])
def test_a_layer_moves_its_scores_through_memory_once_per_head(attention):
    spec = replace(load_model("gpt2-xl"), dropout=0.0)
    workload = Workload(seq_len=1024, global_batch=1, attention=attention)
    numerics = numerics_for(workload, params_sharded=True)
    layer, _, _ = summarize(build_graph(spec, workload, numerics))
    flash, _, _ = summarize(build_graph(spec, replace(workload, attention="sdpa"), numerics))
    assert flash.io_bytes.seq == 0
    assert layer.io_bytes.seq == pytest.approx(spec.num_heads * score_bytes(workload, numerics, dropout=False)[1])
