"""Crash-safe checkpoints and `llmclf train --resume` (checkpoints.py), through the real entry point."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import TRAIN_ARGS, write_csv
from llmclf.cli import main
from llmclf.manifest import MANIFEST, write_manifest
from llmclf.training.checkpoints import STAGING, last_complete_checkpoint

# More steps than the shared settings (4 epochs x 10 steps), so that the kill lands part-way (step 5).
LONG = ["--epochs", "4", "--save-steps", "5"]


def train_cmd(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--output", str(out), *TRAIN_ARGS, *extra]


def complete_checkpoints(out):
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [p for p in root.glob("checkpoint-*") if (p / MANIFEST).is_file()]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, small_csv, capsys):
    reference = tmp_path / "reference"
    assert main(["--quiet", *train_cmd(small_csv, tiny_model_dir, reference, *LONG)]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmclf", "--quiet", *train_cmd(small_csv, tiny_model_dir, killed, *LONG)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert complete_checkpoints(killed), "killed before any checkpoint was complete"
    assert not (killed / "metrics.json").exists()  # really interrupted part-way
    assert (killed / "fingerprint.json").is_file() and (killed / "metrics_before.json").is_file()
    capsys.readouterr()

    assert main(train_cmd(small_csv, tiny_model_dir, killed, *LONG, "--resume")) == 0
    printed = capsys.readouterr().err  # notes and progress: stderr
    assert "Resuming from" in printed and "checkpoint-" in printed
    assert "Reusing the metrics before training" in printed  # the saved baseline is not recomputed

    got = load_file(killed / "adapter/adapter_model.safetensors")
    want = load_file(reference / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    assert json.loads((killed / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(killed / "predictions_test.csv"), pd.read_csv(reference / "predictions_test.csv")
    )
    assert not (killed / "checkpoints").exists()  # deleted after success, as in a run never interrupted


def fake_checkpoint(root, step, *, manifest=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (folder / "trainer_state.json").write_text("{}")
    if manifest:
        write_manifest(folder, fingerprint_sha256=None)
    return folder


def test_incomplete_checkpoints_are_skipped_with_a_message(tmp_path):
    root = tmp_path / "checkpoints"
    good = fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, manifest=False)  # killed during the save, before the manifest
    corrupt = fake_checkpoint(root, 8)
    (corrupt / "adapter_model.safetensors").write_bytes(os.urandom(64))  # same size, other bytes
    truncated = fake_checkpoint(root, 9)
    (truncated / "adapter_model.safetensors").write_bytes(b"x")
    (root / STAGING / "checkpoint-10").mkdir(parents=True)  # a leftover temporary folder
    messages = []
    assert last_complete_checkpoint(root, messages.append) == good
    text = "\n".join(messages)
    assert STAGING in text and "interrupted" in text
    assert "checkpoint-6" in text and MANIFEST in text
    assert "checkpoint-8" in text and "SHA-256" in text
    assert "checkpoint-9" in text and "bytes" in text
    assert not (root / STAGING).exists()


def test_checkpoint_is_staged_then_renamed(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--save-steps", "4", "--keep-checkpoint"]
    assert main(["--quiet", *train_cmd(small_csv, tiny_model_dir, out, *extra)]) == 0
    root = out / "checkpoints"
    kept = sorted(p.name for p in root.iterdir())
    assert kept == ["checkpoint-10"]  # only the newest is kept, no staging folder is left
    manifest = json.loads((root / "checkpoint-10" / MANIFEST).read_text())
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(
        manifest["files"]
    )
    assert last_complete_checkpoint(root, print) == root / "checkpoint-10"


@pytest.fixture(scope="module")
def interrupted(trained_run, tmp_path_factory):
    """A copy of the finished run made to look interrupted: no metrics.json yet."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(trained_run, out)
    (out / "metrics.json").unlink()
    return out


def test_resume_with_other_data_labels_or_model_is_refused(
    interrupted, tmp_path, small_csv, tiny_model_dir, capsys
):
    rows = pd.read_csv(small_csv, dtype=str, keep_default_na=False).to_dict("records")
    changed = [dict(r) for r in rows]
    changed[0]["text"] += " (edited)"
    other_data = write_csv(tmp_path / "edited.csv", changed)
    three_classes = write_csv(tmp_path / "three.csv", [r for r in rows if r["label"] != "World"])
    other_model = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, other_model)
    cases = [
        (other_data, tiny_model_dir, [], ["the data differs", "edited.csv"]),
        (three_classes, tiny_model_dir, [], ["the labels differ", "'World'"]),
        (small_csv, other_model, [], ["the model differs", "model-copy"]),
        (small_csv, tiny_model_dir, ["--lr", "1e-3"], ["setting train.lr differs", "0.002", "0.001"]),
    ]
    for data, model, extra, needles in cases:
        assert main(train_cmd(data, model, interrupted, *extra, "--resume")) == 2
        err = capsys.readouterr().err
        assert "\nerror: Cannot resume" in "\n" + err and "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)
    assert not (interrupted / "metrics.json").exists()  # nothing was trained


def test_resume_needs_a_run_folder(tmp_path, small_csv, tiny_model_dir, trained_run, capsys):
    assert main(train_cmd(small_csv, tiny_model_dir, tmp_path / "none", "--resume")) == 2
    assert "run folder" in capsys.readouterr().err
    assert main(train_cmd(small_csv, tiny_model_dir, trained_run, "--resume")) == 2
    assert "finished run" in capsys.readouterr().err
    assert main(train_cmd(small_csv, tiny_model_dir, trained_run, "--resume", "--overwrite")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_save_steps_is_validated(capsys):
    assert main(["train", "--save-steps", "0"]) == 2
    assert "train.save_steps=0" in capsys.readouterr().err


def test_resume_from_a_named_checkpoint_checks_it(interrupted, tmp_path, small_csv, tiny_model_dir, capsys):
    args = train_cmd(small_csv, tiny_model_dir, interrupted)
    assert main([*args, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "Checkpoint folder not found" in capsys.readouterr().err
    partial = fake_checkpoint(tmp_path, 3, manifest=False)
    assert main([*args, "--resume", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "is incomplete" in err and MANIFEST in err
    foreign = fake_checkpoint(tmp_path / "other-run", 3)  # complete, but written by another run
    assert main([*args, "--resume", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "written by a run with other data, labels, model or settings" in err and "Traceback" not in err
