"""Tokenising the splits for training: token ids (pairs truncated from the longer text first) and the
`datasets.Dataset` the Trainer reads."""

from __future__ import annotations

from typing import Any


def tokenize_texts(
    tokenizer: Any, texts: list[str], max_length: int, pairs: list[str] | None = None
) -> tuple[list[list[int]], int]:
    """Token ids truncated to `max_length`, and how many texts (or pairs) were longer than that. A pair
    is truncated from the longer of its two texts first (`longest_first`), so both parts stay."""
    if not texts:  # an empty split (no validation): transformers 5's tokenizer fails on []
        return [], 0
    full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False)["input_ids"]
    n_truncated = sum(len(ids) > max_length for ids in full)
    if n_truncated == 0:
        return full, 0
    cut = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)["input_ids"]
    return cut, n_truncated


def to_dataset(input_ids: list[list[int]], label_ids: list[int], rows: list[int] | None = None) -> Any:
    """A `datasets.Dataset` ready for the Trainer; padding is left to the collator (dynamic).

    `length` lets the Trainer group texts of similar length into batches; `rows` (optional) are the
    texts' indices in an activation cache."""
    import datasets

    columns: dict[str, list] = {
        "input_ids": input_ids,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "labels": label_ids,
        "length": [len(ids) for ids in input_ids],
    }
    if rows is not None:
        columns["row"] = rows
    return datasets.Dataset.from_dict(columns)
