"""Calibration from one real executor run (issue 5): fit on a single CPU run of llama-tiny, then
a second, different run is predicted better than before the fit. Real runs, no mocks.

What a fit can know is the speed of this machine, and a loaded machine is slower: measured one
after the other, a load that came and went between the two runs once made the fit look wrong
(errors -0.24 before, +0.80 after), and how far the shipped profile is from this machine's speed
depends on the load too. So the two runs train at the same time (whatever else loads the machine
slows both), and "before" is a profile that puts the CPU at a tenth of the shipped efficiency:
one run must move the CPU's efficiency to what it measured (in sample within 10 %), and that
must carry over to the other run. The comparison holds unless the second run is measured about
1.7x slower, relative to the first, than it would be alone (the fit's own error on it is ~12 %)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from tests.executor.conftest import ALPACA, ROOT, make_plan

from calibration.fit import load_measurements
from calibration.fitting import fit_profile
from calibration.validate import validate
from planner.profile import load_profile

STEPS = 10  # the steady-state median is over the steps after the first two


def _train_together(plans: dict[str, object], tmp_path) -> None:
    """`planner train` for every plan at once, each in its own run folder under tmp_path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLANNER_STORE": str(tmp_path / "runs.sqlite")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data",
                                     str(ALPACA), "--steps", str(STEPS), "--output", str(tmp_path / name), "--lr",
                                     "1e-3", "--no-progress", "--no-save"], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, plan in plans.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}\n{out[-2000:]}"


def test_one_cpu_run_improves_the_prediction_of_another(tmp_path):
    store = tmp_path / "runs.sqlite"
    first = make_plan(tmp_path / "first.json", 1, {"seq_len": 64, "global_batch": 8}, micro_batch_size=4)
    second = make_plan(tmp_path / "second.json", 1, {"seq_len": 128, "global_batch": 4}, micro_batch_size=1,
                       recompute="full")
    _train_together({"first": first, "second": second}, tmp_path)
    runs = {json.loads((tmp_path / name / "summary.json").read_text())["run_id"]: name for name in ("first", "second")}
    measured = {runs[c.id]: c for c in load_measurements(store=str(store))}
    assert set(measured) == {"first", "second"} and all(c.usable for c in measured.values())

    wrong = _slow_cpu_profile(tmp_path / "wrong.json", factor=0.1)
    fitted = tmp_path / "profile.json"
    fitted.write_text(json.dumps(fit_profile([measured["first"]], load_profile(str(wrong)))))  # one run on "cpu"
    assert abs(validate([measured["first"]], str(fitted))["rows"][0].throughput_error) < 0.1
    before = validate([measured["second"]], str(wrong))["rows"][0].throughput_error
    after = validate([measured["second"]], str(fitted))["rows"][0].throughput_error
    assert abs(after) < abs(before), (before, after)


def _slow_cpu_profile(path, factor: float):
    """The shipped profile with the CPU's efficiencies times `factor` and its per-layer overhead
    divided by it: a profile that is wrong about this machine whatever the load."""
    data = copy.deepcopy(load_profile().data)
    cpu = data["compute"]["cpu"]["*"]
    for key in ("matmul_efficiency_max", "attention_efficiency", "memory_efficiency"):
        cpu[key] *= factor
    cpu["layer_overhead_s"] /= factor
    path.write_text(json.dumps(data))
    return path
