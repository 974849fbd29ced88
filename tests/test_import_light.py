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


def test_parsers_of_every_command_stay_light():
    """Building every subcommand's parser (executor's and calibration's too) imports no torch:
    their modules keep heavy imports inside run()."""
    code = ("import sys\nfrom planner.cli import build_parser\nbuild_parser()\n"
            "print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_suggest_imports_no_package_above_planner():
    """`planner suggest` builds only its own parser: executor/ and calibration/ stay unimported."""
    code = ("import sys\nfrom planner.cli import main\n"
            "main(['suggest', '--model', 'llama3-8b', '--gpus', '8', '--json'])\n"
            "print('ABOVE=' + ','.join(m for m in sys.modules if m.split('.')[0] in ('executor', 'calibration')),"
            " file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ABOVE=\n" in proc.stderr + "\n", proc.stderr


def test_command_of_a_missing_package_says_so_in_one_line():
    """With executor/ not installed, `planner train` says so in one line; `planner suggest` still works."""
    code = ("import sys\nsys.modules['executor'] = None  # as if not installed\nfrom planner.cli import main\n"
            "print('RC=%d' % main(['train', '--plan', 'p.json']))\n"
            "print('RC=%d' % main(['models']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "planner train" in proc.stderr and "executor" in proc.stderr and "not installed" in proc.stderr
    assert "RC=1" in proc.stdout and "RC=0" in proc.stdout
