"""The README's commands run as written, and its sample output is what the current code prints
(it fails when they drift: regenerate the sample with the command it shows)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# placeholders a reader fills in; commands that need data or devices are exercised elsewhere
PLACEHOLDER = re.compile(r"\[|\.\.\.|\bM\b|\bG\b|my_runs|\bDIR\b|streamlit|--data \S+ --steps \d+ --output")


def bash_blocks() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
        lines = [re.sub(r"^\.venv/bin/", "", line) for line in lines]
        commands.append([line for line in lines if line.startswith("planner ") and not PLACEHOLDER.search(line)])
    return [c for c in commands if c]


def planner(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLANNER_STORE": str(cwd / "runs.sqlite"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "planner.cli", *words], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_every_planner_command_the_readme_shows_runs(tmp_path):
    for name in ("calibration", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    ran = 0
    for block in bash_blocks():
        for line in block:
            words = line.split()[1:]
            if "&&" in words:
                words = words[:words.index("&&")]
            proc = planner(words, tmp_path)
            assert proc.returncode == 0, (line, proc.stderr)
            ran += 1
    assert ran >= 12


def test_the_sample_output_is_what_the_code_prints(tmp_path):
    sample = re.search(r"```\n\$ (planner [^\n]+)\n(.*?)```", README, flags=re.S)
    command, shown = sample.group(1), sample.group(2)
    printed = planner(command.split()[1:], tmp_path).stdout
    timing = re.compile(r"in \d+\.\d+ s")
    for line in shown.splitlines():
        if line.startswith("...") or not line.strip():
            continue
        assert timing.sub("in N s", line) in timing.sub("in N s", printed), (line, printed)
