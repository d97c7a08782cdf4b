"""Text pairs: llmclf's defaults with `--text-pair-column` against the baselines a user would build for
pairs, on MRPC (Microsoft Research Paraphrase Corpus: is the second sentence a paraphrase of the first?).

    python benchmarks/pairs.py --json pairs.json                 # git dir under /work/.mirror
    python benchmarks/pairs.py --git-dir /path/to/F0restL1n+BERT.git --train 2000 --test 1000

The data is never part of this repository: GLUE's MRPC training file is read from a local git dir of the
public repository F0restL1n/BERT (`glue_data/MRPC/train.tsv`, 3,667 labelled pairs) with `git show`.
Cleaning: whitespace collapsed, empty texts dropped, exact duplicate pairs kept once. A seeded stratified
sample of `--test` pairs is the test set and `--train` of the rest the training set (both written under
the runs folder as CSV with columns `text`, `text_b`, `label`); llmclf holds out its validation split from
the training set as a user would get it.

One row each:
* llmclf with its defaults, `data.text_pair_column=text_b` (the pair through the tokenizer, the
  separator between the two texts), through `llmclf.train`; accuracy and macro-F1 before and after;
* TF-IDF + LR over both texts: one vectoriser (word 1-2-grams) fitted on all training texts, features
  [tfidf(a), tfidf(b), tfidf(a) * tfidf(b)] (the product: the n-grams both share), C by 5-fold CV;
* MiniLM + LR: all-MiniLM-L6-v2 embeddings u, v of the two texts, features [u, v, |u - v|, u * v]
  (Sentence-BERT's pair classifier), C by 5-fold CV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import _cv, score  # noqa: E402

SOURCE = ("F0restL1n/BERT", "glue_data/MRPC/train.tsv")
LABELS = {1: "paraphrase", 0: "not_paraphrase"}
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def read_mrpc(git_dir: Path) -> pd.DataFrame:
    """MRPC's labelled pairs as text, text_b, label (names), cleaned."""
    raw = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"HEAD:{SOURCE[1]}"], capture_output=True, check=True
    ).stdout.decode("utf-8-sig")
    frame = pd.read_csv(io.StringIO(raw), sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    out = pd.DataFrame(
        {
            "text": frame["#1 String"].fillna("").str.split().str.join(" "),
            "text_b": frame["#2 String"].fillna("").str.split().str.join(" "),
            "label": frame["Quality"].astype(int).map(LABELS),
        }
    )
    out = out[(out["text"] != "") & (out["text_b"] != "")]
    return out.drop_duplicates(["text", "text_b"]).reset_index(drop=True)


def split(frame: pd.DataFrame, train: int, test: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    rest, test_frame = train_test_split(frame, test_size=test, stratify=frame["label"], random_state=seed)
    train_frame, _ = train_test_split(
        rest, train_size=min(train, len(rest) - 2), stratify=rest["label"], random_state=seed
    )
    return train_frame.reset_index(drop=True), test_frame.reset_index(drop=True)


def _search(x, labels, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    lr = LogisticRegression(class_weight="balanced", max_iter=5000)
    grid = GridSearchCV(lr, {"C": list(C_GRID)}, scoring="accuracy", cv=_cv(labels, seed))
    return grid.fit(x, list(labels))


def tfidf_pairs(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> list[str]:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    vec.fit(pd.concat([train["text"], train["text_b"]]))

    def features(frame: pd.DataFrame):
        a, b = vec.transform(frame["text"]), vec.transform(frame["text_b"])
        return hstack([a, b, a.multiply(b)]).tocsr()

    return list(_search(features(train), train["label"], seed).predict(features(test)))


def minilm_pairs(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> list[str]:
    from baselines import embed

    def features(frame: pd.DataFrame) -> np.ndarray:
        u, v = embed(frame["text"].tolist()), embed(frame["text_b"].tolist())
        return np.hstack([u, v, np.abs(u - v), u * v])

    return list(_search(features(train), train["label"], seed).predict(features(test)))


def run_llmclf(train_csv: Path, test_csv: Path, out: Path, options: dict) -> dict:
    import llmclf

    started = time.perf_counter()
    result = llmclf.train(
        data=str(train_csv),
        eval_data=str(test_csv),
        text_pair_column="text_b",
        output=str(out),
        overwrite=True,
        quiet=True,
        **options,
    )
    seconds = time.perf_counter() - started
    info = json.loads((out / "run_info.json").read_text())
    return {
        "before": {k: result.metrics["before"][k] for k in ("accuracy", "macro_f1")},
        "after": {k: result.metrics["after"][k] for k in ("accuracy", "macro_f1")},
        "probe_test_accuracy": (info.get("probe") or {}).get("test_accuracy"),
        "feature_layer": (info.get("feature_layer") or {}).get("layer"),
        "lexical": info.get("lexical", {}) and info["lexical"].get("test_accuracy"),
        "seconds": round(seconds, 1),
        "precision": info.get("precision"),
    }


def timed(fn, *args) -> tuple[dict, float]:
    started = time.perf_counter()
    predicted, truth = fn(*args), args[1]["label"].tolist()
    seconds = time.perf_counter() - started
    return {m: score(m, truth, predicted) for m in ("accuracy", "macro_f1")}, round(seconds, 1)


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (figures differ between CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    )


def _value(text: str):
    """An option's value: a number where it reads as one (YAML leaves `2e-3` a string), else YAML's."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def add_run_options(p: argparse.ArgumentParser, runs_dir: Path, baselines: str) -> None:
    """The options the task benchmarks share: seed, runs folder, baselines, JSON output, llmclf's model
    and llmclf.train options."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=runs_dir)
    p.add_argument("--baselines", default=baselines, help=f"comma-separated: {baselines} (or none)")
    p.add_argument("--json", type=Path)
    p.add_argument("--model", help="llmclf's model (default: llmclf's default model)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an llmclf.train option (YAML value)",
    )


def run_options(args: argparse.Namespace) -> dict:
    """llmclf.train's options from --option and --model; the libraries quietened, threads set."""
    from llmclf import runtime

    options = {k: _value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.model:
        options["model"] = args.model
    runtime.quiet_libraries()
    runtime.set_threads()
    return options


def finish(row: dict, options: dict, json_path: Path | None) -> int:
    """Print llmclf's side, record its options, write the row as JSON where asked."""
    row["llmclf_options"] = options
    print(f"llmclf: {row['llmclf']}", flush=True)
    if json_path:
        json_path.write_text(json.dumps(row, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--git-dir", type=Path, default=Path("/work/.mirror/F0restL1n+BERT/repo"))
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    add_run_options(p, Path("runs/pairs"), "tfidf,minilm")
    args = p.parse_args(argv)
    options = run_options(args)
    train, test = split(read_mrpc(args.git_dir), args.train, args.test, args.seed)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = args.runs_dir / "train.csv", args.runs_dir / "test.csv"
    train.to_csv(train_csv, index=False)
    test.to_csv(test_csv, index=False)
    shares = train["label"].value_counts(normalize=True).round(3).to_dict()
    print(f"MRPC: {len(train)} train / {len(test)} test pairs, classes {shares}", flush=True)
    row: dict = {"dataset": "mrpc", "train": len(train), "test": len(test), "cpu": cpu_name()}
    chosen = {b.strip() for b in args.baselines.split(",")}
    for name, fn in (("tfidf", tfidf_pairs), ("minilm", minilm_pairs)):
        if name in chosen:
            row[name], row[f"{name}_s"] = timed(fn, train, test, args.seed)
            print(f"{name}: {row[name]} in {row[f'{name}_s']} s", flush=True)
    row["llmclf"] = run_llmclf(train_csv, test_csv, args.runs_dir / "llmclf", options)
    return finish(row, options, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
