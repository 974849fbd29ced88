"""A run that ran, fits: validation counts a run predicted above its devices' memory as a failure,
and `planner runs import` flags what validation excludes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from calibration.cases import SHIPPED_CASES, load_cases
from calibration.commands.validate import _as_json, _render
from calibration.ingest import import_paths
from calibration.case import request_for
from calibration.validate import predict_case, validate
from planner.api import predict
from planner.runstore import iter_runs


def with_huge_batch(ran):
    huge = replace(ran, id="huge", memory_bytes=None, workload=replace(ran.workload, global_batch=16),
                   config=replace(ran.config, micro_batch_size=16))
    return ran, huge


@pytest.fixture(scope="module")
def cases():
    return {case.id: case for case in load_cases()}


def test_a_run_predicted_above_its_device_is_a_failure_even_without_a_memory_figure(cases):
    """c116 trained on one RTX A6000; at 16 sequences a micro-batch the same run is predicted far
    above the device: with no memory figure the excess over the device is its (lower-bound) error."""
    ran, huge = with_huge_batch(cases["c116"])
    result = validate([ran, huge])
    assert result["ran_but_predicted_not_to_fit"] == ["huge"]
    row = next(r for r in result["rows"] if r.case.id == "huge")
    assert row.capacity_error == pytest.approx(row.predicted_memory_bytes / row.capacity_bytes - 1)
    assert row.capacity_error > 0.5
    memory = result["memory"]
    assert memory["n"] == 2 and memory["failed_to_fit"] == 1
    assert memory["p90_abs"] > 0.5  # the failure is in the statistics, not left out of them


def test_validate_json_keeps_its_keys_and_shows_the_failures(cases):
    ran, huge = with_huge_batch(cases["c116"])
    result = validate([ran, huge])
    out = _as_json(result)
    assert {"throughput", "memory", "by_source", "by_hardware", "cases"} <= set(out)
    assert out["ran_but_predicted_not_to_fit"] == ["huge"]
    flagged = {row["id"]: row["ran_but_predicted_not_to_fit"] for row in out["cases"]}
    assert flagged == {"c116": False, "huge": True}
    json.dumps(out)
    text = _render(result, show_all=False)
    assert "1 runs that ran were predicted not to fit" in text and "huge" in text


def test_runs_import_flags_the_cases_validation_excludes(tmp_path, cases):
    """c115's memory claim is below what its configuration holds: validation excludes it, and the
    store must too, or the fit trains on it."""
    assert cases["c115"].excluded and "impossible memory claim" in cases["c115"].excluded
    db = tmp_path / "runs.sqlite"
    import_paths([SHIPPED_CASES], db)
    stored = {run.run_id.removeprefix("published:"): run for run in iter_runs(db, origin="published")}
    for case_id, case in cases.items():
        assert bool(stored[case_id].excluded) == bool(case.excluded), case_id


@pytest.mark.parametrize("case_id", ["c042", "c050", "c053", "c056", "c066", "c302", "c305"])
def test_published_runs_that_trained_are_predicted_to_fit(cases, case_id):
    """llm-foundry's MPT rows (c042, c050, c053, c056: MPT's loss_fn is flash-attn's fused
    cross-entropy, no fp32 copy of the logits) and Megatron's 1T row (c066: its tied embedding and
    output layer are vocabulary shards over TP) trained; each was predicted above its device. So were
    Megatron-Bridge's Qwen3-30B-A3B on 16 H100 (c302, 132.2 GiB of 79.6) and DeepSeek-V3 on 256 B200
    (c305, 286.3 of 167.6) before the megatron memory row (planner/framework_memory.py)."""
    row = predict_case(cases[case_id])
    assert row.fits, f"{case_id}: {row.predicted_memory_bytes / 2**30:.1f} GiB of {row.capacity_bytes / 2**30:.1f}"


def test_a_fused_cross_entropy_keeps_the_logits_not_an_fp32_copy(cases):
    """The same MPT run with torch's cross-entropy holds an fp32 upcast of the logits and its
    log-softmax: the fused kernel's logits memory is a fraction of it."""
    fused = cases["c042"]
    assert fused.workload.fused_loss
    eager = replace(fused, workload=replace(fused.workload, fused_loss=False))
    logits = {name: predict(request_for(c), c.config)["memory"]["breakdown"]["logits"]
              for name, c in (("fused", fused), ("eager", eager))}
    assert logits["fused"] < 0.5 * logits["eager"]


def test_a_paged_optimizers_states_may_leave_the_device(cases):
    """The QLoRA paper's 65B run on one 48 GB GPU (c133, qlora.py: paged AdamW): with its states on
    the device the prediction is above 48 GB; bitsandbytes pages them to host memory, and the rest fits."""
    paged = cases["c133"]
    assert paged.paged_optimizer and predict_case(paged).fits
    assert not predict_case(replace(paged, paged_optimizer=False)).fits


def test_the_memory_fit_counts_a_run_predicted_above_its_device(cases):
    """In the memory fit a run with no memory figure is a one-sided residual: zero while predicted
    within its device, positive (log of the excess over sigma) when predicted above it."""
    from calibration.fitting import MEMORY_PARAMETERS, MEASUREMENT_SIGMA, _residual_fn, prepare
    from planner.profile import load_profile

    profile = load_profile()
    _, huge = with_huge_batch(cases["c116"])
    prepared = prepare([cases["c153"], huge], profile)
    residuals, x0, _ = _residual_fn(prepared, profile.data, MEMORY_PARAMETERS, "memory")
    within, over = residuals(x0)[:2]
    row = predict_case(huge)
    assert within == 0.0
    assert over == pytest.approx(np.log(row.predicted_memory_bytes / row.capacity_bytes) / MEASUREMENT_SIGMA["memory"],
                                 rel=1e-6)
