"""The 1F1B schedule: the DAG's critical path is the truth; the closed form must match it."""

import random

import pytest

from planner.cost.schedule import critical_path_seconds, one_f_one_b_order, pipeline_seconds, schedule_graph


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 8), (4, 4), (4, 16), (8, 3), (8, 64)])
def test_closed_form_equals_critical_path_for_equal_stages(p, m):
    f, b = 1.0, 2.1
    dag = critical_path_seconds(schedule_graph([f] * p, [b] * p, m))
    steady, bubble = pipeline_seconds(p * (f + b), f + b, m, 1)
    assert steady + bubble == pytest.approx(dag)
    assert dag == pytest.approx((m + p - 1) * (f + b))  # Narayanan et al. 2021 §2.2: bubble (p-1)/m


def test_closed_form_bounds_unequal_stages_within_five_percent():
    """Stages differ by a layer and by the head (our layouts): the closed form is an upper bound
    within 5% of the critical path."""
    rng = random.Random(0)
    for _ in range(200):
        p, m = rng.randint(2, 8), rng.choice([1, 2, 4, 8, 16, 32])
        f = [1 + rng.uniform(0, 0.15) for _ in range(p)]
        f[-1] *= 1 + rng.uniform(0, 0.3)
        b = [2 * x for x in f]
        dag = critical_path_seconds(schedule_graph(f, b, m))
        steady, bubble = pipeline_seconds(sum(f) + sum(b), max(x + y for x, y in zip(f, b)), m, 1)
        assert dag * (1 - 1e-9) <= steady + bubble <= 1.05 * dag


def test_order_runs_every_micro_batch_once():
    order = one_f_one_b_order(0, 4, 6)
    assert sorted(j for k, j in order if k == "F") == list(range(6))
    assert sorted(j for k, j in order if k == "B") == list(range(6))
    assert order[:4] == [("F", 0), ("F", 1), ("F", 2), ("F", 3)]
