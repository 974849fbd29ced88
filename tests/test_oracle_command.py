"""`planner oracle`: the comparison table over the stored grid, and its one-line errors."""

import json

from calibration.oracle_grid import load_grid


def test_table_lists_every_point_with_error_and_the_category_most_off(cli):
    proc = cli("oracle", check=True)
    lines = proc.stdout.splitlines()
    names = [p["name"] for p in load_grid()["points"]]
    for name in names:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "median |error|" in lines[-1] and "most off category" in proc.stdout


def test_json_has_a_row_per_point_with_categories(cli):
    data = json.loads(cli("oracle", "--json", check=True).stdout)
    assert data["summary"]["points"] == len(data["points"]) == len(load_grid()["points"])
    row = data["points"][0]
    assert set(row["category_errors"]) == {"params", "grads", "optimizer", "buffers", "activations"}
    assert row["error"] == row["predicted_bytes"] / row["traced_bytes"] - 1


def test_model_without_trace_is_refused_in_one_line(cli):
    proc = cli("oracle", "--model", "llama3-8b")
    assert proc.returncode == 2 and "--trace" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_trace_needs_a_plan_or_a_model(cli):
    proc = cli("oracle", "--trace")
    assert proc.returncode == 2 and "--plan" in proc.stderr


def test_untraceable_configuration_says_what_to_change(cli):
    proc = cli("oracle", "--trace", "--model", "llama3-8b", "--gpus", "2", "--pp", "2", "--global-batch", "2")
    assert proc.returncode == 2
    assert "cannot trace pipeline parallelism" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_grid_file_is_one_line(cli, tmp_path):
    proc = cli("oracle", "--grid", str(tmp_path / "none.json"))
    assert proc.returncode == 2 and "cannot read oracle grid" in proc.stderr


def test_trace_of_a_saved_plan_compares_with_the_plans_prediction(cli, tmp_path):
    plan = tmp_path / "plan.json"
    cli("suggest", "--model", "llama-tiny", "--gpu", "cpu", "--gpus", "1", "--seq-len", "64", "--global-batch", "4",
        "--save-plan", str(plan), check=True)
    proc = cli("oracle", "--trace", "--plan", str(plan), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "llama-tiny: traced peak" in proc.stdout and "planner " in proc.stdout and "error" in proc.stdout
