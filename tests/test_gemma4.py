"""Gemma 4 (gemma4_text, and the text part of gemma4): per-layer head dims and KV heads, values
equal to keys, KV-shared layers, per-layer input embeddings and experts beside the MLP, read from
config.json and followed layer by layer by the graph (planner/gemma4.py)."""

import pytest

from planner.cost.summary import summarize_ops
from planner.errors import InvalidRequest
from planner.graph import build_graph, count_params, numerics_for
from planner.models import catalog, load_model, spec_from_hf_config
from planner.ops import Saved, window_keys_fraction
from planner.specs import Workload

WORKLOAD = Workload(seq_len=32, global_batch=8)  # shorter than tiny-gemma4's window: SDPA gets no mask


def _blocks(workload: Workload = WORKLOAD):
    spec = load_model("tiny-gemma4")
    graph = build_graph(spec, workload, numerics_for(workload, params_sharded=False))
    return spec, {(kind.attention, kind.kv_shared): {n: block.nodes[n]["op"] for n in block.nodes}
                  for kind, _, block in graph.blocks}, graph


def test_kinds_follow_layer_types_and_kv_sharing():
    spec = load_model("tiny-gemma4")
    kinds = [(k.attention, k.kv_shared, i) for k, i in spec.layer_kinds()]
    assert kinds == [("sliding_attention", False, (0, 1, 3)), ("full_attention", False, (2,)),
                     ("sliding_attention", True, (4,)), ("full_attention", True, (5,))]


def test_full_layers_have_their_own_head_dim_and_values_equal_to_keys():
    spec, ops, _ = _blocks()
    full, sliding = ops[("full_attention", False)], ops[("sliding_attention", False)]
    assert full["q_proj"].gemm == (spec.hidden_size, spec.num_heads * spec.global_head_dim)
    assert full["k_proj"].gemm == (spec.hidden_size, spec.global_kv_heads * spec.global_head_dim)
    assert "v_proj" not in full and "v_proj" in sliding  # attention_k_eq_v on full layers only
    assert full["v_norm"].params == 0 and sliding["k_norm"].params == spec.head_dim
    # attention FLOPs follow each layer's width, the sliding one's over its window
    assert full["attention"].flops_per_token_seq == 4 * spec.num_heads * spec.global_head_dim
    long = Workload(seq_len=1024, global_batch=8)
    _, ops_long, _ = _blocks(long)
    fraction = window_keys_fraction(spec.sliding_window, long.seq_len)
    assert ops_long[("sliding_attention", False)]["attention"].flops_per_token_seq == pytest.approx(
        4 * spec.num_heads * spec.head_dim * fraction)


def _saved_keys(ops) -> set[str]:
    return {t.key for op in ops.values() for t in op.saved}


@pytest.mark.parametrize("attention", ["sliding_attention", "full_attention"])
def test_kv_shared_layers_have_no_kv_projections_and_keep_no_kv_of_their_own(attention):
    spec, ops, _ = _blocks()
    own, shared = ops[(attention, False)], ops[(attention, True)]
    assert {"k_proj", "k_norm", "v_norm"} <= set(own) and not {"k_proj", "v_proj", "k_norm", "v_norm"} & set(shared)
    assert {"attn.k", "v_norm.out"} <= _saved_keys(own) and not {"attn.k", "v_norm.out"} & _saved_keys(shared)
    # use_double_wide_mlp: the shared layers' MLP is twice as wide
    assert shared["gate_proj"].gemm[1] == 2 * own["gate_proj"].gemm[1] == 2 * spec.intermediate_size
    # a mask makes SDPA keep repeated copies of K and V in every layer, the shared ones too
    _, masked, _ = _blocks(Workload(seq_len=1024, global_batch=8))
    assert {"attn.k", "attn.v"} <= _saved_keys(masked[("sliding_attention", True)])


def test_per_layer_inputs_are_kept_once_for_the_model():
    spec, ops, graph = _blocks()
    p, layers = spec.per_layer_input_size, spec.num_layers
    ends = {op.name: op for op in graph.end_ops()}
    assert ends["per_layer_embedding"].params == spec.per_layer_input_vocab * layers * p
    assert ends["per_layer_model_projection"].gemm == (spec.hidden_size, layers * p)
    inputs = [t for op in ends.values() for t in op.saved if t.key == "per_layer_inputs"]
    assert len(inputs) == 1 and inputs[0].bytes_per_token == graph.numerics.residual_bytes * layers * p
    for block in ops.values():
        assert block["per_layer_input_gate"].gemm == (spec.hidden_size, p)
        assert "per_layer_inputs" not in _saved_keys(block)
    layer_in = Saved("layer_in", 4 * spec.hidden_size, "sp")
    total = sum(len(i) * summarize_ops(o, False, layer_in).params.total for o, i in graph.kind_ops())
    assert total + sum(op.params for op in graph.end_ops()) == count_params(spec)


def test_experts_beside_the_mlp():
    config = {"model_type": "gemma4", "text_config": {
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "vocab_size": 128,
        "hidden_size_per_layer_input": 0, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 24}}
    spec = spec_from_hf_config(config, name="moe")
    graph = build_graph(spec, WORKLOAD, numerics_for(WORKLOAD, params_sharded=False))
    ops = {op.name: op for op in graph.kind_ops()[0][0]}
    assert ops["gate_proj"].gemm == (64, 96) and ops["experts"].params == 4 * 3 * 64 * 24
    assert ops["router_scale"].params == 64 + 4 and ops["router_norm"].params == 0
    assert {"mlp_post_norm_1", "mlp_post_norm_2", "moe_pre_norm", "mlp_post_norm"} <= set(ops)


def test_the_last_layer_is_always_full_and_a_saved_per_layer_config_reads_the_same():
    base = dict(catalog()["tiny-gemma4"]["config"])
    spec = load_model("tiny-gemma4")
    types = ["sliding_attention"] * 5 + ["full_attention"]
    saved = {**base, "layer_types": types[:5] + ["sliding_attention"], "global_head_dim": None,
             "num_global_key_value_heads": None, "per_layer_config": {"5": {"head_dim": 64, "num_key_value_heads": 1}},
             "num_kv_shared_layers": 0}
    again = spec_from_hf_config(saved, name="x")
    assert again.layer_types == tuple(types)
    assert (again.global_head_dim, again.global_kv_heads) == (spec.global_head_dim, spec.global_kv_heads)


def _with(**changes):
    config = dict(catalog()["tiny-gemma4"]["config"])
    config.update(changes)
    return config


@pytest.mark.parametrize("config, message", [
    (_with(num_kv_shared_layers=4), "num_kv_shared_layers (4) leaves no earlier layer of each attention type"),
    (_with(use_bidirectional_attention="all"), "use_bidirectional_attention 'all'"),
    (_with(global_head_dim=2**20), "global_head_dim 1048576 is beyond any real value"),
    (_with(per_layer_config={"1": {"head_dim": 64}}), "per_layer_config must give the full_attention layers"),
    (_with(per_layer_config={"2": {"intermediate_size": 64}}), "may override only head_dim and num_key_value_heads"),
    (_with(enable_moe_block=True, num_experts=1, top_k_experts=1, moe_intermediate_size=8),
     "num_experts of at least 2"),
])
def test_unreadable_gemma4_configs_get_one_line(config, message):
    with pytest.raises(InvalidRequest) as error:
        spec_from_hf_config(config, name="x", source="config.json")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tp_must_divide_the_full_layers_kv_heads():
    from planner.api import Request, predict
    from planner.plan import ParallelConfig

    request = Request(model="tiny-gemma4", gpu="h100-sxm-80gb", gpus=2, gpus_per_node=2, seq_len=256, global_batch=2)
    with pytest.raises(InvalidRequest, match="full-attention layers: 1"):
        predict(request, ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=1, num_micro_batches=2))


def test_gemma_4_31b_counts_the_model_cards_30_7b():
    # transformers' meta-device count of google/gemma-4-31B-it's language model (tests/test_params.py)
    assert count_params(load_model("gemma-4-31b")) == 30_697_345_280


def _with(**fields):
    from dataclasses import replace

    spec = replace(load_model("tiny-gemma4"), **fields)
    graph = build_graph(spec, WORKLOAD, numerics_for(WORKLOAD, params_sharded=False))
    return spec, {(kind.attention, kind.kv_shared): {n: block.nodes[n]["op"] for n in block.nodes}
                  for kind, _, block in graph.blocks}, graph


def _saved_bytes(op) -> dict[str, float]:
    return {t.key: t.bytes_per_token for t in op.saved}


def test_heads_wider_than_256_get_k_and_v_repeated_for_every_head_without_a_mask():
    # transformers' use_gqa_in_sdpa: native GQA only up to head dim 256 (Gemma 4's global heads are 512)
    c = numerics_for(WORKLOAD, params_sharded=False).compute_bytes
    for width, repeated in ((256, False), (512, True)):
        spec, ops, _ = _with(global_head_dim=width)
        for kv_shared in (False, True):
            saved = _saved_bytes(ops[("full_attention", kv_shared)]["attention"])
            if repeated:  # its own copies, kv-shared layers included, and no mask
                assert saved["attn.k"] == saved["attn.v"] == c * spec.num_heads * width
                assert "attn.mask" not in saved
            elif kv_shared:
                assert "attn.k" not in saved
            else:
                assert saved["attn.k"] == c * spec.global_kv_heads * width
        # the sliding layers' 32-wide heads run GQA natively either way
        assert _saved_bytes(ops[("sliding_attention", False)]["attention"])["attn.k"] == \
            c * spec.num_kv_heads * spec.head_dim


def test_a_soft_capped_head_keeps_the_tanh_output_of_the_logits():
    c = numerics_for(WORKLOAD, params_sharded=False).compute_bytes
    spec, _, graph = _with(final_logit_softcapping=30.0)
    softcap = {op.name: op for op in graph.end_ops()}["logit_softcap"]
    assert _saved_bytes(softcap) == {"logit_softcap.tanh": c * spec.vocab_size}
    _, _, uncapped = _with(final_logit_softcapping=0.0)
    assert "logit_softcap" not in {op.name for op in uncapped.end_ops()}
