"""Prediction throughput: llmclf's length-sorted batching vs the recipe's unsorted batch-of-32 loop.

Both run side by side in one process, on the same model object and the same texts, so the ratio is
meaningful on a shared, noisy machine. The recipe's loop is written out as users write it by hand:
tokenise each batch of 32 in file order, pad to the batch's longest, forward under `torch.no_grad`.

    python benchmarks/predict_throughput.py --run RUN_DIR --data test.csv --text-column content --rows 600

llmclf's side is `Classifier.load(RUN_DIR)` (LoRA folded into the weights, length-sorted batches,
`inference_mode`); the recipe's side is the same base model and adapter as a peft model, as users load it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import pandas as pd
import torch

from llmclf.data import demo_data_path
from llmclf.inference.predict import predict_proba
from llmclf.model.loading import load_classifier
from llmclf.model.sources import resolve_model_source


def recipe_loop(
    model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 512
) -> np.ndarray:
    """The recipe's own inference loop (unsorted batches, padded to each batch's longest)."""
    outputs = []
    for i in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        with torch.no_grad():
            outputs.append(torch.softmax(model(**inputs).logits.float(), -1))
    return torch.cat(outputs).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(demo_data_path()), help="CSV with a text column (default: demo)"
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--rows", type=int, default=1000, help="rows to predict (first N of the file)")
    parser.add_argument("--run", required=True, help="a run folder written by `llmclf train`")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from llmclf.runfolder import RunFolder

    args.run_config_model = RunFolder(args.run).config().model.name

    texts = pd.read_csv(args.data, dtype=str, keep_default_na=False)[args.text_column].tolist()[: args.rows]
    from peft import PeftModel

    from llmclf import Classifier

    # Same weights both ways: llmclf's Classifier, and the recipe's PeftModel (base + adapter, unmerged).
    clf = Classifier.load(args.run)
    base = load_classifier(resolve_model_source(args.run_config_model), clf.labels, for_training=False)
    recipe_model = PeftModel.from_pretrained(base.model, f"{args.run}/adapter").eval()
    model, tokenizer = clf.model, clf.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"{len(texts)} texts from {args.data}: tokens min {min(lengths)}, median {int(np.median(lengths))}, "
        f"max {max(lengths)}"
    )

    predict_proba(model, tokenizer, texts[:64], batch_size=args.batch_size, progress=False)  # warm-up
    start = time.perf_counter()
    ours = predict_proba(model, tokenizer, texts, batch_size=args.batch_size, progress=False)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    recipe = recipe_loop(recipe_model, tokenizer, texts, batch_size=args.batch_size)
    recipe_s = time.perf_counter() - start

    agree = float((ours.argmax(1) == recipe.argmax(1)).mean())
    print(
        f"recipe loop (unsorted, batch {args.batch_size}): {len(texts) / recipe_s:7.1f} rows/s  ({recipe_s:.1f} s)"
    )
    print(
        f"llmclf (length-sorted, batch {args.batch_size}): {len(texts) / ours_s:7.1f} rows/s  ({ours_s:.1f} s)"
    )
    print(
        f"ratio llmclf / recipe: {recipe_s / ours_s:.2f}x   same predicted label: {agree:.4f}   "
        f"max |prob diff|: {np.abs(ours - recipe).max():.2e}"
    )


if __name__ == "__main__":
    main()
