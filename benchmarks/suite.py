"""The accuracy benchmark suite: llmclf's defaults against the baselines a user would try first, per dataset.

For each dataset of the suite (benchmarks/prepare_suite.py writes DIR/<name>/{train,test}.csv and
DIR/suite.json) one row: the suite's metric (accuracy, or macro-F1 where the classes are imbalanced) of

* llmclf with its defaults (plus any `--set` overrides), trained through the Python API (`llmclf.train`)
  in a fresh run folder per dataset, `data.path` = train.csv and `data.eval_data` = test.csv, so the
  validation split is taken from train.csv by `data.val_fraction` as a user would get it; its metric
  before training (the untrained head) and after, its linear probe's test accuracy where the run has one,
  and its wall seconds (the whole run: model load, cache, probe, training, both evaluations, saving);
* TF-IDF + LR and MiniLM sentence embeddings + LR (benchmarks/baselines.py: C by 5-fold CV, balanced
  class weights, one thread), taken from `--baselines-json` (baselines.py's output, or an earlier
  `--json` of this script) where it holds the dataset at the same sizes, else run here and timed;
* the gap: llmclf after minus the best baseline of the row (positive: llmclf ahead).

Then a summary line: wins (datasets where llmclf >= the best baseline), the mean gap and the worst gap.

    python benchmarks/suite.py --data-dir /work/suite-data \
        --baselines-json /work/suite-data/baselines.json --json suite.json     # ~1 hour on 2 cores
    python benchmarks/suite.py --data-dir /work/suite-data --quick            # a few minutes
    python benchmarks/suite.py --data-dir DIR --only sst2,trec --set train.epochs=2 --set lora.r=8

`--quick` draws a seeded, stratified subsample of each dataset (train: at most ~40 texts per class and
QUICK_TRAIN_ROWS in all, at least 2 per class kept; test: ~QUICK_TEST_ROWS rows), written under the
runs folder, and skips MiniLM unless the baselines JSON already holds it at those sizes. Note that the
baselines fit on the whole of train.csv while llmclf holds out its validation split from it.
`--json` is rewritten after every dataset, so a long run leaves its finished rows behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from baselines import MINILM_INSTALL, MINILM_PACKAGE, run_dataset, score, suite_entries

BASELINES = ("tfidf", "minilm")
BASELINE_TITLES = {"tfidf": "TF-IDF", "minilm": "MiniLM"}
QUICK_TRAIN_PER_CLASS = 40
QUICK_TRAIN_ROWS = 200
QUICK_MIN_PER_CLASS = 2
QUICK_TEST_ROWS = 200
QUICK_SEED = 0
SUITE_OWNED = {("data", "path"), ("data", "eval_data"), ("data", "text_column"), ("data", "label_column")}
"""Keys the suite sets per dataset; `--set` may not override them (nor `output`)."""


# ------------------------------------------------------------------------------------------ settings
def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` items (value read as YAML: 1, 2e-4, true, [q_proj, v_proj]) as a nested overlay;
    `preset=NAME` as the top-level preset."""
    overlay: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if (section, name) in SUITE_OWNED or section == "output":
            raise ValueError(f"--set {item!r}: the suite sets {key.strip()} itself for every dataset")
        if not sep or (not dot and section != "preset") or (dot and not name):
            raise ValueError(
                f"--set {item!r}: expected section.key=value (e.g. train.epochs=2) or preset=NAME"
            )
        value = yaml_value(raw)
        if dot:
            overlay.setdefault(section, {})[name] = value
        else:
            overlay["preset"] = value
    return overlay


def yaml_value(raw: str) -> Any:
    """A `--set` value as YAML reads it, except that `2e-3` is a number (YAML 1.1 wants `2.0e-3`)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def llmclf_overlay(model: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """The settings every dataset's run shares: `--model`, then the `--set` items (which win)."""
    from llmclf.config import merge

    base: dict[str, Any] = {"model": {"name": model}} if model else {}
    return merge(base, parse_sets(sets))


# ------------------------------------------------------------------------------------------ data
def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def subsample(
    frame: pd.DataFrame, label: str, *, cap_per_class: int, max_rows: int, min_per_class: int, seed: int
) -> pd.DataFrame:
    """A seeded, stratified subsample: every class scaled by one factor (so the class proportions stay),
    the largest class to at most `cap_per_class` and the whole to about `max_rows`; each class keeps at
    least `min_per_class` rows (all of them if it has fewer). The same inputs give the same rows."""
    counts = frame[label].value_counts()
    factor = min(1.0, max_rows / len(frame), cap_per_class / int(counts.max()))
    parts = []
    for name in sorted(counts.index):
        group = frame[frame[label] == name]
        n = min(len(group), max(min_per_class, round(len(group) * factor)))
        parts.append(group.sample(n=n, random_state=seed))
    return pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def quick_entry(entry: dict, data_dir: Path, out_dir: Path) -> dict:
    """The entry's quick subsample, written as out_dir/<name>/{train,test}.csv; the entry pointing there."""
    label = entry.get("label_column", "label")
    folder = out_dir / entry["name"]
    folder.mkdir(parents=True, exist_ok=True)
    train = subsample(
        read_csv(data_dir / entry["train"]),
        label,
        cap_per_class=QUICK_TRAIN_PER_CLASS,
        max_rows=QUICK_TRAIN_ROWS,
        min_per_class=QUICK_MIN_PER_CLASS,
        seed=QUICK_SEED,
    )
    test = subsample(
        read_csv(data_dir / entry["test"]),
        label,
        cap_per_class=QUICK_TEST_ROWS,
        max_rows=QUICK_TEST_ROWS,
        min_per_class=1,
        seed=QUICK_SEED,
    )
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return {**entry, "train": str(folder / "train.csv"), "test": str(folder / "test.csv")}


def resolve_entries(data_dir: Path, runs_dir: Path, only: set[str], quick: bool) -> list[dict]:
    """The suite's datasets (those in `only`, if given) with absolute train/test paths and their sizes."""
    entries = suite_entries(data_dir)
    missing = only - {e["name"] for e in entries}
    if missing:
        raise SystemExit(f"--only: no dataset(s) {sorted(missing)} in {data_dir}")
    out = []
    for e in entries:
        if only and e["name"] not in only:
            continue
        e = {**e, "train": str(data_dir / e["train"]), "test": str(data_dir / e["test"])}
        if quick:
            e = quick_entry(e, data_dir, runs_dir / "quick-data")
        train, test = read_csv(Path(e["train"])), read_csv(Path(e["test"]))
        label, metric = e.get("label_column", "label"), e.get("metric", "accuracy")
        e["n_train"], e["n_test"], e["n_classes"] = len(train), len(test), train[label].nunique()
        majority = train[label].value_counts().index[0]
        e["majority"] = score(metric, test[label].tolist(), [majority] * len(test))
        out.append(e)
    return out


# ------------------------------------------------------------------------------------------ baselines
def load_cache(path: Path | None) -> dict[str, dict]:
    """Rows of an earlier baselines.py (or suite.py) JSON by dataset name; {} when there is none."""
    if path is None or not path.is_file():
        return {}
    return {row["dataset"]: row for row in json.loads(path.read_text())["results"]}


def cached(entry: dict, cache: dict[str, dict], name: str) -> dict | None:
    """The cached result of baseline `name` on this dataset, if it was measured at the same sizes."""
    row = cache.get(entry["name"])
    same = row is not None and (row.get("n_train"), row.get("n_test")) == (entry["n_train"], entry["n_test"])
    same = same and row.get("metric") == entry.get("metric", "accuracy")
    hit = row.get(name) if same else None
    return {**hit, "source": "cache"} if isinstance(hit, dict) and "score" in hit else None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """BLAS/OpenMP and torch on one thread, as baselines.py measured them; restored afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def baselines_for(
    entry: dict, wanted: Sequence[str], cache: dict[str, dict], args: argparse.Namespace
) -> dict:
    """Each wanted baseline's result: from the cache, else run now (None where skipped, with a note)."""
    out: dict[str, Any] = {"notes": []}
    to_run = []
    for name in wanted:
        out[name] = cached(entry, cache, name)
        if out[name] is not None:
            continue
        if name == "minilm" and args.quick:
            out["notes"].append("MiniLM skipped: --quick and not in the baselines JSON at these sizes")
        elif name == "minilm" and importlib.util.find_spec(MINILM_PACKAGE) is None:
            out["notes"].append(f"MiniLM skipped: not installed ({MINILM_INSTALL})")
        else:
            to_run.append(name)
    if to_run:
        with single_thread():
            row = run_dataset(entry, Path("/"), to_run, args.seed, 1)  # entry's paths are absolute
        out.update({name: {**row[name], "source": "run"} for name in to_run})
    return out


# ------------------------------------------------------------------------------------------ llmclf
def run_llmclf(entry: dict, overlay: dict[str, Any], runs_dir: Path) -> dict:
    """Train llmclf on the dataset with the shared overlay in runs_dir/<name>; what the suite reports."""
    from llmclf import train
    from llmclf.config import build_config, merge

    data = {
        "path": entry["train"],
        "eval_data": entry["test"],
        "text_column": entry.get("text_column", "text"),
        "label_column": entry.get("label_column", "label"),
    }
    out = runs_dir / entry["name"]
    config = build_config(merge(overlay, {"data": data, "output": str(out)}))
    result = train(config, overwrite=True, quiet=True)
    info = json.loads((result.output / "run_info.json").read_text())
    summary = json.loads((result.output / "data_summary.json").read_text())
    metric = entry.get("metric", "accuracy")
    before, after = result.metrics.get("before") or {}, result.metrics["after"]
    probe = info.get("probe") or {}
    return {
        "before": before.get(metric),
        "after": after[metric],
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after["accuracy"],
        "probe_test_accuracy": probe.get("test_accuracy"),
        "seconds": round(result.seconds, 2),
        "timings_s": {k: round(v, 2) for k, v in info.get("timings_s", {}).items()},
        "split_counts": {k: sum(v.values()) for k, v in summary["counts"].items()},
        "precision": info.get("precision"),
        "feature_layer": info.get("feature_layer"),
        "pooling": info.get("pooling"),
        "lexical_weight": (info.get("lexical") or {}).get("weight"),
        "output": str(result.output),
    }


# ------------------------------------------------------------------------------------------ rows
def dataset_row(entry: dict, overlay: dict, cache: dict, args: argparse.Namespace) -> dict:
    """One dataset: baselines first (cheap, or cached), then llmclf; an llmclf failure is recorded."""
    wanted = args.baselines
    base = baselines_for(entry, wanted, cache, args)
    row: dict[str, Any] = {
        "dataset": entry["name"],
        "metric": entry.get("metric", "accuracy"),
        "n_train": entry["n_train"],
        "n_test": entry["n_test"],
        "classes": int(entry["n_classes"]),
        "majority": entry["majority"],
        "notes": base["notes"],
        **{name: base[name] for name in wanted},
    }
    try:
        row["llmclf"] = run_llmclf(entry, overlay, args.runs_dir)
    except Exception as exc:  # one dataset's failure should not lose the others
        traceback.print_exc()
        row["llmclf"], row["error"] = None, f"{type(exc).__name__}: {exc}"
    scored = {name: row[name]["score"] for name in wanted if row.get(name)}
    row["best_baseline"] = max(scored, key=scored.get) if scored else None
    ok = row["llmclf"] is not None and scored
    row["gap"] = row["llmclf"]["after"] - scored[row["best_baseline"]] if ok else None
    return row


def summarise(rows: Sequence[dict]) -> dict:
    """Wins (llmclf >= the best baseline), mean and worst gap, over the rows with a gap."""
    gaps = [(r["gap"], r["dataset"]) for r in rows if r.get("gap") is not None]
    worst = min(gaps) if gaps else (None, None)
    return {
        "datasets": len(rows),
        "compared": len(gaps),
        "wins": sum(1 for g, _ in gaps if g >= 0),
        "mean_gap": sum(g for g, _ in gaps) / len(gaps) if gaps else None,
        "worst_gap": worst[0],
        "worst_dataset": worst[1],
        "failed": [r["dataset"] for r in rows if r.get("error")],
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table_header(baselines: Sequence[str]) -> str:
    titles = [BASELINE_TITLES[b] for b in baselines]
    head = ["dataset", "metric", "train/test", "llmclf before", "llmclf after", "probe acc", "head reads"]
    head += titles
    head += ["gap to best", "llmclf s", *(f"{t} s" for t in titles)]
    return "| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|"


def table_row(row: dict, baselines: Sequence[str]) -> str:
    llm = row.get("llmclf") or {}
    cells = [row["dataset"], row["metric"], f"{row['n_train']}/{row['n_test']}"]
    cells += [_num(llm.get("before"), ".3f"), _num(llm.get("after"), ".3f")]
    cells += [_num(llm.get("probe_test_accuracy"), ".3f"), head_reads(llm)]
    cells += [_num((row.get(b) or {}).get("score"), ".3f") for b in baselines]
    cells += [_num(row.get("gap"), "+.3f"), _num(llm.get("seconds"), ".0f")]
    cells += [_num((row.get(b) or {}).get("seconds"), ".0f") for b in baselines]
    return "| " + " | ".join(cells) + " |"


def head_reads(llm: dict) -> str:
    """`L30 last`, `L20 mean`: the layer (of the base model's) and the pooling the run's head reads."""
    layer = (llm.get("feature_layer") or {}).get("layer")
    if not llm.get("pooling"):
        return "-"
    return f"{'L' + str(layer) + ' ' if layer else ''}{llm['pooling']}"


def summary_line(s: dict) -> str:
    line = f"llmclf >= best baseline on {s['wins']} of {s['compared']} datasets"
    line += f"; mean gap {_num(s['mean_gap'], '+.3f')}"
    line += f"; worst gap {_num(s['worst_gap'], '+.3f')} ({s['worst_dataset'] or '-'})"
    return line + (f"; failed: {', '.join(s['failed'])}" if s["failed"] else "")


# ------------------------------------------------------------------------------------------ output
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().lower().startswith("model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import sklearn
    import torch
    import transformers

    from llmclf.version import __version__

    return {
        "cpu_model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sklearn": sklearn.__version__,
        "llmclf": __version__,
    }


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def write_json(path: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    payload = {**meta, "complete": complete, "load_avg_1m_now": load_avg(), "results": rows}
    payload["summary"] = summarise(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def run_meta(args: argparse.Namespace, overlay: dict, argv: Sequence[str]) -> dict:
    from llmclf.config import build_config

    resolved = build_config(overlay).to_dict()
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": [sys.executable, __file__, *argv],
        "data_dir": str(args.data_dir),
        "runs_dir": str(args.runs_dir),
        "quick": args.quick,
        "baselines": list(args.baselines),
        "baselines_json": str(args.baselines_json) if args.baselines_json else None,
        "overrides": overlay,
        "llmclf_settings": {k: resolved[k] for k in ("model", "lora", "train")},
        "llmclf_data_settings": {
            k: v for k, v in resolved["data"].items() if (("data", k) not in SUITE_OWNED)
        },
        "machine": machine_info(),
        "load_avg_1m_at_start": load_avg(),
    }


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="the suite folder (suite.json, <name>/*.csv)")
    p.add_argument(
        "--runs-dir", type=Path, default=Path("runs/suite"), help="run folders (default runs/suite)"
    )
    p.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    p.add_argument("--quick", action="store_true", help="small seeded subsamples, no MiniLM unless cached")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="llmclf setting")
    p.add_argument("--model", help="llmclf's model.name (default: llmclf's default model)")
    p.add_argument("--baselines", default="tfidf,minilm", help="comma-separated: tfidf, minilm (or none)")
    p.add_argument("--baselines-json", type=Path, help="cached baselines (baselines.py --json)")
    p.add_argument("--seed", type=int, default=0, help="the baselines' CV fold shuffling (as baselines.py)")
    p.add_argument("--json", type=Path, help="write the results here (rewritten after each dataset)")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    if set(names) - set(BASELINES):
        p.error(f"--baselines: unknown {sorted(set(names) - set(BASELINES))} (tfidf, minilm)")
    args.baselines = [b for b in BASELINES if b in names]
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from llmclf import runtime

    runtime.quiet_libraries()
    runtime.set_threads()
    try:
        overlay = llmclf_overlay(args.model, args.set)
        meta = run_meta(args, overlay, argv)
    except Exception as exc:  # a bad --set: say what, no traceback
        raise SystemExit(f"error: {exc}") from None
    entries = resolve_entries(args.data_dir, args.runs_dir, args.only, args.quick)
    cache = load_cache(args.baselines_json)
    print(
        f"{len(entries)} datasets; llmclf overrides {overlay or '{}'}; runs in {args.runs_dir}",
        file=sys.stderr,
    )
    print(table_header(args.baselines), file=sys.stderr, flush=True)
    rows: list[dict] = []
    for entry in entries:
        tick = time.perf_counter()
        rows.append(dataset_row(entry, overlay, cache, args))
        rows[-1]["row_seconds"] = round(time.perf_counter() - tick, 2)
        print(table_row(rows[-1], args.baselines), file=sys.stderr, flush=True)
        for note in rows[-1]["notes"]:
            print(f"  {entry['name']}: {note}", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, meta, rows, complete=False)
    print(table_header(args.baselines))
    print("\n".join(table_row(r, args.baselines) for r in rows))
    print("\n" + summary_line(summarise(rows)), flush=True)
    if args.json:
        write_json(args.json, meta, rows, complete=True)
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
