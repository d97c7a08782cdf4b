"""A checkpoint folder is untrusted data: a malformed manifest, a path or link leading out of the folder,
a file the manifest leaves out, or a checkpoint written by another run is skipped (`--resume`) or refused
with a clear error (`--resume PATH`), never an exception and never a read elsewhere.

The manifests are written by hand here (not with llmclf's writer), so that each case is exactly the
bytes a damaged or planted checkpoint would hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from conftest import TRAIN_ARGS, propagating
from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.training.checkpoints import (
    begin_run,
    checkpoint_problem,
    fingerprint_sha,
    last_complete_checkpoint,
)

MANIFEST = "llmclf_manifest.json"
FINGERPRINT = {
    "data": {"source": "news.csv", "sha256": "d" * 64, "rows": {"train": 60, "val": 15, "test": 30}},
    "labels": ["Business", "Sports", "World"],
    "model": {"name": "tiny", "source": "/models/tiny", "quantized": False},
    "settings": {"train.lr": 0.002, "train.seed": 7},
}
OTHER = {**FINGERPRINT, "data": {**FINGERPRINT["data"], "sha256": "e" * 64}}  # another data set


def entry(path):
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def checkpoint(root, step, fingerprint=FINGERPRINT, manifest=None):
    """A checkpoint folder with two files and a manifest (a valid one unless `manifest` is given: a
    JSON value, or a str written as is)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (folder / "trainer_state.json").write_text("{}")
    if manifest is None:
        files = {p.name: entry(p) for p in sorted(folder.iterdir())}
        sha = fingerprint_sha(fingerprint) if fingerprint is not None else None
        manifest = {"fingerprint_sha256": sha, "files": files}
    (folder / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return folder


def add_to_manifest(folder, name, meta):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = meta
    (folder / MANIFEST).write_text(json.dumps(manifest))


def run_folder(tmp_path, fingerprint=FINGERPRINT):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "fingerprint.json").write_text(json.dumps(fingerprint))
    return out


MALFORMED = {
    "empty file list": {"fingerprint_sha256": None, "files": {}},
    "files is a list": {"files": []},
    "entry is a number": {"files": {"adapter_model.safetensors": 3}},
    "entry without sha256": {"files": {"adapter_model.safetensors": {"size": 64}}},
    "size is a string": {"files": {"adapter_model.safetensors": {"size": "64", "sha256": "0" * 64}}},
    "JSON list": [],
    "JSON null": None,
    "JSON string": "not json {",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_a_skipped_checkpoint_not_an_exception(tmp_path, case):
    root = tmp_path / "checkpoints"
    good = checkpoint(root, 4)
    bad = checkpoint(root, 8, manifest=MALFORMED[case] if case != "JSON null" else "null")
    assert isinstance(checkpoint_problem(bad), str) and checkpoint_problem(bad)
    messages = []
    assert last_complete_checkpoint(root, messages.append) == good
    assert any("checkpoint-8" in m for m in messages), messages


@pytest.mark.parametrize("case", ["empty file list", "files is a list", "entry is a number", "JSON null"])
def test_resume_path_with_a_malformed_manifest_is_a_clear_error(tmp_path, case):
    out = run_folder(tmp_path)
    bad = checkpoint(tmp_path / "elsewhere", 8, manifest=MALFORMED[case] if case != "JSON null" else "null")
    with pytest.raises(LlmclfError, match="is incomplete") as caught:
        begin_run(out, FINGERPRINT, str(bad))
    assert MANIFEST in str(caught.value)


def test_manifest_paths_leaving_the_folder_are_not_read(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    good = checkpoint(root, 4)
    # Files outside the checkpoint, listed with their true size and hash: a manifest that names them
    # must not verify (nor make llmclf read them).
    beside = checkpoint(root, 6)
    (root / "beside.bin").write_bytes(b"outside the checkpoint")
    add_to_manifest(beside, "../beside.bin", entry(root / "beside.bin"))
    absolute = checkpoint(root, 8)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"a file elsewhere on disk")
    add_to_manifest(absolute, str(secret), entry(secret))
    for folder in (beside, absolute):
        problem = checkpoint_problem(folder)
        assert problem and "outside" in problem, problem
    messages = []
    assert last_complete_checkpoint(root, messages.append) == good
    out = run_folder(tmp_path / "second")
    with pytest.raises(LlmclfError, match="is incomplete.*outside"):
        begin_run(out, FINGERPRINT, str(absolute))


def test_a_link_leading_out_of_a_checkpoint_does_not_verify(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    good = checkpoint(root, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    # A listed file that is a link to a file outside with the very same bytes.
    listed = checkpoint(root, 4)
    (outside / "adapter_model.safetensors").write_bytes((listed / "adapter_model.safetensors").read_bytes())
    (listed / "adapter_model.safetensors").unlink()
    (listed / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    # A link the manifest does not list (the Trainer would read optimizer.pt when resuming).
    unlisted = checkpoint(root, 6)
    (outside / "optimizer.pt").write_bytes(b"state from elsewhere")
    (unlisted / "optimizer.pt").symlink_to(outside / "optimizer.pt")
    # The checkpoint folder itself a link to a complete checkpoint elsewhere.
    (root / "checkpoint-8").symlink_to(checkpoint(tmp_path / "other", 8), target_is_directory=True)
    for folder in (listed, unlisted):
        assert checkpoint_problem(folder), folder
    messages = []
    assert last_complete_checkpoint(root, messages.append) == good
    text = "\n".join(messages)
    assert all(f"checkpoint-{n}" in text for n in (4, 6, 8)), text


def test_a_file_added_to_a_checkpoint_after_its_manifest_does_not_verify(tmp_path):
    folder = checkpoint(tmp_path / "checkpoints", 4)
    (folder / "optimizer.pt").write_bytes(b"not written by the run")
    problem = checkpoint_problem(folder)
    assert problem and "optimizer.pt" in problem


def test_plain_resume_skips_a_checkpoint_of_another_run(tmp_path, caplog):
    out = run_folder(tmp_path)
    own = checkpoint(out / "checkpoints", 4)
    checkpoint(out / "checkpoints", 8, fingerprint=OTHER)  # copied in, newer, complete
    checkpoint(out / "checkpoints", 9, fingerprint=None)  # complete, but records no fingerprint
    with propagating("llmclf"), caplog.at_level("INFO", logger="llmclf"):
        start = begin_run(out, FINGERPRINT, "last")
    assert start.checkpoint == str(own)
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-8" in skipped and "checkpoint-9" in skipped and "note:" in skipped


def test_plain_resume_after_an_edited_fingerprint_trains_from_the_start(tmp_path):
    # The run was started with OTHER; fingerprint.json was then edited to match this run's inputs.
    out = run_folder(tmp_path, fingerprint=FINGERPRINT)
    checkpoint(out / "checkpoints", 8, fingerprint=OTHER)
    assert begin_run(out, FINGERPRINT, "last").checkpoint is None
    with pytest.raises(LlmclfError, match="other data, labels, model or settings"):
        begin_run(out, FINGERPRINT, str(out / "checkpoints" / "checkpoint-8"))


def test_plain_resume_takes_a_checkpoint_of_the_same_inputs(tmp_path):
    # The data file moved (another path, same rows): the saved fingerprint differs only in its source,
    # which does not change the result, so the run's own checkpoints still count.
    moved = {**FINGERPRINT, "data": {**FINGERPRINT["data"], "source": "/new/place/news.csv"}}
    out = run_folder(tmp_path, fingerprint=FINGERPRINT)
    own = checkpoint(out / "checkpoints", 8, fingerprint=FINGERPRINT)
    assert begin_run(out, moved, "last").checkpoint == str(own)
    assert begin_run(out, moved, str(own)).checkpoint == str(own)


@pytest.mark.parametrize("saved", ["[]", "null", "{not json", '{"data": 3, "model": {}, "settings": {}}'])
def test_a_damaged_fingerprint_is_a_clear_error(tmp_path, saved):
    out = run_folder(tmp_path)
    (out / "fingerprint.json").write_text(saved)
    with pytest.raises(LlmclfError, match="fingerprint"):
        begin_run(out, FINGERPRINT, "last")


def test_cli_resume_from_a_checkpoint_with_a_malformed_manifest(
    trained_run, tmp_path, small_csv, tiny_model_dir, capsys
):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    (out / "metrics.json").unlink()  # looks interrupted
    bad = checkpoint(out / "checkpoints", 8, manifest={"files": []})
    args = ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*args, *TRAIN_ARGS, "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is incomplete" in err and MANIFEST in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()
