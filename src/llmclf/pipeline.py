"""The whole recipe as one flow: load data → load model → evaluate → train → evaluate → save.

Each step calls a builder with plain arguments taken from the config, so the config object stops here.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmclf import __version__, artifacts, checkpoints, reporting
from llmclf.config import RunConfig
from llmclf.data import Splits, class_weights, load_splits, to_dataset, tokenize_texts
from llmclf.errors import LlmclfError
from llmclf.evaluation import evaluate
from llmclf.modeling import add_lora, load_classifier, resolve_model_source, resolve_quantize
from llmclf.training import build_trainer, training_arguments


@dataclass
class RunResult:
    output: Path
    metrics: dict
    seconds: float


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
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise LlmclfError(
                f"Output folder {path} is not empty. Choose another --output, pass --resume to continue an "
                "interrupted run there, or --overwrite to replace it."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_predictions(path: Path, splits: Splits, probs: np.ndarray) -> None:
    test = splits.test
    frame = pd.DataFrame(
        {
            "text": test["text"].tolist(),
            "label": test["label"].tolist(),
            "predicted": [splits.labels[i] for i in probs.argmax(axis=1)],
        }
    )
    for i, label in enumerate(splits.labels):
        frame[f"prob_{label}"] = probs[:, i]
    frame.to_csv(path, index=False, float_format="%.9g")


def run_training(
    config: RunConfig, *, overwrite: bool = False, quiet: bool = False, resume: str | None = None
) -> RunResult:
    """Train, evaluate before and after, and write the run folder. Returns the metrics.

    `resume`: `last` or a checkpoint folder, to continue an interrupted run in `config.output`.
    """
    started = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    dc, mc, lc, tc = config.data, config.model, config.lora, config.train
    out = prepare_output(config.output, overwrite, resume)
    seed_everything(tc.seed)

    # 1. Data: read, validate, split per class, weigh classes.
    splits = load_splits(
        dc.path,
        dc.text_column,
        dc.label_column,
        eval_data=dc.eval_data,
        train_per_class=dc.train_per_class,
        val_per_class=dc.val_per_class,
        test_per_class=dc.test_per_class,
        val_fraction=dc.val_fraction,
        test_fraction=dc.test_fraction,
        drop_invalid=dc.drop_invalid,
        seed=tc.seed,
    )
    labels = splits.labels
    weights = class_weights(splits.train["label"], labels) if tc.class_weights == "auto" else None
    for note in splits.notes:
        say(f"note: {note}")
    say(reporting.class_balance(splits.counts(), labels, weights), "\n")

    # 2. Model: base + classification head (4-bit where asked or on a GPU), then LoRA.
    source = resolve_model_source(mc.name, quiet=quiet)
    quantized = resolve_quantize(mc.quantize)
    fingerprint = checkpoints.run_fingerprint(config, splits, source, quantized)
    start = checkpoints.begin_run(out, fingerprint, resume, say)
    say(f"Loading {mc.name} ({'4-bit NF4' if quantized else 'full precision'}) ...")
    loaded = load_classifier(
        source,
        labels,
        quantize=quantized,
        trust_remote_code=mc.trust_remote_code,
        allow_pickle=mc.allow_pickle,
    )
    tokenizer = loaded.tokenizer
    model = add_lora(
        loaded.model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets, seed=tc.seed
    )

    label_index = {label: i for i, label in enumerate(labels)}
    encoded: dict[str, tuple[list[list[int]], list[int]]] = {}
    truncated: dict[str, int] = {}
    for name in ("train", "val", "test"):
        frame = getattr(splits, name)
        ids, truncated[name] = tokenize_texts(tokenizer, frame["text"].tolist(), dc.max_length)
        encoded[name] = (ids, [label_index[label] for label in frame["label"]])
    if any(truncated.values()):
        say(f"note: texts truncated to {dc.max_length} tokens: {truncated}")

    def test_eval(desc: str) -> tuple[dict, np.ndarray]:
        ids, y = encoded["test"]
        return evaluate(
            model,
            tokenizer,
            splits.test["text"].tolist(),
            y,
            labels,
            batch_size=tc.eval_batch_size,
            input_ids=ids,
            desc=desc,
        )

    # 3. Evaluate before training: the head is random, so this is the chance-level baseline.
    if start.before is None:
        before, _ = test_eval("evaluating before training")
        checkpoints.save_before(out, before)
    else:
        before = start.before  # saved by the interrupted run: the same model and test split
        say("Reusing the metrics before training saved by the interrupted run.")
    say(reporting.compare(None, before, title="Test metrics before training"), "\n")

    # 4. Train.
    train_ds = to_dataset(*encoded["train"])
    val_ds = to_dataset(*encoded["val"]) if encoded["val"][0] else None
    args = training_arguments(
        str(out / artifacts.CHECKPOINTS),
        epochs=tc.epochs,
        lr=tc.lr,
        batch_size=tc.batch_size,
        eval_batch_size=tc.eval_batch_size,
        weight_decay=tc.weight_decay,
        seed=tc.seed,
        has_val=val_ds is not None,
        n_train=len(train_ds),
        report_to=tc.report_to,
        bf16=quantized and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        quiet=quiet,
    )
    trainer = build_trainer(
        model, tokenizer, train_ds, val_ds, args, weights, quiet=quiet, save_steps=tc.save_steps
    )
    trainer.fingerprint_sha = checkpoints.fingerprint_sha(fingerprint)
    if start.checkpoint:
        say(f"Resuming from {start.checkpoint}")
    train_output = trainer.train(resume_from_checkpoint=start.checkpoint)
    model = trainer.model  # the best epoch's weights when there is a validation split

    # 5. Evaluate after training, on the same test split.
    after, probs = test_eval("evaluating after training")

    # 6. Save everything needed to reuse the classifier.
    model.save_pretrained(str(out / artifacts.ADAPTER))  # adapter + head (modules_to_save), safetensors
    tokenizer.save_pretrained(str(out / artifacts.TOKENIZER))
    config.save(out / artifacts.CONFIG)
    artifacts.write_json(out / artifacts.LABELS, labels)
    artifacts.write_json(
        out / artifacts.RUN_INFO,
        {
            "base_model": mc.name,
            "resolved_source": source,
            "quantized": quantized,
            "llmclf_version": __version__,
            "torch_version": torch.__version__,
            "train_runtime_s": train_output.metrics.get("train_runtime"),
            "train_loss": train_output.metrics.get("train_loss"),
            "log_history": trainer.state.log_history,
        },
    )
    artifacts.write_json(
        out / artifacts.DATA_SUMMARY,
        {
            "source": dc.path,
            "counts": splits.counts(),
            "class_weights": dict(zip(labels, weights)) if weights else None,
            "truncated": truncated,
            "max_length": dc.max_length,
            "notes": splits.notes,
        },
    )
    artifacts.write_json(out / artifacts.METRICS, {"before": before, "after": after})
    write_predictions(out / artifacts.PREDICTIONS, splits, probs)
    checkpoints.finish(out, keep_last=tc.keep_checkpoint)  # the best adapter is saved above

    seconds = time.perf_counter() - started
    print(reporting.full_report(before, after), flush=True)  # the result: printed even with --quiet
    print(f"\nRun folder: {out}  ({seconds:.0f} s)", flush=True)
    return RunResult(out, {"before": before, "after": after}, seconds)


def set_threads() -> None:
    """Use every core present (torch defaults to the physical count, which may be fewer)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
