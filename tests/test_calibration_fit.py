"""Fitting: known parameters are recovered from runs generated with them (issue 5 synthetic check)."""

import numpy as np
import pytest

from calibration.cases import Case
from calibration.fit import Parameter, fit_parameters, predictions, prepare, with_values
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
    from calibration.fit import INITIAL_PROFILE, fit_profile, main
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
