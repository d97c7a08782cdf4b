"""Crash-safe checkpoints and `llmclf train --resume`.

transformers' Trainer writes `checkpoint-N` in place, file by file, and `get_last_checkpoint` only looks at
folder names: a run killed during a save leaves a folder that looks complete but is
not. Here a checkpoint is written to `checkpoints/.staging/checkpoint-N`, a manifest listing every file with
its size and SHA-256 is written last, and only then is the folder renamed to `checkpoints/checkpoint-N`
(a rename is atomic on one file system). Resuming takes the newest checkpoint whose manifest verifies and
skips, with a message, anything else.

A run folder also records at its start what the result depends on (`fingerprint.json`: the resolved
splits, labels, model and settings) and the metrics before training (`metrics_before.json`), so that a
resumed run refuses different inputs and does not recompute the baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_utils import rotate_checkpoints

from llmclf import distributed
from llmclf.errors import LlmclfError
from llmclf.manifest import manifest_problem, read_manifest, write_manifest
from llmclf.runfolder import CHECKPOINTS, FINGERPRINT, METRICS, read_json, write_json

log = logging.getLogger("llmclf")
BEFORE = "metrics_before.json"
LAYER = "feature_layer.json"
STAGING = ".staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Settings that change the trained weights; batch size for evaluation, logging and save interval do not.
# The validation interval and the patience do: they choose the kept checkpoint and when training stops.
RESULT_SETTINGS = {
    "data": ["max_length"],
    "model": ["precision", "prompt_template", "feature_layer", "pooling"],
    "lora": ["r", "alpha", "dropout", "targets", "layers"],
    "train": [
        "epochs",
        "lr",
        "batch_size",
        "weight_decay",
        "class_weights",
        "seed",
        "lr_scheduler",
        "warmup_ratio",
        "head_init",
        "eval_steps",
        "early_stopping_patience",
    ],
}


# ------------------------------------------------------------------------------------- fingerprints
def splits_digest(splits: Any) -> str:
    """SHA-256 of the resolved train/val/test texts and labels, in order: same data, same split."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        frame = getattr(splits, name)
        payload = {"split": name, "text": frame["text"].tolist(), "label": frame["label"].tolist()}
        if "pair" in frame:
            payload["pair"] = frame["pair"].tolist()
        h.update(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


SINCE = {"model.pooling": ("auto", "last")}
"""Settings added to RESULT_SETTINGS later: the values that do what runs written before them did."""


def run_fingerprint(config: Any, splits: Any, source: str, quantized: bool) -> dict[str, Any]:
    """What the result of a run depends on, for refusing a resume with other inputs."""
    sections = config.to_dict()
    return {
        "data": {"source": config.data.path, "sha256": splits_digest(splits), "rows": splits.counts()},
        "labels": list(splits.labels),
        "model": {"name": config.model.name, "source": source, "quantized": quantized},
        "settings": {f"{s}.{k}": sections[s][k] for s, keys in RESULT_SETTINGS.items() for k in keys},
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match."""
    out = []
    if saved.get("data", {}).get("sha256") != current["data"]["sha256"]:
        out.append(
            f"the data differs (run: {saved.get('data', {}).get('source')!r}, rows per split "
            f"{saved.get('data', {}).get('rows')}; now: {current['data']['source']!r}, rows per split "
            f"{current['data']['rows']}; the resolved train/val/test texts and labels are not the same)"
        )
    if saved.get("labels") != current["labels"]:
        out.append(f"the labels differ (run: {saved.get('labels')}; now: {current['labels']})")
    old_model, new_model = saved.get("model", {}), current["model"]
    if old_model.get("source") != new_model["source"] or old_model.get("quantized") != new_model["quantized"]:
        out.append(
            f"the model differs (run: {old_model.get('name')!r} from {old_model.get('source')!r}, "
            f"{'4-bit' if old_model.get('quantized') else 'full precision'}; now: {new_model['name']!r} from "
            f"{new_model['source']!r}, {'4-bit' if new_model['quantized'] else 'full precision'})"
        )
    for key, value in current["settings"].items():
        settings = saved.get("settings", {})
        if key not in settings and value in SINCE.get(key, ()):
            continue  # a run written before the setting existed ran as these values do
        if settings.get(key) != value:
            out.append(f"setting {key} differs (run: {settings.get(key)!r}; now: {value!r})")
    return out


# ---------------------------------------------------------------------------------------- manifests
def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when its manifest verifies: every file listed
    and matching its size and SHA-256, no file the manifest leaves out, no link (the Trainer reads every
    file of the folder when it resumes)."""
    return manifest_problem(folder, complete=True)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _fingerprint_of(folder: Path) -> str | None:
    """The fingerprint hash a checkpoint's manifest records (None when it records none)."""
    recorded = (read_manifest(folder)[0] or {}).get("fingerprint_sha256")
    return recorded if isinstance(recorded, str) else None


def last_complete_checkpoint(
    root: Path, say: Callable[[str], None] = log.info, *, fingerprints: Collection[str] | None = None
) -> Path | None:
    """The newest checkpoint under `root` whose manifest verifies; everything skipped is said.

    `fingerprints`: when given, only a checkpoint whose manifest records one of these fingerprint hashes
    (written by a run with these inputs) counts; one written by another run is skipped.
    """
    if not _is_folder(root):
        return None
    staging = root / STAGING
    if _is_folder(staging) and any(staging.iterdir()):
        say(f"note: skipping {staging}: a checkpoint save was interrupted there (removed).")
        shutil.rmtree(staging, ignore_errors=True)
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    for _, folder in reversed(found):
        if not _is_folder(folder):
            say(f"note: skipping {folder}: not a folder (a link or a file), so not a checkpoint of this run.")
            continue
        problem = checkpoint_problem(folder)
        if problem is not None:
            say(f"note: skipping incomplete checkpoint {folder}: {problem}.")
            continue
        if fingerprints is not None and _fingerprint_of(folder) not in fingerprints:
            say(
                f"note: skipping checkpoint {folder}: it was written by a run with other data, labels, "
                "model or settings (its manifest records another fingerprint)."
            )
            continue
        return folder
    return None


# ------------------------------------------------------------------------------------ trainer parts
class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is staged, given a manifest, then renamed into place."""

    fingerprint_sha: str | None = None
    _staging_root: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        staging = root / STAGING
        # Under torchrun every process gets here; only the one that writes (should_save) moves folders.
        writer = self.args.should_save  # type: ignore[attr-defined]
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        # Every process writes into the staging folder (its RNG state; under FSDP its weight shards): not
        # before it is cleared, and all done before it gets a manifest and is renamed.
        distributed.barrier()
        limit = self.args.save_total_limit  # type: ignore[attr-defined]
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
        distributed.barrier()
        state = self.state  # type: ignore[attr-defined]
        # The Trainer pointed best_model_checkpoint at the staging folder (or left an older value): point it
        # where the checkpoints will be after the rename, on every process (each loads the best model at
        # the end), and save the state again with that path.
        if state.best_global_step:
            best = root / f"checkpoint-{state.best_global_step}"
            if state.best_global_step == state.global_step or best.is_dir():
                state.best_model_checkpoint = str(best)
        if not writer:
            return
        name = f"checkpoint-{state.global_step}"
        written, final = staging / name, root / name
        state.save_to_json(str(written / "trainer_state.json"))
        write_manifest(written, fingerprint_sha256=self.fingerprint_sha)
        if _is_folder(final):  # an incomplete leftover of the same step from an interrupted run
            shutil.rmtree(final)
        elif final.is_symlink() or final.exists():  # not ours: a link is removed, not followed
            final.unlink()
        os.rename(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(str(root), limit, state.best_model_checkpoint, use_mtime=False)


# --------------------------------------------------------------------------------------- run folder
@dataclass
class ResumePoint:
    """Where a (possibly resumed) run starts."""

    checkpoint: str | None
    """Checkpoint folder to resume from; None: train from the start."""
    before: dict | None
    """Metrics before training, saved by the interrupted run; None: compute them."""
    layer: dict | None = None
    """The feature layer the interrupted run chose (its `feature_layer.json`); None: choose it."""


def fingerprint_sha(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()


def _saved_fingerprint(out: Path) -> dict[str, Any]:
    """The run folder's fingerprint.json, checked to be a fingerprint (it is data from the folder)."""
    path = out / FINGERPRINT
    if not path.is_file():
        raise LlmclfError(
            f"Cannot resume: {out} has no {FINGERPRINT}, so it is not a run folder started by `llmclf train`. "
            "Give the --output of the interrupted run, or train without --resume."
        )
    try:
        saved = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    parts = ("data", "model", "settings")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in parts):
        raise LlmclfError(
            f"Cannot resume: {path} is not a fingerprint written by `llmclf train` (damaged or edited). "
            "Start a new run (another --output, or --overwrite)."
        )
    return saved


def _saved_layer(out: Path) -> dict | None:
    """The interrupted run's feature_layer.json (None where it chose none), read as untrusted data."""
    path = out / LAYER
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise LlmclfError(
            f"Cannot resume: {path} is not the feature layer record written by `llmclf train` (damaged or "
            "edited). Start a new run (another --output, or --overwrite)."
        )
    return saved


def begin_run(out: Path, fingerprint: dict[str, Any], resume: str | None) -> ResumePoint:
    """Record the fingerprint of a new run, or check it and find the checkpoint for `--resume`.

    `resume`: None (a new run), `last` (the newest complete checkpoint under the run folder written by a
    run with these inputs), or the path of one checkpoint folder.
    """
    if resume is None:
        if distributed.is_main():  # under a launcher only rank 0 writes the run folder
            write_json(out / FINGERPRINT, fingerprint)
        return ResumePoint(None, None)
    if (out / METRICS).is_file():
        raise LlmclfError(f"{out} holds a finished run (metrics.json): there is nothing to resume.")
    saved = _saved_fingerprint(out)
    differences = fingerprint_differences(saved, fingerprint)
    if differences:
        raise LlmclfError(
            f"Cannot resume the run in {out}: " + "; ".join(differences) + ". Resume with the same data, "
            "labels, model and settings as the interrupted run, or start a new run (another --output, or "
            "--overwrite)."
        )
    # A checkpoint counts when its manifest records this run's fingerprint, or the saved one (just found
    # equal in data, labels, model and settings; it differs in, say, the data file's path). An edited
    # fingerprint.json does not let the checkpoints of other inputs through: they record the original.
    accepted = {fingerprint_sha(fingerprint), fingerprint_sha(saved)}
    before = read_json(out / BEFORE) if (out / BEFORE).is_file() else None
    layer = _saved_layer(out)
    if resume == "last":
        checkpoint = last_complete_checkpoint(out / CHECKPOINTS, fingerprints=accepted)
        if checkpoint is None:
            log.info("note: no complete checkpoint in %s: training from the start.", out / CHECKPOINTS)
        return ResumePoint(str(checkpoint) if checkpoint else None, before, layer)
    folder = Path(resume).expanduser()
    if not folder.is_dir():
        raise LlmclfError(f"Checkpoint folder not found: {folder}. Give a checkpoints/checkpoint-N folder.")
    problem = checkpoint_problem(folder)
    if problem:
        raise LlmclfError(
            f"Checkpoint {folder} is incomplete: {problem}. Give another one, or --resume alone."
        )
    if _fingerprint_of(folder) not in accepted:
        raise LlmclfError(
            f"Checkpoint {folder} was written by a run with other data, labels, model or settings than this "
            f"one (see {out / FINGERPRINT}). Give a checkpoint of this run."
        )
    return ResumePoint(str(folder), before, layer)


def save_before(out: Path, before: dict) -> None:
    write_json(out / BEFORE, before)


def save_layer(out: Path, layer: dict) -> None:
    """The chosen feature layer, for a resumed run: its checkpoints hold LoRA for the model cut there."""
    write_json(out / LAYER, layer)


def finish(out: Path, keep_last: bool) -> None:
    """After a successful run the adapter is saved: drop the checkpoints (or keep only the newest)."""
    root = out / CHECKPOINTS
    if not keep_last:
        shutil.rmtree(root, ignore_errors=True)
        return
    last = last_complete_checkpoint(root, lambda _: None)
    for child in root.iterdir() if _is_folder(root) else []:
        if child != last:
            shutil.rmtree(child, ignore_errors=True) if _is_folder(child) else child.unlink()
