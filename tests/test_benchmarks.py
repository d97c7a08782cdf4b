"""benchmarks/gpu.py in its CPU smoke mode (--tiny): it runs end to end and reports what it measured."""

from __future__ import annotations

import json
import math
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
