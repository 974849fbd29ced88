"""Hostile names through every export and `train --print-launch` (issue 18): a model or hardware
name, a run folder or a data path holding a newline, `$(...)`, backticks, quotes or `; rm` never
runs anything. The exported torchrun and Slurm scripts are run by bash with stub launchers on PATH
(scripts that only record their argv): nothing but the launcher runs (no PWNED file appears) and
the launcher receives each hostile value verbatim as one argument. YAML and TOML exports load
back with their own parsers and hold exactly the keys the exporter wrote.

Names reach an export from a plan file (which a person can edit); config.json and hardware JSON
files with control characters in their names are refused when loaded (tests/test_hostile_inputs.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from planner.api import Request, make_plan, suggest
from planner.errors import InvalidRequest
from planner.export import FORMATS, LaunchOptions, export_plan, shell_word
from planner.export_base import _Plan
from planner.export_engines import accelerate_config
from planner.plan import Plan, save_plan
from planner.search import Pins
from tests.conftest import ROOT

HOSTILE_NAMES = [
    "evil\n$(touch PWNED)",
    "evil\r\ntouch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "a'b\"c$(touch PWNED)",
    "x; touch PWNED; rm -rf /nonexistent-planner-test",
    "\nmain_process_ip: attacker.example.com",
    "x\u2028main_process_ip: attacker.example.com",
    "x\u0085touch PWNED",
    "x\x00y\x1b[31m",
    "x\\\n[job]\ndump_folder = \"/tmp/attacker\"",
]
# no control characters: these stay verbatim (run folders and data paths are the person's own)
HOSTILE_PATHS = ["runs/$(touch PWNED)", "runs/`touch PWNED`", "runs/a'b\"c", "runs/x; touch PWNED",
                 "runs/$HOME$(touch PWNED)", "runs/${HOME:?$(touch PWNED)}", "-rf $(touch PWNED)"]

STUB = """#!/bin/sh
# records its argv, NUL-separated, and runs nothing
for arg in "$0" "$@"; do printf '%s\\0' "$arg"; done >> "$STUB_LOG"
printf '\\n' >> "$STUB_LOG.calls"
"""


def _plan(model="llama3-8b", gpus=8):
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=gpus, seq_len=4096, global_batch=gpus * 2)
    best = suggest(request, Pins(tp=1, pp=1, zero=1, offload="none", recompute="full"), top=1)["candidates"][0]
    return make_plan(request, best)


@pytest.fixture(scope="module")
def base_plan():
    return _plan()


@pytest.fixture(scope="module")
def two_node_plan():
    return _plan(gpus=16)


def _renamed(plan, name: str):
    return dataclasses.replace(plan, model=dataclasses.replace(plan.model, name=name),
                               hardware=dataclasses.replace(plan.hardware, name=name))


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("torchrun", "srun", "python-stub"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")  # the scripts' `planner train --dry-run` line
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node-0\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "argv.log"),
            "DATA": "/data/corpus", "MASTER_ADDR": "10.0.0.1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "node-[0-1]", "HOME": str(tmp_path)}


def _run_script(text: str, tmp_path: Path) -> list[list[str]]:
    """Run `text` with bash in an empty folder, launchers stubbed; the argv of each launcher call."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, **_stubs(tmp_path)}
    log, calls_log = Path(env["STUB_LOG"]), Path(env["STUB_LOG"] + ".calls")
    log.unlink(missing_ok=True)
    calls_log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", "-c", text], cwd=work, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not list(work.iterdir()), f"the script created {list(work.iterdir())}"
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    calls = calls_log.read_text().count("\n") if calls_log.exists() else 0
    assert calls == 1, f"{calls} launcher calls; stderr: {proc.stderr}"
    return [log.read_bytes().decode().split("\0")[:-1]]


def _value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n)[:30] for n in HOSTILE_NAMES])
def test_hostile_names_in_every_format(name, base_plan, two_node_plan, tmp_path):
    for plan in (base_plan, two_node_plan):
        doc = _renamed(plan, name)
        for fmt in FORMATS:
            text = export_plan(doc, fmt, LaunchOptions(steps=10)).text
            # the name appears only in comments and the job name
            assert all("PWNED" not in line or line.startswith("#") for line in text.splitlines())
            _check_loads_back(fmt, text, doc)
            if fmt in ("torchrun", "slurm"):
                argv = _run_script(text, tmp_path)[0]
                assert Path(argv[0]).name == {"torchrun": "torchrun", "slurm": "srun"}[fmt]
                assert _value_after(argv, "--output") == "runs/llm-planner"  # the CLI's runs/<name>: below
                assert _value_after(argv, "--data") == "/data/corpus"


def _check_loads_back(fmt: str, text: str, doc: Plan) -> None:
    """The export parses with its format's parser and holds exactly the exporter's keys."""
    workload = doc.workload
    if fmt == "deepspeed":
        assert json.loads(text)["train_batch_size"] == workload.global_batch
    elif fmt == "accelerate":
        loaded = yaml.safe_load(text)
        expected = accelerate_config(_Plan(doc))
        assert loaded == expected  # no injected key (main_process_ip: attacker...), no value changed
    elif fmt == "torchtitan":
        assert _torchtitan_dump_folder(text) == "runs/llm-planner"
    elif fmt == "megatron":
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    for line in text.splitlines():  # a comment line stays one comment line
        assert "\r" not in line and "\x00" not in line and "\u2028" not in line and "\x85" not in line


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_run_dirs_and_data_reach_the_launcher_verbatim(path, base_plan, two_node_plan, tmp_path):
    for plan in (base_plan, two_node_plan):
        options = LaunchOptions(plan_path=path + ".json", data=path, output=path, steps=3)
        for fmt in ("torchrun", "slurm"):
            argv = _run_script(export_plan(plan, fmt, options).text, tmp_path)[0]
            assert _value_after(argv, "--output") == path
            assert _value_after(argv, "--data") == path
            assert _value_after(argv, "--plan") == path + ".json"
    text = export_plan(base_plan, "torchtitan", LaunchOptions(output=path)).text
    assert _torchtitan_dump_folder(text) == path


def _torchtitan_dump_folder(text: str) -> str:
    """The module compiles, and its one string setting is the run folder, as a literal."""
    tree = ast.parse(text)
    values = [node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and ast.unparse(node.targets[0]) == "config.dump_folder" and isinstance(node.value, ast.Constant)]
    assert len(values) == 1
    return values[0]


def test_plain_variables_still_expand(two_node_plan, tmp_path):
    options = LaunchOptions(data="${DATA}/train.jsonl", output="runs/$SLURM_JOB_ID")
    for fmt in ("torchrun", "slurm"):
        argv = _run_script(export_plan(two_node_plan, fmt, options).text, tmp_path)[0]
        assert _value_after(argv, "--data") == "/data/corpus/train.jsonl"
        assert _value_after(argv, "--output") == "runs/42"
        assert any(a.startswith("--rdzv-endpoint=") and "$" not in a for a in argv)


def test_shell_word_round_trips_through_the_shell():
    for value in HOSTILE_PATHS + ["", "plain", "a b", "'", '"', "\\", "$", "${", "$(", "\n"]:
        assert shlex.split(shell_word(value)) == [value]


def test_control_characters_in_launch_paths_are_refused(base_plan):
    for field in ("data", "output", "plan_path"):
        with pytest.raises(InvalidRequest, match="control characters"):
            export_plan(base_plan, "torchrun", LaunchOptions(**{field: "runs/a\nb"}))


def test_cli_default_run_dir_never_holds_the_name_unquoted(base_plan, tmp_path, cli):
    doc = _renamed(base_plan, "$(touch PWNED)`touch PWNED`")
    path = tmp_path / "plan.json"
    save_plan(str(path), doc)
    for fmt in ("torchrun", "slurm"):
        proc = cli("export", str(path), "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        argv = _run_script(proc.stdout, tmp_path)[0]
        folder = _value_after(argv, "--output")
        assert folder.startswith("runs/") and re.fullmatch(r"[A-Za-z0-9_.-]+", folder[5:]) and "PWNED" in folder


def test_print_launch_quotes_every_word(base_plan, tmp_path):
    """`planner train --print-launch` prints a line that, run by bash, hands the worker launcher the
    hostile --data and --output verbatim and runs nothing else. The Python executable is swapped for
    a stub to run the line."""
    path = tmp_path / "plan.json"
    save_plan(str(path), base_plan)
    hostile = "runs/$(touch PWNED)`touch PWNED`'q\"; touch PWNED"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "train", "--plan", str(path), "--data", hostile,
                           "--output", hostile, "--steps", "1", "--print-launch"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stub = tmp_path / "bin" / "python-stub"
    _stubs(tmp_path)
    text = proc.stdout.replace(shlex.quote(sys.executable), str(stub))
    assert str(stub) in text
    argv = _run_script(text, tmp_path)[0]
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert _value_after(argv, "--output") == hostile and _value_after(argv, "--data") == hostile


def test_streamlit_page_launch_text_with_a_hostile_uploaded_config(tmp_path):
    """The page shows `export_plan(plan, "torchrun")` as its launch command; an uploaded config whose
    name is `$(...)` gives a line that runs only torchrun; a name with a newline, or JSON nested too
    deep, is refused with a one-line InvalidRequest."""
    from planner import views

    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}
    fields = {"gpu": "cpu", "gpus": 2, "seq_len": 128, "global_batch": 8, "method": "full", "precision": "fp32"}
    page = views.what_fits_page(fields, json.dumps({**config, "_name_or_path": "$(touch PWNED)`touch PWNED`"}))
    argv = _run_script(page["launch"], tmp_path)[0]
    assert Path(argv[0]).name == "torchrun" and _value_after(argv, "--data") == "/data/corpus"
    with pytest.raises(InvalidRequest, match="control character"):
        views.what_fits_page(fields, json.dumps({**config, "_name_or_path": "x\nmain_process_ip: attacker"}))
    with pytest.raises(InvalidRequest, match="control character"):
        views.what_fits_page({**fields, "upload_name": "x\rname"}, json.dumps(config))
    with pytest.raises(InvalidRequest, match="nested too deep"):
        views.what_fits_page(fields, "[" * 100_000 + "]" * 100_000)
