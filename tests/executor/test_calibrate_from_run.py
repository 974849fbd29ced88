"""Calibration from one real executor run (issue 5): fit on a single CPU run of llama-tiny, then
a second, different run is predicted better than with the shipped profile. Real runs, no mocks."""

from __future__ import annotations

import json

from tests.executor.conftest import make_plan, train

from calibration.fit import load_measurements
from calibration.fitting import fit_profile
from calibration.validate import validate
from planner.profile import load_profile


def test_one_cpu_run_improves_the_prediction_of_another(tmp_path):
    store = tmp_path / "runs.sqlite"  # train() points PLANNER_STORE at <output parent>/runs.sqlite
    first = make_plan(tmp_path / "first.json", 1, {"seq_len": 64, "global_batch": 8}, micro_batch_size=4)
    second = make_plan(tmp_path / "second.json", 1, {"seq_len": 128, "global_batch": 4}, micro_batch_size=1,
                       recompute="full")
    train(first, tmp_path / "first", 8, "--no-save")
    train(second, tmp_path / "second", 8, "--no-save")
    runs = {json.loads((tmp_path / name / "summary.json").read_text())["run_id"]: name for name in ("first", "second")}
    measured = {runs[c.id]: c for c in load_measurements(store=str(store))}
    assert set(measured) == {"first", "second"} and all(c.usable for c in measured.values())

    fitted = tmp_path / "profile.json"
    data = fit_profile([measured["first"]], load_profile())  # one run on the "cpu" hardware
    fitted.write_text(json.dumps(data))
    before = validate([measured["second"]])["rows"][0].throughput_error
    after = validate([measured["second"]], str(fitted))["rows"][0].throughput_error
    assert abs(after) < abs(before), (before, after)
    assert abs(validate([measured["first"]], str(fitted))["rows"][0].throughput_error) < 0.1
