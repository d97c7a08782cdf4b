"""The run folder: its file names, confined reads, atomic writes, and typed readers.

run/
  config.yaml            resolved configuration (defaults <- YAML <- flags)
  labels.json            label names, in the order of the model's outputs
  run_info.json          resolved base model, precision, versions, training log, timings
  adapter/               LoRA adapter + classification head (safetensors)
  tokenizer/             tokenizer with its pad token set
  lexical/               TF-IDF + LR mixed with the model, where it helped on validation (inference/lexical.py)
  metrics.json           {"before": {...}, "after": {...}} on the test split
  data_summary.json      rows per split and class, class weights, truncation, notes
  predictions_test.csv   text, true label, predicted label, prob_<label> per class

A run folder is data that people share: every file is read through `RunFolder.path`, which refuses a
path leading outside the folder, and written through `atomic_write`, which never follows a link.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llmclf.errors import LlmclfError

CONFIG = "config.yaml"
LABELS = "labels.json"
RUN_INFO = "run_info.json"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
LEXICAL = "lexical"
METRICS = "metrics.json"
DATA_SUMMARY = "data_summary.json"
PREDICTIONS = "predictions_test.csv"
CHECKPOINTS = "checkpoints"
FINGERPRINT = "fingerprint.json"
"""What a run depends on, written at its start (training/checkpoints.py), before the model loads."""
FINISHED = (CONFIG, LABELS, RUN_INFO, ADAPTER, TOKENIZER)
"""What a finished run folder holds for loading the classifier (all of it listed in its manifest)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def prob_column(label: str) -> str:
    """The column holding a label's probability, in predictions_test.csv and in `predict`'s output."""
    return f"prob_{label}"


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a new temporary file beside `path`, then rename it onto `path`.

    A reader never sees half a file; the temporary name is unpredictable (no one can plant a link
    there first), and the rename replaces a link at `path` rather than writing through it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the file gets the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def write_csv(frame: Any, path: Path, sep: str = ",") -> Path:
    """A DataFrame as CSV (or TSV), atomically. Rows end in CRLF (RFC 4180), so that a field holding a
    bare carriage return is quoted: with LF endings it was written bare and split its row when read."""
    return atomic_write(
        path, lambda tmp: frame.to_csv(tmp, index=False, sep=sep, float_format="%.9g", lineterminator="\r\n")
    )


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
            if entry.is_symlink():
                _refuse_outside(root, entry)


def _refuse_outside(root: Path, entry: Path) -> Path:
    target = Path(os.path.realpath(entry))
    if not target.is_relative_to(root):
        raise LlmclfError(
            f"{entry} is a link to {target}, outside the run folder {root}: refused, since llmclf reads "
            "a run folder's files only from inside it. Replace the link by a copy of the file if you "
            "trust it."
        )
    return target


class RunFolder:
    """One run folder, resolved once; every read is confined to it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.realpath(Path(root).expanduser()))

    @classmethod
    def open(cls, run_dir: str | Path, needed: Iterable[str] = FINISHED, purpose: str = "") -> RunFolder:
        """An existing run folder holding `needed`, or an error saying what is missing.

        With the default `needed` (a finished run, to load the classifier from), links leading out of
        the folder anywhere below it are refused too, since the model loaders open folders whole."""
        run = cls(run_dir)
        if not run.root.is_dir():
            raise LlmclfError(
                f"Run folder not found: {run.root}. Give the --output folder of a finished `llmclf train`."
            )
        missing = [n for n in needed if not (run.root / n).exists()]
        if missing and purpose:
            raise LlmclfError(
                f"{run.root} is missing {missing}, which {purpose} needs. Was training interrupted? Train again."
            )
        if missing:
            raise LlmclfError(
                f"{run.root} is not a complete llmclf run folder: missing {missing}. Was training "
                "interrupted? Train again (or resume) into this folder."
            )
        if tuple(needed) == FINISHED:
            confine(run.root)
            if not (run.root / ADAPTER / "adapter_model.safetensors").is_file():
                raise LlmclfError(
                    f"{run.root / ADAPTER} has no adapter_model.safetensors. llmclf writes and reads adapters "
                    "as safetensors only (a pickle adapter can run code when loaded): train the run again."
                )
        return run

    @property
    def name(self) -> str:
        return self.root.name

    def path(self, name: str) -> Path:
        """`name` inside the folder, refused when it (or a link on the way) leads outside it."""
        entry = self.root / name
        _refuse_outside(self.root, entry)
        return entry

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    # ------------------------------------------------------------------------------------ readers
    def read_text(self, name: str) -> str:
        return self.path(name).read_text(encoding="utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def optional_json(self, name: str) -> Any:
        """The file's JSON, or None when the folder has no such file."""
        return self.read_json(name) if self.has(name) else None

    def labels(self) -> list[str]:
        """labels.json: the label names in output order, checked (it is data from the folder)."""
        try:
            labels = self.read_json(LABELS)
        except (UnicodeDecodeError, json.JSONDecodeError):
            labels = None
        ok = isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)
        if not ok or len(set(labels)) != len(labels):
            raise LlmclfError(
                f"{self.root / LABELS} must be a JSON list of distinct, non-empty label names; found "
                f"{str(labels)[:200]}. The run folder is damaged or edited: copy it again, or train again."
            )
        return labels

    def run_info(self) -> dict:
        return self.optional_json(RUN_INFO) or {}

    def config(self) -> Any:
        """The resolved `RunConfig` the run was trained with."""
        from llmclf.config import build_config, parse_yaml

        return build_config(parse_yaml(self.read_text(CONFIG), self.path(CONFIG)))

    def predictions(self) -> Any:
        """predictions_test.csv as a DataFrame (labels as strings), or None when absent."""
        import pandas as pd

        if not self.has(PREDICTIONS):
            return None
        return pd.read_csv(
            self.path(PREDICTIONS), keep_default_na=False, dtype={"label": str, "predicted": str}
        )

    # ------------------------------------------------------------------------------------ writers
    def write_json(self, name: str, data: Any) -> Path:
        return write_json(self.root / name, data)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.root / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_with(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Write a file of the folder through `write(tmp)` (e.g. a figure's or a frame's own saver)."""
        return atomic_write(self.root / name, write)


# ------------------------------------------------------------------------------------ failed runs
def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` (inode, modification time, size), or None when there is none."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: `path` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


@contextlib.contextmanager
def tidy_if_failed(output: str | Path) -> Iterator[None]:
    """Undo what a new run that fails early left in its run folder, so that the same command can run
    again: the `fingerprint.json` it wrote, and the folders it created, once empty.

    Only when nothing reusable is there (no checkpoint, no metrics: the folder holds that fingerprint
    alone), and only what this block made: a fingerprint that was there before is kept (`--resume`),
    a folder that existed before is kept (emptied by `--overwrite`, or empty from the start). Under a
    launcher only the main process (RANK 0) tidies, as only it writes."""
    path = Path(output).expanduser()
    created, stamp = _first_missing(path), _stamp(path / FINGERPRINT)
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            _tidy(path, created, stamp)
        raise


def _tidy(path: Path, created: Path | None, stamp: tuple[int, int, int] | None) -> None:
    if path.is_symlink() or not path.is_dir():
        return
    names = {entry.name for entry in path.iterdir()}
    if names - {FINGERPRINT}:
        return  # checkpoints, metrics or files of the user's: all kept
    fingerprint = path / FINGERPRINT
    if FINGERPRINT in names:
        if _stamp(fingerprint) == stamp or fingerprint.is_symlink() or not fingerprint.is_file():
            return  # not written by this run
        fingerprint.unlink()
    if created is None:
        return
    for folder in (path, *path.parents):
        try:
            folder.rmdir()  # only ever an empty folder
        except OSError:
            return
        if folder == created:
            return
