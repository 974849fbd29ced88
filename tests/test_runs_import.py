"""`planner runs import / list / export`: published cases, people's CSV / JSONL rows with bad rows,
executor run folders, strict imports, conflicts, and export -> import round trips."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from tests.store_helpers import executor_record, write_summary

from calibration.cases import SHIPPED_CASES, load_cases
from calibration.commands.runs import ORIGIN_CHOICES
from calibration.ingest import export_runs, import_paths
from planner.cli import main
from planner.models import catalog
from planner.profile import load_profile
from planner.runrecord import ORIGINS
from planner.runstore import count_runs, iter_runs

GIB = 2**30
HEADER = ("model,gpu,gpus,seq_len,global_batch,dp,tp,micro_batch_size,recompute,zero,tokens_per_s_per_device,"
          "peak_memory_gib,status")
GOOD = "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,6100,61.5,finished"


def write_csv(path: Path, *rows: str) -> Path:
    path.write_text("\n".join((HEADER,) + rows) + "\n")
    return path


def test_public_cases_all_land_and_excluded_ones_are_flagged(tmp_path):
    db = tmp_path / "runs.sqlite"
    raw_cases = json.loads(SHIPPED_CASES.read_text())["cases"]
    report = import_paths([SHIPPED_CASES], db)
    assert report.errors == [] and report.outcomes["inserted"] == len(raw_cases)
    runs = {run.run_id: run for run in iter_runs(db, origin="published")}
    assert set(runs) == {f"published:{c['id']}" for c in raw_cases}
    validated = {case.id: case for case in load_cases()}  # as validation sees them (c115 flagged)
    for raw in raw_cases:
        run, case = runs[f"published:{raw['id']}"], validated[raw["id"]]
        assert run.excluded == case.excluded and run.input == raw  # the original row is kept whole
        assert run.usable == (case.excluded is None)
        if case.excluded is None:
            assert run.config == case.config and run.workload == case.workload and run.prediction is not None
            assert run.calibration["version"] == load_profile().summary()["version"]  # the profile at import
    excluded = [r for r in runs.values() if r.excluded]
    assert report.excluded == len(excluded) > 0
    assert any(r.spec is None for r in excluded)  # e.g. encoder-decoder models: stored all the same
    c001 = runs["published:c001"]  # torchtitan Table 1 'FSDP': 5,762 tokens/s per GPU, 82.4 GiB
    assert c001.measured.tokens_per_s_per_device == 5762 and c001.measured.peak_reserved_bytes == 82.4 * GIB
    assert c001.measured.tokens_per_s == 5762 * 8 and c001.hardware_name == "h100-sxm-96gb-500w"
    again = import_paths([SHIPPED_CASES], db)
    assert again.outcomes == {"unchanged": len(raw_cases)} and count_runs(db) == len(raw_cases)


def test_csv_good_rows_land_and_bad_rows_name_line_and_column(tmp_path):
    db = tmp_path / "runs.sqlite"
    source = write_csv(
        tmp_path / "mine.csv",
        GOOD,                                                             # line 2
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,two,2,selective,3,6100,61.5,finished",  # 3: tp
        "llama3-8b,h100,8,4096,64,8,1,2,selective,3,6100,61.5,finished",            # 4: gpu
        "llama3-8b,h100-sxm-80gb,8,4096,64,4,16,2,selective,3,6100,61.5,finished",  # 5: tp x pp vs devices
        "llama3-8b,h100-sxm-80gb,8,4096,60,8,1,2,selective,3,6100,61.5,finished",   # 6: global batch
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,,,finished",           # 7: nothing measured
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,,,oom",                # 8: an OOM: kept
        "llama3-7b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,6100,61.5,finished",   # 9: model
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,sometimes,3,6100,61.5,finished",   # 10: recompute
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,-5,61.5,finished",     # 11: measured
        "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,6100,61.5,finished,extra",  # 12: cells
    )
    report = import_paths([source], db)
    fields = [error.split(": ")[1] for error in report.errors]
    lines = [int(error.split(": ")[0].rsplit(":", 1)[1]) for error in report.errors]
    assert lines == [3, 4, 5, 6, 7, 9, 10, 11, 12]
    assert fields[:8] == ["tp", "gpu", "tp", "global_batch", "tokens_per_s_per_device", "model", "recompute",
                          "tokens_per_s_per_device"]
    assert "did you mean 'h100-sxm-80gb'" in report.errors[1] and "did you mean" in report.errors[5]
    runs = list(iter_runs(db))
    assert [r.status for r in runs] == ["finished", "oom"] and all(r.origin == "user" for r in runs)
    good = runs[0]
    assert good.config.dp == 8 and good.config.micro_batch_size == 2 and good.config.num_micro_batches == 4
    assert good.measured.peak_reserved_bytes == 61.5 * GIB and good.measured.tokens_per_s == 6100 * 8
    assert good.prediction["config"]["recompute"] == "selective" and good.source == f"{source}:2"
    assert import_paths([source], db).outcomes == {"unchanged": 2}  # ids derive from content: no duplicates


def test_jsonl_mixes_flat_rows_and_records_with_errors_per_line(tmp_path):
    db = tmp_path / "runs.sqlite"
    flat = {"model": "llama-tiny", "gpu": "cpu", "gpus": 2, "seq_len": 128, "global_batch": 8, "precision": "fp32",
            "tokens_per_s": 1400.5, "run_id": "mine-1", "when": "2025-05-01 08:00"}
    bad_record = executor_record("exec-2")
    bad_record["plan"]["config"]["pp"] = 64
    lines = [json.dumps(flat), "{not json", "[1, 2]", json.dumps(executor_record("exec-1")),
             json.dumps(bad_record), json.dumps({**flat, "tokens_per_sec": 3}), "",
             json.dumps({**flat, "run_id": "mine-2", "method": "lora", "lora_targets": ["q", "v"], "zero": 2})]
    source = tmp_path / "runs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    report = import_paths([source], db)
    where = [error.split(": ")[0].rsplit(":", 1)[1] + ":" + error.split(": ")[1] for error in report.errors]
    assert where[0].startswith("2:not valid JSON") and where[1].startswith("3:must be a JSON object")
    assert where[2:] == ["5:plan.config", "6:tokens_per_sec"]
    assert "did you mean 'tokens_per_s'" in report.errors[3]
    runs = {r.run_id: r for r in iter_runs(db)}
    assert set(runs) == {"mine-1", "exec-1", "mine-2"}
    assert runs["mine-1"].when == "2025-05-01T08:00:00Z" and runs["mine-1"].measured.tokens_per_s_per_device == 700.25
    assert runs["mine-2"].workload.lora_targets == ("q", "v") and runs["mine-2"].config.zero == 2
    assert runs["exec-1"].origin == "executor"


def test_strict_import_writes_nothing_when_a_row_is_bad(tmp_path):
    db = tmp_path / "runs.sqlite"
    source = write_csv(tmp_path / "mine.csv", GOOD, GOOD.replace("h100-sxm-80gb", "h100"))
    report = import_paths([source], db, strict=True)
    assert not report.written and len(report.errors) == 1 and count_runs(db) == 0
    assert import_paths([write_csv(tmp_path / "ok.csv", GOOD)], db, strict=True).written and count_runs(db) == 1


def test_same_run_id_with_other_content_is_a_conflict_unless_replace(tmp_path):
    db = tmp_path / "runs.sqlite"
    first = write_csv(tmp_path / "a.csv", "llama3-8b,h100-sxm-80gb,8,4096,64,8,1,2,selective,3,6100,61.5,finished")
    import_paths([first], db)
    run_id = next(iter_runs(db)).run_id
    fixed = tmp_path / "b.csv"
    fixed.write_text(f"run_id,{HEADER}\n{run_id},{GOOD.replace('6100', '6200')}\n")
    report = import_paths([fixed], db)
    assert "already stored with other content" in report.errors[0] and report.errors[0].startswith(f"{fixed}:2: run_id")
    assert next(iter_runs(db)).measured.tokens_per_s_per_device == 6100
    strict = import_paths([fixed], db, strict=True)
    assert not strict.written and next(iter_runs(db)).measured.tokens_per_s_per_device == 6100
    assert import_paths([fixed], db, replace=True).outcomes == {"replaced": 1}
    assert next(iter_runs(db)).measured.tokens_per_s_per_device == 6200 and count_runs(db) == 1


def test_a_folder_of_executor_runs_and_relative_config_paths(tmp_path):
    db = tmp_path / "runs.sqlite"
    write_summary(tmp_path / "runs" / "a", executor_record("exec-a"))
    write_summary(tmp_path / "runs" / "b", executor_record("exec-b", status="oom"))
    config = tmp_path / "models" / "tiny" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(catalog()["llama-tiny"]["config"]))
    (tmp_path / "own.csv").write_text("model,gpu,gpus,seq_len,global_batch,precision,step_s\n"
                                      "models/tiny,cpu,2,128,8,fp32,0.61\n")
    report = import_paths([tmp_path / "runs", tmp_path / "own.csv"], db)
    assert report.errors == [] and report.outcomes == {"inserted": 3}
    runs = {r.run_id: r for r in iter_runs(db)}
    own = next(r for r in runs.values() if r.origin == "user")
    assert own.spec.hidden_size == 256 and own.spec.source == str(config) and own.measured.step_s == 0.61
    assert runs["exec-b"].status == "oom"


@pytest.fixture
def mixed_store(tmp_path) -> Path:
    """Published cases (usable and excluded), own rows and executor records in one store."""
    db = tmp_path / "mixed.sqlite"
    write_summary(tmp_path / "runs" / "a", executor_record("exec-a"))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**catalog()["llama-tiny"]["config"], "_name_or_path": "my-tiny"}))
    own = write_csv(tmp_path / "own.csv", GOOD, GOOD.replace("finished", "oom").replace("6100", ""))
    (tmp_path / "tiny.csv").write_text("model,gpu,gpus,seq_len,global_batch,precision,tokens_per_s,when\n"
                                       "tiny.json,cpu,2,128,8,fp32,1234.5,2025-01-02T03:04:05+02:00\n")
    report = import_paths([SHIPPED_CASES, own, tmp_path / "runs", tmp_path / "tiny.csv"], db)
    assert report.errors == []
    return db


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_import_gives_the_same_runs(mixed_store, tmp_path, fmt):
    first, second = tmp_path / f"first.{fmt}", tmp_path / f"second.{fmt}"
    with first.open("w", newline="") as out:
        written = export_runs(iter_runs(mixed_store), fmt, out)
    assert written == count_runs(mixed_store)
    copy = tmp_path / "copy.sqlite"
    report = import_paths([first], copy)
    assert report.errors == [] and report.outcomes == {"inserted": written}
    originals, copies = list(iter_runs(mixed_store)), list(iter_runs(copy))
    assert [replace(r, recorded_at=None) for r in copies] == [replace(r, recorded_at=None) for r in originals]
    assert {r.origin for r in copies} == set(ORIGINS)
    with second.open("w", newline="") as out:
        export_runs(iter_runs(copy), fmt, out)
    if fmt == "csv":
        assert second.read_text() == first.read_text()
        assert next(csv.DictReader(first.open()))["model"]  # a plain spreadsheet row
    assert import_paths([first], mixed_store).outcomes == {"unchanged": written}  # back into its own store


def test_cli_import_list_export(tmp_path, capsys):
    db = str(tmp_path / "runs.sqlite")
    source = write_csv(tmp_path / "mine.csv", GOOD, GOOD.replace(",8,4096", ",eight,4096"))
    assert main(["runs", "import", str(source), "--store", db]) == 2  # a row was rejected
    out, err = capsys.readouterr()
    assert "1 new" in out and err.strip() == f"{source}:3: gpus: must be a whole number >= 1, got 'eight'"
    assert main(["runs", "import", str(SHIPPED_CASES), "--store", db, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["inserted"] > 100 and counts["unchanged"] == 0 and counts["excluded"] > 0 and counts["errors"] == []
    assert main(["runs", "list", "--store", db, "--origin", "user", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 1 and listed[0]["measured"]["tokens_per_s_per_device"] == 6100
    assert listed[0]["predicted"]["tokens_per_s_per_device"] > 0 and listed[0]["calibration"]["name"] == "default"
    assert main(["runs", "list", "--store", db, "--hardware", "a100-80gb"]) == 0
    table = capsys.readouterr().out
    assert "published:c025" in table and "user" not in table.split("\n")[2] and "usable for fitting" in table
    output = tmp_path / "out.csv"
    assert main(["runs", "export", "--store", db, "--origin", "user", "--output", str(output)]) == 0
    assert "exported 1 runs" in capsys.readouterr().err
    assert [row["model"] for row in csv.DictReader(output.open())] == ["llama3-8b"]


def test_cli_errors_are_one_line(cli, tmp_path):
    for args, words in ((["runs"], "required"), (["runs", "list", "--origin", "cluster"], "invalid choice"),
                        (["runs", "import", "--store", str(tmp_path / "no" / "x.sqlite"), str(SHIPPED_CASES)],
                         "does not exist"),
                        (["runs", "import", str(tmp_path / "missing.csv"), "--store", str(tmp_path / "s.sqlite")],
                         "cannot read")):
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr


def test_list_of_a_store_not_yet_made(tmp_path, capsys):
    assert main(["runs", "list", "--store", str(tmp_path / "new.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [] and not (tmp_path / "new.sqlite").exists()


def test_command_choices_follow_the_store():
    assert ORIGIN_CHOICES == ORIGINS
