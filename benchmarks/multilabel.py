"""Multi-label: llmclf's defaults with `--task multi-label` against the baselines a user would build, on
SemEval-2018 Task 1 E-c (which of 11 emotions a tweet expresses, any number of them).

    python benchmarks/multilabel.py --json multilabel.json            # git dir under /work/.mirror
    python benchmarks/multilabel.py --git-dir /path/to/repo.git --train 2000 --test 1000

The data is never part of this repository: `2018-E-c-En-train.txt` (6,838 tweets; tab-separated: id,
tweet, one 0/1 column per emotion) is read from a local git dir of the public repository
Johann-75/Emotion-Classifier-using-BiLSTM-RNN with `git show`. Tweets with no emotion are left out (a
text needs a label list that is not empty), whitespace is collapsed and exact duplicates kept once. A
seeded sample of `--test` tweets is the test set and `--train` of the rest the training set (written under
the runs folder as CSV with columns `text`, `labels`, the emotions joined by `|`); llmclf holds out its
validation split from the training set, as a user would get it.

One row each, scored by micro- and macro-F1 on the test set:
* llmclf with its defaults, `task=multi-label` (a threshold per label tuned on its validation split);
* TF-IDF + LR: word 1-2-grams, one balanced logistic regression per emotion (C by 5-fold CV on micro-F1),
  each decided at 0.5;
* MiniLM + LR: all-MiniLM-L6-v2 embeddings, the same one-vs-rest logistic regressions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import C_GRID, add_run_options, cpu_name, finish, run_options  # noqa: E402

SOURCE = ("Johann-75/Emotion-Classifier-using-BiLSTM-RNN", "2018-E-c-En-train.txt")
SEPARATOR = "|"


def read_ec(git_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The tweets as text and labels (a tuple of emotions), those with none left out; the emotions."""
    raw = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"HEAD:{SOURCE[1]}"], capture_output=True, check=True
    ).stdout.decode("utf-8-sig")
    lines = [line.split("\t") for line in raw.splitlines() if line.strip()]
    emotions, rows = lines[0][2:], lines[1:]
    frame = pd.DataFrame(
        {
            "text": [" ".join(r[1].split()) for r in rows],
            "labels": [tuple(e for e, v in zip(emotions, r[2:]) if v.strip() == "1") for r in rows],
        }
    )
    frame = frame[(frame["text"] != "") & (frame["labels"].str.len() > 0)]
    return frame.drop_duplicates("text").reset_index(drop=True), emotions


def multi_hot(frame: pd.DataFrame, emotions: list[str]) -> np.ndarray:
    return np.array([[e in labels for e in emotions] for labels in frame["labels"]], dtype=int)


def measure(truth: np.ndarray, predicted: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    return {
        "micro_f1": round(float(f1_score(truth, predicted, average="micro", zero_division=0)), 4),
        "macro_f1": round(float(f1_score(truth, predicted, average="macro", zero_division=0)), 4),
    }


def one_vs_rest(x_train, y_train: np.ndarray, x_test, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.multiclass import OneVsRestClassifier

    model = OneVsRestClassifier(LogisticRegression(class_weight="balanced", max_iter=5000))
    cv = KFold(n_splits=5, shuffle=True, random_state=seed)
    grid = {"estimator__C": list(C_GRID)}
    return GridSearchCV(model, grid, scoring="f1_micro", cv=cv).fit(x_train, y_train).predict(x_test)


def tfidf_lr(train: pd.DataFrame, test: pd.DataFrame, emotions: list[str], seed: int) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vec.fit_transform(train["text"])
    return one_vs_rest(x_train, multi_hot(train, emotions), vec.transform(test["text"]), seed)


def minilm_lr(train: pd.DataFrame, test: pd.DataFrame, emotions: list[str], seed: int) -> np.ndarray:
    from baselines import embed

    x_train, x_test = embed(train["text"].tolist()), embed(test["text"].tolist())
    return one_vs_rest(x_train, multi_hot(train, emotions), x_test, seed)


def run_llmclf(train_csv: Path, test_csv: Path, out: Path, options: dict) -> dict:
    import llmclf

    started = time.perf_counter()
    result = llmclf.train(
        data=str(train_csv),
        eval_data=str(test_csv),
        task="multi-label",
        label_column="labels",
        label_separator=SEPARATOR,
        output=str(out),
        overwrite=True,
        quiet=True,
        **options,
    )
    seconds = time.perf_counter() - started
    info = json.loads((out / "run_info.json").read_text())
    keys = ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")
    return {
        "before": {k: round(result.metrics["before"][k], 4) for k in keys},
        "after": {k: round(result.metrics["after"][k], 4) for k in keys},
        "probe": info.get("probe"),
        "thresholds": info.get("thresholds"),
        "feature_layer": (info.get("feature_layer") or {}).get("layer"),
        "seconds": round(seconds, 1),
        "precision": info.get("precision"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--git-dir", type=Path, default=Path(f"/work/.mirror/{SOURCE[0].replace('/', '+')}/repo"))
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    add_run_options(p, Path("runs/multilabel"), "tfidf,minilm")
    args = p.parse_args(argv)
    options = run_options(args)
    frame, emotions = read_ec(args.git_dir)
    shuffled = frame.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    test, train = shuffled.iloc[: args.test], shuffled.iloc[args.test : args.test + args.train]
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = args.runs_dir / "train.csv", args.runs_dir / "test.csv"
    for part, path in ((train, train_csv), (test, test_csv)):
        part.assign(labels=part["labels"].map(SEPARATOR.join)).to_csv(path, index=False)
    per_text = float(train["labels"].str.len().mean())
    print(
        f"SemEval-2018 E-c: {len(train)} train / {len(test)} test tweets, {per_text:.2f} labels each",
        flush=True,
    )
    row: dict = {"dataset": "semeval2018-ec", "train": len(train), "test": len(test), "cpu": cpu_name()}
    chosen = {b.strip() for b in args.baselines.split(",")}
    truth = multi_hot(test, emotions)
    for name, fn in (("tfidf", tfidf_lr), ("minilm", minilm_lr)):
        if name in chosen:
            started = time.perf_counter()
            row[name] = measure(truth, fn(train, test, emotions, args.seed))
            row[f"{name}_s"] = round(time.perf_counter() - started, 1)
            print(f"{name}: {row[name]} in {row[f'{name}_s']} s", flush=True)
    row["llmclf"] = run_llmclf(train_csv, test_csv, args.runs_dir / "llmclf", options)
    return finish(row, options, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
