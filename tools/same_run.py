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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_model, read_demo_rows, train_tiny  # noqa: E402  (the suite's tiny run)

VARIANTS = {
    "defaults": [],
    "no-cache": ["--lora-layers", "all", "--activation-cache", "off"],
    "recipe": ["--preset", "recipe", "--lr", "2e-3"],
}
# Files whose content depends on the clock, the machine or the library versions, compared by name only.
VOLATILE = {"run_info.json", "report.html", "report.md", "training_curves.png", "config.yaml", "llmclf_manifest.json"}


def train(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = read_demo_rows()
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
    model = build_tiny_model(out / "model")
    for name, extra in VARIANTS.items():
        code = train_tiny(data, model, out / name, *extra)
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
