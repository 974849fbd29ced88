"""Kimi Linear (Kimi Delta Attention between MLA layers) and DeepSeek-V3.2 (MLA with DeepSeek
Sparse Attention): read from config.json, with the FLOPs and saved tensors of their layers."""

import pytest

from planner.cost.summary import summarize_ops
from planner.graph import build_graph, count_params, numerics_for
from planner.models import load_model
from planner.ops import Saved, window_keys_fraction
from planner.specs import Workload


def _kind_ops(name: str, seq_len: int) -> tuple:
    spec = load_model(name)
    workload = Workload(seq_len=seq_len, global_batch=8)
    graph = build_graph(spec, workload, numerics_for(workload, params_sharded=False))
    return spec, graph, [(kind, {op.name: op for op in ops}) for (ops, _), (kind, _, _) in
                         zip(graph.kind_ops(), graph.blocks)]


def _saved_per_token(graph, ops: dict) -> float:
    layer_input = Saved("layer_in", graph.numerics.residual_bytes * graph.spec.hidden_size, "sp")
    return summarize_ops(list(ops.values()), False, layer_input).saved["none"].evaluate(1.0, graph.workload.seq_len, 1, 1)


def test_kimi_linear_release_layers():
    spec = load_model("kimi-linear-48b-a3b")
    full = [i + 1 for i, t in enumerate(spec.layer_types) if t == "full_attention"]
    assert full == [4, 8, 12, 16, 20, 24, 27]  # 1-indexed, as its linear_attn_config names them
    assert spec.mlp_layer_types[:2] == ("dense", "sparse") and spec.num_experts == 256
    assert spec.positions == "none" and spec.is_mla and spec.q_lora_rank == 0
    assert spec.linear_mixer == "kimi_delta" and spec.linear_value_heads == 32 and spec.linear_value_head_dim == 128


def test_kimi_delta_attention_is_linear_in_the_sequence():
    """KDA layers: FLOPs and saved bytes per token do not depend on the sequence; their conv, gates,
    decay (dt_bias per channel, A_log per head) and gated norm are parameters; the MLA layer has no
    rotary and its attention grows with the sequence."""
    spec, short_graph, short = _kind_ops("tiny-kimi-linear", 256)
    _, long_graph, long = _kind_ops("tiny-kimi-linear", 2048)
    by_kind = {(kind.attention, kind.mlp): ops for kind, ops in short}
    kda = by_kind[("linear_attention", "dense")]
    heads, dim, h = spec.linear_value_heads, spec.linear_value_head_dim, spec.hidden_size
    width = heads * dim
    assert "attention" not in kda and "rotary" not in kda
    assert kda["conv1d"].params == 3 * width * spec.linear_conv_kernel
    assert kda["forget_gate"].params == width + heads
    assert kda["o_norm"].params == dim
    assert kda["f_b_proj"].gemm == (dim, width) and kda["g_b_proj"].gemm == (dim, width)
    assert kda["b_proj"].gemm == (h, heads) and kda["o_proj"].gemm == (width, h)
    for (kind, a), (_, b) in zip(short, long):
        if kind.attention == "linear_attention":
            assert a["delta_rule"].flops_per_token == b["delta_rule"].flops_per_token > 0
            assert sum(op.flops_per_token_seq for op in a.values()) == 0
            assert _saved_per_token(short_graph, a) == pytest.approx(_saved_per_token(long_graph, b))
        else:
            assert "rotary" not in a and a["attention"].flops_per_token_seq > 0


def test_dsa_indexer_scores_all_tokens_and_attention_the_selected():
    spec, graph, kinds = _kind_ops("tiny-dsa", 1024)
    ops = kinds[0][1]
    heads, dim, k = spec.index_heads, spec.index_head_dim, spec.index_topk
    # the indexer: q·k over every causal pair and its head weights; forward only, frozen, nothing saved
    assert ops["indexer.scores"].flops_per_token_seq == 2 * heads * (dim + 1)
    indexer = [op for name, op in ops.items() if name.startswith("indexer.")]
    assert indexer and all(not op.trainable and not op.saved and not op.grads for op in indexer)
    assert sum(op.params for op in indexer) == spec.q_lora_rank * heads * dim + spec.hidden_size * (dim + heads) + 2 * dim
    # the main attention: the keys each query selects (min(i + 1, k)), and the selected indices kept
    _, _, dense = _kind_ops("tiny-mla", 1024)
    full = dense[0][1]["attention"].flops_per_token_seq
    assert ops["attention"].flops_per_token_seq == pytest.approx(full * window_keys_fraction(k, 1024))
    assert {t.key: t.bytes_per_token for t in ops["attention"].saved}["indexer.topk"] == 4 * k
    # a sequence no longer than index_topk: every key is selected, the attention is dense MLA's
    _, _, short = _kind_ops("tiny-dsa", k)
    _, _, short_dense = _kind_ops("tiny-mla", k)
    assert short[0][1]["attention"].flops_per_token_seq == short_dense[0][1]["attention"].flops_per_token_seq


def test_dsa_eager_keeps_only_the_selected_scores():
    workload = Workload(seq_len=1024, global_batch=8, attention="eager")
    spec = load_model("tiny-dsa")
    graph = build_graph(spec, workload, numerics_for(workload, params_sharded=False))
    attention = {op.name: op for op in graph.kind_ops()[0][0]}["attention"]
    scores = next(t for t in attention.saved if t.key == "attn.scores")
    assert not scores.times_seq and scores.bytes_per_token % spec.index_topk == 0


def test_deepseek_v32_adds_the_indexer_to_deepseek_v3():
    """61 layers of one indexer each: wq_b (q rank -> 64 x 128), wk (hidden -> 128), its LayerNorm,
    weights_proj (hidden -> 64)."""
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    assert count_params(load_model("deepseek-v3.2")) == count_params(load_model("deepseek-v3")) + 61 * per_layer


def test_executor_refuses_ddp_for_the_gradient_less_indexer():
    """transformers' indexer gets no gradient: DDP stops on it, FSDP2 trains it (tests/executor/
    test_family_training.py); Kimi Linear has no such weight."""
    from planner.capabilities import runnable_reason
    from planner.layout import ParallelConfig

    workload = Workload(seq_len=64, global_batch=8)
    ddp = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4, zero=0)
    fsdp = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4, zero=3)
    reason = runnable_reason("executor", ddp, load_model("tiny-dsa"), workload, gpu=False)
    assert reason and "indexer gets none" in reason and "--zero 2 or 3" in reason
    assert runnable_reason("executor", fsdp, load_model("tiny-dsa"), workload, gpu=False) is None
    assert runnable_reason("executor", ddp, load_model("tiny-kimi-linear"), workload, gpu=False) is None
