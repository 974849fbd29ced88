"""The mixture-of-experts costs: grouped-GEMM efficiency at the per-expert token count, the
all-to-all's links, the MoE block's host overhead and memory passes, and their fitted parameters."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from calibration.cases import Case, _planner_ep
from calibration.fitting import MOE_PARAMETERS, time_parameters
from calibration.scope import Scope
from planner.api import Request, resolve
from planner.cost.candidates import Candidates
from planner.cost.compute import expert_gemm_efficiency, gemm_efficiency, moe_share, part_times
from planner.cost.cpep import all_to_all_seconds, ep_seconds
from planner.graph import build_graph
from planner.layout import ParallelConfig
from planner.profile import Profile

H100 = "h100-sxm-80gb"


def qwen3_moe(gpus=8, **kw) -> Request:
    return Request(model="qwen3-30b-a3b", gpu=H100, gpus=gpus, seq_len=4096, global_batch=256, target="megatron", **kw)


def config(dp, ep=1, tp=1, micro=1, global_batch=256) -> ParallelConfig:
    return ParallelConfig(dp=dp, tp=tp, pp=1, micro_batch_size=micro, num_micro_batches=global_batch // (dp * micro),
                          ep=ep, zero=1)


def experts_matmul(ctx):
    return next(m for m in ctx.regime(False).layer.matmuls if m.name == "experts")


def test_fewer_tokens_per_expert_make_slower_grouped_gemms():
    """Per-expert GEMMs at a few tokens are far from the peak; at many tokens they approach it."""
    ctx = resolve(qwen3_moe()).context
    params = ctx.compute_params
    matmul = experts_matmul(ctx)
    tokens = np.array([16.0, 128.0, 1024.0, 8192.0])
    eff = expert_gemm_efficiency(matmul, ctx.spec.gated_mlp, tokens, params)
    assert np.all(np.diff(eff) > 0)
    assert eff[0] < 0.5 * params.matmul_efficiency_max < eff[-1]


def test_expert_gemms_are_costed_at_their_own_shapes_not_as_one_fused_gemm():
    """gate_up (h -> 2i) and down (i -> h) are two GEMMs, each smaller than their sum: less efficient
    than one GEMM of the summed size would be."""
    ctx = resolve(qwen3_moe()).context
    params, matmul = ctx.compute_params, experts_matmul(ctx)
    tokens = np.array([256.0])
    fused = gemm_efficiency(2 * tokens * matmul.in_features * matmul.out_features, params.matmul_efficiency_max,
                            params.matmul_half_flops)
    assert expert_gemm_efficiency(matmul, True, tokens, params)[0] < fused[0]


def test_a_smaller_micro_batch_lowers_the_expert_throughput():
    """Halving the tokens of a micro-batch halves each expert's rows: the experts' seconds per token rise."""
    r = resolve(qwen3_moe())
    ctx, layer = r.context, r.context.regime(False).layer
    c = Candidates.from_configs([config(dp=8, ep=8, micro=1), config(dp=8, ep=8, micro=4)])
    no_overhead = Profile("t", "(test)", copy.deepcopy(ctx.profile.data))
    for key in ("layer_overhead_s",):
        for entry in no_overhead.data["compute"].values():
            for dtype in entry.values():
                dtype.pop(key, None)
        no_overhead.data["compute"]["default"]["*"][key] = 0.0
    times = part_times(ctx.with_profile(no_overhead), layer, c)
    per_token = times.forward / c.micro_batch_size
    assert per_token[0] > per_token[1]


def test_all_to_all_inside_a_node_uses_nvlink_only():
    ctx = resolve(qwen3_moe(gpus=16)).context
    hw, intra = ctx.cluster.hardware, ctx.profile.link("intra")
    nbytes = np.array([1e9])
    seconds = all_to_all_seconds(ctx, nbytes, np.array([8]), np.array([1]))
    expected = nbytes * 7 / 8 / (hw.intra_node_bandwidth_bytes_per_s * intra.efficiency)
    assert seconds[0] == pytest.approx(expected[0], rel=0.01)


def test_all_to_all_crossing_nodes_pays_the_network_for_the_remote_share():
    """ep 16 over two nodes of 8: half of each rank's buffer goes to the other node over the network
    (at its bandwidth), the in-node share over NVLink beside it; ep 8 with tp 2 spans two nodes too."""
    ctx = resolve(qwen3_moe(gpus=16)).context
    hw, inter = ctx.cluster.hardware, ctx.profile.link("inter")
    network_bytes_per_s = hw.inter_node_bandwidth_bytes_per_s * inter.efficiency
    nbytes = np.array([1e9, 1e9, 1e9])
    seconds = all_to_all_seconds(ctx, nbytes, np.array([8, 16, 8]), np.array([1, 1, 2]))
    remote = nbytes[1] * 8 / 16 / network_bytes_per_s
    assert seconds[1] >= remote and seconds[1] < 1.05 * remote + 1e-3
    assert seconds[1] > 1.5 * seconds[0]  # the network is the slower link
    assert seconds[2] >= nbytes[2] * 4 / 8 / network_bytes_per_s  # 4 of the 8 ep ranks in the other node


def test_ep_traffic_grows_with_the_imbalance_and_only_moe_layers_pay_it():
    r = resolve(qwen3_moe())
    ctx, regime = r.context, r.context.regime(False)
    c = Candidates.from_configs([config(dp=8, ep=8)])
    data = copy.deepcopy(ctx.profile.data)
    data["moe"]["expert_imbalance"] = 1.0
    balanced = ep_seconds(ctx.with_profile(Profile("t", "(test)", data)), regime, c)
    data["moe"]["expert_imbalance"] = 1.5
    skewed = ep_seconds(ctx.with_profile(Profile("t", "(test)", data)), regime, c)
    assert skewed[0] == pytest.approx(1.5 * balanced[0], rel=0.02)
    deepseek = resolve(Request(model="deepseek-v3", gpu=H100, gpus=64, seq_len=4096, global_batch=512)).context
    assert moe_share(deepseek.regime(False).layer) == pytest.approx(58 / 61)  # its first 3 layers are dense


def test_moe_overhead_factor_adds_host_time_to_moe_layers_only():
    r = resolve(qwen3_moe())
    ctx, layer = r.context, r.context.regime(False).layer
    c = Candidates.from_configs([config(dp=8, ep=8)])
    data = copy.deepcopy(ctx.profile.data)
    data["moe"]["overhead_factor"] = 0.0
    without = part_times(ctx.with_profile(Profile("t", "(test)", data)), layer, c)
    data["moe"]["overhead_factor"] = 4.0
    with_it = part_times(ctx.with_profile(Profile("t", "(test)", data)), layer, c)
    expected = 4.0 * ctx.compute_params.layer_overhead_s
    assert with_it.forward[0] - without.forward[0] == pytest.approx(expected, rel=1e-6)
    assert with_it.backward[0] - without.backward[0] == pytest.approx(2 * expected, rel=1e-6)
    dense = resolve(Request(model="llama3-8b", gpu=H100, gpus=8, seq_len=4096, global_batch=64)).context
    assert moe_share(dense.regime(False).layer) == 0


def test_the_moe_block_moves_its_permutation_and_routing_through_memory():
    r = resolve(qwen3_moe())
    spec = r.context.spec
    graph = build_graph(spec, r.context.workload, r.context.regime(False).numerics)
    ops = {op.name: op for ops, _ in graph.kind_ops() for op in ops}
    c, h, k, e = 2, spec.hidden_size, spec.experts_per_token, spec.num_experts
    assert ops["experts"].io_bytes_per_token >= (3 * k + 1) * c * h  # permute (k copies), unpermute
    assert ops["router"].io_bytes_per_token >= 4 * e  # softmax's fp32 probabilities


def test_moe_parameters_are_fitted_with_priors():
    paths = {p.path for p in time_parameters(Scope({}, (), (), True))}
    assert {("moe", "expert_imbalance"), ("moe", "overhead_factor")} <= paths
    imbalance = next(p for p in MOE_PARAMETERS if p.path[-1] == "expert_imbalance")
    assert imbalance.lower == 1.0 and imbalance.prior_sigma > 0


def test_megatron_expert_tp_below_tp_folds_into_the_planners_ep():
    case = Case(id="x", source="s", model="m")
    assert _planner_ep({"tp": 2, "ep": 8, "etp": 1}, case) == 4
    assert case.assumptions and "ep 4" in case.assumptions[0]
    assert _planner_ep({"tp": 2, "ep": 8}, Case(id="y", source="s", model="m")) == 8


@pytest.mark.parametrize("framework, float8", [("megatron", True), ("torchtitan", False)])
def test_fp8_runs_the_grouped_experts_in_float8_only_under_transformer_engine(framework, float8):
    """Megatron-Core's fp8 covers TEGroupedLinear; torchao's Float8Linear swap converts nn.Linear only."""
    ctx = resolve(Request(model="qwen3-30b-a3b", gpu=H100, gpus=8, seq_len=4096, global_batch=256,
                          precision="fp8", framework=framework)).context
    assert experts_matmul(ctx).float8 is float8


def test_float8_experts_cast_every_local_expert():
    """A grouped GEMM casts all its local experts' weights: 16 local experts cast 16 times one's bytes."""
    from planner.cost.compute import float8_cast_bytes

    ctx = resolve(qwen3_moe()).context
    matmul = experts_matmul(ctx)
    one = float8_cast_bytes(matmul, np.array([0.0]), np.array([1]), False, 1)
    sixteen = float8_cast_bytes(matmul, np.array([0.0]), np.array([1]), False, 16)
    assert sixteen[0][0] == pytest.approx(16 * one[0][0]) and sixteen[1][0] == pytest.approx(16 * one[1][0])


def test_moe_parameters_move_only_the_runs_of_moe_models():
    from calibration.cases import load_cases
    from calibration.fitting import prepare
    from calibration.scope import runs_of_parameter
    from planner.profile import load_profile

    prepared = prepare([c for c in load_cases() if c.id in ("c001", "c306")], load_profile())
    assert [p.case.id for p in runs_of_parameter(("moe", "overhead_factor"), prepared)] == ["c306"]
    assert len(runs_of_parameter(("overlap", "tp"), prepared)) == 2


def _llama4_graph(framework: str):
    from planner.graph import numerics_for
    from planner.models import load_model
    from planner.specs import Workload

    spec = load_model("llama-4-scout")
    workload = Workload(seq_len=4096, global_batch=16, framework=framework)
    return spec, build_graph(spec, workload, numerics_for(workload, params_sharded=True))


def _experts_op(graph):
    return next(op for ops, _ in graph.kind_ops() for op in ops if op.name == "experts")


def test_transformers_llama4_runs_every_expert_on_every_token_and_mfu_counts_the_top_k():
    """modeling_llama4.py Llama4TextMoe: `hidden_states.repeat(num_experts, 1) * scores` then a bmm over
    all experts. Under the frameworks that run transformers' modeling code (executor, hf) the experts
    cost 16x the top-1 FLOPs and keep E copies of each token; torchtitan's own Llama 4 routes top-k.
    MFU counts the model's FLOPs (top k) either way."""
    spec, hf = _llama4_graph("executor")
    _, titan = _llama4_graph("torchtitan")
    dense, routed = _experts_op(hf), _experts_op(titan)
    assert spec.expert_dispatch == "dense" and (spec.num_experts, spec.experts_per_token) == (16, 1)
    assert dense.params == routed.params
    assert dense.flops_per_token == routed.flops_per_token * spec.num_experts
    saved = {s.key: s.bytes_per_token for s in dense.saved}
    assert saved["experts.repeated"] == saved["experts.in"] == 2 * spec.hidden_size * spec.num_experts
    from planner.api import Request, predict
    from planner.layout import ParallelConfig as Config

    layout = Config(dp=64, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4, zero=3, recompute="full")
    runs = {fw: predict(Request(model="llama-4-scout", gpu=H100, gpus=64, seq_len=4096, global_batch=256,
                                framework=fw, target="deepspeed"), layout) for fw in ("hf", "torchtitan")}
    assert runs["hf"]["memory"]["peak_bytes"] > runs["torchtitan"]["memory"]["peak_bytes"]
    compute = {fw: r["time"]["breakdown"]["compute"] for fw, r in runs.items()}
    assert compute["hf"] > 3 * compute["torchtitan"]
    hf_mfu_per_token = runs["hf"]["time"]["mfu"] / runs["hf"]["time"]["tokens_per_s"]
    titan_mfu_per_token = runs["torchtitan"]["time"]["mfu"] / runs["torchtitan"]["time"]["tokens_per_s"]
    assert hf_mfu_per_token == pytest.approx(titan_mfu_per_token, rel=1e-6)  # same model FLOPs per token


def _brute_force_ranks_reached(num_experts: int, top_k: int, ep: int) -> float:
    from itertools import combinations
    choices = list(combinations(range(num_experts), top_k))
    per_rank = num_experts // ep
    return sum(len({e // per_rank for e in chosen}) for chosen in choices) / len(choices)


@pytest.mark.parametrize("num_experts, top_k, ep", [(8, 2, 4), (16, 4, 4), (12, 3, 2), (8, 8, 8), (16, 2, 16)])
def test_deepep_reaches_each_rank_once_per_token_on_average_as_enumerated(num_experts, top_k, ep):
    """The mean number of distinct ep ranks a token's k experts live on, against every k-subset."""
    from planner.cost.cpep import ranks_reached_per_token
    expected = _brute_force_ranks_reached(num_experts, top_k, ep)
    assert ranks_reached_per_token(num_experts, top_k, np.array([ep]))[0] == pytest.approx(expected)


def test_deepep_sends_a_token_once_per_rank_not_once_per_expert():
    """Qwen3-30B-A3B (128 experts, top 8) at ep 8: DeepEP's dispatch moves 5.34 copies of a token
    (the ranks reached) where the all-to-all dispatcher moves 8; the sort of received copies does not
    shrink (each local expert still gets its copy)."""
    from planner.cost.cpep import ranks_reached_per_token
    c = Candidates.from_configs([config(dp=8, ep=8, micro=4, global_batch=256)])

    def comm_and_sort(dispatcher: str) -> tuple[float, float]:
        ctx = resolve(qwen3_moe(expert_dispatcher=dispatcher)).context
        data = copy.deepcopy(ctx.profile.data)
        data["overlap"]["ep"] = 0.0
        ctx = ctx.with_profile(Profile("t", "(test)", data))
        return ep_seconds(ctx, ctx.regime(False), c)[0], ctx
    alltoall, ctx = comm_and_sort("alltoall")
    deepep, _ = comm_and_sort("deepep")
    reached = ranks_reached_per_token(128, 8, np.array([8]))[0]
    assert reached == pytest.approx(5.34, abs=0.01)
    w, spec = ctx.workload, ctx.spec
    token_bytes = 4 * w.seq_len * spec.hidden_size * 2 * ctx.profile.expert_imbalance()
    a2a = lambda copies: all_to_all_seconds(ctx, np.array([token_bytes * copies]), np.array([8]), np.array([1]))[0]
    assert alltoall - deepep == pytest.approx(moe_share(ctx.regime(False).layer) * (a2a(8) - a2a(reached)), rel=1e-6)


def test_transformers_llama4_expert_backward_frees_as_autograd_does():
    """Llama4TextExperts' backward runs its nodes in turn (the down bmm, act(gate) * up, silu, the
    gate_up bmm): the product is freed before act(gate) * up's backward allocates its three E·T·I
    gradients, and only down_proj's gradient (a third of the experts' weights) exists by then; the
    gate_up bmm makes the rest once act(gate) and gate_up are freed. One step holding every saved
    tensor with every gradient at once would over-count the peak by the product, gate_up_proj's
    gradient and a gradient of width H (the oracle's two Llama 4 points: +7 and +12 %)."""
    from planner.cost.summary import backward_steps
    from planner.ops import Saved

    spec, hf = _llama4_graph("executor")
    ops = next(ops for ops, _ in hf.kind_ops())
    steps = [s for s in backward_steps(ops, Saved("layer_in", 2 * spec.hidden_size, "sp")) if s.name == "experts"]
    experts = _experts_op(hf)
    c, e, h, i = 2, spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert [s.weight_share for s in steps] == pytest.approx([1 / 3, 0, 2 / 3, 0])
    # the shared expert runs after the experts in the forward, so its whole backward comes first
    assert steps[0].done_params_tp == 3 * spec.hidden_size * spec.shared_expert_intermediate_size
    assert sum(s.weight_params_tp for s in steps) == pytest.approx(experts.params)
    assert steps[1].done_params_tp - steps[0].done_params_tp == pytest.approx(experts.params / 3)
    down, act_mul, gate_up = (s.alive.tp + s.alive.sp for s in steps[:3])
    # down: + the gradients of the sum (copied, E·T·H) and of the product (E·T·I); act_mul: the product
    # freed, + three E·T·I gradients; gate_up: act and gate_up freed, + gate_up's gradient and the input's
    assert act_mul - down == pytest.approx(c * e * i * (3 - 1 - 1) - c * e * h)
    assert gate_up - act_mul == pytest.approx(c * e * (2 * i + h) - c * e * 3 * i - c * e * 3 * i)


def test_dense_expert_weights_under_expert_parallelism_count_the_ranks_share_once():
    """The experts' weight gradients, made over several backward steps, are the rank's 1/ep of them
    in total (planner/cost/memory.py _backward_steps), as a single step's are."""
    from planner.cost.memory import _backward_steps
    from planner.cost.summary import summarize_parts

    _, hf = _llama4_graph("executor")
    part = summarize_parts(hf)[3][0][0]
    experts = _experts_op(hf).params
    gone = experts * (1 - 1 / 4)  # ep 4
    steps = _backward_steps(part, 1, gone, lambda alive: 0.0)
    names = [s.name for s in part.backward]
    first, last = names.index("experts"), len(names) - 1 - names[::-1].index("experts")
    made = sum(steps[j][1] for j in range(first, last + 1))
    assert made == pytest.approx(experts / 4)
    assert steps[last + 1][2] - steps[first][2] == pytest.approx(experts / 4)
