"""Scoring texts with a model: class probabilities and the head's input features, in length-sorted
batches that waste little compute on padding; sharded across processes under a launcher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmclf import distributed
from llmclf.batches import length_batches, shard_indices
from llmclf.data import case_only
from llmclf.errors import LlmclfError
from llmclf.inference.metrics import compute_metrics
from llmclf.model.anatomy import activate, device_of, trainable_head
from llmclf.model.pooling import pool
from llmclf.progress import Progress


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: list[str] | None = None,
    *,
    pairs: list[str] | None = None,
    input_ids: list[list[int]] | None = None,
    batch_size: int | str = "auto",
    max_length: int = 512,
    progress: bool | None = None,
    desc: str = "predicting",
) -> np.ndarray:
    """Class probabilities, shape (n_texts, num_labels), rows in input order (a regression model's
    numbers, (n_texts, 1), in its place: `anatomy.activate`).

    Texts are sorted by token count and batched (`length_batches`) so that each batch pads only to its
    own longest member; the order is restored at the end. Pooling takes the last non-pad token, so the padding side
    does not change the result (tested). `pairs`: each text's second text, tokenised as a pair.
    """
    if input_ids is None:
        input_ids = tokenizer(list(texts or []), pairs, truncation="longest_first", max_length=max_length)[
            "input_ids"
        ]
    n = len(input_ids)
    num_labels = model.config.num_labels
    out = np.zeros((n, num_labels), dtype=np.float64)
    if n == 0:
        return out
    device = device_of(model)
    batches = length_batches([len(ids) for ids in input_ids], batch_size, device)
    was_training = _to_eval(model)
    # a bar on a terminal, plain lines in a log (no carriage returns), nothing with progress=False
    bar = Progress(n, desc, "text", progress=progress)
    try:
        with torch.inference_mode():
            for idx in batches:
                batch = tokenizer.pad({"input_ids": [input_ids[i] for i in idx]}, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**batch).logits  # (batch, num_labels)
                out[idx] = activate(logits, model).cpu().numpy()  # probabilities, or numbers
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return out


def _to_eval(model: Any) -> bool:
    """Put a model in eval mode; returns whether it was training. A model already in eval mode (a loaded
    classifier) is left alone: `eval()` walks every module, 2 ms per call on an 800-module peft model."""
    if not model.training:
        return False
    model.eval()
    return True


def head_inputs(
    model: Any, tokenizer: Any, input_ids: list[list[int]], *, batch_size: int | str = "auto"
) -> np.ndarray:
    """What the classification head's output layer sees for each text, shape (n_texts, hidden): for a
    decoder the final hidden state of the last real token, for an encoder its own pooling's output (BERT:
    the pooler on [CLS]). Used to fit a linear-probe head without an activation cache."""
    captured: list[torch.Tensor] = []
    hook = trainable_head(model).register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    out = None
    device = device_of(model)
    was_training = _to_eval(model)
    try:
        with torch.inference_mode():
            for idx in length_batches([len(ids) for ids in input_ids], batch_size, device):
                batch = tokenizer.pad({"input_ids": [input_ids[i] for i in idx]}, return_tensors="pt")
                mask = batch["attention_mask"].to(device)
                model(**{k: v.to(device) for k, v in batch.items()})
                pooled = _pooled(captured.pop(), mask).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(input_ids), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled
    finally:
        hook.remove()
        if was_training:
            model.train()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The head's input per text (batch, hidden). A decoder's head runs on every position (batch, seq,
    hidden) and the model keeps the last real token's logits; an encoder's gets one vector per text."""
    if hidden.dim() == 2:
        return hidden
    return pool(hidden, mask, "last")  # under mean pooling every position holds the mean (model.pooling)


def reassemble(parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int, width: int) -> np.ndarray:
    """Put the gathered (row indices, rows) shards back in input order; every row exactly once."""
    out = np.zeros((n, width), dtype=np.float64)
    seen = np.zeros(n, dtype=np.int64)
    for idx, rows in parts:
        idx = np.asarray(idx, dtype=np.int64)
        out[idx] = rows
        np.add.at(seen, idx, 1)
    if n and not (seen == 1).all():
        raise RuntimeError(f"sharded scoring covered rows {int((seen == 1).sum())}/{n} exactly once")
    return out


def sharded_predict_proba(
    model: Any,
    tokenizer: Any,
    input_ids: list[list[int]],
    *,
    batch_size: int,
    desc: str,
    progress: bool | None = None,
) -> np.ndarray:
    """`predict_proba` over all rows, the work split across processes; all get the result."""
    if not distributed.active():
        return predict_proba(
            model, tokenizer, input_ids=input_ids, batch_size=batch_size, desc=desc, progress=progress
        )
    idx = shard_indices([len(ids) for ids in input_ids], distributed.world_size(), distributed.rank())
    local = predict_proba(
        model,
        tokenizer,
        input_ids=[input_ids[i] for i in idx],
        batch_size=batch_size,
        desc=desc,
        progress=False if not distributed.is_main() else progress,
    )
    return reassemble(distributed.all_gather((idx, local)), len(input_ids), model.config.num_labels)


def evaluate_split(
    model: Any,
    tokenizer: Any,
    input_ids: list[list[int]],
    label_ids: list[int],
    labels: list[str],
    *,
    batch_size: int,
    desc: str,
    progress: bool | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics over the whole test split (scored once, sharded when launched) and the probabilities."""
    probs = sharded_predict_proba(
        model, tokenizer, input_ids, batch_size=batch_size, desc=desc, progress=progress
    )
    return compute_metrics(label_ids, probs.argmax(axis=1), labels), probs


def check_labels(found: Sequence[str], known: list[str], source: str, column: str) -> None:
    """Refuse labels the run does not know, before any model loads; say so when only case or spaces differ
    (`business` for the run's `Business`)."""
    unknown = sorted(set(found) - set(known))
    if not unknown:
        return
    case = case_only(unknown, known)
    if not case:
        raise LlmclfError(
            f"{source}: label(s) {unknown} in column '{column}' are not known to this run (it knows {known}). "
            "Remove those rows or map them to known labels, or check --label-column."
        )
    rest = [u for u in unknown if u not in case]
    renames = ", ".join(f"{u!r} -> {k!r}" for u, k in case.items())
    raise LlmclfError(
        f"{source}: label(s) in column '{column}' differ from the run's only in case or spaces: {renames}"
        + (f"; {rest} are not known to the run at all" if rest else "")
        + f". The run knows {known}, spelled exactly so. Rename them in the file to the run's spelling, e.g. "
        f"in pandas: df[{column!r}] = df[{column!r}].str.strip().replace({case!r}); then evaluate again."
    )
