"""The planner's memory prediction against the oracle's traces, point by point and by category.

Pure Python (no torch): it reads the stored grid (calibration/data/oracle_grid.json) and calls
`planner.api.predict` for each point. Categories are compared in the planner's breakdown keys,
with the planner's `logits` counted among activations (the tracer cannot tell them apart).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from calibration.oracle import PLANNER_GROUPS, planner_groups

TOLERANCE = 0.03  # the bar for every grid point


@dataclass
class Row:
    name: str
    predicted_bytes: int
    traced_bytes: int
    predicted_phase: str
    traced_phase: str
    predicted_at: str  # the moment of the peak (planner/cost/moments.py MOMENTS)
    traced_at: str
    predicted: dict[str, int]  # planner breakdown, activations include logits
    traced: dict[str, int]

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.traced_bytes - 1

    def category_errors(self) -> dict[str, float]:
        """(predicted - traced) per category, as a fraction of the traced peak."""
        return {k: (self.predicted[k] - self.traced[k]) / self.traced_bytes for k in PLANNER_GROUPS}

    @property
    def worst_category(self) -> str:
        errors = self.category_errors()
        return max(errors, key=lambda k: abs(errors[k]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "predicted_bytes": self.predicted_bytes, "traced_bytes": self.traced_bytes,
                "error": self.error, "predicted_phase": self.predicted_phase, "traced_phase": self.traced_phase,
                "predicted_at": self.predicted_at, "traced_at": self.traced_at, "predicted": self.predicted, "traced": self.traced,
                "category_errors": self.category_errors(), "worst_category": self.worst_category}


def compare_point(point: dict[str, Any]) -> Row:
    from calibration.oracle_grid import request_and_config
    from planner.api import predict

    request, config = request_and_config(point)
    memory = predict(request, config)["memory"]
    breakdown = memory["breakdown"]
    predicted = {k: int(breakdown[k]) for k in PLANNER_GROUPS}
    predicted["activations"] += int(breakdown["logits"])
    oracle = point["oracle"]
    return Row(point["name"], int(memory["allocated_peak_bytes"]), int(oracle["peak_bytes"]), memory["peak_phase"],
               oracle["peak_phase"], memory["peak_at"], oracle["peak_at"], predicted,
               planner_groups(oracle["phases"][oracle["peak_at"]]["categories"]))


def compare(document: dict[str, Any]) -> list[Row]:
    return [compare_point(point) for point in document["points"]]


def summary(rows: list[Row]) -> dict[str, Any]:
    errors = [abs(r.error) for r in rows]
    category = [max(abs(e) for e in r.category_errors().values()) for r in rows]
    return {"points": len(rows), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "within_tolerance": sum(e <= TOLERANCE for e in errors), "tolerance": TOLERANCE,
            "max_category_error": max(category)}


def render(rows: list[Row], document: dict[str, Any]) -> str:
    from planner.format import GIB, table

    body = []
    for r in rows:
        worst = r.worst_category
        off = r.category_errors()[worst]
        body.append([r.name, f"{r.predicted_bytes / GIB:.2f}", f"{r.traced_bytes / GIB:.2f}", f"{r.error:+.1%}",
                     r.predicted_at, r.traced_at, f"{worst} {off:+.1%}"])
    s = summary(rows)
    head = (f"planner memory model vs the oracle ({s['points']} traced points; torch {document.get('torch')}, "
            f"transformers {document.get('transformers')}, peft {document.get('peft')})")
    foot = (f"median |error| {s['median_abs_error']:.2%}, max {s['max_abs_error']:.2%}; "
            f"{s['within_tolerance']}/{s['points']} within {s['tolerance']:.0%}; "
            f"largest category difference {s['max_category_error']:.2%} of the peak")
    columns = ["config", "predicted GiB", "traced GiB", "error", "predicted peak at", "traced peak at",
               "most off category"]
    return "\n".join([head, table(columns, body, align="lrrrlll"), foot])

