"""Evaluation: batched inference that wastes no compute on padding, and the metrics we report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from llmclf.modeling import device_of
from llmclf.progress import Progress

CPU_BATCH = 32
"""`auto` batch on CPU: a pass costs about its tokens there, so the batch size matters little."""
GPU_BATCH_TOKENS = 16_384
"""`auto` budget of padded tokens per batch on a GPU, where a pass over 32 short texts costs about as
much as one over hundreds (an 8B model in 4-bit on an H200: benchmarks/gpu.py)."""
GPU_BATCH_MAX = 1024


def length_batches(
    lengths: list[int] | np.ndarray, batch_size: int | str, device: torch.device
) -> list[np.ndarray]:
    """Row indices, longest first, cut into batches; each pads only to its own longest (its first row).

    `batch_size` texts per batch, or `auto`: 32 on CPU; on CUDA as many as fit GPU_BATCH_TOKENS padded
    tokens (rows x the batch's longest), at most GPU_BATCH_MAX. Every row is in exactly one batch.
    """
    lengths = np.asarray(lengths)
    if batch_size != "auto" or device.type != "cuda":
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: an out-of-memory shows early
        size = CPU_BATCH if batch_size == "auto" else int(batch_size)
        return [order[i : i + size] for i in range(0, len(order), size)]
    return token_budget_batches(lengths, GPU_BATCH_TOKENS, GPU_BATCH_MAX)


def token_budget_batches(lengths: list[int] | np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Row indices, longest first, cut so that each batch padded to its own longest (its first row)
    holds at most `max_tokens` tokens (a single row longer than that is a batch of its own) and at most
    `max_rows` rows. Every row is in exactly one batch."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, begin = [], 0
    while begin < len(order):
        longest = max(int(lengths[order[begin]]), 1)
        size = max(1, min(max_rows, max_tokens // longest))
        batches.append(order[begin : begin + size])
        begin += size
    return batches


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: list[str] | None = None,
    *,
    input_ids: list[list[int]] | None = None,
    batch_size: int | str = "auto",
    max_length: int = 512,
    progress: bool | None = None,
    desc: str = "predicting",
) -> np.ndarray:
    """Class probabilities, shape (n_texts, num_labels), rows in input order.

    Texts are sorted by token count and batched (`length_batches`) so that each batch pads only to its
    own longest member; the order is restored at the end. Pooling takes the last non-pad token, so the padding side
    does not change the result (tested).
    """
    if input_ids is None:
        input_ids = tokenizer(list(texts or []), truncation=True, max_length=max_length)["input_ids"]
    n = len(input_ids)
    num_labels = model.config.num_labels
    out = np.zeros((n, num_labels), dtype=np.float64)
    if n == 0:
        return out
    device = device_of(model)
    batches = length_batches([len(ids) for ids in input_ids], batch_size, device)
    was_training = model.training
    model.eval()
    # a bar on a terminal, plain lines in a log (no carriage returns), nothing with progress=False
    bar = Progress(n, desc, "text", progress=progress)
    try:
        with torch.inference_mode():
            for idx in batches:
                batch = tokenizer.pad({"input_ids": [input_ids[i] for i in idx]}, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**batch).logits  # (batch, num_labels)
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


def compute_metrics(
    y_true: np.ndarray | list[int], y_pred: np.ndarray | list[int], labels: list[str]
) -> dict:
    """accuracy, balanced_accuracy, macro_f1, per_class {label: precision/recall/f1/support},
    confusion_matrix (rows = true label, columns = predicted, in `labels` order)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    label_ids: list[int],
    labels: list[str],
    *,
    batch_size: int | str = "auto",
    max_length: int = 512,
    input_ids: list[list[int]] | None = None,
    desc: str = "evaluating",
    progress: bool | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics on labelled texts, and the probabilities they came from."""
    probs = predict_proba(
        model,
        tokenizer,
        texts,
        input_ids=input_ids,
        batch_size=batch_size,
        max_length=max_length,
        desc=desc,
        progress=progress,
    )
    return compute_metrics(label_ids, probs.argmax(axis=1), labels), probs


def head_inputs(
    model: Any, tokenizer: Any, input_ids: list[list[int]], *, batch_size: int | str = "auto"
) -> np.ndarray:
    """What the classification head sees for each text, shape (n_texts, hidden): the final hidden state
    of the last real token. Used to fit a linear-probe head without an activation cache."""
    from llmclf.layer_cache import head_of

    captured: list[torch.Tensor] = []
    hook = head_of(model).register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    out = None
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in length_batches([len(ids) for ids in input_ids], batch_size, device):
                batch = tokenizer.pad({"input_ids": [input_ids[i] for i in idx]}, return_tensors="pt")
                mask = batch["attention_mask"].to(device)
                model(**{k: v.to(device) for k, v in batch.items()})
                hidden = captured.pop()  # (batch, seq, hidden)
                positions = torch.arange(mask.shape[1], device=device)
                last = (positions * mask).argmax(dim=1)  # rightmost real token, either padding side
                pooled = hidden[torch.arange(len(idx), device=device), last].float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(input_ids), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled
    finally:
        hook.remove()
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
