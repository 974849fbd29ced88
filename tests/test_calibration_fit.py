"""Fitting: known parameters are recovered from runs generated with them (issue 5 synthetic check)."""

import numpy as np
import pytest

from calibration.cases import Case
from calibration.fitting import Parameter, fit_parameters, predictions, prepare, with_values
from planner.models import load_model
from planner.plan import ParallelConfig
from planner.profile import load_profile
from planner.specs import Workload

PARAMS = [
    Parameter(("compute", "a100-80gb", "*", "matmul_efficiency_max"), 0.6, 0.05, 1.0, 2.0),
    Parameter(("compute", "h100-sxm-80gb", "*", "matmul_efficiency_max"), 0.6, 0.05, 1.0, 2.0),
    Parameter(("compute", "a100-80gb", "*", "attention_efficiency"), 0.45, 0.05, 1.0, 2.0),
    Parameter(("compute", "h100-sxm-80gb", "*", "attention_efficiency"), 0.45, 0.05, 1.0, 2.0),
]
TRUTH_FACTORS = np.array([0.85, 1.12, 1.2, 0.8])


def synthetic_runs() -> list[Case]:
    """Llama-3-8B on 8 GPUs of each kind, short to long sequences, so that matmul and attention
    efficiencies are both pinned down by the data."""
    spec = load_model("llama3-8b")
    runs = []
    for hardware in ("a100-80gb", "h100-sxm-80gb"):
        for seq, mbs, recompute in ((1024, 8, "none"), (2048, 4, "selective"), (8192, 1, "full"),
                                    (16384, 1, "full"), (32768, 1, "full")):
            config = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=mbs, num_micro_batches=2,
                                    recompute=recompute, zero=3)
            runs.append(Case(id=f"{hardware}-{seq}", source="synthetic", model=spec.name, spec=spec,
                             hardware=hardware, devices=8, workload=Workload(seq_len=seq, global_batch=16 * mbs),
                             config=config))
    return runs


def _value(profile, path):
    _, hardware, _, key = path
    return getattr(profile.compute(hardware, "nvidia", "bf16"), key)


def test_synthetic_runs_recover_known_parameters_within_2_percent():
    base = load_profile()
    prepared = prepare(synthetic_runs(), base)
    start = np.array([_value(base, p.path) for p in PARAMS])
    truth = np.minimum(start * TRUTH_FACTORS, 0.99)
    measured, _, _ = predictions(prepared, with_values(base.data, PARAMS, np.log(truth)))
    for item, tokens_per_s in zip(prepared, measured, strict=True):
        item.case.tokens_per_s_per_device = float(tokens_per_s)  # generated from the known parameters
    fitted = np.exp(fit_parameters(prepared, base.data, PARAMS, "throughput"))
    assert fitted == pytest.approx(truth, rel=0.02)
    assert not np.allclose(start, truth, rtol=0.02)  # the fit had to move to get there


def test_the_shipped_fit_starts_from_the_initial_guesses_not_from_itself(tmp_path):
    """`python -m calibration.fit` centres its priors on calibration/profiles/initial.json: were it
    to start from the shipped profile, each refit would lean on the last one, and each
    leave-one-source-out fold's prior would already have seen the source it holds out."""
    import json

    from calibration.cases import load_cases
    from calibration.fit import main
    from calibration.fitting import INITIAL_PROFILE, fit_profile
    from planner.profile import Profile

    cases = [c for c in load_cases() if c.id in ("c001", "c036")]
    subset = tmp_path / "cases.json"
    rows = json.loads(open("calibration/data/public_cases.json").read())
    rows = rows["cases"] if isinstance(rows, dict) else rows
    subset.write_text(json.dumps([r for r in rows if r["id"] in ("c001", "c036")]))  # one H100 run each
    out = tmp_path / "fitted.json"
    assert main(["--cases", str(subset), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = fit_profile(cases, load_profile(str(INITIAL_PROFILE)))
    shipped = fit_profile(cases, load_profile())
    key = ("compute", "default", "*", "matmul_efficiency_max")
    value = {name: _value(Profile(name, "", data), key) for name, data in
             (("written", written), ("expected", expected), ("shipped", shipped))}
    assert value["written"] == pytest.approx(value["expected"], rel=1e-9)
    assert value["written"] != pytest.approx(value["shipped"], rel=1e-3)
    assert "initial" in written["description"] and written["name"] == "fitted"


def test_parts_of_one_chip_share_its_calibration():
    """H100 80GB, H100 96GB at 500 W and H200 are one silicon (GH100): a run on one part moves the
    others' predictions with it, a part of another chip (A100) much less. Without that, a source
    alone on one part (one framework, one vintage) would set that part's efficiency by itself.
    (One run moves the shared efficiencies too, so the A100 follows part of the way.)"""
    from calibration.fitting import INITIAL_PROFILE, fit_profile
    from planner.hardware import chip_of, load_hardware

    assert {chip_of(load_hardware(n)) for n in ("h100-sxm-80gb", "h100-sxm-96gb-500w", "h200-141gb")} == {"GH100"}
    base = load_profile(str(INITIAL_PROFILE))
    runs = {c.hardware: c for c in synthetic_runs() if c.workload.seq_len == 8192}
    runs["h200-141gb"] = Case(**{**runs["h100-sxm-80gb"].__dict__, "id": "h200", "hardware": "h200-141gb"})
    before = {name: predictions(prepare([case], base), base.data)[0][0] for name, case in runs.items()}
    measured = runs["h100-sxm-80gb"]
    measured.tokens_per_s_per_device = 0.7 * before["h100-sxm-80gb"]  # a slower stack than the prior
    fitted = fit_profile([measured], base)
    ratio = {name: predictions(prepare([case], base), fitted)[0][0] / before[name] for name, case in runs.items()}
    assert ratio["h100-sxm-80gb"] < 0.85
    assert ratio["h200-141gb"] == pytest.approx(ratio["h100-sxm-80gb"], rel=0.05)
    assert ratio["h200-141gb"] < ratio["a100-80gb"] - 0.03


def test_records_written_before_parts_named_their_chip_take_their_presets_chip():
    from planner.hardware import chip_of, load_hardware
    from planner.specs import Hardware

    stored = {**load_hardware("h100-sxm-80gb").to_dict(), "chip": ""}
    assert chip_of(Hardware.from_dict(stored)) == "GH100"
    custom = {**stored, "name": "my-lab-gpu"}
    assert chip_of(Hardware.from_dict(custom)) == "my-lab-gpu"  # its own chip: calibrated on its own



def test_calibrating_runs_of_one_part_moves_the_other_parts_of_its_chip_in_the_profile():
    """`planner calibrate` fits on the shipped profile, which has its own entry for every part it
    was fitted on: an H100 run that is slower than predicted must still slow the H200 down."""
    from calibration.fitting import fit_profile

    base = load_profile()
    assert "h200-141gb" in base.data["compute"]
    case = next(c for c in synthetic_runs() if c.hardware == "h100-sxm-80gb" and c.workload.seq_len == 8192)
    on_h200 = Case(**{**case.__dict__, "id": "h200", "hardware": "h200-141gb"})
    before = {c.hardware: predictions(prepare([c], base), base.data)[0][0] for c in (case, on_h200)}
    case.tokens_per_s_per_device = 0.7 * before["h100-sxm-80gb"]
    fitted = fit_profile([case], base)
    after = {c.hardware: predictions(prepare([c], base), fitted)[0][0] for c in (case, on_h200)}
    assert after["h100-sxm-80gb"] / before["h100-sxm-80gb"] < 0.85
    assert after["h200-141gb"] / before["h200-141gb"] == pytest.approx(
        after["h100-sxm-80gb"] / before["h100-sxm-80gb"], rel=0.05)
