"""Train the tiny test model with fixed settings, or compare two run folders written that way.

Shows that a change of layout left behaviour alone: train once on the old code and once on the new one,
then compare (same files, same metrics.json, predictions_test.csv to 1e-6):

    python tools/same_run.py train OUT_BEFORE     # on the old checkout
    python tools/same_run.py train OUT_AFTER      # on the new one
    python tools/same_run.py compare OUT_BEFORE OUT_AFTER

Each OUT holds three runs: the defaults (activation cache + probe head), every layer adapted without the
cache, and the recipe preset (random head, all layers).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

VARIANTS = {
    "defaults": [],
    "no-cache": ["--lora-layers", "all", "--activation-cache", "off"],
    "recipe": ["--preset", "recipe", "--lr", "2e-3"],
}
COMMON = [
    "--quantize",
    "none",
    "--precision",
    "fp32",
    "--train-per-class",
    "20",
    "--val-per-class",
    "5",
    "--test-per-class",
    "10",
    "--epochs",
    "2",
    "--lr",
    "2e-3",
    "--batch-size",
    "8",
    "--max-length",
    "64",
    "--seed",
    "7",
]
# Files whose content depends on the clock, the machine or the library versions, compared by name only.
VOLATILE = {"run_info.json", "report.html", "report.md", "training_curves.png", "config.yaml", "llmclf_manifest.json"}


def demo_rows() -> list[dict[str, str]]:
    from llmclf.data import demo_data_path

    with demo_data_path().open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def tiny_model(out: Path, rows: list[dict[str, str]]) -> Path:
    """A 2-layer Llama with hidden size 64 and a BPE tokenizer trained on the demo texts (no pad token)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([r["text"] for r in rows], trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def train(out: Path) -> None:
    from llmclf.cli import main

    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    random.Random(0).shuffle(rows)
    picked = [
        r
        for label in sorted({r["label"] for r in rows})
        for r in [x for x in rows if x["label"] == label][:40]
    ]
    data = out / "data.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in picked)
    model = tiny_model(out / "model", rows)
    for name, extra in VARIANTS.items():
        code = main(
            [
                "--quiet",
                "train",
                "--data",
                str(data),
                "--model",
                str(model),
                "--output",
                str(out / name),
                *COMMON,
                *extra,
            ]
        )
        if code:
            sys.exit(f"{name}: llmclf train exited {code}")


def _json(text: str) -> object:
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])  # peft writes a set: hash order
    return data


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two run folders written by `train` (empty: the same)."""
    import numpy as np
    import pandas as pd

    out = []
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        out.append(
            f"files differ: only in {a}: {sorted(set(files_a) - set(files_b))}; "
            f"only in {b}: {sorted(set(files_b) - set(files_a))}"
        )
    for name in sorted(set(files_a) & set(files_b)):
        if Path(name).name in VOLATILE or name.startswith("tensorboard"):
            continue
        if name.endswith("predictions_test.csv"):
            pa, pb = (
                pd.read_csv(a / name, keep_default_na=False),
                pd.read_csv(b / name, keep_default_na=False),
            )
            probs = [c for c in pa.columns if c.startswith("prob_")]
            if list(pa.columns) != list(pb.columns) or not pa.drop(columns=probs).equals(
                pb.drop(columns=probs)
            ):
                out.append(f"{name}: columns or labels differ")
            elif not np.allclose(pa[probs].to_numpy(), pb[probs].to_numpy(), atol=1e-6, rtol=0):
                out.append(
                    f"{name}: probabilities differ by up to "
                    f"{np.abs(pa[probs].to_numpy() - pb[probs].to_numpy()).max():.2e}"
                )
        elif name.endswith(".safetensors"):
            continue  # compared through the probabilities they give (predictions_test.csv)
        elif name.endswith(".png"):
            if (a / name).read_bytes() != (b / name).read_bytes():
                out.append(f"{name} differs")
        else:  # text naming the folders it was written in: compared with the two roots made alike
            text_a = (a / name).read_text(encoding="utf-8").replace(str(a.parent), "ROOT")
            text_b = (b / name).read_text(encoding="utf-8").replace(str(b.parent), "ROOT")
            same = _json(text_a) == _json(text_b) if name.endswith(".json") else text_a == text_b
            if not same:
                out.append(f"{name} differs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "train":
        train(args.out)
        return
    problems = []
    for name in VARIANTS:
        problems += [f"{name}: {p}" for p in differences(args.a / name, args.b / name)]
    print("\n".join(problems) if problems else f"same runs: {', '.join(VARIANTS)}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
