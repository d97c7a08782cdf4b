"""Prediction throughput: llmclf's length-sorted batching vs the recipe's unsorted batch-of-32 loop.

Both run side by side in one process, on the same model object and the same texts, so the ratio is
meaningful on a shared, noisy machine. The recipe's loop is written out as users write it by hand:
tokenise each batch of 32 in file order, pad to the batch's longest, forward under `torch.no_grad`.

    python benchmarks/predict_throughput.py --run RUN_DIR --data test.csv --text-column content --rows 600

llmclf's side is `Classifier.load(RUN_DIR)` (LoRA folded into the weights, bf16 weights packed for
oneDNN on a CPU, length-sorted batches, `inference_mode`); the recipe's side is the same base model and
adapter as a peft model, as users load it.

    python benchmarks/predict_throughput.py --run RUN_DIR --fit-overhead [--rounds 5] [--threads 2]

`--fit-overhead` times one text per pass at ~20 lengths and fits time = fixed + per_token x tokens (least
squares over each length's best of `--rounds` interleaved rounds) for three models in one process: the
run as `Classifier.load` built it before the per-pass work was cut (peft's LoRA layers with their dropout
modules over plain bf16 weights, and the two walks over every module that `predict_proba` made per call),
`Classifier.load` now (LoRA merged, as the run's own evaluation after training was, unless the run is
4-bit or was sharded) and `Classifier.load(merge_lora=False)`; then how far the probabilities of the
last two differ from the first's on the demo texts and on as many half-and-half mixes of them.
"""

from __future__ import annotations

import argparse
import datetime
import os
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
    parser.add_argument("--fit-overhead", action="store_true", help="fit a pass's fixed and per-token cost")
    parser.add_argument("--rounds", type=int, default=5, help="--fit-overhead: interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--versus",
        help="a second run folder (e.g. the same data trained with --feature-layer last): both classifiers "
        "timed on the same texts in this process, interleaved, best of --rounds",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fit_overhead:
        fit_overhead(args.run, args.rounds)
        return
    if args.versus:
        versus(args)
        return
    from llmclf.runfolder import RunFolder

    args.run_config_model = RunFolder(args.run).config().model.name

    texts = pd.read_csv(args.data, dtype=str, keep_default_na=False)[args.text_column].tolist()[: args.rows]
    from peft import PeftModel

    from llmclf import Classifier

    # Same weights both ways: llmclf's Classifier, and the recipe's PeftModel (base + adapter, unmerged).
    clf = Classifier.load(args.run)
    # a run cut at its feature layer: the recipe's model is cut there too (plain transformers, as exported)
    base = load_classifier(
        resolve_model_source(args.run_config_model),
        clf.labels,
        for_training=False,
        layers=clf.model.config.num_hidden_layers,
    )
    recipe_model = PeftModel.from_pretrained(base.model, f"{args.run}/adapter").eval()
    tokenizer = clf.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"{len(texts)} texts from {args.data}: tokens min {min(lengths)}, median {int(np.median(lengths))}, "
        f"max {max(lengths)}"
    )

    # llmclf's side as users call it: the model part of Classifier (its precision's autocast, no lexical part)
    clf.model_proba(texts[:64], batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    ours = clf.model_proba(texts, batch_size=args.batch_size)
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


def versus(args: argparse.Namespace) -> None:
    """Two run folders' classifiers (the model alone, no lexical part) on the same texts, interleaved."""
    from llmclf import Classifier

    texts = pd.read_csv(args.data, dtype=str, keep_default_na=False)[args.text_column].tolist()[: args.rows]
    runs = {"run": Classifier.load(args.run), "versus": Classifier.load(args.versus)}
    best = dict.fromkeys(runs, float("inf"))
    probs = {}
    print(machine())
    for name, clf in runs.items():
        layers = clf.model.config.num_hidden_layers
        print(f"{name}: {args.run if name == 'run' else args.versus}  ({layers} layers, {clf.precision})")
        clf.model_proba(texts[:64], batch_size=args.batch_size)  # warm-up
    for _ in range(args.rounds):
        for name, clf in runs.items():
            start = time.perf_counter()
            probs[name] = clf.model_proba(texts, batch_size=args.batch_size)
            best[name] = min(best[name], time.perf_counter() - start)
    for name in runs:
        print(f"{name}: {len(texts) / best[name]:7.1f} texts/s  (best of {args.rounds}: {best[name]:.1f} s)")
    print(f"ratio run / versus: {best['versus'] / best['run']:.2f}x  on {len(texts)} texts")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, torch {torch.__version__}, {torch.get_num_threads()} threads{load}"


def previous_model(run: str, precision: str, labels: list[str]):
    """The model as `Classifier.load` built it before: base + adapter through peft, unmerged in half
    precision, plain weights, LoRA dropout modules kept."""
    from llmclf.model.adapter import load_adapter
    from llmclf.model.anatomy import upcast_head
    from llmclf.model.provenance import resolve_recorded
    from llmclf.runfolder import RunFolder

    folder = RunFolder.open(run)
    info = folder.run_info()
    source, revision = resolve_recorded(info.get("base_model_identity"), None, folder.path("run_info.json"))
    loaded = load_classifier(
        source,
        labels,
        for_training=False,
        tokenizer_source=str(folder.path("tokenizer")),
        precision=precision,
        attn_implementation="sdpa",
        revision=revision,
    )
    if precision in ("bf16", "fp16"):
        upcast_head(loaded.model)
    model = load_adapter(loaded.model, folder.path("adapter"), labels).eval()
    return model if precision in ("bf16", "fp16") else model.merge_and_unload()


def texts_of_lengths(tokenizer, lengths: list[int]) -> list[str]:
    """Demo text cut to about each length in tokens (re-tokenised: the fit uses the real counts)."""
    text = " ".join(pd.read_csv(demo_data_path(), dtype=str)["text"].tolist()[:40])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[:n]) for n in lengths]


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """The demo texts and `n` mixes: the first half of one text's words and the second half of another's,
    which the model is less sure about than about the texts it was trained on."""
    import random

    texts = pd.read_csv(demo_data_path(), dtype=str)["text"].tolist()
    rng = random.Random(seed)
    mixes = []
    for _ in range(n):
        a, b = (t.split() for t in rng.sample(texts, 2))
        mixes.append(" ".join(a[: len(a) // 2] + b[len(b) // 2 :]))
    return texts + mixes


def fit_overhead(run: str, rounds: int) -> None:
    """Fixed and per-token cost of a one-text pass, three ways in one process (see the module's doc)."""
    from llmclf import Classifier, runtime

    now = Classifier.load(run)
    unmerged = Classifier.load(run, merge_lora=False)
    with runtime.library_output_to_log():
        before = previous_model(run, now.precision, now.labels)
    tokenizer = now.tokenizer

    def previous(texts: list[str]) -> np.ndarray:
        before.eval()  # predict_proba walked every module twice per call: eval(), then train(was_training)
        with runtime.autocast(now.precision):
            probs = predict_proba(
                before, tokenizer, texts, batch_size=32, max_length=now.max_length, progress=False
            )
        before.train(False)
        return probs

    sides = {"before": previous, "now": now.model_proba, "merge_lora=False": unmerged.model_proba}
    texts = texts_of_lengths(tokenizer, list(range(8, 168, 8)))
    tokens = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {machine()}")
    print(f"run {run} ({now.precision}); {len(texts)} single texts of {tokens.min()}-{tokens.max()} tokens")
    best = {name: np.full(len(texts), np.inf) for name in sides}
    for side in sides.values():  # warm-up: kernels for every shape, in each model
        for text in texts:
            side([text])
    for _ in range(rounds):
        for i, text in enumerate(texts):
            for name, side in sides.items():  # before, now, unmerged, before, now, ...: noise hits all alike
                started = time.perf_counter()
                side([text])
                best[name][i] = min(best[name][i], time.perf_counter() - started)
    print("best ms per text of " + " ".join(f"{n:>5}" for n in tokens) + " tokens")
    for name in sides:
        print(f"{name:>16}: " + " ".join(f"{t * 1e3:5.0f}" for t in best[name]))
    design = np.column_stack([np.ones(len(tokens)), tokens])
    fits = {name: np.linalg.lstsq(design, best[name] * 1e3, rcond=None)[0] for name in sides}
    for name, (fixed, per_token) in fits.items():
        print(
            f"{name:>16}: fixed {fixed:6.1f} ms + {per_token:.3f} ms/token   (16 tokens: {fixed + 16 * per_token:.1f} ms)"
        )
    for name in ("now", "merge_lora=False"):
        print(
            f"{name:>16} / before: fixed {fits[name][0] / fits['before'][0]:.2f}x, per token "
            f"{fits[name][1] / fits['before'][1]:.2f}x, best times {np.median(best[name] / best['before']):.2f}x (median)"
        )
    compare_probabilities(sides)


def compare_probabilities(sides: dict, mixes: int = 300) -> None:
    texts = mixed_texts(mixes)
    probs = {name: side(texts) for name, side in sides.items()}
    reference = probs["before"]
    # bf16 rounds by a pass's shape: the same model, the same texts one per pass instead of 32 per pass
    alone = np.vstack([sides["before"]([t]) for t in texts[-100:]])
    print(
        f"batch-composition noise of before (100 mixes, 1 vs 32 per pass): max {np.abs(alone - reference[-100:]).max():.2e}"
    )
    for name in ("now", "merge_lora=False"):
        diff = np.abs(probs[name] - reference)
        agree = (probs[name].argmax(1) == reference.argmax(1)).mean()
        print(
            f"{name:>16} vs before on {len(texts)} texts: max |prob diff| {diff.max():.2e}, mean {diff.mean():.2e}, "
            f"same argmax {agree:.4f}"
        )


if __name__ == "__main__":
    main()
