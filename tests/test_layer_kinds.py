"""Heterogeneous stacks: per-layer kinds read from config.json, summed exactly by the cost model,
and one-line errors for configs the planner cannot read (issue 15)."""

import json

import pytest

from planner.cost.summary import RECOMPUTE_POLICIES, summarize, summarize_ops
from planner.errors import InvalidRequest
from planner.graph import build_graph, count_params, numerics_for
from planner.models import catalog, load_model, spec_from_hf_config
from planner.ops import Saved, chunk_keys_fraction, window_keys_fraction
from planner.specs import ModelSpec, Workload

WORKLOAD = Workload(seq_len=1024, global_batch=8)


def _graph(name: str, workload: Workload = WORKLOAD):
    spec = load_model(name)
    return spec, build_graph(spec, workload, numerics_for(workload, params_sharded=False))


def test_deepseek_v3_kinds_follow_first_k_dense_replace():
    spec = load_model("deepseek-v3")
    kinds = spec.layer_kinds()
    assert [(k.mlp, len(i)) for k, i in kinds] == [("dense", 3), ("sparse", 58)]
    assert kinds[0][1] == (0, 1, 2)


def test_llama4_scout_chunked_layers_and_global_layers_without_rope():
    spec = load_model("llama-4-scout")
    by_kind = {(k.attention, k.rope): len(i) for k, i in spec.layer_kinds()}
    assert by_kind == {("chunked_attention", True): 36, ("full_attention", False): 12}
    assert spec.no_rope_layers[:2] == (3, 7)


def test_gemma3_five_sliding_layers_to_one_global():
    spec = load_model("gemma-3-27b")
    assert spec.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert spec.family == "gemma3_text" and spec.sliding_window == 1024


def test_uniform_model_keeps_its_one_layer():
    spec, graph = _graph("llama3-8b")
    assert len(graph.blocks) == 1 and graph.blocks[0][1] == tuple(range(spec.num_layers))


@pytest.mark.parametrize("name", ["deepseek-v3", "tiny-moe-shared", "tiny-sliding", "llama-4-scout", "gpt-oss-20b",
                                  "tiny-gemma4", "tiny-kimi-linear", "tiny-dsa", "tiny-dsv4"])
def test_mean_layer_times_depth_is_the_sum_over_layers(name):
    """Every additive quantity of the summarised layer, times the depth, equals the sum over each
    layer's own summary."""
    spec, graph = _graph(name)
    layer, _, _ = summarize(graph)
    layer_input = Saved("layer_in", graph.numerics.residual_bytes * spec.residual_width, "sp")
    parts = [(summarize_ops(ops, False, layer_input), len(indices)) for ops, indices in graph.kind_ops()]
    L = spec.num_layers

    def close(a, b):
        assert a == pytest.approx(b, rel=1e-12)

    close(L * layer.params.total, sum(c * p.params.total for p, c in parts))
    close(L * layer.matmul_flops_per_token, sum(c * p.matmul_flops_per_token for p, c in parts))
    close(L * layer.attention_flops_per_token_seq, sum(c * p.attention_flops_per_token_seq for p, c in parts))
    for policy in RECOMPUTE_POLICIES:
        ours, theirs = layer.saved[policy], [(p.saved[policy], c) for p, c in parts]
        close(L * ours.evaluate(1.0, 1024, 1, 1), sum(c * b.evaluate(1.0, 1024, 1, 1) for b, c in theirs))
    # the kept backward steps are every kind's steps that no other step exceeds in every quantity
    kept = set(layer.backward)
    every = [step for p, _ in parts for step in p.backward]
    assert kept <= set(every)
    for step in every:
        assert any(_no_larger(step, other) for other in kept)
    assert L * layer.params.total + sum(op.params for op in graph.end_ops()) == pytest.approx(count_params(spec))


def _no_larger(step, other) -> bool:
    a, b = step.alive, other.alive
    return all(x <= y for x, y in zip(
        (a.tp, a.sp, a.none, a.seq, step.weight_params_tp, step.weight_params_rep, step.done_params_tp,
         step.done_params_rep),
        (b.tp, b.sp, b.none, b.seq, other.weight_params_tp, other.weight_params_rep, other.done_params_tp,
         other.done_params_rep)))


def test_sliding_layers_cost_their_window():
    spec, graph = _graph("tiny-sliding")
    attention = {kind.attention: next(op for op in _ops(block) if op.name == "attention")
                 for kind, _, block in graph.blocks}
    full, sliding = attention["full_attention"], attention["sliding_attention"]
    window, s = spec.sliding_window, WORKLOAD.seq_len
    assert sliding.flops_per_token_seq == pytest.approx(full.flops_per_token_seq * window_keys_fraction(window, s))
    # the fraction is the causal keys a query sees within the window over the causal keys of the sequence
    keys = sum(min(i + 1, window) for i in range(s))
    assert window_keys_fraction(window, s) == pytest.approx(keys / (s * (s + 1) / 2), rel=2 / window)
    assert window_keys_fraction(window, window) == 1.0 and chunk_keys_fraction(8192, 4096) == 1.0
    # at a sequence the window covers, every layer costs the same
    _, short = _graph("tiny-sliding", Workload(seq_len=32, global_batch=8))
    flops = {next(op for op in _ops(b) if op.name == "attention").flops_per_token_seq for _, _, b in short.blocks}
    assert len(flops) == 1


def _ops(block):
    return [block.nodes[n]["op"] for n in block.nodes]


def test_mla_attention_widths():
    spec, graph = _graph("tiny-mla")
    ops = {op.name: op for op in graph.kind_ops()[0][0]}
    heads = spec.num_heads
    assert ops["q_b_proj"].gemm == (spec.q_lora_rank, heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim))
    assert ops["kv_a_proj"].gemm == (spec.hidden_size, spec.kv_lora_rank + spec.qk_rope_head_dim)
    assert not ops["kv_a_proj"].tp_split and ops["kv_b_proj"].tp_split
    assert ops["o_proj"].gemm == (heads * spec.v_head_dim, spec.hidden_size)
    qk, v = heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim), heads * spec.v_head_dim
    assert ops["attention"].flops_per_token_seq == 2 * (qk + v)


def test_spec_round_trips_through_json():
    spec = load_model("llama-4-scout")
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.layer_kinds() == spec.layer_kinds()


def _config(**changes):
    base = dict(catalog()["tiny-sliding"]["config"])
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("config, message", [
    (_config(layer_types=["full_attention"] * 5), "layer_types lists 5 layers but num_hidden_layers is 6"),
    (_config(model_type="olmo3", sliding_window=0), "sliding_attention layers but sliding_window is not set"),
    (_config(model_type="qwen3_moe", num_experts=4, mlp_only_layers=[9]), "mlp_only_layers names layer 9"),
    (_config(model_type="deepseek_v3", first_k_dense_replace=7), "first_k_dense_replace (7) exceeds"),
    (_config(model_type="qwen3moe"), "nearest: qwen3_moe"),
    (_config(model_type="kimi_linear", linear_attn_config={"full_attn_layers": [3], "kda_layers": [1, 2]}),
     "full_attn_layers and kda_layers must name each layer 1..6 once"),
    (_config(layer_types=["linear_attention"] * 6), "linear_attention layers but model_type gemma3_text has no"),
    (_config(model_type="deepseek_v32", index_head_dim=8, n_group=1, topk_group=1), "index_head_dim (8) is smaller"),
    (_config(model_type="nemotron_h", hybrid_override_pattern="M-X"), "hybrid_override_pattern may hold only"),
    ({**catalog()["tiny-dsa"]["config"], "q_lora_rank": None}, "deepseek_v32 needs q_lora_rank"),
    ({**catalog()["tiny-dsa"]["config"], "mlp_layer_types": ["dense"]}, "mlp_layer_types lists 1 layers but"),
])
def test_unreadable_configs_get_one_line(config, message):
    with pytest.raises(InvalidRequest) as error:
        spec_from_hf_config(config, name="x", source="config.json")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name, gpus, target", [("qwen3-30b-a3b", 8, "executor"), ("deepseek-v3", 256, "deepspeed"),
                                                ("gpt-oss-20b", 8, "executor")])
def test_suggest_plans_todays_models(name, gpus, target):
    """DeepSeek-V3 needs tensor or expert parallelism (or ZeRO-3 with DeepSpeed): the executor runs
    neither for MLA/MoE families yet, so it is planned for DeepSpeed."""
    from planner.api import Request, suggest

    attention = "eager" if name.startswith("gpt-oss") else "sdpa"  # transformers runs gpt-oss's sinks eager
    result = suggest(Request(model=name, gpu="h100-sxm-80gb", gpus=gpus, seq_len=4096, global_batch=512,
                             target=target, attention=attention), top=1)
    best = result["candidates"][0]
    assert result["feasible"] > 0 and best["fits"] and result["request"]["params"] == count_params(load_model(name))


@pytest.mark.parametrize("layers, pp, vpp", [(61, 4, 1), (61, 8, 1), (4, 4, 1), (48, 4, 2), (48, 3, 4), (7, 1, 1),
                                              (126, 8, 8), (61, 8, 4), (61, 16, 1), (10, 2, 3)])
def test_stage_kind_counts_follow_the_executors_split(layers, pp, vpp):
    """A stage holds exactly the layers executor/pipeline.py gives its rank, also where the virtual
    stages do not divide the layers; the cost model's per-rank layer count is the same split's."""
    import numpy as np

    from planner.cost.candidates import Candidates
    from planner.cost.context import stage_layout
    from planner.cost.stages import kind_count
    from planner.plan import ParallelConfig
    pipeline = pytest.importorskip("executor.pipeline")
    split = pipeline.layers_per_stage(layers, pp, vpp)
    assert sorted(i for stage in split for i in stage) == list(range(layers))
    kinds = [tuple(range(3)), tuple(range(3, layers)), tuple(range(0, layers, 2))]
    layout = stage_layout(layers, Candidates.from_configs([ParallelConfig(
        dp=1, tp=1, pp=pp, vpp=vpp, micro_batch_size=1, num_micro_batches=pp * 2)]))
    for rank in range(pp):
        held = [i for stage in pipeline.stage_indices(rank, pp, vpp) for i in split[stage]]
        for indices in kinds:
            ours = kind_count(indices, layers, np.array([rank]), np.array([pp]), np.array([vpp]))
            assert int(ours[0]) == len(set(held) & set(indices))
        for role, index in layout.stage_index.items():
            if int(index[0]) == rank:
                assert int(layout.layers[role][0]) == len(held)


def test_uneven_virtual_stages_give_the_first_and_last_fewer_layers_as_megatron_does():
    """Llama 3.1 405B on pp 8 x vpp 8 (Megatron-Bridge's H100 recipe, case c301): 126 layers over 64
    virtual stages, 1 + 62 x 2 + 1 — the split account_for_embedding/loss_in_pipeline_split makes —
    written for Megatron-LM as its pipeline_model_parallel_layout."""
    from planner.api import Request, make_plan, suggest
    from planner.export import LaunchOptions, _Plan
    from planner.export_engines import megatron_arguments
    from planner.layout import stage_layers
    from planner.search import Pins

    stages = stage_layers(126, 8, 8)
    assert [len(s) for s in stages] == [1] + [2] * 62 + [1]
    request = Request(model="llama3.1-405b", gpu="h100-sxm-80gb", gpus=1024, seq_len=8192, global_batch=512,
                      target="megatron", precision="fp8")
    best = suggest(request, Pins(tp=8, pp=8, vpp=8, cp=2), top=1)["candidates"][0]
    args = megatron_arguments(_Plan(make_plan(request, best)), LaunchOptions())
    layout = args[args.index("--pipeline-model-parallel-layout") + 1]
    assert layout == "|".join(["Et"] + ["tt"] * 62 + ["tL"])
    assert "--num-layers-per-virtual-pipeline-stage" not in args


def test_each_pipeline_stage_holds_its_own_kinds():
    """tiny-mla on 4 stages: the first stage holds the dense layer only, the others a MoE layer each."""
    from planner.cost.candidates import Candidates
    from planner.cost.context import Regime, stage_layout
    from planner.cost.stages import role_layer
    from planner.cost.summary import summarize_parts
    from planner.plan import ParallelConfig

    spec, graph = _graph("tiny-mla")
    regime = Regime(graph.numerics, *summarize_parts(graph))
    layout = stage_layout(spec.num_layers, Candidates.from_configs([ParallelConfig(dp=1, tp=1, pp=4, micro_batch_size=1,
                                                                             num_micro_batches=4)]))
    (dense, _), (sparse, _) = regime.kinds
    assert role_layer(regime, layout, "first", spec.num_layers).params.total[0] == pytest.approx(dense.params.total)
    assert role_layer(regime, layout, "last", spec.num_layers).params.total[0] == pytest.approx(sparse.params.total)
    assert dense.params.total < sparse.params.total


def test_gated_deltanet_layers_grow_linearly_with_the_sequence():
    """Qwen3-Next: the linear-attention layers' FLOPs per token do not depend on the sequence; the
    full-attention layer's grow with it."""
    def per_kind(seq_len):
        _, graph = _graph("tiny-gated-deltanet", Workload(seq_len=seq_len, global_batch=8))
        ops = {kind.attention: {op.name: op for op in _ops(block)} for kind, _, block in graph.blocks}
        return ops["linear_attention"], ops["full_attention"]

    (linear_short, full_short), (linear_long, full_long) = per_kind(512), per_kind(4096)
    assert linear_short["delta_rule"].flops_per_token == linear_long["delta_rule"].flops_per_token > 0
    assert "attention" not in linear_short and linear_short["delta_rule"].flops_per_token_seq == 0
    assert full_long["attention"].flops_per_token_seq == full_short["attention"].flops_per_token_seq > 0
    spec = load_model("tiny-gated-deltanet")
    assert [kind.attention for kind, _ in spec.layer_kinds()] == ["linear_attention", "full_attention"]
    assert full_short["q_proj"].gemm == (spec.hidden_size, 2 * spec.q_dim)  # query and output gate


def test_nemotron_h_blocks_hold_one_mixer_or_one_mlp():
    """Nemotron-H: Mamba-2 blocks have no MLP and MLP blocks no mixer; the scan's FLOPs per token do
    not depend on the sequence."""
    spec = load_model("tiny-mamba2-hybrid")
    kinds = [(kind.attention, kind.mlp, len(indices)) for kind, indices in spec.layer_kinds()]
    assert kinds == [("mamba", "none", 3), ("none", "dense", 1), ("full_attention", "none", 1), ("none", "sparse", 1)]

    def ops(seq_len):
        _, graph = _graph("tiny-mamba2-hybrid", Workload(seq_len=seq_len, global_batch=8))
        return [{op.name: op for op in _ops(block)} for _, _, block in graph.blocks]

    short, long = ops(256), ops(4096)
    assert short[0]["ssd_scan"].flops_per_token == long[0]["ssd_scan"].flops_per_token > 0
    assert "down_proj" not in short[0] and "in_proj" not in short[1] and "rotary" not in short[2]
    assert short[3]["experts"].gemm == (spec.hidden_size, 2 * spec.intermediate_size)  # relu2 experts: up and down


def test_a_layer_between_runs_beside_the_largest_layer_the_stack_puts_next_to_it():
    """FSDP2 prefetches the layer below the one running its backward (planner/cost/moments.py
    NEIGHBOURS): alternating kinds (Nemotron-H's Mamba-2 and experts) never put two of the largest
    side by side; a stack that does keeps the largest as the partner; one layer has no neighbour."""
    import numpy as np

    from planner.cost.stages import _partner

    sizes = np.array([[1.0, 5.0], [10.0, 10.0]])  # kind x candidate
    largest = sizes.max(axis=0)
    assert list(_partner(sizes, largest, np.array([0, 1, 0, 1, 0]))) == [1.0, 5.0]
    assert list(_partner(sizes, largest, np.array([0, 1, 1, 0]))) == [10.0, 10.0]
    assert list(_partner(sizes, largest, np.array([1]))) == [10.0, 10.0]
