"""The benchmarks run end to end on CPU and report what they measured: benchmarks/gpu.py in its smoke
mode (--tiny), benchmarks/serve_load.py against the tiny model's trained run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_mode_runs_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--train-rows", "32"]
    done = subprocess.run(
        [*cmd, "--infer-rows", "40", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["quantized_linears"] == 14  # 2 layers x 7 linears, NF4
    for name in ("a_recipe", "b_llmclf"):
        train, infer = report["results"][name]["train"], report["results"][name]["inference"]
        assert train["samples_s"] > 0 and infer["samples_s"] > 0 and math.isfinite(train["loss"])
    a, b = report["results"]["a_recipe"], report["results"]["b_llmclf"]
    assert a["settings"]["attn"] == "eager" and b["settings"]["attn"] == "sdpa"  # no flash-attn on CPU
    # Length-sorted batches pad less than file order (same texts, same batch size): a property, not a timing.
    assert b["inference"]["pad_share"] < a["inference"]["pad_share"]
    assert "ratio b/a" in done.stdout


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_model_dir, small_csv) -> Path:
    """A tiny run trained in bf16 (head in fp32 over a bf16 base: what a CPU with native bf16 trains)."""
    from conftest import train_tiny

    out = tmp_path_factory.mktemp("bf16") / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, "--precision", "bf16") == 0
    return out


def test_predict_throughput_times_llmclf_against_the_recipe_loop_and_fits_the_pass_cost(bf16_run):
    """benchmarks/predict_throughput.py on a bf16 run: the batched comparison (which once called the
    model outside its autocast and failed on the fp32 head) and the per-pass fit of three models."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "predict_throughput.py"), "--run", str(bf16_run)]
    done = subprocess.run([*cmd, "--rows", "40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rates = [float(r) for r in re.findall(r"\(.*batch 32\): +([\d.]+) rows/s", done.stdout)]
    ratio = re.search(r"ratio llmclf / recipe: ([\d.]+)x +same predicted label: ([\d.]+)", done.stdout)
    assert len(rates) == 2 and ratio, done.stdout
    assert float(ratio[1]) == pytest.approx(rates[1] / rates[0], rel=0.05)
    # The same trained weights on both sides (bf16 against the recipe's fp32: the tiny model's near-ties
    # may flip); a random head would agree on about a quarter of the 4-label texts.
    assert float(ratio[2]) >= 0.6
    done = subprocess.run(
        [*cmd, "--fit-overhead", "--rounds", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fits = re.findall(
        r"^ *(before|now|merge_lora=False): fixed +(-?[\d.]+) ms \+ (-?[\d.]+) ms/token", done.stdout, re.M
    )
    assert [name for name, _, _ in fits] == ["before", "now", "merge_lora=False"], done.stdout
    # The unmerged model is the one before, loaded the new way: in bf16 the same probabilities, bit for bit.
    # On a CPU without native bf16 the run loads in fp32, where "before" merged LoRA: float rounding apart.
    same = re.search(r"merge_lora=False vs before on \d+ texts: max \|prob diff\| ([\d.e+-]+)", done.stdout)
    assert same, done.stdout
    if re.search(r"^run .* \(bf16\);", done.stdout, re.M):
        assert float(same[1]) == 0.0, done.stdout
    else:
        assert float(same[1]) < 1e-4, done.stdout


def test_serve_load_benchmark_checks_every_answer_and_prints_both_rates(trained_run):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--run", str(trained_run)]
    done = subprocess.run(
        [*cmd, "--seconds", "1", "--rounds", "1", "--clients", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    rates = {}
    for phase in ("sequential", "concurrent"):
        line = re.search(rf"{phase}: +(\d+) rows in .* = +([\d.]+) rows/s; failures (\d+);", out)
        assert line, out
        assert int(line[1]) > 0 and int(line[3]) == 0  # answered, and no request failed
        rates[phase] = float(line[2])
    # Every text answered in both phases was compared between a single pass and a merged one.
    compared = re.search(r"texts answered in both: (\d+), wrong: (\d+) at tolerance 0.0001 \(fp32\)", out)
    assert compared and int(compared[1]) > 0 and int(compared[2]) == 0, out
    ratio = float(re.search(r"ratio concurrent/sequential: ([\d.]+)x", out)[1])
    assert ratio == pytest.approx(rates["concurrent"] / rates["sequential"], abs=0.01)
    assert "SIGTERM: server exited with 0" in out
    ceiling = re.search(r"model alone .*: 1 text per call ([\d.]+) rows/s, 4 per call ([\d.]+) rows/s", out)
    assert ceiling and float(ceiling[1]) > 0 and float(ceiling[2]) > 0, out


def write_tiny_suite(folder: Path) -> Path:
    """Two small datasets out of the demo texts: 4 balanced topics (accuracy) and an imbalanced
    Sports-or-not task (macro-F1), laid out as prepare_suite.py writes the real suite."""
    import random

    from conftest import read_demo_rows, write_csv

    rows = read_demo_rows()
    random.Random(3).shuffle(rows)
    by_label = {
        label: [r for r in rows if r["label"] == label] for label in sorted({r["label"] for r in rows})
    }
    topics = {
        "train": [r for g in by_label.values() for r in g[:30]],
        "test": [r for g in by_label.values() for r in g[30:40]],
    }
    other = [r for label, g in by_label.items() if label != "Sports" for r in g]
    sports = {
        "train": [{"text": r["text"], "label": "sports"} for r in by_label["Sports"][:12]]
        + [{"text": r["text"], "label": "other"} for r in other[:48]],
        "test": [{"text": r["text"], "label": "sports"} for r in by_label["Sports"][50:55]]
        + [{"text": r["text"], "label": "other"} for r in other[100:120]],
    }
    entries = []
    for name, metric, splits in (("topics", "accuracy", topics), ("sports", "macro_f1", sports)):
        (folder / name).mkdir(parents=True)
        for split, split_rows in splits.items():
            write_csv(folder / name / f"{split}.csv", split_rows, ["text", "label"])
        entries.append(
            {"name": name, "metric": metric, "train": f"{name}/train.csv", "test": f"{name}/test.csv"}
        )
    (folder / "suite.json").write_text(json.dumps({"datasets": entries}))
    return folder


def run_suite(data: Path, runs: Path, out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    settings = ["train.epochs=1", "train.lr=2e-3", "train.batch_size=8", "data.max_length=64"]
    settings += ["model.quantize=none", "model.precision=fp32"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--data-dir", str(data), "--quick"]
    cmd += ["--runs-dir", str(runs), "--json", str(out), "--model", str(model), "--baselines", "tfidf"]
    cmd += [arg for s in settings for arg in ("--set", s)]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600)


def test_suite_runs_llmclf_and_tfidf_per_dataset_and_summarises_the_gaps(tmp_path, tiny_model_dir):
    import pandas as pd

    data = write_tiny_suite(tmp_path / "suite")
    out = tmp_path / "suite.json"
    done = run_suite(data, tmp_path / "runs", out, tiny_model_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["dataset"]: r for r in report["results"]}
    assert list(rows) == ["topics", "sports"] and report["complete"] and report["quick"]
    assert rows["topics"]["metric"] == "accuracy" and rows["sports"]["metric"] == "macro_f1"
    # --quick: the seeded stratified subsample (largest class cut to 40, proportions kept), written out.
    assert (rows["topics"]["n_train"], rows["topics"]["n_test"]) == (120, 40)
    sports = pd.read_csv(tmp_path / "runs" / "quick-data" / "sports" / "train.csv")
    assert sports["label"].value_counts().to_dict() == {"other": 40, "sports": 10}
    assert rows["sports"]["n_train"] == 50 and rows["sports"]["n_test"] == 25
    for row in rows.values():
        llm, tfidf = row["llmclf"], row["tfidf"]
        assert "minilm" not in row and row["best_baseline"] == "tfidf" and tfidf["source"] == "run"
        for value in (llm["before"], llm["after"], tfidf["score"], row["majority"]):
            assert 0.0 <= value <= 1.0
        assert llm["seconds"] > 0 and tfidf["seconds"] >= 0
        assert row["gap"] == pytest.approx(llm["after"] - tfidf["score"])
        assert llm["split_counts"]["test"] == row["n_test"]  # the test file is llmclf's whole test split
        assert llm["pooling"] == "last"  # the 2-layer model: no layer pass, the last token
        assert (tmp_path / "runs" / row["dataset"] / "metrics.json").is_file()
    gaps = {name: r["gap"] for name, r in rows.items()}
    summary = report["summary"]
    assert summary["datasets"] == summary["compared"] == 2 and summary["failed"] == []
    assert summary["wins"] == sum(g >= 0 for g in gaps.values())
    assert summary["mean_gap"] == pytest.approx(sum(gaps.values()) / 2)
    assert summary["worst_gap"] == min(gaps.values()) and summary["worst_dataset"] == min(gaps, key=gaps.get)
    assert report["overrides"]["train"]["epochs"] == 1 and report["overrides"]["model"]["quantize"] == "none"
    assert report["llmclf_settings"]["model"]["name"] == str(tiny_model_dir)
    assert report["machine"]["cpu_model"] and report["machine"]["torch"]
    assert (
        f"on {summary['wins']} of 2 datasets" in done.stdout
        and "| topics | accuracy | 120/40 |" in done.stdout
        and "| head reads |" in done.stdout
    )

    # Again on one dataset with the first output as the baselines cache: same subsample, TF-IDF not rerun.
    again = tmp_path / "again.json"
    done = run_suite(
        data, tmp_path / "runs2", again, tiny_model_dir, "--only", "sports", "--baselines-json", str(out)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (row,) = json.loads(again.read_text())["results"]
    assert row["tfidf"]["source"] == "cache" and row["tfidf"]["score"] == rows["sports"]["tfidf"]["score"]
    for split in ("train", "test"):
        first, second = (tmp_path / r / "quick-data" / "sports" / f"{split}.csv" for r in ("runs", "runs2"))
        assert first.read_text() == second.read_text()


def test_suite_refuses_a_set_of_what_it_sets_itself(tmp_path):
    data = write_tiny_suite(tmp_path / "suite")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--data-dir", str(data)]
    done = subprocess.run([*cmd, "--set", "data.path=x.csv"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "the suite sets data.path itself" in done.stderr


def test_feature_study_pools_the_last_token_or_the_mean_of_each_texts_tokens(tiny_model_dir):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from feature_study import layer_features

    from llmclf.model.anatomy import decoder_of
    from llmclf.model.loading import load_classifier

    loaded = load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False)
    texts = ["stocks fell sharply today", "the match ended in a draw after extra time was played"]
    last = layer_features(loaded.model, loaded.tokenizer, texts, 32, pooling="last")
    mean = layer_features(loaded.model, loaded.tokenizer, texts, 32, pooling="mean")
    decoder = decoder_of(loaded.model)
    with torch.inference_mode():
        for i, text in enumerate(texts):  # each text alone: no padding, every position is the text's
            ids = loaded.tokenizer(text, return_tensors="pt")
            hidden = decoder(**ids, output_hidden_states=True).hidden_states
            normed = [decoder.norm(h) for h in hidden[1:-1]] + [hidden[-1]]
            for layer, h in enumerate(normed):
                assert np.allclose(last[layer, i], h[0, -1].numpy(), atol=1e-4)
                assert np.allclose(mean[layer, i], h[0].mean(dim=0).numpy(), atol=1e-4)
    assert not np.allclose(last, mean)


def test_the_pairs_benchmark_trains_on_pairs_and_builds_both_texts_features(tmp_path, tiny_model_dir):
    """benchmarks/pairs.py on a git repository holding a small MRPC-shaped file: the llmclf side runs
    with the pair column and the TF-IDF side on both texts' features, each scored on the same test rows."""
    import csv
    import random

    import pandas as pd

    from conftest import read_demo_rows

    rows, rng = read_demo_rows(), random.Random(0)
    repo = tmp_path / "repo"
    (repo / "glue_data" / "MRPC").mkdir(parents=True)
    with (repo / "glue_data" / "MRPC" / "train.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
        for i in range(90):
            a, b = rng.sample(rows, 2)
            writer.writerow([int(a["label"] == b["label"]), i, i + 1000, a["text"], b["text"]])
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for step in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "data"]):
        subprocess.run([*git, *step], check=True)
    out = tmp_path / "pairs.json"
    options = ["epochs=1", "lr=2e-3", "batch_size=8", "max_length=64", "quantize=none", "precision=fp32"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pairs.py"), "--git-dir", str(repo / ".git")]
    cmd += ["--train", "50", "--test", "30", "--baselines", "tfidf", "--runs-dir", str(tmp_path / "runs")]
    cmd += ["--json", str(out), "--model", str(tiny_model_dir)]
    cmd += [arg for option in options for arg in ("--option", option)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    row = json.loads(out.read_text())
    assert (row["train"], row["test"]) == (50, 30) and "minilm" not in row
    for side in (row["tfidf"], row["llmclf"]["after"], row["llmclf"]["before"]):
        assert 0.0 <= side["accuracy"] <= 1.0 and 0.0 <= side["macro_f1"] <= 1.0
    predictions = pd.read_csv(tmp_path / "runs" / "llmclf" / "predictions_test.csv")
    assert len(predictions) == 30 and predictions["pair"].notna().all()  # trained and tested on pairs
    assert row["llmclf_options"]["epochs"] == 1 and row["llmclf"]["seconds"] > 0


def _git_repo(repo, files: dict[str, str]) -> str:
    """A git repository holding `files` (path: text), committed; returns its git dir."""
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text, encoding="utf-8")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for step in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "data"]):
        subprocess.run([*git, *step], check=True)
    return str(repo / ".git")


TINY_OPTIONS = ["epochs=1", "lr=2e-3", "batch_size=8", "max_length=64", "quantize=none", "precision=fp32"]


def _run_benchmark(name: str, git_dir: str, tmp_path, tiny_model_dir, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--git-dir", git_dir, *extra]
    cmd += ["--baselines", "tfidf", "--runs-dir", str(tmp_path / "runs"), "--json", str(out)]
    cmd += ["--model", str(tiny_model_dir), *[arg for option in TINY_OPTIONS for arg in ("--option", option)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_regression_benchmark_scores_numbers_on_pairs(tmp_path, tiny_model_dir):
    """benchmarks/regression.py on STS-benchmark-shaped files: llmclf with --task regression and the pair
    column, TF-IDF + ridge, both scored by correlation and MSE on the same test pairs."""
    import random

    import pandas as pd

    from conftest import read_demo_rows

    rows, rng = read_demo_rows(), random.Random(0)

    def sts(n: int) -> str:
        lines = []
        for i in range(n):
            a, b = rng.sample(rows, 2)
            score = 4.0 if a["label"] == b["label"] else 1.0
            lines.append(f"g\tf\t2012\t{i:04d}\t{score + rng.random():.3f}\t{a['text']}\t{b['text']}")
        return "\n".join(lines) + "\n"

    git_dir = _git_repo(
        tmp_path / "repo", {"stsbenchmark/sts-train.csv": sts(80), "stsbenchmark/sts-test.csv": sts(30)}
    )
    row = _run_benchmark("regression", git_dir, tmp_path, tiny_model_dir, "--train", "60", "--test", "25")
    assert (row["train"], row["test"]) == (60, 25)
    for side in (row["tfidf"], row["llmclf"]["after"]):
        assert -1.0 <= side["pearson"] <= 1.0 and side["mse"] >= 0
    predictions = pd.read_csv(tmp_path / "runs" / "llmclf" / "predictions_test.csv")
    assert list(predictions.columns) == ["text", "pair", "label", "score"] and len(predictions) == 25


def test_the_multilabel_benchmark_scores_label_sets(tmp_path, tiny_model_dir):
    """benchmarks/multilabel.py on a SemEval-E-c-shaped file: tweets without an emotion left out, llmclf
    with --task multi-label and TF-IDF + one-vs-rest LR scored by micro and macro F1 on the same tweets."""
    import random

    import pandas as pd

    from conftest import read_demo_rows

    rows, rng = read_demo_rows(), random.Random(0)
    topics = sorted({r["label"] for r in rows})
    lines = ["ID\tTweet\t" + "\t".join(t.replace("/", "") for t in topics)]
    for i in range(120):
        a, b = rng.sample(rows, 2)
        flags = ["1" if t in (a["label"], b["label"]) else "0" for t in topics]
        lines.append(f"{i}\t{a['text']} {b['text']}\t" + "\t".join(flags if i % 20 else ["0"] * len(topics)))
    git_dir = _git_repo(tmp_path / "repo", {"2018-E-c-En-train.txt": "\n".join(lines) + "\n"})
    row = _run_benchmark("multilabel", git_dir, tmp_path, tiny_model_dir, "--train", "70", "--test", "30")
    assert (row["train"], row["test"]) == (70, 30)  # 6 tweets without an emotion left out of 120
    for side in (row["tfidf"], row["llmclf"]["after"]):
        assert 0.0 <= side["micro_f1"] <= 1.0 and 0.0 <= side["macro_f1"] <= 1.0
    assert set(row["llmclf"]["thresholds"]) == {t.replace("/", "") for t in topics}
    predictions = pd.read_csv(tmp_path / "runs" / "llmclf" / "predictions_test.csv", keep_default_na=False)
    assert len(predictions) == 30 and predictions["label"].str.len().gt(0).all()
