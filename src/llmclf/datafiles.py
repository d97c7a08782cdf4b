"""Data sources: read a table of labelled texts from a file, a `datasets` folder, a hub dataset or the
bundled demo, or take one given in memory (a pandas DataFrame, a list of dicts, a `datasets.Dataset`);
and find a column in it, a dotted name (`ticket.body`) reaching into nested JSON objects / structs.

What comes out is raw rows, unvalidated: data.py checks them, names the rows to fix, and splits them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmclf.errors import LlmclfError

DEMO_NAME = "demo"
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"}


def demo_data_path() -> Path:
    """The bundled news-topic demo data (written by tools/demo_data.py)."""
    return Path(str(resources.files("llmclf") / "resources" / "demo_news.csv"))


# --------------------------------------------------------------------------------------------- loading
@dataclass
class Table:
    """Raw rows as read, before validation: one frame per split the source came with."""

    frames: dict[str, pd.DataFrame]
    """`{"all": df}` for a file; the dataset's own splits (`train`, `test`, ...) for a `datasets` source."""
    source: str
    """What was read, for messages."""
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Label names of integer `ClassLabel` columns, by column."""
    in_memory: bool = False
    """Given in memory (`llmclf.train(data=frame)`): errors name the frame's index and the keyword
    arguments, not file rows and flags."""


def _first_bad_utf8_line(path: Path) -> tuple[int, str]:
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return number, repr(raw[max(0, exc.start - 20) : exc.end + 20])
    return 0, ""


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LlmclfError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}). Each line of a JSONL file must be "
                    'one JSON object, e.g. {"text": "...", "label": "..."}.'
                ) from None
            if not isinstance(record, dict):
                raise LlmclfError(
                    f"{path}: line {number} is {type(record).__name__}, expected a JSON object."
                )
            records.append(record)
    return pd.DataFrame.from_records(records)


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        # dtype=str and no NA parsing: "NA", "null" or "nan" stay texts, integers stay as written.
        return pd.read_csv(
            path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, encoding="utf-8"
        )
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON Lines under a .json name
        if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
            raise LlmclfError(f"{path}: expected a JSON list of objects or JSON Lines, one object per line.")
        return pd.DataFrame.from_records(loaded)
    return pd.read_parquet(path)


def _class_names(dataset: Any) -> dict[str, list[str]]:
    features = dataset.features.items()
    return {column: list(f.names) for column, f in features if type(f).__name__ == "ClassLabel"}


def _from_datasets(obj: Any, source: str) -> Table:
    if hasattr(obj, "features"):  # a single Dataset
        return Table({"all": obj.to_pandas()}, source, _class_names(obj))
    frames = {name: split.to_pandas() for name, split in obj.items()}
    first = next(iter(obj.values()))
    return Table(frames, source, _class_names(first))


def read_table(spec: str) -> Table:
    """Read a file, a `save_to_disk` folder, a hub dataset name, or `demo`."""
    if spec.startswith("<") and spec.endswith(">"):
        raise LlmclfError(
            f"{spec} stands for data given in memory to llmclf.train(data=...), not a file: pass that data "
            f"again, or the copy its run folder holds ({MEMORY_COPIES['data']}, {MEMORY_COPIES['eval_data']}) "
            "as the data path."
        )
    path = demo_data_path() if spec == DEMO_NAME else Path(spec).expanduser()
    if path.is_dir():
        if not any(
            (path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            raise LlmclfError(
                f"{path} is a folder but not one written by datasets' save_to_disk. Give a CSV, JSONL or "
                "Parquet file, or such a folder."
            )
        import datasets

        return _from_datasets(datasets.load_from_disk(str(path)), str(path))
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise LlmclfError(
                f"{path}: unreadable format '{path.suffix or '(no extension)'}'. Supported: "
                f"{', '.join(sorted(TABLE_SUFFIXES))}, or a datasets folder."
            )
        if not path.read_bytes().strip():
            raise LlmclfError(f"{path} is empty. Give a file with a header row and one row per example.")
        try:
            frame = _read_file(path)
        except UnicodeDecodeError:
            line, excerpt = _first_bad_utf8_line(path)
            raise LlmclfError(
                f"{path}: line {line} is not valid UTF-8 (bytes {excerpt}). Re-save the file as UTF-8, e.g. "
                f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`."
            ) from None
        except LlmclfError:
            raise
        except Exception as exc:  # pandas/pyarrow parse errors
            raise LlmclfError(
                f"{path}: could not be read as {path.suffix[1:].upper()} ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())}). Check that the file is a valid {path.suffix[1:].upper()} file."
            ) from None
        if len(frame) == 0:
            raise LlmclfError(
                f"{path} has no data rows (columns: {list(frame.columns)}). Give a file with one row per example."
            )
        return Table({"all": frame}, str(path))
    if path.suffix.lower() in TABLE_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LlmclfError(f"Data file not found: {path}. Check the path (relative to {Path.cwd()}).")
    return _load_hub_dataset(spec)


def _load_hub_dataset(name: str) -> Table:
    import datasets

    try:
        return _from_datasets(datasets.load_dataset(name), f"hub dataset {name}")
    except Exception as exc:
        raise LlmclfError(
            f"'{name}' is neither a local file nor a dataset that could be loaded from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the path, or the "
            "dataset name and your network connection (HF_HUB_OFFLINE must be unset to download)."
        ) from None


# ------------------------------------------------------------------------------------------- columns
ABSENT = object()
"""A field that a row's object does not have (unlike a field holding null)."""


def pick(value: Any, keys: list[str]) -> Any:
    """The field at `keys` inside a JSON object / Parquet struct, `ABSENT` where the row has none."""
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return ABSENT
        value = value[key]
    return value


def field_paths(values: list, prefix: str, depth: int = 4) -> list[str]:
    """Dotted names of the fields in a column of objects (`ticket.body`, `ticket.meta.id`), from its
    first 200 rows."""
    fields: dict[str, list] = {}
    for value in values[:200]:
        for key, inner in value.items() if isinstance(value, dict) else ():
            fields.setdefault(str(key), []).append(inner)
    out = []
    for key, inner in fields.items():
        nested = depth > 1 and any(isinstance(v, dict) for v in inner)
        out += field_paths(inner, f"{prefix}.{key}", depth - 1) if nested else [f"{prefix}.{key}"]
    return out


def lookup_column(frame: pd.DataFrame, column: str) -> list | None:
    """A column's values; a dotted name not itself a column (`ticket.body`) reaches into the objects of
    column `ticket` (JSONL/JSON objects, Parquet or datasets structs). None: no such column or field."""
    if column in frame.columns:
        return frame[column].tolist()
    parts = column.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in frame.columns:
            values = [pick(v, parts[cut:]) for v in frame[head].tolist()]
            if any(v is not ABSENT for v in values):
                return [None if v is ABSENT else v for v in values]
    return None


# ------------------------------------------------------------------------------------------ in memory
MEMORY_COPIES = {"data": "data.jsonl", "eval_data": "eval_data.jsonl"}
"""The run folder's copy of data given in memory, by the keyword it came as."""


@dataclass
class InMemory:
    """Labelled rows given in memory: the table to validate, and the columns the run uses as JSON Lines
    (the run folder's copy: it reads back as the same rows, so a run from it splits them alike)."""

    table: Table
    copy: str
    kind: str
    """`DataFrame`, `list` (of dicts) or `Dataset`."""

    @property
    def rows(self) -> int:
        return len(self.table.frames["all"])

    @functools.cached_property
    def sha256(self) -> str:
        """Of the copy: what `sha256sum` gives for the run folder's file."""
        return hashlib.sha256(self.copy.encode("utf-8")).hexdigest()

    @property
    def marker(self) -> str:
        """What stands for the data in the run's config (data.path / data.eval_data)."""
        return f"<{self.kind}: {self.rows} rows, sha256 {self.sha256[:16]}>"


def from_memory(
    data: Any, text_column: str, label_column: str, what: str = "data", pair_column: str | None = None
) -> InMemory:
    """A DataFrame, a list of dicts (one per row) or a `datasets.Dataset`, as a table of its own rows.

    Nothing is validated here but the container: missing columns and empty values are data.py's to name
    (by the frame's index)."""
    source = f"{what} ({type(data).__name__})"
    class_names: dict[str, list[str]] = {}
    if isinstance(data, pd.DataFrame):
        kind, frame = "DataFrame", data
    elif isinstance(data, list | tuple):
        odd = next(((i, r) for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if odd is not None:
            raise LlmclfError(
                f"{what}: item {odd[0]} of the list is {type(odd[1]).__name__}, not a dict. Give one dict "
                f"per row, e.g. {{{text_column!r}: 'some text', {label_column!r}: 'its label'}}."
            )
        kind, frame = "list", pd.DataFrame.from_records(list(data))
    elif hasattr(data, "features") and hasattr(data, "to_pandas"):  # a datasets.Dataset
        kind, frame, class_names = "Dataset", data.to_pandas(), _class_names(data)
    else:
        splits = f" (a DatasetDict: give one split, e.g. {what}=ds['train'])" if hasattr(data, "keys") else ""
        raise LlmclfError(
            f"{what}= takes a file path, a pandas DataFrame, a list of dicts or a datasets.Dataset; got "
            f"{type(data).__name__}{splits}."
        )
    if len(frame) == 0:
        raise LlmclfError(
            f"{source} has no rows (columns: {list(frame.columns)}). Give one row per labelled example."
        )
    table = Table({"all": frame}, source, class_names, in_memory=True)
    columns = [text_column, *([pair_column] if pair_column else []), label_column]
    return InMemory(table, _copy(frame, columns, class_names), kind)


def _plain(value: Any) -> Any:
    """A value as JSON holds it: numpy scalars as Python's, a missing value as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _copy(frame: pd.DataFrame, columns: list[str], class_names: dict[str, list[str]]) -> str:
    """The columns (dotted names resolved) as JSON Lines; integer `ClassLabel`s as their names. A column
    the frame lacks is left out (validation refuses it before anything is written)."""
    found = {c: lookup_column(frame, c) for c in dict.fromkeys(columns)}
    values = {c: v for c, v in found.items() if v is not None}
    for column, names in class_names.items():
        if column in values:
            values[column] = [
                names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in values[column]
            ]
    if not values:
        return ""
    return "".join(
        json.dumps(dict(zip(values, map(_plain, row))), ensure_ascii=False, default=str) + "\n"
        for row in zip(*values.values())
    )
