"""Bad input: one line on stderr saying what to change, exit 2, never a traceback."""

import json

import pytest


def one_line_error(proc, code=2):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_unknown_model_suggests_close_names(cli):
    line = one_line_error(cli("suggest", "--model", "llama3-7b"))
    assert "llama3-70b" in line or "llama3-8b" in line


def test_unknown_gpu_suggests_close_names(cli):
    line = one_line_error(cli("suggest", "--model", "llama3-8b", "--gpu", "h100"))
    assert "h100-sxm-80gb" in line


def test_unknown_flavor(cli):
    line = one_line_error(cli("suggest", "--model", "llama3-8b", "--flavor", "9xLarge.999GB"))
    assert "flavor" in line


def test_flavor_sets_devices(cli):
    proc = cli("suggest", "--model", "llama3-70b", "--flavor", "8xLarge.4096GB", "--seq-len", "1024",
               "--global-batch", "512", "--json", check=True)
    assert json.loads(proc.stdout)["request"]["gpus"] == 64


@pytest.mark.parametrize("args", [
    ["--gpus", "0"], ["--gpus", "-4"], ["--gpus", "eight"], ["--seq-len", "0"], ["--global-batch", "1.5"],
])
def test_bad_sizes(cli, args):
    line = one_line_error(cli("suggest", "--model", "llama3-8b", *args))
    assert "positive whole number" in line


@pytest.mark.parametrize("args,words", [
    (["--tp", "3"], "divide"),  # 3 does not divide 8 devices
    (["--tp", "16", "--gpus", "16"], "heads"),  # 8 kv heads
    (["--dp", "2", "--tp", "2"], "devices"),  # 4 != 8
    (["--dp", "8", "--global-batch", "12"], "divisible"),
    (["--pp", "8", "--gpus", "64", "--model", "llama-tiny"], "layers"),
])
def test_bad_degrees(cli, args, words):
    base = ["predict", "--model", "llama3-8b", "--gpus", "8"]
    line = one_line_error(cli(*base, *args))
    assert words in line


def test_malformed_config_file(cli, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_line_error(cli("suggest", "--model", str(bad)))
    bad.write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    assert "unsupported model_type" in one_line_error(cli("suggest", "--model", str(bad)))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 0}))
    assert "hidden_size" in one_line_error(cli("suggest", "--model", str(bad)))


def test_missing_file(cli):
    assert "does not exist" in one_line_error(cli("suggest", "--model", "/nope/config.json"))


def test_bad_hardware_file(cli, tmp_path):
    hw = tmp_path / "gpu.json"
    hw.write_text(json.dumps({"name": "x"}))
    assert "missing key" in one_line_error(cli("suggest", "--model", "llama3-8b", "--gpu", str(hw)))


def test_precision_the_hardware_lacks(cli):
    line = one_line_error(cli("suggest", "--model", "llama3-8b", "--gpu", "a100-80gb", "--precision", "fp8"))
    assert "fp8" in line


def test_predict_not_fitting_still_prints(cli):
    proc = cli("predict", "--model", "llama3-70b", "--gpus", "8", "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["fits"] is False and "GiB" in data["reason"]


def test_calibrate_into_a_missing_folder_says_so_before_fitting(cli, tmp_path):
    line = one_line_error(cli("calibrate", "--out", str(tmp_path / "nowhere" / "profile.json")))
    assert "does not exist" in line and "nowhere" in line
