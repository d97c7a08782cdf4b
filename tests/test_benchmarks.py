"""The benchmarks run end to end on CPU and report what they measured: benchmarks/gpu.py in its smoke
mode (--tiny), benchmarks/serve_load.py against the tiny model's trained run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_mode_runs_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--train-rows", "32"]
    done = subprocess.run(
        [*cmd, "--infer-rows", "40", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["quantized_linears"] == 14  # 2 layers x 7 linears, NF4
    for name in ("a_recipe", "b_llmclf"):
        train, infer = report["results"][name]["train"], report["results"][name]["inference"]
        assert train["samples_s"] > 0 and infer["samples_s"] > 0 and math.isfinite(train["loss"])
    a, b = report["results"]["a_recipe"], report["results"]["b_llmclf"]
    assert a["settings"]["attn"] == "eager" and b["settings"]["attn"] == "sdpa"  # no flash-attn on CPU
    # Length-sorted batches pad less than file order (same texts, same batch size): a property, not a timing.
    assert b["inference"]["pad_share"] < a["inference"]["pad_share"]
    assert "ratio b/a" in done.stdout


def test_serve_load_benchmark_checks_every_answer_and_prints_both_rates(trained_run):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--run", str(trained_run)]
    done = subprocess.run(
        [*cmd, "--seconds", "1", "--rounds", "1", "--clients", "4"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    rates = {}
    for phase in ("sequential", "concurrent"):
        line = re.search(rf"{phase}: +(\d+) rows in .* = +([\d.]+) rows/s; failures (\d+);", out)
        assert line, out
        assert int(line[1]) > 0 and int(line[3]) == 0  # answered, and no request failed
        rates[phase] = float(line[2])
    # Every text answered in both phases was compared between a single pass and a merged one.
    compared = re.search(r"texts answered in both: (\d+), wrong: (\d+) at tolerance 0.0001 \(fp32\)", out)
    assert compared and int(compared[1]) > 0 and int(compared[2]) == 0, out
    ratio = float(re.search(r"ratio concurrent/sequential: ([\d.]+)x", out)[1])
    assert ratio == pytest.approx(rates["concurrent"] / rates["sequential"], abs=0.01)
    assert "SIGTERM: server exited with 0" in out
    ceiling = re.search(r"model alone .*: 1 text per call ([\d.]+) rows/s, 4 per call ([\d.]+) rows/s", out)
    assert ceiling and float(ceiling[1]) > 0 and float(ceiling[2]) > 0, out
