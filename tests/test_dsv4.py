"""DeepSeek-V4 (deepseek_v4): read from config.json as DeepseekV4Config reads it, with the FLOPs,
saved tensors and memory of compressed attention, the indexer, hyper-connections and hash routing."""

from dataclasses import replace

import pytest

from planner.cost.summary import summarize_parts
from planner.errors import InvalidRequest
from planner.graph import build_graph, count_params, numerics_for
from planner.models import catalog, load_model, spec_from_hf_config
from planner.ops import window_keys_fraction
from planner.specs import Workload

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def _graph(name: str, seq_len: int, framework: str = "torchtitan", attention: str = "sdpa", sharded: bool = True):
    spec = load_model(name)
    workload = Workload(seq_len=seq_len, global_batch=8, framework=framework, attention=attention)
    return spec, build_graph(spec, workload, numerics_for(workload, params_sharded=sharded))


def _by_kind(graph) -> dict:
    return {(kind.attention, kind.hash_routed): {op.name: op for op in ops}
            for (ops, _), (kind, _, _) in zip(graph.kind_ops(), graph.blocks)}


def test_release_schedule_and_shapes():
    """V4-Flash: compress_ratios [0, 0] + [4, 128] x 20 + [4, (MTP) 0] cut to 43 layers, the first
    3 hash-routed, one kv head, a 64-dim rotary slice, one shared expert of the routed width."""
    spec = load_model("deepseek-v4")
    assert spec.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA) and spec.layer_types[-1] == CSA
    assert [spec.layer_types.count(t) for t in (SLIDING, CSA, HCA)] == [2, 21, 20]
    assert spec.hash_moe_layers == (0, 1, 2) and spec.num_kv_heads == 1 and spec.qk_rope_head_dim == 64
    assert spec.shared_expert_intermediate_size == spec.intermediate_size == 2048
    assert (spec.csa_compress_rate, spec.hca_compress_rate, spec.hc_mult) == (4, 128, 4)
    assert spec.residual_width == 4 * 4096


def test_defaults_are_transformers_defaults():
    """A config.json with only model_type builds DeepseekV4Config's defaults: two HCA layers, then
    CSA / HCA alternating, 3 hash layers (transformers' meta count of that default: 284,325,869,015)."""
    spec = spec_from_hf_config({"model_type": "deepseek_v4"}, name="defaults")
    assert spec.layer_types[:4] == (HCA, HCA, HCA, CSA) and spec.hash_moe_layers == (0, 1, 2)
    assert count_params(spec) == 284_325_869_015


def test_compressed_attention_costs_the_keys_each_query_sees():
    """A kernel (any framework but transformers'): the window, plus every earlier entry (HCA) or the
    top-k of them (CSA); transformers' eager path: every query against s + s/m keys."""
    seq = 1024
    spec, graph = _graph("tiny-dsv4", seq)
    kinds = _by_kind(graph)
    per_key = 2 * 2 * spec.num_heads * spec.head_dim
    window = window_keys_fraction(spec.sliding_window, seq)
    csa, hca = spec.csa_compress_rate, spec.hca_compress_rate
    assert kinds[(SLIDING, True)]["attention"].flops_per_token_seq == pytest.approx(per_key * window)
    assert kinds[(HCA, False)]["attention"].flops_per_token_seq == pytest.approx(per_key * (window + 1 / hca))
    assert kinds[(CSA, False)]["attention"].flops_per_token_seq == pytest.approx(
        per_key * (window + window_keys_fraction(spec.index_topk * csa, seq) / csa))
    kept = {t.key: t.bytes_per_token for t in kinds[(CSA, False)]["attention"].saved}
    assert kept["indexer.topk"] == 4 * spec.index_topk
    _, eager = _graph("tiny-dsv4", seq, framework="executor", attention="eager")
    eager_kinds = _by_kind(eager)
    for (attention, hashed), rate in (((SLIDING, True), 0), ((HCA, False), hca), ((CSA, False), csa)):
        op = eager_kinds[(attention, hashed)]["attention"]
        keys = 1 + (1 / rate if rate else 0)
        assert op.flops_per_token_seq == pytest.approx(per_key * keys)
        scores = next(t for t in op.saved if t.key == "attn.scores")
        per_score = eager.numerics.compute_bytes * spec.num_heads
        assert scores.times_seq and scores.bytes_per_token == pytest.approx(per_score * keys)


def test_indexer_is_frozen_and_keeps_nothing():
    """CSA's indexer: its weights get no gradient (it returns indices) and its forward keeps nothing;
    its parameters are kv/gate projections to 2 x index_head_dim, weights_proj, q_b_proj, the window
    position bias and kv_norm."""
    spec, graph = _graph("tiny-dsv4", 256)
    ops = _by_kind(graph)[(CSA, True)]
    indexer = [op for name, op in ops.items() if name.startswith("indexer.")]
    assert indexer and all(not op.trainable and not op.saved and not op.grads for op in indexer)
    h, heads, dim, rate = spec.hidden_size, spec.index_heads, spec.index_head_dim, spec.csa_compress_rate
    assert sum(op.params for op in indexer) == (h * 4 * dim + h * heads + spec.q_lora_rank * heads * dim
                                                + rate * 2 * dim + dim)
    assert ops["indexer.scores"].flops_per_token_seq == pytest.approx(2 * heads * (dim + 1) / rate)
    assert not any(name.startswith("indexer.") for name in _by_kind(graph)[(HCA, False)])


def test_hyper_connections_carry_every_stream():
    """The checkpointed layer input and the saved streams are hc_mult hidden states; each branch's
    mixing linear is (2 + n)·n outputs of the n·H flattened streams; the head collapses them."""
    spec, graph = _graph("tiny-dsv4", 256)
    r, n, h = graph.numerics.residual_bytes, spec.hc_mult, spec.hidden_size
    layer, _, head, kinds = summarize_parts(graph)
    for part, _ in kinds:
        assert part.saved["full"].sp == r * n * h
    ops = _by_kind(graph)[(HCA, False)]
    mixes = (2 + n) * n
    assert ops["attn_hc.fn"].params == ops["ffn_hc.fn"].params == mixes * n * h + mixes + 3
    assert {t.key: t.bytes_per_token for t in ops["attn_hc.mix"].saved}["layer_in"] == r * n * h
    assert [m.name for m in head.matmuls] == ["hc_head", "lm_head"]
    assert replace(spec, hc_mult=0).residual_width == h


def test_hash_layers_read_a_table_not_a_top_k():
    _, graph = _graph("tiny-dsv4", 256)
    kinds = _by_kind(graph)
    hashed = {t.key for t in kinds[(CSA, True)]["router"].saved}
    learned = {t.key for t in kinds[(CSA, False)]["router"].saved}
    assert "router.table" in hashed and "router.topk" not in hashed and "router.topk" in learned
    assert kinds[(CSA, True)]["router"].params == kinds[(CSA, False)]["router"].params  # the gate still scores


def _tiny(**changes) -> dict:
    return {**catalog()["tiny-dsv4"]["config"], **changes}


@pytest.mark.parametrize("config, message", [
    (_tiny(layer_types=None, compress_ratios=[0, 4, 8, 4]), "compress_ratios may hold only 0, 4 and 128"),
    (_tiny(o_groups=3), "o_groups (3) must divide"),
    (_tiny(layer_types=[SLIDING, CSA]), "names 2 layers but num_hidden_layers is 4"),
    (_tiny(compress_rates={"compressed_sparse_attention": 4}), "no rate for heavily_compressed_attention"),
    (_tiny(partial_rotary_factor=0.01), "rotary slice"),
    ({**catalog()["tiny-sliding"]["config"], "layer_types": [CSA] * catalog()["tiny-sliding"]["config"]
      ["num_hidden_layers"]}, "only model_type deepseek_v4 has"),
])
def test_unreadable_configs_get_one_line(config, message):
    with pytest.raises(InvalidRequest) as error:
        spec_from_hf_config(config, name="bad")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_executor_refuses_sdpa_and_ddp():
    """transformers has eager attention only for V4, and its indexer gets no gradient (DDP refuses)."""
    from planner.capabilities import runnable_reason
    from planner.layout import ParallelConfig

    spec = load_model("tiny-dsv4")
    config = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4, zero=0)
    sdpa = runnable_reason("executor", config, spec, Workload(seq_len=64, global_batch=8), gpu=False)
    assert "without sdpa attention" in sdpa
    ddp = runnable_reason("executor", config, spec, Workload(seq_len=64, global_batch=8, attention="eager"), gpu=False)
    assert "indexer gets none" in ddp


def test_suggest_with_sdpa_points_to_eager_attention():
    """Every engine refuses V4 with sdpa; the ways out say eager attention (alone where it fits)."""
    from planner.api import Request, suggest
    from planner.errors import Infeasible

    with pytest.raises(Infeasible) as refused:
        suggest(Request(model="tiny-dsv4", gpu="cpu", gpus=1, seq_len=64, global_batch=8, precision="fp32"))
    assert "--attention eager" in str(refused.value)
    result = suggest(Request(model="tiny-dsv4", gpu="cpu", gpus=1, seq_len=64, global_batch=8, precision="fp32",
                             attention="eager"))
    assert result["candidates"]
