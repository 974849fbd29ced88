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
