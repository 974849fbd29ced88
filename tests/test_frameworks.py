"""The software stack as an input (--framework) and calibration that stays where it was fitted
(issue 17 items 1 and 3)."""

import copy
import json
from types import SimpleNamespace

import pytest

from planner.api import Request, predict
from planner.errors import InvalidRequest
from planner.plan import ParallelConfig, load_plan
from planner.profile import Profile, load_profile
from planner.specs import FRAMEWORKS, Workload

CONFIG = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, zero=3)


def _profile_file(tmp_path, data, name="p"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _predict(gpu, calibration, framework="executor", precision="bf16"):
    request = Request(model="llama3-8b", gpu=gpu, gpus=8, seq_len=4096, global_batch=8, framework=framework,
                      precision=precision, calibration=calibration)
    return predict(request, CONFIG)


def test_framework_is_a_workload_field_that_defaults_to_the_executor():
    assert Workload(seq_len=1024, global_batch=8).framework == "executor"
    with pytest.raises(InvalidRequest, match="--framework must be one of"):
        Workload(seq_len=1024, global_batch=8, framework="nemo")


def test_the_cli_takes_framework_on_every_command_that_predicts(cli):
    for command in ("suggest", "predict", "fits", "capacity"):
        proc = cli(command, "--help")
        assert "--framework" in proc.stdout, command
    bad = cli("predict", "--model", "llama3-8b", "--framework", "nemo")
    assert bad.returncode == 2 and "--framework" in bad.stderr and "Traceback" not in bad.stderr


def test_plans_written_before_the_framework_read_as_the_executor(tmp_path):
    from planner.api import make_plan
    from planner.plan import save_plan

    request = Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=1024, global_batch=8)
    tiny_plan_file = tmp_path / "plan.json"
    save_plan(str(tiny_plan_file), make_plan(request, predict(request, CONFIG)))
    document = json.loads(tiny_plan_file.read_text())
    assert document["workload"]["framework"] == "executor"
    document["workload"].pop("framework")
    older = tmp_path / "older.json"
    older.write_text(json.dumps(document))
    assert load_plan(str(older)).workload.framework == "executor"


def test_every_public_case_is_tagged_with_a_framework_its_stack_names():
    from calibration.case_stack import framework_of
    from calibration.cases import load_cases

    rows = json.loads(open("calibration/data/public_cases.json").read())["cases"]
    assert all(row.get("planner_framework") in FRAMEWORKS for row in rows)
    names = {row["id"]: row["planner_framework"] for row in rows}
    assert names["c001"] == "torchtitan" and names["c031"] == "llm-foundry" and names["c057"] == "megatron"
    assert names["c069"] == "deepspeed" and names["c067"] == "megatron"  # one table, two stacks
    cases = {c.id: c for c in load_cases() if c.workload is not None}
    assert all(c.workload.framework == names[i] for i, c in cases.items())
    assert all(framework_of(row) == row["planner_framework"] for row in rows)  # untagged copies read alike


def test_a_frameworks_factors_scale_its_chips_values_and_fp8_only_under_fp8():
    data = copy.deepcopy(load_profile().data)
    data["frameworks"] = {"megatron": {"matmul_factor": 0.5, "fp8_factor": 1.5, "attention_factor": 2.0,
                                       "layer_overhead_factor": 3.0}}
    profile = Profile("t", "", data)
    plain = {dtype: profile.compute("h100-sxm-80gb", "nvidia", dtype, "GH100") for dtype in ("bf16", "fp8")}
    mega = {dtype: profile.compute("h100-sxm-80gb", "nvidia", dtype, "GH100", "megatron") for dtype in ("bf16", "fp8")}
    assert mega["bf16"].matmul_efficiency_max == pytest.approx(0.5 * plain["bf16"].matmul_efficiency_max)
    assert mega["fp8"].matmul_efficiency_max == pytest.approx(0.75 * plain["fp8"].matmul_efficiency_max)
    assert mega["bf16"].attention_efficiency == pytest.approx(min(1.0, 2 * plain["bf16"].attention_efficiency))
    assert mega["bf16"].layer_overhead_s == pytest.approx(3 * plain["bf16"].layer_overhead_s)
    assert profile.compute("h100-sxm-80gb", "nvidia", "bf16", "GH100", "torchtitan") == plain["bf16"]


def test_uncalibrated_chips_and_frameworks_are_flagged_and_their_intervals_widened(tmp_path, cli):
    data = copy.deepcopy(load_profile().data)
    data["fitted_on"] = {**data["fitted_on"], "chips": ["GH100"], "hardware": ["h100-sxm-80gb"],
                         "frameworks": ["torchtitan"]}
    data["uncertainty"]["uncalibrated_log_sd"] = {"chip": {"throughput": 0.2, "memory": 0.05},
                                                  "framework": {"throughput": 0.1, "memory": None}}
    path = _profile_file(tmp_path, data)
    known, new_chip, both = (_predict("h100-sxm-80gb", path, "torchtitan"), _predict("a100-80gb", path, "torchtitan"),
                             _predict("a100-80gb", path, "megatron"))
    assert known["uncalibrated"] == [] and new_chip["uncalibrated"] == ["chip GA100"]
    assert both["uncalibrated"] == ["chip GA100", "framework megatron"]

    def width(p):
        low, high = p["time"]["tokens_per_s_range"]
        return high / low

    assert width(known) < width(new_chip) < width(both)
    proc = cli("predict", "--model", "llama3-8b", "--gpu", "a100-80gb", "--gpus", "8", "--calibration", path)
    assert "uncalibrated: intervals widened" in proc.stdout and "framework executor" in proc.stdout
    quiet = cli("predict", "--model", "llama3-8b", "--gpu", "h100-sxm-80gb", "--gpus", "8", "--framework",
                "torchtitan", "--calibration", path)
    assert quiet.returncode == 0 and "uncalibrated" not in quiet.stdout
    for command in (("fits", "--gpus", "1"), ("capacity", "--tokens", "1e9", "--max-gpus", "8")):
        flagged = cli(command[0], "--model", "llama3-8b", "--gpu", "a100-80gb", *command[1:], "--calibration", path)
        assert flagged.returncode == 0 and "uncalibrated: intervals widened" in flagged.stdout, command
        assert "chip GA100 or framework executor" in flagged.stdout
        as_json = cli(command[0], "--model", "llama3-8b", "--gpu", "a100-80gb", *command[1:], "--calibration", path,
                      "--json")
        assert json.loads(as_json.stdout)["uncalibrated"] == ["chip GA100", "framework executor"], command


def _items(pairs):
    """Stand-ins for prepared runs: (hardware part, framework, precision)."""
    from planner.hardware import load_hardware

    return [SimpleNamespace(context=SimpleNamespace(hardware=load_hardware(hw),
                                                    workload=SimpleNamespace(framework=fw, precision=prec)))
            for hw, fw, prec in pairs]


def test_a_frameworks_factors_are_fitted_only_where_the_data_tells_them_from_its_chips():
    from calibration.scope import scope_of

    alone = scope_of(_items([("h100-sxm-80gb", "executor", "bf16")] * 3))
    assert alone.frameworks == () and not alone.shared and alone.chip_names == {"GH100"}
    mixed = scope_of(_items([("h100-sxm-80gb", "executor", "bf16"), ("h100-sxm-80gb", "torchtitan", "fp8"),
                             ("a100-80gb", "megatron", "bf16"), ("rtx4090-24gb", "torchtune", "bf16")]))
    assert mixed.frameworks == ("executor", "torchtitan") and mixed.fp8_frameworks == ("torchtitan",)
    assert mixed.shared  # three chips


def test_fitting_runs_of_one_chip_leaves_every_other_chip_bit_identical(tmp_path):
    """`planner calibrate` on one chip's runs: that chip moves, no other (nor its intervals), and the
    base profile's out-of-sample figures are not passed off as the new profile's."""
    from calibration.fit import load_run_records
    from calibration.fitting import fit_profile

    shipped = load_profile()
    data = copy.deepcopy(shipped.data)  # the shipped profile, recording what it calibrated
    data["fitted_on"] = {**data["fitted_on"], "chips": ["GA100", "GH100"], "hardware": ["a100-80gb"],
                         "frameworks": ["executor", "torchtune"]}
    base_path = _profile_file(tmp_path, data, "base")
    base = load_profile(base_path)
    runs = load_run_records(["calibration/data/h100_runs"])[:2]
    assert {r.hardware_name for r in runs} == {"h100-sxm-80gb"}
    for run in runs:
        run.tokens_per_s_per_device *= 0.6  # a much slower stack than the profile's
    fitted = fit_profile(runs, base)
    assert "validation" not in fitted and "not recomputed" in fitted["uncertainty"]["source"]
    assert "GH100" in fitted["fitted_on"]["chips"]
    assert all("h100" in key or "GH100" in key for key in fitted["fitted_on"]["parameters"]
               if key not in (base.data.get("fitted_on") or {}).get("parameters", {}))
    path = _profile_file(tmp_path, fitted, "fitted")
    for gpu, framework in (("a100-80gb", "executor"), ("mi300x-192gb", "megatron"), ("rtx4090-24gb", "torchtune")):
        assert _predict(gpu, path, framework) == _predict(gpu, base_path, framework), gpu
    slower = _predict("h100-sxm-80gb", path)["time"]["step_s"] / _predict("h100-sxm-80gb", base_path)["time"]["step_s"]
    assert slower > 1.2


def test_validate_shows_each_rows_framework():
    from calibration.cases import load_cases
    from calibration.commands.validate import _as_json, _render
    from calibration.validate import validate

    result = validate([c for c in load_cases() if c.id in ("c001", "c057")])
    text = _render(result, False)
    assert "framework" in text.splitlines()[0]
    assert "torchtitan" in text and "megatron" in text
    assert {r["framework"] for r in _as_json(result)["cases"]} == {"torchtitan", "megatron"}


def test_calibrate_never_prints_the_base_profiles_held_out_figures(cli, tmp_path):
    rows = json.loads(open("calibration/data/public_cases.json").read())["cases"]
    subset = tmp_path / "cases.json"
    subset.write_text(json.dumps([r for r in rows if r["id"] in ("c001", "c002")]))
    out = tmp_path / "fitted.json"
    proc = cli("calibrate", "--cases", str(subset), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "out-of-sample: not computed" in proc.stdout and "leave one source out" not in proc.stdout
    assert "validation" not in json.loads(out.read_text())


def test_a_chip_fitted_under_its_own_name_keeps_the_fitted_values():
    """The CPU preset is its own chip ("cpu"): the fit writes its values into compute.cpu, which must
    not then be moved again as a part following its chip (that scaled them by the fit's own factor,
    clipped at the bounds, and a one-run fit missed its own run by 62 %)."""
    from calibration.fitting import _parts_follow_their_chips
    from planner.hardware import chip_of, presets

    assert chip_of(presets()["cpu"]) == "cpu"
    before = {"compute": {"default": {"*": {"matmul_efficiency_max": 0.7}},
                          "cpu": {"*": {"matmul_efficiency_max": 0.03, "layer_overhead_s": 1e-2}}}}
    after = copy.deepcopy(before)
    after["compute"]["cpu"]["*"] = {"matmul_efficiency_max": 0.8, "layer_overhead_s": 5e-4}
    moved = _parts_follow_their_chips(before, copy.deepcopy(after), {"cpu": "cpu"}, frozenset())
    assert moved["compute"]["cpu"] == after["compute"]["cpu"]
