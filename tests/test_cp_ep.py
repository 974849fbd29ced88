"""Context parallelism (cp) and expert parallelism (ep): the physics of the cost model, the rules,
the search and pins, what each engine runs, and the exports."""

import json
from dataclasses import replace
import subprocess
import sys

import pytest

from planner.api import Request, make_plan, predict, resolve, suggest
from planner.capabilities import runnable_reason
from planner.cost import comm
from planner.cost.candidates import Candidates
from planner.cost.cpep import ep_seconds
from planner.errors import Infeasible, InvalidRequest
from planner.layout import ParallelConfig
from planner.search import Pins

H100 = "h100-sxm-80gb"


def config(dp, cp=1, ep=1, tp=1, pp=1, global_batch=8, micro=1, **options) -> ParallelConfig:
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=micro, num_micro_batches=global_batch // (dp * micro),
                          cp=cp, ep=ep, **options)


def llama_long(seq_len=32768, gpus=8, global_batch=8, **kw) -> Request:
    return Request(model="llama3-8b", gpu=H100, gpus=gpus, seq_len=seq_len, global_batch=global_batch, **kw)


def mixtral(gpus=16, **kw) -> Request:
    return Request(model="mixtral-8x7b", gpu=H100, gpus=gpus, seq_len=4096, global_batch=256, target="megatron", **kw)


# ---- physics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cp", [2, 4, 8])
def test_activation_memory_falls_as_one_over_cp(cp):
    """The same 8 devices, a sequence split over cp ranks: saved activations and logits per rank
    are those of seq_len / cp tokens (the ring's backward buffers are not activations)."""
    one = predict(llama_long(), config(dp=8, zero=3, recompute="none", global_batch=8))
    split = predict(llama_long(), config(dp=8 // cp, cp=cp, zero=3, recompute="none", global_batch=8))
    ratio = split["memory"]["breakdown"]["activations"] / one["memory"]["breakdown"]["activations"]
    assert ratio == pytest.approx(1 / cp, rel=0.02)
    logits = split["memory"]["breakdown"]["logits"] / one["memory"]["breakdown"]["logits"]
    assert logits == pytest.approx(1 / cp, rel=0.02)
    # FSDP shards over dp x cp = 8 ranks either way: the same parameter bytes per rank
    assert split["memory"]["breakdown"]["params"] == one["memory"]["breakdown"]["params"]


def test_cp_adds_ring_traffic_and_rescaling_work():
    one = predict(llama_long(), config(dp=8, zero=3))["time"]["breakdown"]
    ring = predict(llama_long(), config(dp=2, cp=4, zero=3))["time"]["breakdown"]
    assert one["cp_comm"] == 0 and ring["cp_comm"] > 0
    # per-rank compute is a quarter of the tokens with four times the micro-batches: about the same,
    # plus the softmax rescaling per ring step
    assert ring["compute"] > one["compute"]
    assert ring["compute"] < 1.1 * one["compute"]


def test_cp_ring_grows_with_cp_and_crosses_nodes():
    """cp 8 on one node (NVLink) against cp 16 over two nodes, same per-rank shard of a 128k sequence."""
    within = predict(llama_long(131072, gpus=8), config(dp=1, cp=8, zero=3, recompute="full"))
    across = predict(llama_long(131072, gpus=16, global_batch=16),
                     config(dp=1, cp=16, zero=3, recompute="full", global_batch=16))
    assert across["time"]["breakdown"]["cp_comm"] > within["time"]["breakdown"]["cp_comm"]


def test_ep_divides_the_expert_parameters():
    """Mixtral, no ZeRO: each rank holds 1/ep of the routed experts' fp32 weights; the dense parts
    (attention, router, norms, embedding, head) stay whole."""
    request = mixtral(gpus=8)
    spec = resolve(request).spec
    expert_params = spec.num_layers * spec.num_experts * 3 * spec.hidden_size * spec.intermediate_size
    base = dict(tp=1, pp=1, zero=0, offload="none", global_batch=256, micro=1)
    whole = predict(request, config(dp=8, ep=1, **base))["memory"]["breakdown"]
    split = predict(request, config(dp=8, ep=8, **base))["memory"]["breakdown"]
    assert whole["params"] - split["params"] == pytest.approx(4 * expert_params * (1 - 1 / 8), rel=1e-9)
    # AdamW's two fp32 moments follow the weights (the foreach temporaries may add at the step)
    assert whole["optimizer"] - split["optimizer"] >= 8 * expert_params * (1 - 1 / 8) * (1 - 1e-9)


def test_ep_under_fsdp_keeps_the_shard_and_shrinks_the_gathered_layer():
    """ZeRO 3 shards expert weights over dp x cp / ep ranks of 1/ep of them: the stored share is the
    same, but a layer's all-gathered copy holds only the rank's experts."""
    request = mixtral(gpus=8)
    base = dict(tp=1, pp=1, zero=3, offload="none", global_batch=256, micro=1, recompute="full")
    whole = predict(request, config(dp=8, ep=1, **base))["memory"]
    split = predict(request, config(dp=8, ep=8, **base))["memory"]
    assert split["breakdown"]["params"] == pytest.approx(whole["breakdown"]["params"], rel=1e-9)
    assert split["peak_bytes"] < whole["peak_bytes"]


def test_all_to_all_crosses_nodes_when_ep_exceeds_a_node():
    """ep 8 x tp 1 fits a node of 8 (NVLink); ep 16 spans two: the half of each rank's buffer bound
    for the other node crosses the network, far slower per byte (tests/test_moe_cost.py has the rest)."""
    r = resolve(mixtral(gpus=16))
    ctx, regime = r.context, r.context.regime(False)
    c = Candidates.from_configs([config(dp=8, ep=8, global_batch=256), config(dp=16, ep=16, global_batch=256)])
    c.dp[1], c.num_micro_batches[1] = 16, 16
    seconds = ep_seconds(ctx, regime, c)
    intra, _ = comm.link_bandwidth(ctx.cluster, ctx.profile, c.ep[:1] * c.tp[:1])
    inter, _ = comm.link_bandwidth(ctx.cluster, ctx.profile, c.ep[1:] * c.tp[1:])
    assert inter[0] < intra[0]
    # the same bytes per rank: 7/8 of them over NVLink for ep 8, 8/16 over the network for ep 16
    assert seconds[1] > 0.9 * seconds[0] * (8 / 16) / (7 / 8) * intra[0] / inter[0]


def test_imbalance_from_the_profile_slows_the_experts():
    request = mixtral(gpus=8)
    base = dict(tp=1, pp=1, zero=1, global_batch=256, micro=1, recompute="full")
    one = predict(request, config(dp=8, ep=1, **base))["time"]["breakdown"]
    eight = predict(request, config(dp=8, ep=8, **base))["time"]["breakdown"]
    assert one["ep_comm"] == 0 and eight["ep_comm"] > 0
    profile = resolve(request).context.profile
    assert profile.expert_imbalance() >= 1.0


# ---- rules and pins ----------------------------------------------------------------------------

@pytest.mark.parametrize("request_, cfg, words", [
    (llama_long(4098), config(dp=4, cp=2), "2 x cp"),
    (llama_long(), config(dp=8, ep=2), "dense model"),
    (mixtral(gpus=16), config(dp=4, tp=4, ep=8, global_batch=256), "does not divide dp x cp"),
    (llama_long(attention="eager"), config(dp=4, cp=2), "sdpa"),
])
def test_invalid_cp_ep_configurations_say_what_to_change(request_, cfg, words):
    with pytest.raises(InvalidRequest, match=words):
        predict(request_, cfg)


def test_pinned_ep_must_divide_the_experts():
    with pytest.raises(InvalidRequest, match="routed experts"):
        suggest(mixtral(), Pins(ep=3))


def test_pins_hold_for_every_candidate():
    result = suggest(mixtral(), Pins(ep=4, cp=2), top=5)
    assert result["candidates"] and all(c["config"]["ep"] == 4 and c["config"]["cp"] == 2
                                        for c in result["candidates"])
    single = predict(mixtral(), config(dp=4, cp=2, ep=8, tp=2, global_batch=256, zero=1))
    assert single["config"]["cp"] == 2 and single["config"]["ep"] == 8


def test_search_offers_cp_only_where_the_sequence_divides():
    result = suggest(llama_long(seq_len=4096 * 3, target="torchtitan"), top=20)
    assert all(12288 % (2 * c["config"]["cp"]) == 0 for c in result["candidates"])


# ---- acceptance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["executor", "torchtitan"])
def test_llama3_8b_at_128k_on_8_h100_plans_context_parallelism(target):
    """The issue's command, under the default target (the executor) and torchtitan."""
    command = [sys.executable, "-m", "planner.cli", "suggest", "--model", "llama3-8b", "--gpu", H100, "--gpus", "8",
               "--seq-len", "131072", "--global-batch", "8", "--target", target, "--json"]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["candidates"][0]["fits"] and result["candidates"][0]["config"]["cp"] >= 2
    assert all({"cp", "ep"} <= set(c["config"]) for c in result["candidates"])


def test_executor_refuses_cp_on_cpu_naming_the_op_that_refuses():
    """torch 2.13's ring attention has no CPU SDPA handler (tests/executor/test_context_parallel.py
    shows torch refusing): a CPU plan with cp is refused with one line, a GPU plan is not."""
    gpu = resolve(llama_long())
    assert runnable_reason("executor", config(dp=1, cp=8), gpu.spec, gpu.workload, gpu.hardware) is None
    cpu = resolve(Request(model="llama3.2-1b", gpu="cpu", gpus=2, seq_len=1024, global_batch=2))
    reason = runnable_reason("executor", config(dp=1, cp=2, global_batch=2), cpu.spec, cpu.workload, cpu.hardware)
    assert "_scaled_dot_product_flash_attention_for_cpu" in reason and "--cp 1" in reason and "\n" not in reason
    assert all(c["config"]["cp"] == 1 for c in suggest(Request(model="llama3.2-1b", gpu="cpu", gpus=4, seq_len=1024,
                                                               global_batch=4), top=20)["candidates"])


def test_executor_refuses_cp_where_its_ring_attention_would_change_the_model():
    """Full causal attention only (a sliding window shorter than the sequence would be dropped), and no pp."""
    r = resolve(llama_long())
    assert "--cp 1" in runnable_reason("executor", config(dp=1, cp=4, pp=2), r.spec, r.workload, r.hardware)
    windowed = replace(r.spec, hf_config={**r.spec.hf_config, "sliding_window": 4096})
    assert "full causal" in runnable_reason("executor", config(dp=8 // 2, cp=2), windowed, r.workload, r.hardware)
    assert runnable_reason("executor", config(dp=4, cp=2), replace(r.spec, hf_config={**r.spec.hf_config,
                           "sliding_window": 65536}), r.workload, r.hardware) is None


def test_mixtral_on_16_h100_has_expert_parallel_plans_among_the_best():
    best = suggest(mixtral(), top=5)["candidates"]
    assert any(c["config"]["ep"] > 1 for c in best)


@pytest.mark.parametrize("target, cp, ep, refused", [
    ("deepspeed", 2, 1, "Ulysses"), ("deepspeed", 1, 2, "expert"), ("accelerate", 1, 2, "expert"),
    ("accelerate", 2, 1, "FSDP2"), ("executor", 1, 2, "expert parallelism"),
])
def test_engines_refuse_what_they_cannot_run(target, cp, ep, refused):
    r = resolve(mixtral())
    reason = runnable_reason(target, config(dp=16 // cp, cp=cp, ep=ep, global_batch=256, zero=1), r.spec,
                             r.workload, r.hardware)
    assert reason is not None and refused in reason


def test_megatron_and_torchtitan_run_cp_and_ep():
    r = resolve(mixtral())
    assert runnable_reason("megatron", config(dp=4, tp=2, cp=2, ep=8, global_batch=256, zero=1), r.spec, r.workload,
                           r.hardware) is None
    llama = resolve(llama_long(target="torchtitan"))
    assert runnable_reason("torchtitan", config(dp=2, cp=4, zero=3), llama.spec, llama.workload, llama.hardware) is None


def test_exports_carry_cp_and_ep():
    from planner.export import LaunchOptions, _Plan
    from planner.export_engines import accelerate_config, megatron_arguments, torchtitan_settings

    request = mixtral()
    best = suggest(request, Pins(cp=2, ep=8, tp=2), top=1)["candidates"][0]
    args = megatron_arguments(_Plan(make_plan(request, best)), LaunchOptions())
    values = dict(zip(args, args[1:]))
    assert values["--context-parallel-size"] == "2" and values["--expert-model-parallel-size"] == "8"

    llama = llama_long(131072, target="torchtitan")
    plan = make_plan(llama, suggest(llama, Pins(cp=8), top=1)["candidates"][0])
    assert torchtitan_settings(_Plan(plan), LaunchOptions())["parallelism"]["context_parallel_degree"] == 8

    acc = llama_long(131072, target="accelerate")
    plan = make_plan(acc, suggest(acc, Pins(cp=8), top=1)["candidates"][0])
    assert accelerate_config(_Plan(plan))["parallelism_config"]["parallelism_config_cp_size"] == 8


def test_even_cp_with_an_even_micro_batch_is_never_better():
    """Why the search skips (cp, b) both even: (cp / 2, b / 2) with twice the dp gives each rank the
    same tokens and micro-batches with a shorter ring (planner/search.py)."""
    request = llama_long(32768, global_batch=16, target="torchtitan")
    skipped = predict(request, config(dp=2, cp=4, micro=2, global_batch=16, zero=3, recompute="full"))
    kept = predict(request, config(dp=4, cp=2, micro=1, global_batch=16, zero=3, recompute="full"))
    assert kept["time"]["step_s"] <= skipped["time"]["step_s"]
    assert kept["memory"]["peak_bytes"] <= skipped["memory"]["peak_bytes"]


def test_deepep_runs_under_megatron_only_and_its_export_names_the_flex_dispatcher():
    """The executor, DeepSpeed, Accelerate and the torchtitan export have no DeepEP dispatch; Megatron-Core
    runs it as its flex dispatcher (--moe-token-dispatcher-type flex --moe-enable-deepep)."""
    from planner.export import LaunchOptions, _Plan
    from planner.export_engines import megatron_arguments

    r = resolve(mixtral(expert_dispatcher="deepep"))
    cfg = config(dp=16, ep=8, global_batch=256, zero=1)
    for target in ("executor", "deepspeed", "accelerate"):
        reason = runnable_reason(target, cfg, r.spec, r.workload, r.hardware)
        assert reason is not None and "DeepEP" in reason, target
    llama = resolve(llama_long(expert_dispatcher="deepep", target="torchtitan"))  # torchtitan ships no Mixtral
    reason = runnable_reason("torchtitan", config(dp=8, zero=3), llama.spec, llama.workload, llama.hardware)
    assert reason is not None and "DeepEP" in reason
    assert runnable_reason("megatron", cfg, r.spec, r.workload, r.hardware) is None
    request = mixtral(expert_dispatcher="deepep")
    best = suggest(request, Pins(ep=8), top=1)["candidates"][0]
    args = megatron_arguments(_Plan(make_plan(request, best)), LaunchOptions())
    assert args[args.index("--moe-token-dispatcher-type") + 1] == "flex" and "--moe-enable-deepep" in args


def test_an_unknown_dispatcher_is_refused_with_the_choices():
    with pytest.raises(InvalidRequest, match="alltoall"):
        resolve(mixtral(expert_dispatcher="nccl"))
