"""Fit the calibration profile to measured runs, cross-validate it and write it: the command
around fitting.py (the least-squares fit) and crossval.py (leave one source out).

    python -m calibration.fit --runs calibration/data/h100_runs --out calibration/profiles/default.json \
        --cross-validate --jobs 2 --residuals calibration/data/loso_residuals.json

The shipped profile is fitted from calibration/profiles/initial.json (hand-set starting values and
prior centres), never from itself: refitting is then reproducible, and each leave-one-source-out
fold's prior has not seen the source it holds out. `planner calibrate` fits a user's own runs with
the shipped profile as the prior instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path
from typing import Any

from calibration.cases import Case, load_cases
from calibration.fitting import INITIAL_PROFILE, fit_profile
from planner.errors import InvalidRequest
from planner.profile import Profile
from planner.progress import add_flag, bars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fit the calibration profile to published runs")
    parser.add_argument("--cases", help="cases JSON (default: the shipped copy of the public cases)")
    parser.add_argument("--base", default=str(INITIAL_PROFILE),
                        help="profile to start from and centre the priors on (default: calibration/profiles/initial.json)")
    parser.add_argument("--out", required=True, help="where to write the fitted profile")
    parser.add_argument("--runs", nargs="*", default=[], help="run record files or folders to fit on as well")
    parser.add_argument("--cross-validate", action="store_true",
                        help="also run leave-one-source-out cross-validation and store its errors and intervals")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the cross-validation folds")
    parser.add_argument("--residuals", help="also write each held-out run's residuals to this JSON file")
    add_flag(parser)
    args = parser.parse_args(argv)
    from planner.profile import load_profile

    cases, base = load_cases(args.cases) + load_run_records(args.runs), load_profile(args.base)
    with bars(not args.no_progress):
        write_profile(cases, base, Path(args.out), cross_validate=args.cross_validate, jobs=args.jobs,
                      residuals=args.residuals)
    print(f"wrote {args.out}")
    return 0


def write_profile(cases: list[Case], base: Profile, out: Path, cross_validate: bool = False, jobs: int = 1,
                  residuals: str | None = None) -> dict[str, Any]:
    """Fit `cases` starting from `base`, optionally cross-validate (leave one source out, each fold
    from the same base), write the profile to `out` (named after the file) and return it."""
    if not out.parent.is_dir():  # before the minutes of fitting, not after
        raise InvalidRequest(f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    if cross_validate and jobs > 1:  # the full fit in a process of its own, beside the folds
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1) as pool:
            full = pool.submit(fit_profile, cases, base)
            rows = _folds(cases, base, jobs)
            data = full.result()
    else:
        data = fit_profile(cases, base)
        rows = _folds(cases, base, jobs) if cross_validate else []
    data["name"] = out.stem
    data["version"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if cross_validate:
        from calibration.crossval import summarize

        if residuals:
            Path(residuals).write_text(json.dumps(rows, indent=1) + "\n")
        summary = summarize(rows)
        spread = (data.get("uncertainty") or {}).get("uncalibrated_log_sd") or {}
        data["uncertainty"] = summary.pop("uncertainty")
        for what, values in spread.items():  # the fit's spread of throughput, the folds' of memory
            data["uncertainty"].setdefault("uncalibrated_log_sd", {}).setdefault(what, {}).update(
                {k: v for k, v in values.items() if k == "throughput"})
        data["validation"] = {"method": "leave-one-source-out", **summary}
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _folds(cases: list[Case], base: Profile, jobs: int) -> list[dict[str, Any]]:
    from calibration.crossval import leave_one_source_out

    return leave_one_source_out(cases, base, jobs=jobs)


def load_run_records(paths: list[str]) -> list[Case]:
    """Run records (format llm-planner/run@1) from JSON files or folders of them, as Cases."""
    from calibration.cases import case_from_run
    from planner.errors import read_json
    from planner.runrecord import RUN_FORMAT, from_record

    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    records = [(f, read_json(f, "run record")) for f in files]
    # one source per folder: leave-one-source-out holds a folder of runs out together
    return [case_from_run(from_record(r, default_source=f"run records {f.parent.name}")) for f, r in records
            if isinstance(r, dict) and r.get("format") == RUN_FORMAT]


def load_measurements(store: str | None = None, cases: str | None = None, origin: str | None = None,
                      hardware: str | None = None) -> list[Case]:
    """Measured runs to fit or validate on: from the run store when one is named (or exists at the
    default path and holds usable runs), else from a cases file (default: the shipped public cases)."""
    from calibration.cases import case_from_run
    from planner.runstore import default_store_path, iter_runs

    found: list[Case] = []
    use_store = store is not None or (cases is None and Path(default_store_path()).exists())
    if use_store:
        found = [case_from_run(run) for run in iter_runs(store, origin=origin, hardware=hardware)]
        if store is None and not any(c.usable for c in found):
            found = []
    if not found and store is None:
        found = [c for c in load_cases(cases) if hardware is None or c.hardware_name == hardware]
    return found


if __name__ == "__main__":
    raise SystemExit(main())
