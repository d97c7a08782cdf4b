"""The time estimate printed before a CPU run: its arithmetic, and the real entry point logging it."""

import logging

import pytest

from conftest import train_tiny
from llmclf.training import estimate


def work(**changes) -> estimate.Work:
    base = {
        "parameters": 135_000_000,
        "tokens": {"train": 60_000, "val": 6_000, "test": 30_000},
        "epochs": 1.0,
        "adapted_share": 0.2,
        "validations": 2,
    }
    return estimate.Work(**{**base, **changes})


def test_each_epoch_adds_one_training_pass_and_the_cache_saves_the_frozen_part():
    one, two = estimate.flops(work()), estimate.flops(work(epochs=2.0))
    assert two - one == pytest.approx(3 * 2 * 135e6 * 0.2 * 60_000)
    # every layer trained every step costs more than the top fifth over cached lower layers
    assert estimate.flops(work(adapted_share=1.0)) > one
    # ten times the parameters, ten times the work
    assert estimate.flops(work(parameters=1_350_000_000)) == pytest.approx(10 * one)


def test_the_estimate_divides_the_work_by_the_reachable_rate():
    rate = 100e9
    assert estimate.estimate_seconds(work(), rate) == pytest.approx(
        estimate.flops(work()) / (rate * estimate.MODEL_EFFICIENCY)
    )
    assert [estimate.human(s) for s in (42, 600, 3 * 3600)] == ["42 s", "10 min", "3.0 h"]


def test_a_long_run_gets_a_note_with_the_size_and_the_time(caplog, monkeypatch):
    monkeypatch.setattr(estimate, "matmul_rate", lambda precision: 50e9)
    with caplog.at_level(logging.INFO, logger="llmclf"):
        seconds = estimate.announce(work(parameters=8_000_000_000, epochs=3.0), "fp32")
    assert seconds > estimate.NOTE_FROM_SECONDS
    record = next(r for r in caplog.records if "Estimated time" in r.getMessage())
    assert record.levelno == logging.WARNING
    assert (
        "8.0B parameters" in record.getMessage()
        and "60,000 training tokens x 3 epoch(s)" in record.getMessage()
    )


def test_training_logs_the_estimate_before_the_model_runs(
    tmp_path, tiny_model_dir, small_csv, capfd, monkeypatch
):
    monkeypatch.setattr(
        estimate, "NOTE_FROM_SECONDS", 0.0
    )  # a note even for the tiny model (--quiet shows notes)
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "run") == 0
    err = capfd.readouterr().err
    assert "note: Estimated time on this CPU: roughly" in err, err
    line = next(line for line in err.splitlines() if "Estimated time" in line)
    assert "M parameters" in line and "training tokens x" in line and "GFLOP/s in" in line
