"""The planner against published measured runs (validation/cases.json): errors must not grow.

Aims (issue 2): throughput median |error| <= 15 %, memory median <= 10 % on cases with a
measured value. The thresholds below are the achieved figures plus a little room; lower them
when the model improves, never raise them to hide a regression."""

import pytest

from calibration.cases import load_cases
from calibration.validate import plausibility, predict_case, validate

from tests.conftest import SHARED_CASES


@pytest.fixture(scope="module")
def result():
    path = SHARED_CASES if SHARED_CASES.exists() else None  # the shipped copy otherwise
    return validate(load_cases(path))


def test_throughput_error(result):
    stats = result["throughput"]
    assert stats["n"] >= 70
    assert stats["median_abs"] <= 0.07
    assert stats["p90_abs"] <= 0.19


def test_memory_error(result):
    stats = result["memory"]
    assert stats["n"] >= 25
    assert stats["median_abs"] <= 0.08
    assert stats["p90_abs"] <= 0.22


def test_every_case_is_predicted_or_says_why(result):
    for row in result["rows"]:
        assert row.error or row.predicted_tokens_per_s is not None, row.case.id


def test_moai_param_guide_claims_are_flagged_impossible():
    """seeds/moai-llm-param-guide.md: the 7-13B rows need more than the MI250s' peak FLOP/s."""
    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    for case_id in ("c149", "c150", "c151"):
        flags = plausibility(cases[case_id])
        assert flags["plausible"] is False and flags["fraction_of_peak_min_flops"] > 1.0
    assert plausibility(cases["c152"])["plausible"] is True  # the 70B tutorial run is self-consistent


def test_a_memory_claim_below_what_its_configuration_holds_is_impossible():
    """torchtune's RTX 4090 LoRA row (c115) claims 16.2 GiB for Llama-3.1-8B, batch 2 x 2048 packed,
    with checkpointing: the bf16 weights (16.06 GB), the 32 layer inputs (1.07 GB) and the chunked
    bf16 logits (1.05 GB) alone are 16.9 GiB. Whatever ran, it was not that configuration; the case
    is flagged and kept out of the statistics. Every other single-device memory claim, and every
    one of our own H100 runs, is above its floor."""
    from calibration.fit import load_run_records
    from calibration.case import memory_floor_bytes

    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    c115 = cases["c115"]
    layer_inputs, logits = 32 * 2 * 2048 * 4096 * 2, 2 * 2048 * 128256 * 2
    assert memory_floor_bytes(c115) >= 2 * 8.03e9 + layer_inputs + logits
    assert "impossible memory claim" in c115.excluded and not plausibility(c115)["plausible"]
    others = [c for c in cases.values() if c.id != "c115" and c.memory_bytes and memory_floor_bytes(c)]
    runs = [c for c in load_run_records(["calibration/data/h100_runs"]) if c.memory_bytes]
    assert len(others) >= 10 and len(runs) >= 10
    for case in others + runs:
        assert memory_floor_bytes(case) < case.memory_bytes, case.id


def test_a_table_reports_one_kind_of_memory():
    """torchtune's 'Optimization flags' table reports 'Peak Memory Active' (allocated) for every
    row, including the LoRA / QLoRA rows whose own notes do not repeat it."""
    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    table = [c for c in cases.values() if "Optimization flags" in c.source and c.memory_bytes]
    assert len(table) >= 8 and {c.memory_kind for c in table} == {"allocated"}


def test_checkpointing_is_inferred_from_what_the_throughput_allows():
    """torchtune rows that do not state activation checkpointing get the recipe default (on) unless
    the claimed tokens/s would then need more than the GPU's peak: the A6000 LoRA row (4,699 tok/s
    on 8B: 6N FLOPs/token with recomputation = 146 % of peak) ran without it; the 4090 rows with it."""
    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    assert cases["c116"].config.recompute == "none"
    assert any("peak bf16" in note for note in cases["c116"].assumptions)
    assert cases["c115"].config.recompute == "full" and cases["c117"].config.recompute == "full"
    # the A6000 full fine-tune then has no room for its paged optimizer's states: not modelled
    assert cases["c114"].excluded and "paged" in cases["c114"].excluded


def test_megatron_2021_rows_materialise_their_attention_scores():
    """Narayanan et al. 2021 ran Megatron-LM's attention before FlashAttention (baddbmm,
    FusedScaleMaskSoftmax, dropout, bmm): per layer its scores cost time that grows with the
    sequence, which flash kernels never spend. Read that way, the weak-scaling table (1.7B to 1T)
    has no trend of error with model size left: the small models' lower achieved FLOP/s is the
    softmax traffic over a·s scores per token, small against 24·h² FLOPs only when h is large."""
    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    table = [c for c in cases.values() if c.source.startswith("Narayanan et al. 2021, 'Effici")]
    assert len(table) == 10 and {c.workload.attention for c in table} == {"fused-softmax"}
    assert {c.workload.attention for c in cases.values() if c.workload and "Narayanan" not in c.source} == {"sdpa"}
    errors = {c.spec.hidden_size: predict_case(c).throughput_error for c in table}
    smallest, largest = errors[min(errors)], errors[max(errors)]
    assert abs(smallest - largest) <= 0.10  # with flash-attention timing: +34 % vs -8 %


# torchtitan's benchmarks ran the same configuration in bf16 and with float8 (tensorwise) linears:
# asyncTP_llama3_h100_2025-06 (async TP columns): Llama-3.1-8B TP8 4809.4 -> 5570.1 tokens/s/GPU
# (c021 -> c022), 70B TP8 652.4 -> 942.4 (c019 -> c020); llama3_h100_202412: 8B FSDP on 8 GPUs
# with torch.compile, 6667 -> 8532 (c002 -> c003). The gain shrinks with the per-GPU GEMMs: at
# TP8 an 8B layer's GEMMs are small and casting their operands to float8 costs a larger share.
@pytest.mark.parametrize("bf16_id, fp8_id", [("c021", "c022"), ("c019", "c020"), ("c002", "c003")])
def test_float8_speedups_follow_the_published_ones(bf16_id, fp8_id):
    cases = {c.id: c for c in load_cases()}
    bf16, fp8 = predict_case(cases[bf16_id]), predict_case(cases[fp8_id])
    predicted = fp8.predicted_tokens_per_s / bf16.predicted_tokens_per_s
    measured = fp8.case.tokens_per_s_per_device / bf16.case.tokens_per_s_per_device
    # 8B TP8 is the farthest: 1.30 vs 1.16 (1.27 before torchtitan had factors of its own; each of
    # the two runs' errors fell, c021 +7 % -> +1 %, c022 +18 % -> +13 %, the bf16 one more)
    assert predicted == pytest.approx(measured, rel=0.12)


def test_fsdp_scaling_from_8_to_512_gpus_follows_llm_foundrys():
    """llm-foundry's H100 tables, MPT-7b at sequence 2048 and micro-batch 6 under FSDP: 10643
    tokens/s/GPU on 8 GPUs (c038), 9670 on 512 (c032). A ring over 512 ranks takes 511 steps per
    gather; their latency (links.*.latency_s, fitted) decides what the scale-out costs. With the
    hand-set 10 / 20 us per step the prediction lost 39 %, not 9 %."""
    cases = {c.id: c for c in load_cases()}
    small, large = predict_case(cases["c038"]), predict_case(cases["c032"])
    predicted = large.predicted_tokens_per_s / small.predicted_tokens_per_s
    measured = large.case.tokens_per_s_per_device / small.case.tokens_per_s_per_device
    assert predicted == pytest.approx(measured, rel=0.2)
