"""Step-time mechanisms of planner/cost/estimate.py checked against their definitions."""

import json

import pytest

from planner.api import Request, predict
from planner.plan import ParallelConfig
from planner.profile import DEFAULT_PROFILE

# Llama-3-8B on 8 H100 with ZeRO-3: the per-layer gathers and reduce-scatters are shorter than
# the layer's compute, so a full overlap hides them all
REQUEST = dict(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=32)
CONFIG = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1, recompute="full", zero=3)


def dp_comm_seconds(tmp_path, **overlap) -> float:
    profile = json.loads(DEFAULT_PROFILE.read_text())
    profile["overlap"].update(overlap)
    path = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(profile))
    return predict(Request(**REQUEST, calibration=str(path)), CONFIG)["time"]["breakdown"]["dp_comm"]


def test_a_hidden_collective_costs_its_hidden_cost_fraction(tmp_path):
    """Exposed = comm - hidden + cost x hidden: with every collective hidden, the step pays
    `hidden_cost` of their time, linearly, and at cost 1 exactly what it pays with no overlap."""
    unhidden = dp_comm_seconds(tmp_path, zero=0.0, hidden_cost=0.0)
    assert unhidden > 0
    assert dp_comm_seconds(tmp_path, zero=1.0, hidden_cost=0.0) == 0.0
    assert dp_comm_seconds(tmp_path, zero=1.0, hidden_cost=0.25) == pytest.approx(0.25 * unhidden)
    assert dp_comm_seconds(tmp_path, zero=1.0, hidden_cost=1.0) == pytest.approx(unhidden)


def tp_comm_seconds(precision: str = "bf16", recompute: str = "none", sequence_parallel: bool = True) -> float:
    request = Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=8192, global_batch=8,
                      precision=precision, compile=True)
    config = ParallelConfig(dp=1, tp=8, pp=1, micro_batch_size=8, num_micro_batches=1, recompute=recompute,
                            zero=0, sequence_parallel=sequence_parallel)
    return predict(request, config)["time"]["breakdown"]["tp_comm"]


def test_recomputation_repeats_the_collectives_that_torchtitans_policies_do_not_save():
    """Full recomputation re-runs the forward's collectives (half the layer's TP traffic); the
    per-op selective policy saves reduce-scatter outputs, so it gathers again (a quarter), and
    without sequence parallelism it all-reduces again (half)."""
    plain = tp_comm_seconds()
    assert plain > 0
    assert tp_comm_seconds(recompute="full") == pytest.approx(1.5 * plain)
    assert tp_comm_seconds(recompute="selective") == pytest.approx(1.25 * plain)
    unsplit = tp_comm_seconds(sequence_parallel=False)
    assert tp_comm_seconds(recompute="selective", sequence_parallel=False) == pytest.approx(1.5 * unsplit)


def test_float8_tensor_parallel_gathers_in_float8_and_reduces_in_bf16():
    """Half the layer's TP traffic is all-gathers, which float8 TP moves at one byte per value."""
    # the collectives' latency does not shrink
    assert tp_comm_seconds(precision="fp8") == pytest.approx(0.75 * tp_comm_seconds(), rel=0.02)
    assert tp_comm_seconds(precision="fp8", sequence_parallel=False) == pytest.approx(
        tp_comm_seconds(sequence_parallel=False))


def test_float8_efficiency_is_a_factor_on_the_parts_fitted_bf16_efficiency():
    """compute.default.fp8.matmul_dtype_factor scales what the part's bf16 GEMMs reach, so a chip
    with its own fitted efficiency still gets the fitted float8 factor (an absolute fp8 entry at
    the default level was shadowed by every chip's own entry)."""
    from planner.hardware import chip_of, presets
    from planner.profile import load_profile

    profile = load_profile(None)
    h100 = presets()["h100-sxm-80gb"]
    chip = chip_of(h100)
    assert "matmul_efficiency_max" in profile.data["compute"][chip]["*"]
    bf16 = profile.compute(h100.name, h100.vendor, "bf16", chip).matmul_efficiency_max
    fp8 = profile.compute(h100.name, h100.vendor, "fp8", chip).matmul_efficiency_max
    factor = profile.data["compute"]["default"]["fp8"]["matmul_dtype_factor"]
    assert factor != 1.0
    assert fp8 == pytest.approx(bf16 * factor)


def test_under_fp8_the_layers_linears_run_in_float8_but_not_the_lm_head_or_a_router():
    """torchtitan's float8 configs leave the output projection in bf16 (filter_fqns), and float8
    GEMMs cannot take a dimension that is not a multiple of 16 (torchao module_filter_fn): a
    Mixtral router's 8 outputs."""
    from planner.graph import build_graph, numerics_for
    from planner.models import load_model
    from planner.specs import Workload

    workload = Workload(seq_len=4096, global_batch=8, precision="fp8")
    graph = build_graph(load_model("mixtral-8x7b"), workload, numerics_for(workload, True))
    block = {op.name: op for op in graph.block_ops()}
    assert block["q_proj"].float8 and block["o_proj"].float8
    assert not block["router"].float8
    assert not {op.name: op for op in graph.end_ops()}["lm_head"].float8
    plain = Workload(seq_len=4096, global_batch=8)
    bf16 = build_graph(load_model("llama3-8b"), plain, numerics_for(plain, True))
    assert not any(op.float8 for op in bf16.block_ops())


def pp_comm_seconds(tmp_path, vpp: int, overlap_pp: float) -> float:
    profile = json.loads(DEFAULT_PROFILE.read_text())
    profile["overlap"]["pp"] = overlap_pp
    path = tmp_path / f"profile-{vpp}-{overlap_pp}.json"
    path.write_text(json.dumps(profile))
    request = Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=64,
                      calibration=str(path))
    config = ParallelConfig(dp=4, tp=1, pp=4, vpp=vpp, micro_batch_size=2, num_micro_batches=8,
                            recompute="full", zero=1)
    return predict(request, config)["time"]["breakdown"]["pp_comm"]


def test_interleaving_sends_once_per_model_chunk(tmp_path):
    """Interleaved 1F1B sends each micro-batch's activations out of every one of a rank's vpp model
    chunks (Megatron-Core schedules.py forward_backward_pipelining_with_interleaving): with nothing
    hidden, the steady-state sends grow vpp-fold while the 2 (pp - 1) fill and drain sends do not."""
    one, two, four = (pp_comm_seconds(tmp_path, vpp, overlap_pp=0.0) for vpp in (1, 2, 4))
    pp, micro_batches = 4, 8
    per_send = one / (2 * (pp - 1) + 2 * micro_batches)
    assert two == pytest.approx(per_send * (2 * (pp - 1) + 2 * micro_batches * 2))
    assert four == pytest.approx(per_send * (2 * (pp - 1) + 2 * micro_batches * 4))
