"""`llmclf report` and `llmclf compare` read files only: they must not import torch (seconds of start-up)."""

from __future__ import annotations

import shutil
import subprocess
import sys

PROBE = """
import sys
from llmclf.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers.trainer", "peft", "accelerate") if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)


def test_report_and_compare_run_without_torch(trained_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained_run, a)
    shutil.copytree(trained_run, b)
    (a / "report.html").unlink()
    report = run_cli("report", str(a))
    assert report.returncode == 0, report.stderr
    assert (a / "report.html").is_file()
    compare = run_cli("compare", str(a), str(b), "--output", str(tmp_path / "c.md"))
    assert compare.returncode == 0, compare.stderr
    assert "accuracy after" in compare.stdout
    for done in (report, compare):
        assert "HEAVY []" in done.stdout, done.stdout


def test_the_probe_sees_torch_where_a_command_loads_it(trained_run):
    # The same probe on a command that runs the model: it must report torch, or the test above proves nothing.
    done = run_cli("--quiet", "predict", str(trained_run), "--text", "Stocks rallied")
    assert done.returncode == 0, done.stderr
    assert "'torch'" in done.stdout
