"""The planner against published measured runs (validation/cases.json): errors must not grow.

Aims (issue 2): throughput median |error| <= 15 %, memory median <= 10 % on cases with a
measured value. The thresholds below are the achieved figures plus a little room; lower them
when the model improves, never raise them to hide a regression."""

import pytest

from calibration.cases import load_cases
from calibration.validate import plausibility, validate

from conftest import SHARED_CASES


@pytest.fixture(scope="module")
def result():
    path = SHARED_CASES if SHARED_CASES.exists() else None  # the shipped copy otherwise
    return validate(load_cases(path))


def test_throughput_error(result):
    stats = result["throughput"]
    assert stats["n"] >= 70
    assert stats["median_abs"] <= 0.12
    assert stats["p90_abs"] <= 0.30


def test_memory_error(result):
    stats = result["memory"]
    assert stats["n"] >= 25
    assert stats["median_abs"] <= 0.11
    assert stats["p90_abs"] <= 0.32


def test_every_case_is_predicted_or_says_why(result):
    for row in result["rows"]:
        assert row.error or row.predicted_tokens_per_s is not None, row.case.id


def test_moai_param_guide_claims_are_flagged_impossible():
    """seeds/moai-llm-param-guide.md: the 7-13B rows need more than the MI250s' peak FLOP/s."""
    cases = {c.id: c for c in load_cases(SHARED_CASES if SHARED_CASES.exists() else None)}
    for case_id in ("c149", "c150", "c151"):
        flags = plausibility(cases[case_id])
        assert flags["plausible"] is False and flags["fraction_of_peak_6N"] > 1.0
    assert plausibility(cases["c152"])["plausible"] is True  # the 70B tutorial run is self-consistent
