"""What each subcommand does, once its arguments are parsed (see cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from llmclf import artifacts, reporting
from llmclf.config import config_from_saved, load_config
from llmclf.data import clean_frame, read_table
from llmclf.errors import LlmclfError

WRITERS = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq"}


def dispatch(args: argparse.Namespace) -> int:
    from llmclf.pipeline import set_threads

    set_threads()
    commands = {"train": train, "predict": predict, "evaluate": evaluate, "export": export, "serve": serve}
    return commands[args.command](args)


def train(args: argparse.Namespace) -> int:
    from llmclf.cli import train_overrides
    from llmclf.pipeline import run_training

    config = load_config(args.config, train_overrides(args))
    run_training(config, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _load(args: argparse.Namespace):
    from llmclf.prediction import Classifier

    if not args.quiet:
        print(f"Loading classifier from {args.run_dir} ...", file=sys.stderr, flush=True)
    clf = Classifier.load(args.run_dir, quiet=args.quiet)
    clf.batch_size = args.batch_size or clf.batch_size
    clf.max_length = args.max_length or clf.max_length
    return clf


def _single_frame(spec: str) -> pd.DataFrame:
    table = read_table(spec)
    if len(table.frames) > 1:
        raise LlmclfError(f"{spec} holds several splits {list(table.frames)}: give one file.")
    return next(iter(table.frames.values()))


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write by extension, through a temporary file, so a failed run leaves no half-written output."""
    suffix = path.suffix.lower()
    if suffix not in WRITERS:
        raise LlmclfError(f"Output {path}: unsupported extension '{suffix}'. Use one of {sorted(WRITERS)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if suffix in (".csv", ".tsv"):
        frame.to_csv(tmp, index=False, sep="\t" if suffix == ".tsv" else ",", float_format="%.9g")
    elif suffix in (".jsonl", ".ndjson"):
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def predict(args: argparse.Namespace) -> int:
    if args.input and not args.output:
        raise LlmclfError(
            "--input needs --output FILE (.csv, .jsonl or .parquet) to write the predictions to."
        )
    clf = _load(args)
    if args.text:
        probs = clf.predict_proba(args.text)
        for text, row in zip(args.text, probs):
            ranked = sorted(zip(clf.labels, row), key=lambda kv: -kv[1])
            print(
                json.dumps(
                    {
                        "text": text,
                        "label": ranked[0][0],
                        "probabilities": {k: round(float(v), 6) for k, v in ranked},
                    },
                    ensure_ascii=False,
                )
            )
        return 0
    text_column = (
        args.text_column or config_from_saved(Path(args.run_dir) / artifacts.CONFIG).data.text_column
    )
    frame = _single_frame(args.input)
    clean_frame(frame, args.input, text_column, None)  # empty texts are an error naming their rows
    added = [args.prediction_column] + [f"prob_{label}" for label in clf.labels]
    clash = [c for c in added if c in frame.columns]
    if clash:
        raise LlmclfError(
            f"{args.input} already has column(s) {clash}, which predict would add. Pass --prediction-column "
            "with another name, or rename those columns."
        )
    probs = clf.predict_proba(
        frame[text_column].astype(str).tolist(),
        progress=None if not args.quiet else False,
    )
    out = frame.copy()
    out[args.prediction_column] = [clf.labels[i] for i in probs.argmax(axis=1)]
    for i, label in enumerate(clf.labels):
        out[f"prob_{label}"] = probs[:, i]
    write_table(out, Path(args.output))
    if not args.quiet:
        print(f"Wrote {len(out)} rows to {args.output}", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    saved = config_from_saved(Path(args.run_dir) / artifacts.CONFIG)
    text_column = args.text_column or saved.data.text_column
    label_column = args.label_column or saved.data.label_column
    frame = clean_frame(
        _single_frame(args.data), args.data, text_column, label_column, drop_invalid=args.drop_invalid
    )
    clf = _load(args)
    metrics, _ = clf.evaluate(frame["text"].tolist(), frame["label"].tolist(), progress=None)
    output = (
        Path(args.output) if args.output else Path(args.run_dir) / f"evaluation_{Path(args.data).stem}.json"
    )
    artifacts.write_json(output, {"data": str(args.data), **metrics})
    print(reporting.full_report(None, metrics))
    print(f"\nMetrics written to {output}")
    return 0


def export(args: argparse.Namespace) -> int:
    from llmclf.prediction import Classifier

    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise LlmclfError(f"Export folder {out} is not empty. Choose an empty or new folder.")
    clf = Classifier.load(args.run_dir, quiet=args.quiet, full_precision=True)
    merged = clf.merged_model()
    merged.save_pretrained(str(out))  # safetensors
    # Plain users who pass truncation=True then truncate where training did.
    clf.tokenizer.model_max_length = clf.max_length
    clf.tokenizer.save_pretrained(str(out))
    if not args.quiet:
        print(f"Exported a merged model ({len(clf.labels)} labels) to {out}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from llmclf.serving import ServeOptions, run_server

    keys = ("host", "port", "max_batch_size", "max_wait_ms", "max_texts", "max_body_bytes", "max_queue")
    given = {
        k: getattr(args, k) for k in keys + ("max_length", "max_padding") if getattr(args, k) is not None
    }
    options = ServeOptions(**given)
    return run_server(args.run_dir, options, quiet=args.quiet, verbose=args.verbose)
