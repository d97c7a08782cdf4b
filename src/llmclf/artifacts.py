"""The run folder: file names and small readers/writers shared by training, prediction and export.

run/
  config.yaml            resolved configuration (defaults <- YAML <- flags)
  labels.json            label names, in the order of the model's outputs
  run_info.json          resolved base model, quantisation, versions
  adapter/               LoRA adapter + classification head (safetensors)
  tokenizer/             tokenizer with its pad token set
  metrics.json           {"before": {...}, "after": {...}} on the test split
  data_summary.json      rows per split and class, class weights, truncation, notes
  predictions_test.csv   text, true label, predicted label, prob_<label> per class
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmclf.errors import LlmclfError

CONFIG = "config.yaml"
LABELS = "labels.json"
RUN_INFO = "run_info.json"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
METRICS = "metrics.json"
DATA_SUMMARY = "data_summary.json"
PREDICTIONS = "predictions_test.csv"
CHECKPOINTS = "checkpoints"


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may write at once
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def confine(root: Path) -> None:
    """Refuse links in a run folder that lead outside it: a run folder is read, never what it points to.

    The folder named by the user is resolved once (it may itself be a link); below it, every file the
    loaders would open must really be inside it, so a copied or downloaded run folder cannot make
    predict/evaluate/export read (or load weights from) another place on disk.
    """
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            entry = Path(folder) / name
            if not entry.is_symlink():
                continue
            target = Path(os.path.realpath(entry))
            if not target.is_relative_to(root):
                raise LlmclfError(
                    f"{entry} is a link to {target}, outside the run folder {root}: refused, since llmclf reads "
                    "a run folder's files only from inside it. Replace the link by a copy of the file if you "
                    "trust it."
                )


def check_run_dir(run_dir: str | Path) -> Path:
    """A finished run folder (resolved, links confined to it), or a clear error saying what is missing."""
    path = Path(os.path.realpath(Path(run_dir).expanduser()))
    if not path.is_dir():
        raise LlmclfError(
            f"Run folder not found: {path}. Give the --output folder of a finished `llmclf train`."
        )
    missing = [n for n in (CONFIG, LABELS, RUN_INFO, ADAPTER, TOKENIZER) if not (path / n).exists()]
    if missing:
        raise LlmclfError(
            f"{path} is not a complete llmclf run folder: missing {missing}. Was training interrupted? "
            "Train again (or resume) into this folder."
        )
    confine(path)
    if not (path / ADAPTER / "adapter_model.safetensors").is_file():
        raise LlmclfError(
            f"{path / ADAPTER} has no adapter_model.safetensors. llmclf writes and reads adapters as safetensors "
            "only (a pickle adapter can run code when loaded): train the run again."
        )
    return path
