"""The oracle points of today's families (calibration/data/oracle_families.json): sliding-window
layers with zero-centred norms and a tied head (Gemma 3), MLA with dense-first MoE (DeepSeek-V3),
dense-first MoE with a shared expert (GLM-4.5-Air), Gated DeltaNet hybrids (Qwen3-Next, through
the GPU kernels' stand-ins of calibration/gpu_kernels.py), attention sinks in eager attention
(gpt-oss), Mamba-2 hybrids (a Nemotron-H shape chosen here, through the fused mamba_ssm stand-in),
chunked attention with NoPE layers and experts run on every token (Llama 4), compressed attention with
hyper-connections and hash routing (DeepSeek-V4), per-head q/k norms on one device, FSDP and TP
(Qwen3, Qwen3-MoE), fused projections (Phi-3), 512-wide global heads with experts beside the MLP
and a soft-capped head (Gemma 4), each a released config at full width cut to a
few layers and traced whole; the planner within the grid's tolerance, and (slow) a re-trace
reproduces a stored point."""

import json

import pytest

from calibration.oracle import PLANNER_GROUPS
from calibration.oracle_check import TOLERANCE, compare, summary
from calibration.oracle_families import CUTS, FAMILY_GRID, MODELS_DIR, SHAPES, cut_config, load_families
from calibration.oracle_grid import request_and_config
from planner.api import resolve

DOC = load_families()
POINTS = DOC["points"]
ROWS = compare(DOC)


def test_stored_points_are_the_points_the_code_defines_with_versions():
    assert {"torch", "transformers", "peft"} <= set(DOC)
    assert [p["name"] for p in POINTS] == [p["name"] for p in FAMILY_GRID]
    for stored, defined in zip(POINTS, FAMILY_GRID):
        assert (stored["model"], stored["workload"], stored["config"]) == \
            (defined["model"], json.loads(json.dumps(defined["workload"])), defined["config"]), stored["name"]


def test_stored_cut_configs_are_the_catalog_configs_cut():
    for name in CUTS:
        assert json.loads((MODELS_DIR / f"{name}.json").read_text()) == cut_config(name), name
    for name, config in SHAPES.items():
        assert json.loads((MODELS_DIR / f"{name}.json").read_text()) == config, name


# families whose every layer is of one kind: their cuts hold four layers of it (still traced whole)
UNIFORM_FAMILIES = ("qwen3", "qwen3_moe", "phi3")


def test_each_cut_holds_several_kinds_of_layer_and_was_traced_whole():
    for point in POINTS:
        spec = resolve(request_and_config(point)[0]).spec
        assert len(spec.layer_kinds()) > 1 or (spec.family in UNIFORM_FAMILIES and spec.num_layers == 4), point["name"]
        assert point["oracle"]["layers_traced"] == [spec.num_layers], point["name"]


def test_the_mechanisms_are_covered():
    specs = [resolve(request_and_config(p)[0]).spec for p in POINTS]
    assert any(s.is_mla and s.is_moe for s in specs)
    assert any(s.sliding_window and s.norm_offset and s.tie_word_embeddings for s in specs)
    assert any(s.shared_expert_intermediate_size and s.mlp_layer_types[0] == "dense" for s in specs)
    assert any(any(kind.attention == "linear_attention" for kind, _ in s.layer_kinds()) for s in specs)
    assert any(s.attention_sinks and s.expert_gate == "clamped_swiglu" for s in specs)
    assert any(any(kind.attention == "mamba" for kind, _ in s.layer_kinds()) for s in specs)
    assert any(s.is_moe and not s.gated_mlp for s in specs)  # Nemotron 3 Nano: relu2 experts beside Mamba-2
    assert {p["config"]["recompute"] for p in POINTS} == {"none", "full"}
    # issue 15's families: Qwen3 (one device, FSDP and its transformers TP plan), Qwen3-MoE, Phi-3,
    # Gemma 4 (512-wide global heads whose k and v transformers repeats, experts beside the MLP, a soft-capped head)
    assert {"qwen3", "qwen3_moe", "phi3", "gemma4_text"} <= {s.family for s in specs}
    assert any(s.family == "qwen3" and p["config"]["tp"] > 1 for s, p in zip(specs, POINTS))
    assert any(s.global_head_dim and s.global_head_dim > 256 and s.is_moe and s.final_logit_softcapping
               for s in specs)
    # DeepSeek-V4: compressed (sparse and heavy) attention, hyper-connected streams, hash-routed layers
    assert any(s.hc_mult > 1 and {"compressed_sparse_attention", "heavily_compressed_attention"} <= set(s.layer_types)
               and s.hash_moe_layers for s in specs)


def test_every_point_within_the_grid_tolerance_and_median_within_one_percent():
    off = {r.name: f"{r.error:+.2%}" for r in ROWS if abs(r.error) > TOLERANCE}
    assert not off
    assert summary(ROWS)["median_abs_error"] <= 0.01


@pytest.mark.parametrize("category", PLANNER_GROUPS)
def test_categories_agree_at_the_peak(category):
    off = {r.name: f"{r.category_errors()[category]:+.2%}" for r in ROWS
           if abs(r.category_errors()[category]) > TOLERANCE}
    assert not off


def test_the_peak_falls_where_the_trace_says():
    for row, point in zip(ROWS, POINTS):
        if row.predicted_at != row.traced_at:
            phases = point["oracle"]["phases"]
            assert phases[row.predicted_at]["total_bytes"] >= (1 - TOLERANCE) * row.traced_bytes, row.name


def test_fsdp_gathers_each_layer_at_its_own_size():
    """The dense first layer's backward holds a dense layer gathered, the middle one a MoE layer
    (the stage's mean layer would get both wrong by tens of GiB at 256 experts)."""
    point = next(p for p in POINTS if p["name"].startswith("deepseek-v3-4l"))
    from planner.api import predict

    request, config = request_and_config(point)
    moments = predict(request, config)["memory"]["moments"]
    phases = point["oracle"]["phases"]
    for moment in ("backward layer:first", "backward layer:middle", "backward layer:last", "backward embedding"):
        assert moments[moment] == pytest.approx(phases[moment]["total_bytes"], rel=TOLERANCE), moment


@pytest.mark.slow
def test_retracing_a_point_reproduces_it():
    pytest.importorskip("torch")
    from calibration.oracle_grid import trace_point, versions

    if versions() != {k: DOC[k] for k in ("torch", "transformers", "peft")}:
        pytest.skip(f"the points were traced with other versions ({versions()})")
    name = "deepseek-v3-4l fsdp64 1x4096"
    stored = next(p for p in POINTS if p["name"] == name)
    fresh = trace_point(next(p for p in FAMILY_GRID if p["name"] == name))["oracle"]
    assert fresh["phases"] == stored["oracle"]["phases"]
