import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # TORCH-NOTES: one thread per process is 14x faster here

ROOT = Path(__file__).resolve().parent.parent
SHARED_CASES = ROOT.parent / "shared" / "validation" / "cases.json"


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `planner ...` as a separate process, the way people do."""
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"planner {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli
