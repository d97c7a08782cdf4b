"""Which frozen features make the best classifier head, per dataset: a study behind llmclf's defaults.

For each dataset of the suite (benchmarks/prepare_suite.py writes DIR/<name>/{train,test}.csv and
DIR/suite.json) the base model runs once over every text, and the state the head would see is kept
for every layer: the last real token's hidden state after the final norm, as a model cut after that
layer would feed its head. Then, without touching the model again:

- a linear probe per layer (logistic regression on standardised features, C by cross-validation on the
  training split), its cross-validated training score and its test score;
- the layer chosen by cross-validation, against the last layer;
- TF-IDF (1-2-grams) + LR, and the chosen layer's probe and TF-IDF stacked (their out-of-fold
  log-probabilities, weighted by cross-validation).

    python benchmarks/feature_study.py --data-dir /work/suite-data --json study.json

Prints one row per dataset; the metric is the suite's (accuracy, or macro-F1 where imbalanced).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def layer_features(
    model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32, pooling: str = "last"
) -> np.ndarray:
    """(layers, n, hidden) float32: each layer's normed state, layers 1..L, of the last real token
    (`last`) or averaged over the text's tokens (`mean`)."""
    import torch

    from llmclf.batches import length_batches
    from llmclf.model.anatomy import decoder_of

    decoder = decoder_of(model)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    out = None
    with torch.inference_mode():
        for idx in length_batches([len(i) for i in ids], batch_size, torch.device("cpu")):
            batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            hidden = decoder(**batch, output_hidden_states=True, use_cache=False).hidden_states
            mask = batch["attention_mask"]
            if (
                pooling == "mean"
            ):  # each token normed as the head would see it, then averaged: (batch, hidden)
                weights = (mask / mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
                normed = [decoder.norm(h) for h in hidden[1:-1]] + [hidden[-1]]
                states = [(h.float() * weights).sum(dim=1) for h in normed]
            else:
                last = mask.sum(dim=1) - 1  # right padding: the last real token
                rows = torch.arange(len(idx))
                states = [decoder.norm(h[rows, last]) for h in hidden[1:-1]] + [hidden[-1][rows, last]]
            stacked = torch.stack(states).float().numpy()  # (layers, batch, hidden)
            if out is None:
                out = np.zeros((stacked.shape[0], len(texts), stacked.shape[2]), dtype=np.float32)
            out[:, idx] = stacked
    return out


def probe_scores(x_train, y_train, x_test, seed: int = 0) -> tuple[float, np.ndarray, np.ndarray]:
    """(cross-validated training accuracy, test log-probabilities, out-of-fold train log-probabilities)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(n_splits=min(4, int(np.bincount(y_train).min())), shuffle=True, random_state=seed)
    best = None
    for c in (1e-3, 1e-2, 1e-1):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        oof = cross_val_predict(model, x_train, y_train, cv=folds, method="predict_log_proba")
        score = float((oof.argmax(1) == y_train).mean())
        if best is None or score > best[0]:
            best = (score, c, oof)
    score, c, oof = best
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x_train, y_train)
    return score, model.predict_log_proba(x_test), oof


def tfidf_scores(train: list[str], y_train, test: list[str], seed: int = 0):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    folds = StratifiedKFold(n_splits=min(4, int(np.bincount(y_train).min())), shuffle=True, random_state=seed)
    best = None
    for c in (1.0, 10.0, 100.0):
        model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            LogisticRegression(C=c, max_iter=3000),
        )
        oof = cross_val_predict(model, train, y_train, cv=folds, method="predict_log_proba")
        score = float((oof.argmax(1) == y_train).mean())
        if best is None or score > best[0]:
            best = (score, c, oof)
    score, c, oof = best
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=c, max_iter=3000),
    ).fit(train, y_train)
    return score, model.predict_log_proba(test), oof


def metric(name: str, y_true, y_pred) -> float:
    from sklearn.metrics import accuracy_score, f1_score

    return float(
        f1_score(y_true, y_pred, average="macro") if name == "macro_f1" else accuracy_score(y_true, y_pred)
    )


def study(
    name: str, spec: dict, folder: Path, model, tokenizer, max_length: int, step: int, pooling: str = "last"
) -> dict:
    train = pd.read_csv(folder / "train.csv", keep_default_na=False)
    test = pd.read_csv(folder / "test.csv", keep_default_na=False)
    labels = sorted(set(train["label"].astype(str)))
    index = {label: i for i, label in enumerate(labels)}
    test = test[test["label"].astype(str).isin(index)]
    y_train = np.array([index[str(v)] for v in train["label"]])
    y_test = np.array([index[str(v)] for v in test["label"]])
    started = time.perf_counter()
    texts = train["text"].tolist() + test["text"].tolist()
    feats = layer_features(model, tokenizer, texts, max_length, pooling=pooling)
    seconds = time.perf_counter() - started
    n = len(train)
    total = feats.shape[0]
    layers = sorted({*range(total - 1, total // 3 - 1, -step), total - 1})  # 0-based, always the last
    per_layer = []
    for layer in layers:
        cv, test_lp, oof = probe_scores(feats[layer, :n], y_train, feats[layer, n:])
        per_layer.append((cv, metric(spec["metric"], y_test, test_lp.argmax(1)), test_lp, oof))
    chosen_at = int(np.argmax([p[0] for p in per_layer]))
    t_cv, t_lp, t_oof = tfidf_scores(train["text"].tolist(), y_train, test["text"].tolist())
    # stacking weight w in [0, 1] on log-probabilities, chosen on the out-of-fold predictions
    weights = np.linspace(0, 1, 11)
    oof = per_layer[chosen_at][3]
    w = weights[
        int(np.argmax([((1 - a) * oof + a * t_oof).argmax(1).__eq__(y_train).mean() for a in weights]))
    ]
    stacked = (1 - w) * per_layer[chosen_at][2] + w * t_lp
    return {
        "dataset": name,
        "pooling": pooling,
        "metric": spec["metric"],
        "classes": len(labels),
        "train": n,
        "test": len(test),
        "features_s": round(seconds, 1),
        "last_layer": per_layer[-1][1],
        "layers": [layer + 1 for layer in layers],
        "chosen_layer": layers[chosen_at] + 1,
        "chosen": per_layer[chosen_at][1],
        "best_test_layer": layers[int(np.argmax([p[1] for p in per_layer]))] + 1,
        "tfidf": metric(spec["metric"], y_test, t_lp.argmax(1)),
        "stack_weight": float(w),
        "stacked": metric(spec["metric"], y_test, stacked.argmax(1)),
        "per_layer_test": [round(p[1], 4) for p in per_layer],
        "per_layer_cv": [round(p[0], 4) for p in per_layer],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="dataset names (default: all)")
    parser.add_argument("--step", type=int, default=2, help="probe every STEP-th layer of the top two thirds")
    parser.add_argument(
        "--pooling", choices=["last", "mean"], default="last", help="the text's state: last token or mean"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from llmclf.model.loading import load_classifier
    from llmclf.model.sources import resolve_model_source
    from llmclf.runtime import quiet_libraries, set_threads

    quiet_libraries()
    set_threads()
    suite = json.loads((args.data_dir / "suite.json").read_text())
    datasets = suite["datasets"] if isinstance(suite, dict) and "datasets" in suite else suite
    loaded = load_classifier(resolve_model_source(args.model), ["a", "b"], for_training=False)
    rows = []
    for spec in datasets:
        name = spec["name"]
        if args.only and name not in args.only:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16):
            row = study(
                name,
                spec,
                args.data_dir / name,
                loaded.model,
                loaded.tokenizer,
                args.max_length,
                args.step,
                args.pooling,
            )
        rows.append(row)
        print(
            f"{name:24s} last {row['last_layer']:.3f}  chosen L{row['chosen_layer']:>2} {row['chosen']:.3f}  "
            f"(best L{row['best_test_layer']})  tfidf {row['tfidf']:.3f}  stacked {row['stacked']:.3f} "
            f"(w {row['stack_weight']:.1f})  features {row['features_s']:.0f} s",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
