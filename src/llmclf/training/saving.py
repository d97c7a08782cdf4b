"""The run folder's files at the end of training: adapter and head, tokenizer, config, labels, metrics,
the data summary, the test predictions, copies of data given in memory, and the manifest that marks the
folder complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmclf import runfolder
from llmclf.config import RunConfig
from llmclf.data import Splits
from llmclf.datafiles import MEMORY_COPIES, InMemory
from llmclf.inference.task import Task
from llmclf.manifest import write_manifest
from llmclf.targets import SCORE, summary
from llmclf.training import checkpoints
from llmclf.training.backend import Encoded
from llmclf.training.heads import SPLITS
from llmclf.training.trainer import WeightedLossTrainer

MANIFESTED = (
    runfolder.CONFIG,
    runfolder.LABELS,
    runfolder.RUN_INFO,
    runfolder.ADAPTER,
    runfolder.TOKENIZER,
    runfolder.LEXICAL,
    runfolder.METRICS,
    runfolder.DATA_SUMMARY,
    runfolder.PREDICTIONS,
    *MEMORY_COPIES.values(),
)
"""The files training writes for reuse and reporting, listed in the run folder's manifest."""


def save_memory_copies(out: Path, memory: dict[str, InMemory]) -> dict | None:
    """Write data given in memory into the run folder (the columns the run used, as JSON Lines: a run
    from the file splits it alike), so that the folder alone reproduces and reports the run. Returns
    what was written, by keyword, for run_info.json; None for data read from files."""
    run = runfolder.RunFolder(out)
    written = {}
    for key, data in memory.items():
        run.write_text(MEMORY_COPIES[key], data.copy)
        written[key] = {
            "kind": data.kind,
            "rows": data.rows,
            "sha256": data.sha256,
            "file": MEMORY_COPIES[key],
        }
    return written or None


def target_summaries(splits: Splits) -> dict[str, dict | None]:
    """Each split's targets (regression): mean, std, min, max."""
    return {name: summary(getattr(splits, name)) for name in SPLITS}


def save_run(
    out: Path,
    config: RunConfig,
    trainer: WeightedLossTrainer,
    tokenizer: Any,
    state: dict | None,
    splits: Splits,
    weights: list[float] | None,
    encoded: Encoded,
    metrics: dict,
    probs: np.ndarray,
    info: dict,
    task: Task,
) -> None:
    """Everything needed to reuse the classifier and to report on the run; then drop the checkpoints."""
    run = runfolder.RunFolder(out)
    trainer.model.save_pretrained(
        str(out / runfolder.ADAPTER), state_dict=state
    )  # adapter + head, safetensors
    tokenizer.save_pretrained(str(out / runfolder.TOKENIZER))
    run.write_text(runfolder.CONFIG, config.to_yaml())
    run.write_json(runfolder.LABELS, splits.labels)
    run.write_json(runfolder.RUN_INFO, info)
    run.write_json(
        runfolder.DATA_SUMMARY,
        {
            "source": config.data.path,
            "counts": splits.counts(),
            "class_weights": dict(zip(splits.labels, weights)) if weights and not task.multi_label else None,
            **(
                {"pos_weights": dict(zip(splits.labels, weights)) if weights else None}
                if task.multi_label
                else {}
            ),
            "rows": {name: len(getattr(splits, name)) for name in SPLITS},
            "truncated": encoded.truncated,
            **({"targets": target_summaries(splits)} if task.regression else {}),
            "max_length": config.data.max_length,
            "notes": splits.notes,
        },
    )
    run.write_json(runfolder.METRICS, metrics)
    frame = predictions_frame(splits, probs, task, config.data.label_separator)
    runfolder.write_csv(frame, out / runfolder.PREDICTIONS)
    write_manifest(out, names=MANIFESTED)  # last: it marks the run folder complete, checked on load
    checkpoints.finish(out, keep_last=config.train.keep_checkpoint)  # the best adapter is saved above


def predictions_frame(splits: Splits, probs: np.ndarray, task: Task, separator: str = ",") -> pd.DataFrame:
    """The test split with its predictions: text (and pair), label, predicted, prob_<label> per class;
    regression: text (and pair), label (the true number), score (the predicted one)."""
    test = splits.test
    frame = pd.DataFrame(
        {
            "text": test["text"].tolist(),
            **({"pair": test["pair"].tolist()} if "pair" in test else {}),
            "label": test["label"].tolist(),
            (SCORE if task.regression else "predicted"): task.predicted(probs),
        }
    )
    if task.regression:
        return frame
    if task.multi_label:  # label sets joined as in the data (an empty cell: no label passed its threshold)
        for column in ("label", "predicted"):
            frame[column] = [separator.join(labels) for labels in frame[column]]
    for i, label in enumerate(splits.labels):
        frame[runfolder.prob_column(label)] = probs[:, i]
    return frame
