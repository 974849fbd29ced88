"""`import planner` (and a whole suggest) must not pull in torch, transformers or streamlit."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "streamlit")


def test_import_planner_is_light():
    code = "import sys, planner, planner.cli; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_suggest_stays_light():
    code = ("import sys\nfrom planner.cli import main\n"
            "main(['suggest', '--model', 'llama3-8b', '--gpus', '8', '--json'])\n"
            "print('HEAVY=' + ','.join(m for m in %r if m in sys.modules), file=sys.stderr)" % (HEAVY,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY=\n" in proc.stderr + "\n" and "HEAVY=t" not in proc.stderr
