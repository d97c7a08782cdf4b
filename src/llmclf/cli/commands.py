"""What each subcommand does, once its arguments are parsed (cli/parser.py). Heavy imports (torch, the
model) happen inside the commands that run a model: `report` and `compare` never load torch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from llmclf import runtime
from llmclf.cli.parser import name_flags, train_overrides
from llmclf.config import MULTI_LABEL, REGRESSION, load_config
from llmclf.data import clean_frame, inputs, read_table
from llmclf.datafiles import DEMO_NAME, demo_data_path
from llmclf.errors import LlmclfError
from llmclf.reports import console
from llmclf.runfolder import RunFolder, atomic_write, prob_column, tidy_if_failed, write_csv, write_json
from llmclf.targets import SCORE

log = logging.getLogger("llmclf")

WRITERS = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq"}


def dispatch(args: argparse.Namespace) -> int:
    commands = {"train": train, "predict": predict, "evaluate": evaluate, "export": export}
    commands.update(serve=serve, report=report, compare=compare)
    if args.command not in ("report", "compare"):  # these read files only
        runtime.set_threads()
    return commands[args.command](args)


def train(args: argparse.Namespace) -> int:
    from llmclf.training.pipeline import run_training

    try:
        config = load_config(args.config, train_overrides(args))
    except LlmclfError as exc:
        raise LlmclfError(name_flags(str(exc))) from None
    if config.data.path == DEMO_NAME:  # the default: say so, a newcomer may have forgotten --data
        log.info(
            "note: training on the bundled demo data (%s, news topics): give --data FILE to train on "
            "your own.",
            demo_data_path().name,
        )
    with tidy_if_failed(config.output):  # a run that fails before writing anything reusable can be rerun
        result = run_training(config, overwrite=args.overwrite, quiet=args.quiet, resume=args.resume)
    if result.written:  # the result, printed even with --quiet (under a launcher by rank 0 alone)
        print(console.full_report(result.metrics["before"], result.metrics["after"]), flush=True)
        print(f"\nRun folder: {result.output}  ({result.seconds:.0f} s)", flush=True)
    return 0


def _load(args: argparse.Namespace):
    from llmclf.inference.classifier import Classifier

    log.info("Loading classifier from %s ...", args.run_dir)
    clf = Classifier.load(args.run_dir, **loading_options(args))
    clf.batch_size = args.batch_size or clf.batch_size
    clf.max_length = args.max_length or clf.max_length
    return clf


def loading_options(args: argparse.Namespace) -> dict:
    """`Classifier.load`'s keyword arguments that only the caller may set (a run folder never does)."""
    options = {
        "base_model": args.base_model,
        "trust_remote_code": args.trust_remote_code,
        "allow_pickle": args.allow_pickle,
    }
    if getattr(args, "precision", None):  # predict, evaluate, serve (export writes full precision)
        options["precision"] = args.precision
    return options


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

    def write(tmp: Path) -> None:
        if suffix in (".csv", ".tsv"):
            write_csv(frame, tmp, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(tmp, index=False)

    atomic_write(path, write)


def _note_truncated(clf, texts: list[str], source: str, pairs: list[str] | None = None) -> None:
    """Say how many texts are longer than the classifier's max_length (they are truncated, not refused)."""
    lengths = [len(ids) for ids in clf.tokenizer(texts, pairs, truncation=False)["input_ids"]]
    n = sum(length > clf.max_length for length in lengths)
    if n:
        log.warning("note: %s: %d text(s) longer than %d tokens truncated.", source, n, clf.max_length)


def predict(args: argparse.Namespace) -> int:
    if args.input and not args.output:
        raise LlmclfError(
            "--input needs --output FILE (.csv, .jsonl or .parquet) to write the predictions to."
        )
    run = RunFolder.open(args.run_dir)
    pair_column = args.text_pair_column or run.config().data.text_pair_column
    if args.text:
        return _predict_texts(args, bool(pair_column))
    if args.pair:
        raise LlmclfError("--pair goes with --text; with --input, the pairs come from --text-pair-column.")
    text_column = args.text_column or run.config().data.text_column
    frame = _single_frame(args.input)  # the input is checked before the model loads
    # Empty texts are an error naming their rows; with --drop-invalid they stay in the output, unlabelled.
    notes: list[str] = []
    valid = clean_frame(
        frame,
        args.input,
        text_column,
        None,
        drop_invalid=args.drop_invalid,
        notes=notes,
        pair_column=pair_column,
    )
    keep = (valid["row"] - 1).to_numpy()
    regression = run.config().task == REGRESSION
    column = args.prediction_column or (SCORE if regression else "label")
    added = [column] + ([] if regression else [prob_column(label) for label in run.labels()])
    clash = [c for c in added if c in frame.columns]
    if clash:  # before the model loads, like every check of the input
        raise LlmclfError(
            f"{args.input} already has column(s) {clash}, which predict would add. Pass --prediction-column "
            "with another name, or rename those columns."
        )
    clf = _load(args)
    texts, pairs = inputs(valid)
    _note_truncated(clf, texts, args.input, pairs)
    out = frame.copy()
    progress = None if not args.quiet else False
    for name, values in _prediction_columns(clf, texts, pairs, keep, len(frame), column, progress).items():
        out[name] = values
    for note in notes:
        log.warning("note: %s", note.replace("dropped", "left unlabelled"))
    write_table(out, Path(args.output))
    log.info("Wrote %d rows to %s", len(out), args.output)
    return 0


def _prediction_columns(
    clf,
    texts: list[str],
    pairs: list[str] | None,
    keep: np.ndarray,
    n: int,
    column: str,
    progress: bool | None,
) -> dict[str, list | np.ndarray]:
    """The columns predict adds to the n input rows, those in `keep` predicted: the label and each class's
    probability, or for a regression run the number; rows left out stay empty."""
    if clf.task == REGRESSION:
        scores = np.full(n, np.nan)
        scores[keep] = clf.scores(texts, pairs=pairs, progress=progress)
        return {column: scores}
    probs = clf.predict_proba(texts, pairs=pairs, progress=progress)
    predicted: list[str | None] = [None] * n
    if clf.task == MULTI_LABEL:  # the labels that reach their thresholds, joined as in the training data
        for row, labels in zip(keep, clf.chosen_labels(probs)):
            predicted[row] = clf.label_separator.join(labels)
    else:
        for row, i in zip(keep, probs.argmax(axis=1)):
            predicted[row] = clf.labels[i]
    columns: dict[str, list | np.ndarray] = {column: predicted}
    for i, label in enumerate(clf.labels):
        columns[prob_column(label)] = np.full(n, np.nan)
        columns[prob_column(label)][keep] = probs[:, i]
    return columns


def _predict_texts(args: argparse.Namespace, pairs_expected: bool) -> int:
    """`predict --text ... [--pair ...]`: one JSON line per text."""
    if pairs_expected and len(args.pair or []) != len(args.text):
        raise LlmclfError(
            f"This run was trained on text pairs: give one --pair (the second text) per --text "
            f"({len(args.text)} --text, {len(args.pair or [])} --pair)."
        )
    clf = _load(args)
    if clf.task == REGRESSION:
        for k, (text, score) in enumerate(zip(args.text, clf.scores(args.text, pairs=args.pair))):
            record = {"text": text, **({"pair": args.pair[k]} if args.pair else {}), SCORE: float(score)}
            print(json.dumps(record, ensure_ascii=False))
        return 0
    probs = clf.predict_proba(args.text, pairs=args.pair)
    chosen = clf.chosen_labels(probs) if clf.task == MULTI_LABEL else None
    for k, (text, row) in enumerate(zip(args.text, probs)):
        ranked = sorted(zip(clf.labels, row), key=lambda kv: -kv[1])
        record = {"text": text, **({"pair": args.pair[k]} if args.pair else {})}
        record |= {"labels": chosen[k]} if chosen is not None else {"label": ranked[0][0]}
        record |= {"probabilities": {k: round(float(v), 6) for k, v in ranked}}
        print(json.dumps(record, ensure_ascii=False))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from llmclf.inference.predict import check_labels

    run = RunFolder.open(args.run_dir)
    saved = run.config()
    text_column = args.text_column or saved.data.text_column
    label_column = args.label_column or saved.data.label_column
    frame = clean_frame(
        _single_frame(args.data),
        args.data,
        text_column,
        label_column,
        drop_invalid=args.drop_invalid,
        pair_column=args.text_pair_column or saved.data.text_pair_column,
        task=saved.task,
        label_separator=saved.data.label_separator,
    )
    if saved.task != REGRESSION:  # before the model loads
        found = frame["label"].tolist()
        found = [label for labels in found for label in labels] if saved.task == MULTI_LABEL else found
        check_labels(found, run.labels(), args.data, label_column)
    clf = _load(args)
    texts, pairs = inputs(frame)
    _note_truncated(clf, texts, args.data, pairs)
    metrics, _ = clf.evaluate(
        texts, frame["label"].tolist(), pairs=pairs, progress=False if args.quiet else None
    )
    output = (
        Path(args.output) if args.output else Path(args.run_dir) / f"evaluation_{Path(args.data).stem}.json"
    )
    write_json(output, {"data": str(args.data), **metrics})
    print(console.full_report(None, metrics, thresholds=clf.thresholds))
    print(f"\nMetrics written to {output}")
    return 0


def export(args: argparse.Namespace) -> int:
    from llmclf.inference.classifier import Classifier, check_exportable
    from llmclf.reports.modelcard import exported_name, write_model_card

    out = Path(args.output).expanduser()
    repo = getattr(args, "push_to_hub", None)
    if repo:
        _check_repo_id(repo)
    if out.exists() and any(out.iterdir()):
        raise LlmclfError(f"Export folder {out} is not empty. Choose an empty or new folder.")
    check_exportable(args.run_dir)
    clf = Classifier.load(args.run_dir, full_precision=True, **loading_options(args))
    merged = clf.merged_model()
    # A GGUF-converted base carries its file's internal name ("Smollm2 135M 8k Lc100K Mix1 Ep2") in the
    # config; the export is named after the base model's hub id, or the run folder where there is none.
    name = exported_name(args.run_dir)
    vars(merged.config).pop("_model_name_or_path", None)
    merged.config.name_or_path = name
    merged.save_pretrained(str(out))  # safetensors
    _name_config(out / "config.json", name)
    # Plain users who pass truncation=True then truncate where training did.
    clf.tokenizer.model_max_length = clf.max_length
    clf.tokenizer.save_pretrained(str(out))
    write_model_card(args.run_dir, out, repo)  # README.md: labels, data, metrics, intended use, base licence
    if not args.quiet:
        print(f"Exported a merged model ({len(clf.labels)} labels) to {out}")
        if clf.lexical is not None:
            print(
                f"note: the run's classifier also mixes in TF-IDF + LR (weight {clf.lexical.weight:.1f}); the "
                "export is the model part alone (README.md there gives both figures). `llmclf predict` on the "
                "run folder uses both."
            )
    if repo:
        url = push_to_hub(out, repo, private=args.private)
        if not args.quiet:
            print(f"Uploaded to {url}")
    return 0


def _name_config(path: Path, name: str) -> None:
    """Write `_name_or_path` into an exported config.json (transformers 5 leaves it out)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.pop("_name_or_path", None)
    config = {"_name_or_path": name, **saved}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise LlmclfError(
            f"--push-to-hub {repo!r} is not a Hugging Face repository id ({exc}). Give NAME or USER/NAME, "
            "e.g. my-name/news-classifier."
        ) from None


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Upload `folder` to the hub model repository `repo` (created if missing); its URL. Without a
    token, offline, or with the hub out of reach, an LlmclfError saying so within seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from llmclf.model.sources import HUB_PROBE_S, _answers, _proxied

    host = urlparse(constants.ENDPOINT)
    port = host.port or (443 if host.scheme == "https" else 80)
    login = "set HF_TOKEN to a token with write access, or run `hf auth login` (`huggingface-cli login` in older versions)"
    problem = None
    if constants.HF_HUB_OFFLINE:
        problem = "HF_HUB_OFFLINE is set; unset it"
    elif not get_token():
        problem = f"no Hugging Face token was found; {login}"
    elif host.hostname and not _proxied() and not _answers(host.hostname, port, HUB_PROBE_S):
        problem = f"{host.hostname} cannot be reached from here; check the network (and HF_ENDPOINT)"
    if problem is None:
        try:
            api = HfApi()
            url = api.create_repo(repo, private=private or None, exist_ok=True)
            api.upload_folder(
                repo_id=url.repo_id,
                folder_path=str(folder),
                commit_message="Upload a model exported by llmclf",
            )
            return str(url)
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            problem = {
                401: f"the hub refused the token (401); {login}",
                403: f"the token may not write to {repo} (403); use one with write access, or a repository "
                "of your own",
            }.get(status, f"the hub answered: {console.one_line(str(exc))[:300]}")
        except Exception as exc:  # network errors (httpx), file errors
            problem = f"the upload failed ({type(exc).__name__}: {console.one_line(str(exc))[:300]})"
    raise LlmclfError(
        f"Could not push to the hub repository {repo}: {problem}. The exported model is kept in {folder}; "
        f"once that is fixed, upload it with `hf upload {repo} {shlex.quote(str(folder))} .`"
    )


def report(args: argparse.Namespace) -> int:
    from llmclf.reports.run_report import build_report

    path = build_report(args.run_dir, top=args.top)
    print(f"Report written to {path} (and report.md, PNGs beside it)")
    return 0


def compare(args: argparse.Namespace) -> int:
    from llmclf.reports.compare import compare_runs, write_comparison

    headers, rows, warnings = compare_runs(args.run_dirs)
    print(console.table(headers, rows, title="Runs compared (config keys that differ, then test metrics)"))
    if warnings:
        print("\n" + "\n".join(f"warning: {console.printable(w)}" for w in warnings))
    if args.output:
        print(f"\nWritten to {write_comparison(headers, rows, args.output, warnings)}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from llmclf.serve.app import API_KEY_ENV, ServeOptions, run_server

    keys = ("host", "port", "max_batch_size", "max_wait_ms", "max_texts", "max_body_bytes", "max_queue")
    keys += ("max_length", "pass_overhead_tokens", "max_connections", "header_timeout_s", "body_timeout_s")
    keys += ("graceful_timeout_s", "api_key", "docs")
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.allowed_hosts:
        names = [name.strip() for value in args.allowed_hosts for name in value.split(",")]
        given["allowed_hosts"] = tuple(name for name in names if name)
    if "api_key" not in given and os.environ.get(API_KEY_ENV):
        given["api_key"] = os.environ[API_KEY_ENV]
    options = ServeOptions(**given)
    return run_server(
        args.run_dir, options, quiet=args.quiet, verbose=args.verbose, loading=loading_options(args)
    )
