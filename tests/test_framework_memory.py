"""Per-framework memory mechanisms (planner/framework_memory.py): HF + peft QLoRA's fp32 residual
stream, DeepSpeed ZeRO-3's per-module gathering and reduce bucket; the executor's FSDP2 row unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest

from calibration.case import request_for
from calibration.cases import load_cases
from calibration.validate import validate
from planner.api import Request, predict
from planner.framework_memory import FRAMEWORK_MEMORY, DeepSpeedZero3, FrameworkMemory, framework_memory
from planner.search import Pins
from planner.specs import FRAMEWORKS
from planner.whatfits import longest_sequence

GIB = 2**30
# unsloth.ai/blog/llama3-3 (2024-12): HF + FlashAttention-2 QLoRA r32 on all linears, batch 1, gradient
# checkpointing, one 80 GB A100: Llama 3.1 8B reaches 28,000 tokens, Llama 3.3 70B 6,916
HF_FA2_MAX_TOKENS = {"llama3.1-8b": 28_000, "llama3-70b": 6_916}


@pytest.fixture(scope="module")
def cases():
    return {case.id: case for case in load_cases()}


def _memory(case, framework: str, **config) -> dict:
    case = replace(case, workload=replace(case.workload, framework=framework),
                   config=replace(case.config, **config))
    return predict(request_for(case), case.config)["memory"]


def _held(memory: dict) -> tuple:
    """What a prediction says the device holds (its interval also depends on the framework's calibration)."""
    return memory["peak_bytes"], memory["allocated_peak_bytes"], memory["breakdown"]


def test_every_framework_has_a_memory_row():
    assert set(FRAMEWORK_MEMORY) == set(FRAMEWORKS)
    # both FSDP2 per layer; only the executor runs transformers' own modeling code (torchtitan its own)
    from dataclasses import replace

    assert replace(framework_memory("executor"), transformers_modeling=False) == framework_memory("torchtitan")
    assert framework_memory("executor").transformers_modeling and framework_memory("hf").transformers_modeling


@pytest.mark.parametrize("case_id", ["c153", "c154"])
def test_hf_qlora_holds_every_checkpointed_layer_input_in_fp32(cases, case_id):
    """peft keeps the norms fp32 and bitsandbytes' Linear4bit returns its input's dtype: the residual
    stream is fp32, so at the end of the forward each checkpointed layer input takes 2 more bytes a
    value than the executor's bf16 one: layers x tokens x hidden x 2, computed from the shapes."""
    case = cases[case_id]
    hf, executor = _memory(case, "hf"), _memory(case, "executor")
    spec, tokens = case.spec, case.config.micro_batch_size * case.workload.seq_len
    expected = spec.num_layers * tokens * spec.hidden_size * 2
    assert hf["allocated_peak_bytes"] - executor["allocated_peak_bytes"] == pytest.approx(expected, rel=1e-6)


def test_hf_lora_without_quantization_is_the_executors(cases):
    """prepare_model_for_kbit_training runs for k-bit models only (trl sft_trainer.py): a bf16 LoRA
    under HF keeps bf16 norms and the executor's memory."""
    case = cases["c154"]
    lora = replace(case, workload=replace(case.workload, method="lora"))
    assert _held(_memory(lora, "hf")) == _held(_memory(lora, "executor"))


@pytest.mark.parametrize("model", sorted(HF_FA2_MAX_TOKENS))
def test_planner_fits_longest_hf_qlora_sequence_is_near_the_published_maximum(model):
    """`planner fits --framework hf` (13 % headroom): within 10 % of HF + FA2's published maxima; the
    executor's FSDP2/transformers path (bf16 norms) claims 30,720 and 9,728, 10 % and 41 % above."""
    request = Request(model=model, gpu="a100-80gb", gpus=1, seq_len=4096, method="qlora", lora_rank=32,
                      optimizer="adamw8bit", framework="hf")
    published = HF_FA2_MAX_TOKENS[model]
    longest = longest_sequence(request, Pins(), 131072)
    assert 0.9 * published <= longest <= 1.1 * published
    executor = longest_sequence(replace(request, framework="executor"), Pins(), 131072)
    assert executor > longest


def _gpt_layer_params(spec) -> tuple[float, float, float]:
    """(layer parameters, largest tensor, persistent elements) of a GPT-2 style layer: qkv, proj, fc,
    fc-out weights (12 h^2); biases and layer norms (13 h), each under DeepSpeed's 1e5 threshold here."""
    h, f = spec.hidden_size, spec.intermediate_size
    return 4 * h * h + 2 * h * f + 9 * h + f, h * f, 9 * h + f


def test_deepspeed_zero3_gathers_within_its_documented_defaults(cases):
    """c072 (GPT 529.6B, ZeRO-3 over 640 A100s, fp16): FSDP2 would hold two whole layers gathered
    (2 x 2 bytes x ~5.0e9); DeepSpeed's coordinator holds the running module and a prefetch bounded by
    stage3_prefetch_bucket_size, the root's one module, the persistent tensors and the reduce bucket."""
    case = cases["c072"]
    ds, fsdp = _memory(case, "deepspeed"), _memory(case, "executor")
    layer, largest, persistent = _gpt_layer_params(case.spec)
    defaults = DeepSpeedZero3()
    assert fsdp["breakdown"]["buffers"] >= 2 * 2 * layer
    bound = (3 * 2 * (largest + defaults.prefetch_bucket_size) + 2 * defaults.reduce_bucket_size
             + 2 * case.spec.num_layers * persistent)
    assert ds["breakdown"]["buffers"] <= bound
    assert ds["breakdown"]["buffers"] < fsdp["breakdown"]["buffers"] / 3


def test_deepspeed_below_zero3_is_the_executors(cases):
    """ZeRO 1 and 2 keep whole parameters: DeepSpeed's coordinator changes nothing there."""
    case = cases["c069"]
    for zero in (1, 2):
        assert _held(_memory(case, "deepspeed", zero=zero)) == _held(_memory(case, "executor", zero=zero))


def test_torchtitan_fused_rmsnorm_keeps_its_input_and_rstd_only(cases):
    """c028 (torchtitan 2024, llama2_13b.toml: norm_type fused_rmsnorm, no activation checkpointing):
    each of a layer's two norms keeps its bf16 input instead of an fp32 copy and the bf16 normalised
    tensor (8 bytes a hidden value less per layer), the final norm 4 less."""
    case = cases["c028"]
    assert case.workload.fused_norm and case.config.recompute == "none"
    plain = replace(case, workload=replace(case.workload, fused_norm=False))
    saved = {name: predict(request_for(c), c.config)["memory"]["breakdown"]["activations"]
             for name, c in (("fused", case), ("plain", plain))}
    spec, tokens = case.spec, case.config.micro_batch_size * case.workload.seq_len
    assert saved["plain"] - saved["fused"] == pytest.approx((8 * spec.num_layers + 4) * tokens * spec.hidden_size, rel=1e-6)
    assert not cases["c027"].workload.fused_norm  # llama3_70b.toml at that commit: rmsnorm


def test_runs_that_ran_are_predicted_to_fit(cases):
    """Before the framework mechanisms c072 (DeepSpeed ZeRO-3, 113.7 GiB of 80) and c028 (torchtitan's
    fused RMSNorm, 81.7 of 80) were among five published runs that trained but were predicted not to fit."""
    result = validate(list(cases.values()))
    failures = result["ran_but_predicted_not_to_fit"]
    assert not {"c028", "c072", "c153", "c154", "c302", "c305"} & set(failures)
    assert len(failures) <= 1


def _without_megatron_row(monkeypatch) -> None:
    """The megatron row as it was before its Megatron-Core mechanisms: the executor's memory."""
    monkeypatch.setitem(FRAMEWORK_MEMORY, "megatron", FrameworkMemory())


def test_megatron_stores_bf16_params_and_grads_and_fp32_main_params_in_the_sharded_states(cases, monkeypatch):
    """c059 (Megatron GPT-7.5B, ZeRO 1 over dp): Float16Module's bf16 parameters and the bf16 grad buffer
    are half the executor's fp32 ones; the distributed optimizer's shard holds the fp32 main parameters
    beside the two fp32 moments, 12 bytes for the executor's 8."""
    case = cases["c059"]
    megatron = predict(request_for(case), case.config)["memory"]["breakdown"]
    _without_megatron_row(monkeypatch)
    executor = predict(request_for(case), case.config)["memory"]["breakdown"]
    assert megatron["params"] == pytest.approx(executor["params"] / 2, rel=1e-9)
    assert megatron["grads"] == pytest.approx(executor["grads"] / 2, rel=1e-9)
    assert megatron["optimizer"] == pytest.approx(executor["optimizer"] * 12 / 8, rel=1e-9)


def test_megatron_memory_row_changes_memory_not_the_calibrated_time(cases, monkeypatch):
    case = cases["c302"]
    with_row = predict(request_for(case), case.config)
    _without_megatron_row(monkeypatch)
    without = predict(request_for(case), case.config)
    assert with_row["time"] == without["time"]
    assert with_row["memory"]["peak_bytes"] < 0.7 * without["memory"]["peak_bytes"]


def _memory_ops(case) -> list:
    from planner.graph import build_graph, numerics_for

    numerics = numerics_for(case.workload, False, for_memory=True)
    assert numerics.framework_layers and numerics.residual_bytes == 2 and not numerics.autocast  # Float16Module
    return [op for ops, _ in build_graph(case.spec, case.workload, numerics).kind_ops() for op in ops]


@pytest.mark.parametrize("case_id", ["c302", "c305"])
def test_megatron_fp8_linears_keep_one_byte_inputs_and_te_grouped_experts_keep_no_outputs(cases, case_id):
    """Transformer Engine's fp8 linears keep their quantized input, one byte an element; TEGroupedMLP
    applies the routing weights inside its weighted SwiGLU, so neither act(gate) nor the experts'
    outputs are kept, and TE's norms keep no fp32 copy."""
    ops = _memory_ops(cases[case_id])
    k = cases[case_id].spec.experts_per_token
    for op in ops:
        inputs = [t for t in op.saved if t.for_weight_grad]
        if op.kind == "matmul" and op.float8:
            assert [t.bytes_per_token for t in inputs] == [op.gemm[0]], op.name
        if op.kind == "experts":
            assert sorted(t.bytes_per_token for t in inputs) == sorted((k * op.gemm[0], k * op.gemm[1] // 3))
            assert not {"experts.act", "experts.down_out"} & {t.key for t in op.saved}
    assert not [t for op in ops if op.kind == "norm" for t in op.saved if t.key.endswith(".fp32")]


def test_megatron_stage_parameters_of_qwen3_30b_are_bf16_from_the_shapes(cases):
    """c302 (Qwen3-30B-A3B, pp 2, ep 8): the head's stage holds 24 layers (attention, q/k norms, two
    norms, the router, 128 / 8 routed experts), the final norm and the untied head, two bytes each."""
    case = cases["c302"]
    h, q, kv, d, e, i, v = 2048, 32 * 128, 4 * 128, 128, 128, 768, 151936
    layer = h * (q + 2 * kv) + q * h + 2 * d + 2 * h + h * e + e // 8 * 3 * h * i
    params = 24 * layer + h + v * h
    breakdown = predict(request_for(case), case.config)["memory"]["breakdown"]
    assert breakdown["params"] == pytest.approx(2 * params, rel=1e-6)


def test_megatron_precision_aware_optimizer_keeps_bf16_moments(cases):
    """c305 (DeepSeek-V3 recipe: use_precision_aware_optimizer, bf16 exp_avg and exp_avg_sq): the
    distributed optimizer's shard holds 4 + 2 + 2 bytes a parameter instead of 4 + 4 + 4."""
    case = cases["c305"]
    assert case.workload.moments_dtype == "bf16"
    fp32 = replace(case, workload=replace(case.workload, moments_dtype="fp32"))
    states = {c.workload.moments_dtype: predict(request_for(c), c.config)["memory"]["breakdown"]["optimizer"]
              for c in (case, fp32)}
    assert states["bf16"] == pytest.approx(states["fp32"] * 8 / 12, rel=1e-9)


def test_megatron_mla_up_proj_recompute_keeps_no_q_k_v_and_leaves_the_time(cases):
    """recompute_modules mla_up_proj: the core attention's q, k and v (the up-projections' outputs) are
    discarded after it and recomputed; each layer keeps (2 x 128 x 192 + 128 x 128) x 2 bytes a token less."""
    case = cases["c305"]
    assert case.workload.recompute_modules == "mla_up_proj" and case.config.recompute == "none"
    kept = replace(case, workload=replace(case.workload, recompute_modules=""))
    attention = {c.workload.recompute_modules: next(op for op in _memory_ops(c) if op.kind == "attention")
                 for c in (case, kept)}
    saved = {name: {t.key: t.bytes_per_token for t in op.saved} for name, op in attention.items()}
    dropped = set(saved[""]) - set(saved["mla_up_proj"])
    assert sum(saved[""][key] for key in dropped) == (2 * 128 * 192 + 128 * 128) * 2
    with_modules, without = (predict(request_for(c), c.config) for c in (case, kept))
    assert with_modules["time"] == without["time"]
    assert with_modules["memory"]["peak_bytes"] < without["memory"]["peak_bytes"]


def test_megatron_only_options_are_refused_elsewhere():
    from planner.errors import InvalidRequest
    from planner.specs import Workload

    for options in ({"moments_dtype": "bf16"}, {"recompute_modules": "mla_up_proj"}):
        with pytest.raises(InvalidRequest, match="--framework megatron"):
            Workload(seq_len=4096, global_batch=8, framework="torchtitan", **options)
    with pytest.raises(InvalidRequest, match="--recompute-modules entry"):
        Workload(seq_len=4096, global_batch=8, framework="megatron", recompute_modules="mla_up_proj,moe_act")
