"""Regression: llmclf's defaults with `--task regression` (and `--text-pair-column`) against the baselines
a user would build, on the STS benchmark (how alike in meaning are two sentences, 0 to 5).

    python benchmarks/regression.py --json regression.json            # git dir under /work/.mirror
    python benchmarks/regression.py --git-dir /path/to/repo.git --train 2000 --test 1379

The data is never part of this repository: the STS benchmark's files (`stsbenchmark/sts-train.csv`,
5,749 pairs, and `sts-test.csv`, 1,379 pairs; tab-separated: genre, file, year, id, score, sentence 1,
sentence 2) are read from a local git dir of the public repository sudha93/semanticTextualSimilarity
with `git show`. A seeded sample of `--train` training pairs is the training set (llmclf holds out its
validation split from it, as a user would get it) and the first `--test` pairs of the test file the test
set; both are written under the runs folder as CSV with columns `text`, `text_b`, `score`.

One row each, scored by Pearson and Spearman correlation and MSE on the test set:
* llmclf with its defaults, `task=regression`, `data.text_pair_column=text_b`, through `llmclf.train`;
* TF-IDF + ridge over both texts: one vectoriser (word 1-2-grams) fitted on the training texts, features
  [tfidf(a), tfidf(b), tfidf(a) * tfidf(b)], the penalty by 5-fold CV;
* MiniLM + ridge: all-MiniLM-L6-v2 embeddings u, v, features [u, v, |u - v|, u * v], penalty by 5-fold CV;
* MiniLM cosine: the cosine similarity of u and v as it is (no training; correlations only).
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
from pairs import add_run_options, cpu_name, finish, run_options  # noqa: E402

SOURCE = ("sudha93/semanticTextualSimilarity", "stsbenchmark/sts-{split}.csv")
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def read_sts(git_dir: Path, split: str) -> pd.DataFrame:
    """One STS benchmark file as text, text_b, score; whitespace collapsed, empty texts dropped."""
    raw = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"HEAD:{SOURCE[1].format(split=split)}"],
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8-sig")
    rows = [line.split("\t") for line in raw.splitlines() if line.strip()]
    frame = pd.DataFrame(
        {
            "text": [" ".join(r[5].split()) if len(r) > 6 else "" for r in rows],
            "text_b": [" ".join(r[6].split()) if len(r) > 6 else "" for r in rows],
            "score": [float(r[4]) if len(r) > 6 else np.nan for r in rows],
        }
    )
    frame = frame[(frame["text"] != "") & (frame["text_b"] != "") & frame["score"].notna()]
    return frame.drop_duplicates(["text", "text_b"]).reset_index(drop=True)


def measure(truth, predicted) -> dict:
    from scipy.stats import pearsonr, spearmanr

    truth, predicted = np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    return {
        "pearson": round(float(pearsonr(truth, predicted)[0]), 4),
        "spearman": round(float(spearmanr(truth, predicted)[0]), 4),
        "mse": round(float(np.mean((truth - predicted) ** 2)), 4),
    }


def _ridge(x, y, seed: int):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    cv = KFold(n_splits=5, shuffle=True, random_state=seed)
    search = GridSearchCV(Ridge(), {"alpha": list(ALPHAS)}, scoring="neg_mean_squared_error", cv=cv)
    return search.fit(x, y)


def tfidf_ridge(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> np.ndarray:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    vec.fit(pd.concat([train["text"], train["text_b"]]))

    def features(frame: pd.DataFrame):
        a, b = vec.transform(frame["text"]), vec.transform(frame["text_b"])
        return hstack([a, b, a.multiply(b)]).tocsr()

    return _ridge(features(train), train["score"], seed).predict(features(test))


def _embeddings(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    from baselines import embed

    return embed(frame["text"].tolist()), embed(frame["text_b"].tolist())


def minilm_ridge(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> np.ndarray:
    def features(frame: pd.DataFrame) -> np.ndarray:
        u, v = _embeddings(frame)
        return np.hstack([u, v, np.abs(u - v), u * v])

    return _ridge(features(train), train["score"], seed).predict(features(test))


def minilm_cosine(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> np.ndarray:
    u, v = _embeddings(test)
    return (u * v).sum(axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))


def run_llmclf(train_csv: Path, test_csv: Path, out: Path, options: dict) -> dict:
    import llmclf

    started = time.perf_counter()
    result = llmclf.train(
        data=str(train_csv),
        eval_data=str(test_csv),
        task="regression",
        label_column="score",
        text_pair_column="text_b",
        output=str(out),
        overwrite=True,
        quiet=True,
        **options,
    )
    seconds = time.perf_counter() - started
    info = json.loads((out / "run_info.json").read_text())
    keys = ("pearson", "spearman", "mse")
    return {
        "before": {k: result.metrics["before"][k] for k in keys},
        "after": {k: result.metrics["after"][k] for k in keys},
        "ridge_head_test_mse": (info.get("probe") or {}).get("test_mse"),
        "feature_layer": (info.get("feature_layer") or {}).get("layer"),
        "seconds": round(seconds, 1),
        "precision": info.get("precision"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--git-dir", type=Path, default=Path("/work/.mirror/sudha93+semanticTextualSimilarity/repo")
    )
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1379)
    add_run_options(p, Path("runs/regression"), "tfidf,minilm,cosine")
    args = p.parse_args(argv)
    options = run_options(args)
    pool = read_sts(args.git_dir, "train")
    train = pool.sample(n=min(args.train, len(pool)), random_state=args.seed).reset_index(drop=True)
    test = read_sts(args.git_dir, "test").head(args.test)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = args.runs_dir / "train.csv", args.runs_dir / "test.csv"
    train.to_csv(train_csv, index=False)
    test.to_csv(test_csv, index=False)
    print(f"STS-B: {len(train)} train / {len(test)} test pairs, scores 0-5", flush=True)
    row: dict = {"dataset": "sts-b", "train": len(train), "test": len(test), "cpu": cpu_name()}
    chosen = {b.strip() for b in args.baselines.split(",")}
    for name, fn in (("tfidf", tfidf_ridge), ("minilm", minilm_ridge), ("cosine", minilm_cosine)):
        if name in chosen:
            started = time.perf_counter()
            row[name] = measure(test["score"], fn(train, test, args.seed))
            if name == "cosine":  # a similarity in [-1, 1], not a score in 0-5: only its correlations count
                del row[name]["mse"]
            row[f"{name}_s"] = round(time.perf_counter() - started, 1)
            print(f"{name}: {row[name]} in {row[f'{name}_s']} s", flush=True)
    row["llmclf"] = run_llmclf(train_csv, test_csv, args.runs_dir / "llmclf", options)
    return finish(row, options, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
