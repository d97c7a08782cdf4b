"""Data: validate labelled texts (read by datafiles.py), split them per class, weigh classes, tokenise.

Everything here works on pandas frames with two columns, `text` and `label` (label names as strings),
plus `row`: the 1-based data row of the input file, so that every error can point at the row to fix.
Nothing is dropped or renamed silently: invalid rows stop the run unless `drop_invalid` is set, and every
removal (duplicates, rows dropped) is counted in `notes` and printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llmclf.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL
from llmclf.datafiles import (  # the readers, re-exported: `from llmclf.data import read_table` keeps working
    DEMO_NAME,
    TABLE_SUFFIXES,
    Table,
    demo_data_path,
    field_paths,
    lookup_column,
    pick,
    read_table,
)
from llmclf.errors import LlmclfError
from llmclf.labelsets import all_labels, normalise_label, parse_label_sets, split_label_sets  # re-exported
from llmclf.labelsets import counts as label_counts
from llmclf.targets import SCORE, check_train_targets, fraction_sizes, parse_targets, split_targets
from llmclf.tokens import to_dataset, tokenize_texts  # re-exported: their home was here

__all__ = [
    "DEMO_NAME",
    "TABLE_SUFFIXES",
    "Splits",
    "Table",
    "case_only",
    "class_weights",
    "clean_frame",
    "demo_data_path",
    "load_splits",
    "normalise_label",
    "order_labels",
    "read_table",
    "split_data",
    "to_dataset",
    "tokenize_texts",
]


# ------------------------------------------------------------------------------------------ validation
def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:  # pd.NA: a nullable column of a frame given in memory
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _rows_text(rows: list) -> str:
    shown = ", ".join(str(r) for r in rows[:10])
    return shown + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


_NESTED = (dict, list, tuple, np.ndarray)
FILE_WORDS = {
    "text": "--text-column",
    "pair": "--text-pair-column",
    "label": "--label-column",
    "drop": "--drop-invalid",
    "at": "row(s)",
    "counted": "data rows counted from 1, header excluded",
}
"""How errors name rows and fixes for a file: its data rows and the command line's flags."""
MEMORY_WORDS = {
    "text": "text_column=",
    "pair": "text_pair_column=",
    "label": "label_column=",
    "drop": "drop_invalid=True",
    "at": "index",
    "counted": "the frame's index",
}
"""... and for data given in memory to `llmclf.train`: the frame's index and its keyword arguments."""


def _setting(flag: str, value: str) -> str:
    return f"{flag}{value!r}" if flag.endswith("=") else f"{flag} {value}"


def _where(rows: list[int], words: dict[str, str], index: pd.Index) -> str:
    """`row(s) 3, 7` (1-based data rows), or `index 2, 6` (the frame's own index) for data in memory."""
    shown = [index[r - 1] for r in rows] if words is MEMORY_WORDS else rows
    return f"{words['at']} {_rows_text(shown)}"


def _refuse_nested(
    values: list, source: str, column: str, flag: str, what: str, where: Callable[[list[int]], str]
) -> None:
    """A column of objects or lists is not text nor a label: say which fields there are to choose from."""
    rows = [i for i, v in enumerate(values, start=1) if isinstance(v, _NESTED)]
    if not rows:
        return
    paths = field_paths(values, column)
    if not paths:
        raise LlmclfError(
            f"{source}: column '{column}' holds lists, not {what} ({where(rows)}). Choose a "
            f"column of {what} with {flag}."
        )
    keys = {p: p[len(column) + 1 :].split(".") for p in paths}
    texts = [p for p in paths if any(isinstance(pick(v, keys[p]), str) for v in values[:200])]
    raise LlmclfError(
        f"{source}: column '{column}' holds JSON objects with the fields {paths[:12]}, not {what} "
        f"({where(rows)}). Choose one field by its dotted name, e.g. {_setting(flag, (texts or paths)[0])}."
    )


def _find_columns(frame: pd.DataFrame, source: str, flags: dict[str, str]) -> dict[str, list]:
    """The values of each column named in `flags`, or an error naming the missing ones and those present."""
    found = {column: lookup_column(frame, column) for column in flags}
    missing = [c for c, values in found.items() if values is None]
    if missing:
        objects = [c for c in frame.columns if frame[c].dtype == object]
        fields = [p for c in objects for p in field_paths(frame[c].tolist(), str(c))]
        raise LlmclfError(
            f"{source}: column(s) {missing} not found. Columns present: {list(frame.columns)}"
            + (f" (fields inside them: {fields[:12]})" if fields else "")
            + f". Choose {'it' if len(missing) == 1 else 'them'} with {' / '.join(flags[c] for c in missing)}."
        )
    return found


def clean_frame(
    frame: pd.DataFrame,
    source: str,
    text_column: str,
    label_column: str | None,
    *,
    drop_invalid: bool = False,
    class_names: list[str] | None = None,
    notes: list[str] | None = None,
    in_memory: bool = False,
    pair_column: str | None = None,
    task: str = SINGLE_LABEL,
    label_separator: str = ",",
) -> pd.DataFrame:
    """Check columns and values; return `text`, `pair` (with a `pair_column`), `label` (if asked) and
    `row` columns. A dotted column name (`ticket.body`) reaches into nested JSON objects / structs.
    `in_memory`: a frame given to `llmclf.train`, whose errors name its index and the keyword arguments
    to fix them with. `task`: `regression` reads the labels as numbers (floats), `multi-label` as sets of
    names (tuples), joined by `label_separator` or given as lists; else one class name per row."""
    words = MEMORY_WORDS if in_memory else FILE_WORDS
    flags = {text_column: words["text"]}
    if pair_column:
        flags[pair_column] = words["pair"]
    if label_column:
        flags[label_column] = words["label"]
    found = _find_columns(frame, source, flags)

    def where(rows: list[int]) -> str:
        return _where(rows, words, frame.index)

    _refuse_nested(found[text_column], source, text_column, words["text"], "text", where)
    if pair_column:
        _refuse_nested(found[pair_column], source, pair_column, words["pair"], "text", where)
    if label_column and task != MULTI_LABEL:  # a multi-label column may hold lists
        _refuse_nested(found[label_column], source, label_column, words["label"], "labels", where)
    rows = np.arange(1, len(frame) + 1)
    texts = found[text_column]
    bad_text = [int(r) for r, t in zip(rows, texts) if _is_missing(t)]
    bad_pair = [int(r) for r, t in zip(rows, found[pair_column]) if _is_missing(t)] if pair_column else []
    bad_label: list[int] = []
    if label_column:
        bad_label = [int(r) for r, v in zip(rows, found[label_column]) if _is_missing(v)]
    problems = []
    if bad_text:
        problems.append(
            f"{len(bad_text)} empty or missing text(s) in column '{text_column}' at {where(bad_text)}"
        )
    if bad_pair:
        problems.append(
            f"{len(bad_pair)} empty or missing second text(s) of a pair in column '{pair_column}' at "
            f"{where(bad_pair)}"
        )
    if bad_label:
        problems.append(f"{len(bad_label)} missing label(s) in column '{label_column}' at {where(bad_label)}")
    if problems and not drop_invalid:
        raise LlmclfError(
            f"{source}: " + "; ".join(problems) + f" ({words['counted']}). "
            f"Fix those rows, or pass {words['drop']} to leave them out."
        )
    keep = np.ones(len(frame), dtype=bool)
    for r in set(bad_text) | set(bad_pair) | set(bad_label):
        keep[r - 1] = False
    if problems and notes is not None:
        notes.append(
            f"{source}: dropped {int((~keep).sum())} invalid row(s) ({words['drop']}): " + "; ".join(problems)
        )
    out = pd.DataFrame({"text": [str(t) for t, k in zip(texts, keep) if k], "row": rows[keep]})
    if pair_column:
        out.insert(1, "pair", [str(t) for t, k in zip(found[pair_column], keep) if k])
    kept = [v for v, k in zip(found[label_column], keep) if k] if label_column else []
    if label_column and task == REGRESSION:
        out["label"] = parse_targets(kept, out["row"].tolist(), source, label_column, words["label"], where)
    elif label_column and task == MULTI_LABEL:
        rows = out["row"].tolist()
        out["label"] = parse_label_sets(kept, rows, source, label_column, label_separator, words, where)
    elif label_column:
        out["label"] = [normalise_label(v, class_names) for v, k in zip(found[label_column], keep) if k]
        _refuse_scores(out, source, label_column, words, where)
        _refuse_label_sets(out, source, label_column, where)
    return out


MAX_FRACTIONAL_CLASSES = 20
"""More distinct fractional numbers than this in a label column are scores, not classes."""
MAX_SPARSE_CLASSES = 50
"""More distinct whole numbers than this, most of them on a single row, are scores too."""
LABEL_SEPARATORS = (",", ";", "|")


def _first_rows(frame: pd.DataFrame, labels: list[str]) -> list[int]:
    first = frame.drop_duplicates("label").set_index("label")["row"]
    return [int(first[label]) for label in labels]


def _refuse_scores(
    frame: pd.DataFrame, source: str, column: str, words: dict[str, str], where: Callable[[list[int]], str]
) -> None:
    """A column of many fractional numbers (ratings, similarity scores) would train a class per value."""
    counts = frame["label"].value_counts()
    values = list(dict.fromkeys(frame["label"]))
    numbers = [_finite(v) for v in values]
    if any(n is None for n in numbers):
        return
    fractional = [v for v, n in zip(values, numbers) if not float(n).is_integer()]  # "2.5", "1e-3"
    sparse = len(values) > MAX_SPARSE_CLASSES and (counts == 1).sum() > len(values) / 2
    if not (fractional and len(values) > MAX_FRACTIONAL_CLASSES) and not sparse:
        return
    shown = (fractional or values)[:3]
    raise LlmclfError(
        f"{source}: column '{column}' holds {len(values)} distinct numbers (e.g. {', '.join(shown)} at "
        f"{where(_first_rows(frame, shown))}): these look like scores, not classes; as classes most would "
        "have a text or two each. Predict the number itself with --task regression, bin the scores into a "
        f"few classes first (e.g. pandas.cut), or choose the column of class names with {words['label']}."
    )


def _refuse_label_sets(
    frame: pd.DataFrame, source: str, column: str, where: Callable[[list[int]], str]
) -> None:
    """Labels such as "sports,politics" beside "sports" and "politics" are several labels per text; so
    are labels most of which join names that recur in others ("a,b", "a,c", "b,c": 3 names, 3 labels)."""
    present = set(frame["label"])
    for sep in LABEL_SEPARATORS:
        split = {label: [p.strip() for p in label.split(sep)] for label in present}
        joined = {label: parts for label, parts in split.items() if len(parts) > 1}
        names = {p for parts in split.values() for p in parts}
        alone = {label: parts for label, parts in joined.items() if all(p in present for p in parts)}
        recurring = len(joined) > len(present) / 2 and len(names) < len(present)
        if alone or recurring:
            label, parts = sorted((alone or joined).items())[0]
            found = (
                "also found alone" if alone else f"recurring across the column's labels ({len(names)} names)"
            )
            raise LlmclfError(
                f"{source}: column '{column}' has {len(alone or joined)} label(s) such as '{label}' (at "
                f"{where(_first_rows(frame, [label]))}) that join labels {found} ({parts}) with "
                f"'{sep}': this looks like several labels per text. Train with --task multi-label "
                f"--label-separator '{sep}'; or, if such a label is a class of its own, write it without "
                f"'{sep}'."
            )


def case_only(unknown: list[str], known: list[str]) -> dict[str, str]:
    """The `unknown` labels that differ from a `known` one only in case or spaces, mapped to it."""
    spelled = {" ".join(k.split()).casefold(): k for k in known}
    pairs = ((u, spelled.get(" ".join(u.split()).casefold())) for u in unknown)
    return {u: k for u, k in pairs if k is not None}


def order_labels(labels: list[str] | set[str], class_names: list[str] | None = None) -> list[str]:
    """Stable label order: the dataset's own names, else numeric order for numbers, else alphabetical."""
    present = set(labels)
    if class_names:
        return [n for n in class_names if n in present] + sorted(present - set(class_names))
    numbers = {v: _finite(v) for v in present}
    if all(n is not None for n in numbers.values()):
        return sorted(present, key=lambda v: (numbers[v], v))
    return sorted(present)  # "nan" or "inf" compare with nothing: alphabetical, whatever the set order


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------------------- splitting
@dataclass
class Splits:
    """The three splits, label order, and what was done to get them."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    notes: list[str] = field(default_factory=list)
    task: str = SINGLE_LABEL
    """`regression`: labels are numbers and `labels` is the one output, [SCORE]."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per split and class, in label order (regression: rows per split, as {SCORE: n})."""
        out = {}
        for name in ("train", "val", "test"):
            frame = getattr(self, name)
            if self.task == REGRESSION:
                out[name] = {SCORE: len(frame)}
                continue
            if self.task == MULTI_LABEL:  # texts carrying each label
                out[name] = label_counts(frame, self.labels)
                continue
            vc = frame["label"].value_counts() if len(frame) else {}
            out[name] = {label: int(vc.get(label, 0)) for label in self.labels}
        return out


PAIR_JOIN = "\x1f"
"""Between a pair's two texts where one string stands for the pair (duplicate and leakage checks)."""


def input_key(frame: pd.DataFrame) -> pd.Series:
    """What makes two rows the same input: the text, or the pair of texts."""
    return frame["text"] + PAIR_JOIN + frame["pair"] if "pair" in frame else frame["text"]


def inputs(frame: pd.DataFrame) -> tuple[list[str], list[str] | None]:
    """A split's texts and, where the data has pairs, their second texts."""
    return frame["text"].tolist(), frame["pair"].tolist() if "pair" in frame else None


def _dedupe(frame: pd.DataFrame, source: str, notes: list[str]) -> pd.DataFrame:
    key = input_key(frame)
    dup = key.duplicated(keep="first")
    if dup.any():
        conflicting = frame.groupby(key)["label"].nunique()
        what = "text pair(s)" if "pair" in frame else "text(s)"
        notes.append(
            f"{source}: removed {int(dup.sum())} duplicate {what} (kept the first occurrence; "
            f"{int((conflicting > 1).sum())} had conflicting labels) so that no input is in two splits."
        )
    return frame[~dup]


def split_data(
    pool: pd.DataFrame,
    *,
    source: str,
    labels: list[str],
    test_pool: pd.DataFrame | None = None,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 42,
    notes: list[str] | None = None,
    task: str = SINGLE_LABEL,
) -> Splits:
    """Seeded, stratified split into train/val/test; `test_pool` (a separate file) becomes the test split.
    Regression: a random split by the fractions (`targets.split_targets`)."""
    notes = list(notes or [])
    rng = np.random.default_rng(seed)
    pool = _dedupe(pool, source, notes)
    if task != SINGLE_LABEL:
        return _split_by_fractions(
            pool, source, labels, test_pool, val_fraction, test_fraction, rng, notes, task
        )
    if len(labels) < 2:
        raise LlmclfError(
            f"{source}: only one class ({labels[0] if labels else 'none'}) found in the label column. "
            "A classifier needs at least two classes: check --label-column."
        )
    per_class = train_per_class is not None
    if per_class:
        need = (
            train_per_class + (val_per_class or 0) + (0 if test_pool is not None else (test_per_class or 0))
        )
        counts = pool["label"].value_counts()
        short = {lab: int(counts.get(lab, 0)) for lab in labels if counts.get(lab, 0) < need}
        if short:
            listing = ", ".join(f"'{lab}' has {n}" for lab, n in short.items())
            raise LlmclfError(
                f"{source}: {need} examples per class requested (train {train_per_class} + val "
                f"{val_per_class or 0} + test {0 if test_pool is not None else test_per_class or 0}), but "
                f"{listing}. Lower the per-class sizes, or leave them out to split by fractions."
            )
    parts: dict[str, list[pd.DataFrame]] = {"train": [], "val": [], "test": []}
    for label in labels:
        rows = pool[pool["label"] == label]
        rows = rows.iloc[rng.permutation(len(rows))]
        if per_class:
            n_val, n_test = val_per_class or 0, (0 if test_pool is not None else test_per_class or 0)
            n_train = train_per_class
        else:
            n_val, n_test = fraction_sizes(
                len(rows), val_fraction, 0 if test_pool is not None else test_fraction
            )
            n_train = len(rows) - n_val - n_test
        parts["val"].append(rows.iloc[:n_val])
        parts["test"].append(rows.iloc[n_val : n_val + n_test])
        parts["train"].append(rows.iloc[n_val + n_test : n_val + n_test + n_train])

    def shuffled(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat(frames)
        return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)

    train, val, test = shuffled(parts["train"]), shuffled(parts["val"]), shuffled(parts["test"])
    if test_pool is not None:
        test = _prepare_test_pool(test_pool, train, val, labels, test_per_class, rng, notes)
    _require_test(test, source)
    return Splits(train, val, test, labels, notes)


def _split_by_fractions(
    pool: pd.DataFrame,
    source: str,
    labels: list[str],
    test_pool: pd.DataFrame | None,
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
    notes: list[str],
    task: str,
) -> Splits:
    """Regression (at random: `targets.split_targets`) and multi-label (every label in every split where
    it can be: `labelsets.split_label_sets`) splits by fractions; `test_pool` becomes the test split."""
    fraction = 0 if test_pool is not None else test_fraction
    if task == REGRESSION:
        train, val, test = split_targets(pool, val_fraction=val_fraction, test_fraction=fraction, rng=rng)
        check_train_targets(train, source)
    else:
        train, val, test = split_label_sets(
            pool,
            labels,
            val_fraction=val_fraction,
            test_fraction=fraction,
            rng=rng,
            notes=notes,
            source=source,
        )
    if test_pool is not None:
        test = _prepare_test_pool(test_pool, train, val, labels, None, rng, notes, task)
    _require_test(test, source)
    return Splits(train, val, test, labels, notes, task)


def _require_test(test: pd.DataFrame, source: str) -> None:
    if len(test) == 0:
        raise LlmclfError(
            f"{source}: the test split is empty. Give --eval-data, --test-per-class, or a test fraction > 0."
        )


def _prepare_test_pool(
    test_pool: pd.DataFrame,
    train: pd.DataFrame,
    val: pd.DataFrame,
    labels: list[str],
    test_per_class: int | None,
    rng: np.random.Generator,
    notes: list[str],
    task: str = SINGLE_LABEL,
) -> pd.DataFrame:
    found = all_labels(test_pool["label"]) if task == MULTI_LABEL else set(test_pool["label"])
    unseen = [] if task == REGRESSION else sorted(found - set(labels))
    if unseen:
        case = case_only(unseen, labels)
        raise LlmclfError(
            f"The evaluation data has label(s) never seen in training: {unseen} (training labels: {labels}). "
            + (f"Only case or spaces differ ({case}): spell them alike. " if case else "")
            + "Remove those rows or add training examples for them."
        )
    test = _dedupe(test_pool, "evaluation data", notes)
    seen = input_key(test).isin(set(input_key(train)) | set(input_key(val)))
    if seen.any():
        what = "text pair(s)" if "pair" in test else "text(s)"
        notes.append(f"evaluation data: removed {int(seen.sum())} {what} that are also in train/val.")
        test = test[~seen]
    if test_per_class is not None:
        picked = []
        for label in labels:
            rows = test[test["label"] == label]
            picked.append(rows.iloc[rng.permutation(len(rows))[:test_per_class]])
        test = pd.concat(picked)
        test = test.iloc[rng.permutation(len(test))]
    return test.reset_index(drop=True)


def class_weights(train_labels: list[str] | pd.Series, labels: list[str]) -> list[float]:
    """Inverse class frequency in the training split, normalised to sum to 1 (the recipe's weights)."""
    counts = pd.Series(list(train_labels)).value_counts()
    missing = [lab for lab in labels if counts.get(lab, 0) == 0]
    if missing:
        raise LlmclfError(f"No training examples for class(es) {missing}: cannot weigh them.")
    inverse = np.array([len(train_labels) / counts[lab] for lab in labels], dtype=np.float64)
    return (inverse / inverse.sum()).tolist()


# ----------------------------------------------------------------------------------------- top level
def load_splits(
    path: str | Table,
    text_column: str,
    label_column: str,
    *,
    eval_data: str | Table | None = None,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    drop_invalid: bool = False,
    seed: int = 42,
    text_pair_column: str | None = None,
    task: str = SINGLE_LABEL,
    label_separator: str = ",",
) -> Splits:
    """Read, validate and split. A source with its own `train`/`test` splits uses them for test.

    `path` / `eval_data`: what `read_table` reads, or a `Table` already read (data given in memory).
    `text_pair_column`: a second text per row; the splits then have a `pair` column. `task`:
    `regression` reads the labels as numbers, `multi-label` as sets of names joined by `label_separator`
    (or lists)."""
    notes: list[str] = []
    table = path if isinstance(path, Table) else read_table(path)
    names = table.class_names.get(label_column)

    def clean(frame: pd.DataFrame, source: str, of: Table, class_names: list[str] | None) -> pd.DataFrame:
        return clean_frame(
            frame,
            source,
            text_column,
            label_column,
            drop_invalid=drop_invalid,
            class_names=class_names,
            notes=notes,
            in_memory=of.in_memory,
            pair_column=text_pair_column,
            task=task,
            label_separator=label_separator,
        )

    frames = table.frames
    test_pool = None
    if eval_data is not None:
        evaluation = eval_data if isinstance(eval_data, Table) else read_table(eval_data)
        eval_frames = evaluation.frames
        eval_frame = eval_frames.get("test", next(iter(eval_frames.values())))
        eval_names = evaluation.class_names.get(label_column) or names
        test_pool = clean(eval_frame, evaluation.source, evaluation, eval_names)
    elif "train" in frames and "test" in frames:
        test_pool = clean(frames["test"], f"{table.source} [test]", table, names)
        notes.append(f"{table.source}: using its own 'test' split for testing.")
    pool_frame = frames.get("train", next(iter(frames.values())))
    pool_source = table.source + (" [train]" if "train" in frames and len(frames) > 1 else "")
    pool = clean(pool_frame, pool_source, table, names)
    if task == REGRESSION:
        labels = [SCORE]
    else:
        labels = order_labels(all_labels(pool["label"]) if task == MULTI_LABEL else set(pool["label"]), names)
    return split_data(
        pool,
        source=pool_source,
        labels=labels,
        test_pool=test_pool,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        notes=notes,
        task=task,
    )
