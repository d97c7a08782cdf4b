"""The run's steps before the model: its folder, the data read and split per class, the task, the token
ids."""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf import distributed, runfolder
from llmclf.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, RunConfig
from llmclf.data import Splits, class_weights, inputs, load_splits, tokenize_texts
from llmclf.datafiles import InMemory
from llmclf.errors import LlmclfError
from llmclf.inference.task import Task
from llmclf.labelsets import pos_weights
from llmclf.reports import console
from llmclf.targets import TargetScale
from llmclf.training.backend import Encoded
from llmclf.training.heads import SPLITS
from llmclf.training.saving import target_summaries

log = logging.getLogger("llmclf")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(output: str, overwrite: bool, resume: str | None = None) -> Path:
    path = Path(output).expanduser()
    if resume is not None:
        if overwrite:
            raise LlmclfError(
                "--resume continues the run in --output; --overwrite would delete it. Give one."
            )
        if not path.is_dir():
            raise LlmclfError(
                f"Cannot resume: run folder {path} not found. Give the --output of the interrupted run."
            )
        return path
    # A lone fingerprint is what a run that failed before its first checkpoint leaves: no reason to stop.
    leftover = {p.name for p in path.iterdir()} - {runfolder.FINGERPRINT} if path.is_dir() else set()
    if leftover and not overwrite:  # every process stops alike
        raise LlmclfError(
            f"Output folder {path} is not empty. Choose another --output, pass --resume to continue an "
            "interrupted run there, or --overwrite to replace it."
        )
    distributed.barrier()  # all have looked before the main process clears it
    if distributed.is_main():  # under a launcher only rank 0 touches the run folder
        if path.exists() and any(path.iterdir()):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return path


def load_data(
    config: RunConfig, memory: dict[str, InMemory] | None = None
) -> tuple[Splits, list[float] | None]:
    """Read, validate and split the data per class; weigh the classes. Shows the class balance.

    `memory`: data given in memory, found by the marker that stands for it in data.path / data.eval_data."""
    dc = config.data
    tables = {data.marker: data.table for data in (memory or {}).values()}
    splits = load_splits(
        tables.get(dc.path, dc.path),
        dc.text_column,
        dc.label_column,
        eval_data=tables.get(dc.eval_data, dc.eval_data) if dc.eval_data is not None else None,
        train_per_class=dc.train_per_class,
        val_per_class=dc.val_per_class,
        test_per_class=dc.test_per_class,
        val_fraction=dc.val_fraction,
        test_fraction=dc.test_fraction,
        drop_invalid=dc.drop_invalid,
        seed=config.train.seed,
        text_pair_column=dc.text_pair_column,
        task=config.task,
        label_separator=dc.label_separator,
    )
    weights = None
    if config.train.class_weights == "auto" and splits.task == SINGLE_LABEL:
        weights = class_weights(splits.train["label"], splits.labels)
    elif config.train.class_weights == "auto" and splits.task == MULTI_LABEL:  # each label's positives
        weights = pos_weights(splits.train, splits.labels, dc.path)
    distributed.check_identical((splits.counts(), weights), "data splits or class weights")
    for note in splits.notes:
        log.info("note: %s", note)
    if splits.task != REGRESSION:  # multi-label: texts carrying each label, and its positive weight
        texts = {name: len(getattr(splits, name)) for name in SPLITS} if splits.task == MULTI_LABEL else None
        log.info("%s\n", console.class_balance(splits.counts(), splits.labels, weights, texts))
    else:
        log.info("%s\n", console.target_summary(target_summaries(splits)))
    return splits, weights


def plan_epochs(config: RunConfig, train_texts: int) -> RunConfig:
    """The run's config with `train.epochs: auto` resolved for its training split, as it is saved."""
    epochs = config.train.epochs_for(train_texts)
    if config.train.epochs == "auto":
        log.info(
            "Epochs (auto): %g over %d training texts at batch %d",
            epochs,
            train_texts,
            config.train.batch_size,
        )
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def define_task(config: RunConfig, splits: Splits) -> Task:
    """The run's task; for regression, the training targets' scale, which the model learns them at."""
    if splits.task != REGRESSION:
        return Task(config.task, splits.labels)
    scale = TargetScale.of(splits.train["label"].tolist())
    log.info(
        "Regression: targets are learned divided by %.4g (their standard deviation in train).", scale.scale
    )
    return Task(config.task, splits.labels, scale)


def task_info(task: Task, config: RunConfig) -> dict:
    """run_info.json's record of the task: its name and what a reload needs (a multi-label run's
    thresholds and separator; a regression run's target scale, already folded into the head)."""
    info: dict = {"task": task.name, "target_scale": task.scale.scale if task.regression else None}
    if task.multi_label:
        info["thresholds"] = task.threshold_map()
        info["label_separator"] = config.data.label_separator
    return info


def tokenise(tokenizer: Any, splits: Splits, max_length: int, task: Task) -> Encoded:
    """Token ids and targets (label ids, or scaled numbers) of every split; each text's row in the
    activation cache (train, val, test in turn)."""
    log.info("Tokenising %d texts ...", sum(len(getattr(splits, name)) for name in SPLITS))
    encoded = Encoded(ids={}, labels={}, rows={}, truncated={})
    first = 0
    for name in SPLITS:
        frame = getattr(splits, name)
        texts, pairs = inputs(frame)
        encoded.ids[name], encoded.truncated[name] = tokenize_texts(tokenizer, texts, max_length, pairs)
        encoded.labels[name] = task.targets(frame["label"].tolist())
        encoded.rows[name] = list(range(first, first + len(frame)))
        first += len(frame)
    if any(encoded.truncated.values()):
        log.info("note: texts truncated to %d tokens: %s", max_length, encoded.truncated)
    return encoded
