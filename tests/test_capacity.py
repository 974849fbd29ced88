"""Capacity planning: time, GPU-hours and cost per device count; the recommendation's rules."""

import json
import math

import pytest

from planner.api import Request
from planner.capacity import default_price, device_counts, plan_capacity, recommend
from planner.errors import Infeasible, InvalidRequest
from planner.hardware import flavor_devices

REQUEST = Request(model="llama3-8b", gpu="h100-sxm-80gb", seq_len=4096, global_batch=256)


@pytest.fixture(scope="module")
def curve():
    return plan_capacity(REQUEST, tokens=5e9, price_per_gpu_hour=2.5, max_gpus=256)


def test_device_counts_are_whole_nodes_past_one_node():
    assert device_counts(8, 100) == [1, 2, 4, 8, 16, 32, 64]
    assert device_counts(8, 96) == [1, 2, 4, 8, 16, 32, 64, 96]
    assert device_counts(4, 3) == [1, 2, 3]


def test_time_gpu_hours_and_cost_follow_from_the_step(curve):
    assert curve["tokens_per_step"] == 4096 * 256
    for o in curve["options"]:
        assert o["fits"]
        assert o["steps"] == math.ceil(5e9 / (4096 * 256))
        assert o["hours"] == pytest.approx(o["steps"] * o["step_s"] / 3600)
        assert o["gpu_hours"] == pytest.approx(o["hours"] * o["gpus"])
        assert o["cost"] == pytest.approx(o["gpu_hours"] * 2.5)


def test_fastest_never_gets_slower_with_more_devices_allowed():
    hours = [plan_capacity(REQUEST, tokens=5e9, max_gpus=n)["fastest"]["hours"] for n in (8, 32, 128)]
    assert hours == sorted(hours, reverse=True) and hours[-1] < hours[0]


def test_deadline_gives_the_least_cost_that_meets_it(curve):
    options = curve["options"]
    deadline = sorted(o["hours"] for o in options)[len(options) // 2]  # about half the options meet it
    chosen, rule = recommend(options, deadline, None)
    assert chosen["hours"] <= deadline and "within" in rule
    meeting = [o for o in options if o["hours"] <= deadline]
    assert chosen["cost"] == min(o["cost"] for o in meeting)
    tighter, _ = recommend(options, min(o["hours"] for o in options), None)
    assert tighter["hours"] <= chosen["hours"] and tighter["cost"] >= chosen["cost"]


def test_budget_gives_the_fastest_within_it(curve):
    options = curve["options"]
    budget = sorted(o["cost"] for o in options)[len(options) // 2]
    chosen, rule = recommend(options, None, budget)
    assert chosen["cost"] <= budget and "fastest" in rule
    assert chosen["hours"] == min(o["hours"] for o in options if o["cost"] <= budget)


def test_unmeetable_deadline_says_why():
    result = plan_capacity(REQUEST, tokens=5e9, max_gpus=16, deadline_hours=0.01)
    assert result["recommendation"] is None and "deadline" in result["unmet"]


def test_recommendation_is_never_dominated(curve):
    assert curve["recommendation"] is not None and not curve["recommendation"]["dominated"]
    for o in curve["options"]:
        if o["dominated"]:
            assert any(p["hours"] <= o["hours"] and p["gpu_hours"] <= o["gpu_hours"] for p in curve["options"] if p is not o)


def test_default_price_is_data_with_a_source():
    offer = default_price("h100-sxm-80gb")
    assert offer["usd_per_gpu_hour"] > 0 and offer["source"].startswith("https://") and offer["as_of"]
    assert default_price("mi250-gcd-64gb") is None


def test_budget_without_a_price_is_refused():
    with pytest.raises(InvalidRequest, match="price-per-gpu-hour"):
        plan_capacity(Request(model="llama-tiny", gpu="mi250-gcd-64gb"), tokens=1e6, budget=100, max_gpus=8)


def test_moai_flavors():
    result = plan_capacity(Request(model="llama3-8b", seq_len=1024, global_batch=384), tokens=1e9,
                           flavor_family="moai", max_gpus=384)
    assert [o["gpus"] for o in result["options"]] == [flavor_devices(o["flavor"]) for o in result["options"]]
    assert "1.5xLarge.768GB" in [o["flavor"] for o in result["options"]]
    assert {o["hardware"] for o in result["options"]} == {"mi250-gcd-64gb"}


def test_nothing_fits_is_infeasible():
    with pytest.raises(Infeasible, match="max-gpus"):
        plan_capacity(Request(model="llama3.1-405b", gpu="rtx4090-24gb"), tokens=1e9, max_gpus=2)


def test_cli_llama3_70b_on_h100(cli):
    args = ("capacity", "--model", "llama3-70b", "--gpu", "h100-sxm-80gb", "--tokens", "2e9")
    text = cli(*args, check=True).stdout
    assert "Recommendation" in text and "GPU-h" in text and "*" in text
    data = json.loads(cli(*args, "--json", check=True).stdout)
    for option in data["options"]:
        assert {"gpus", "hours", "gpu_hours", "cost"} <= set(option)
    best = data["recommendation"]
    assert best["cost"] == pytest.approx(best["gpu_hours"] * data["price_per_gpu_hour"])


def test_cli_bad_input_is_one_line(cli):
    proc = cli("capacity", "--model", "llama3-8b", "--tokens", "0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "positive" in proc.stderr
    proc = cli("capacity", "--model", "llama3.1-405b", "--gpu", "rtx4090-24gb", "--tokens", "1e9", "--max-gpus", "2")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
