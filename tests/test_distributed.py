"""Multi-process training: the real `llmclf train` under torchrun (DDP) and `accelerate launch` (FSDP), 2 CPU
processes (gloo), tiny model.

Also the shard/gather bookkeeping that makes sharded evaluation score every test row exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TRAIN_ARGS, write_csv
from llmclf.batches import shard_indices
from llmclf.data import load_splits
from llmclf.inference.predict import reassemble

# Installed in the launched workers through PYTHONPATH: the non-zero ranks record every file they
# create, open for writing, rename or delete under the run folder (Python audit events).
WATCH = textwrap.dedent(
    """
    import os, sys
    if os.environ.get("RANK", "0") != "0" and os.environ.get("LLMCLF_TEST_WATCH"):
        _root = os.path.realpath(os.environ["LLMCLF_TEST_WATCH"])
        _log = os.environ["LLMCLF_TEST_WRITES"] + "." + os.environ["RANK"]
        _events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
        _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if isinstance(path, int) or path is None:
                    return
                writing = any(c in mode for c in "wax+") if mode else bool(flags & _write_flags)
                if not writing:
                    return
            elif event in _events:
                path = args[0]
                if isinstance(path, int):
                    return
            else:
                return
            full = os.path.realpath(os.fsdecode(path))
            if full == _root or full.startswith(_root + os.sep):
                with open(_log, "a") as handle:
                    handle.write(f"{event} {full}\\n")

        sys.addaudithook(_hook)
    """
)


# ------------------------------------------------------------------------ shard / gather, no processes
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_row_once_and_stay_length_sorted(world):
    lengths = np.random.default_rng(world).integers(1, 60, size=37).tolist()
    shards = [shard_indices(lengths, world, r) for r in range(world)]
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(37))  # every row exactly once
    for shard in shards:
        shard_lengths = [lengths[i] for i in shard]
        assert shard_lengths == sorted(shard_lengths, reverse=True)  # little padding per batch
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced work


def test_reassemble_restores_input_order():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    values = np.arange(len(lengths) * 2, dtype=np.float64).reshape(-1, 2)  # row i is "the score of i"
    parts = [(idx, values[idx]) for idx in (shard_indices(lengths, 3, r) for r in range(3))]
    assert np.array_equal(reassemble(parts[::-1], len(lengths), 2), values)


def test_reassemble_refuses_missing_or_duplicated_rows():
    rows = np.ones((2, 2))
    with pytest.raises(RuntimeError, match="exactly once"):
        reassemble([(np.array([0, 1]), rows), (np.array([1, 2]), rows)], 4, 2)


# ------------------------------------------------------------------------------ launched end to end
SRC = Path(__file__).resolve().parents[1] / "src"
FSDP_CPU_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp_cpu.yaml"


def launch(
    tmp_path: Path, launcher: list[str], data: Path, model: Path, name: str, args: list[str] | None = None
) -> dict:
    """Run `llmclf train` on the tiny model under `launcher` (2 CPU processes), the non-zero ranks
    watched for writes into the run folder. Returns the run folder, the result and per-rank logs."""
    out = tmp_path / name
    hooks = tmp_path / f"{name}-hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WATCH, encoding="utf-8")
    writes = tmp_path / f"{name}-rank-writes"
    logs = tmp_path / f"{name}-logs"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(SRC), os.environ.get("PYTHONPATH", "")]),
        "LLMCLF_TEST_WATCH": str(out),
        "LLMCLF_TEST_WRITES": str(writes),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even where a GPU exists
    }
    # Per-rank stdout/stderr files under `logs` (torchrun redirects; accelerate launch only tees).
    torchrun = "torch.distributed.run" in launcher
    per_rank_logs = (
        ["--log-dir", str(logs), "--redirects", "3"] if torchrun else ["--log_dir", str(logs), "--tee", "3"]
    )
    cmd = [
        sys.executable,
        *launcher,
        *per_rank_logs,
        "-m",
        "llmclf",
        "train",
        "--data",
        str(data),
        "--model",
        str(model),
        "--output",
        str(out),
        *(TRAIN_ARGS if args is None else args),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert done.returncode == 0, (done.stderr[-3000:], stderr)
    # Every process loads the best epoch at the end (it scores its share of the test rows with it): none may
    # miss it (they used to look for it in the staging folder, already renamed by rank 0).
    assert not any("Could not locate the best model" in text for text in stderr.values()), stderr
    log = writes.with_name(writes.name + ".1")
    rank1_writes = log.read_text().splitlines() if log.exists() else []
    return {"out": out, "stdout": stdout, "rank1_writes": rank1_writes}


def check_run(out: Path, small_csv: Path) -> tuple[dict, dict, np.ndarray]:
    """What every launched run must satisfy: a complete run folder like a single-process run's, every test
    row exactly once in order, and a classifier that loads and reproduces the saved probabilities."""
    for name in ("config.yaml", "labels.json", "run_info.json", "metrics.json", "data_summary.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not (out / "checkpoints").exists()  # removed by rank 0 at the end
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    # Data sharded: 80 training rows, 8 per process per step, 2 processes -> 5 steps/epoch, 2 epochs.
    assert max(entry.get("step", 0) for entry in info["log_history"]) == 10
    assert sum("eval_balanced_accuracy" in entry for entry in info["log_history"]) == 2  # best epoch kept

    expected = load_splits(
        str(small_csv), "text", "label", train_per_class=20, val_per_class=5, test_per_class=10, seed=7
    ).test
    predictions = pd.read_csv(out / "predictions_test.csv")
    assert len(predictions) == len(expected) == 40
    assert not predictions["text"].duplicated().any()
    assert predictions["text"].tolist() == expected["text"].tolist()
    assert predictions["label"].tolist() == expected["label"].tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    for stage in ("before", "after"):
        assert metrics[stage]["n"] == 40
        assert sum(map(sum, metrics[stage]["confusion_matrix"])) == 40
    labels = json.loads((out / "labels.json").read_text())
    probs = predictions[[f"prob_{label}" for label in labels]].to_numpy()
    hits = (np.array(labels)[probs.argmax(axis=1)] == predictions["label"]).mean()
    assert hits == pytest.approx(metrics["after"]["accuracy"])

    # Loads like a single-process run and reproduces the saved probabilities.
    from llmclf.inference.classifier import Classifier

    clf = Classifier.load(out)
    again = clf.predict_proba(predictions["text"].tolist())
    np.testing.assert_allclose(again, probs, atol=1e-5)
    return info, metrics, probs


def check_only_rank0_wrote(run: dict, printed: str = "Confusion matrix") -> None:
    """Only rank 0 wrote the run folder and printed the report. (The other ranks do write the Trainer's
    checkpoint parts into checkpoints/: their RNG state, under FSDP their shards; removed at the end.)"""
    recorded = run["rank1_writes"]
    assert any(f"{os.sep}checkpoints" in line for line in recorded)  # the watcher saw rank 1's Trainer
    assert [line for line in recorded if f"{os.sep}checkpoints" not in line] == []
    stdout = run["stdout"]
    assert "Run folder:" in stdout[0] and printed in stdout[0]
    assert (
        "Run folder:" not in stdout[1]
        and "Test metrics" not in stdout[1]
        and "Class balance" not in stdout[1]
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, small_csv) -> dict:
    """`llmclf train` under torchrun, 2 CPU processes (DDP over gloo)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return launch(tmp_path_factory.mktemp("ddp"), launcher, small_csv, tiny_model_dir, "ddp-run")


def test_torchrun_two_cpu_processes(ddp_run, small_csv):
    info, _, _ = check_run(ddp_run["out"], small_csv)
    assert info["fsdp"] is False and info["lora_merged"] is True
    check_only_rank0_wrote(ddp_run)


def test_fsdp_two_cpu_processes_match_ddp(tmp_path, tiny_model_dir, small_csv, ddp_run):
    """FSDP2 under `accelerate launch` with examples/accelerate/fsdp_cpu.yaml: the model sharded across
    2 CPU processes, llmclf's evaluation and probe through the Trainer, the adapter gathered to rank 0."""
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU_CONFIG)]
    run = launch(tmp_path, launcher, small_csv, tiny_model_dir, "fsdp-run")
    info, metrics, probs = check_run(run["out"], small_csv)
    assert info["fsdp"] is True and info["lora_merged"] is False  # a sharded base is not merged
    check_only_rank0_wrote(run)

    # Same data, seed and batches as the DDP run: FSDP must train the same model, to float rounding.
    ddp_info = json.loads((ddp_run["out"] / "run_info.json").read_text())
    ddp_metrics = json.loads((ddp_run["out"] / "metrics.json").read_text())
    assert metrics["before"] == ddp_metrics["before"]  # the same random head, scored on the same rows
    assert info["probe"] == ddp_info["probe"]  # the head's inputs read through the sharded model

    def losses(entries):
        return [
            (e["step"], e.get("loss", e.get("eval_loss"))) for e in entries if "loss" in e or "eval_loss" in e
        ]

    ours, theirs = losses(info["log_history"]), losses(ddp_info["log_history"])
    assert [step for step, _ in ours] == [step for step, _ in theirs]
    np.testing.assert_allclose([v for _, v in ours], [v for _, v in theirs], rtol=1e-4)
    ddp_probs = pd.read_csv(ddp_run["out"] / "predictions_test.csv")
    labels = json.loads((run["out"] / "labels.json").read_text())
    np.testing.assert_allclose(probs, ddp_probs[[f"prob_{label}" for label in labels]].to_numpy(), atol=1e-4)


LAYER_PASS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification
    from llmclf import distributed
    from llmclf.training import feature_layer
    from llmclf.training.backend import Encoded

    model_dir, out = sys.argv[1], sys.argv[2]
    seen, kept = [], {}
    real_states, real_choose = feature_layer.layer_states, feature_layer.choose

    def counted(model, ids, *args, **kwargs):
        seen.append(len(ids))
        return real_states(model, ids, *args, **kwargs)

    def keep(states, labels, candidates, total, **options):
        kept["states"] = states
        return real_choose(states, labels, candidates, total, **options)

    feature_layer.layer_states, feature_layer.choose = counted, keep
    with distributed.session():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
        rng = np.random.default_rng(0)
        ids = [rng.integers(5, 200, size=int(rng.integers(3, 12))).tolist() for _ in range(41)]
        encoded = Encoded({"train": ids}, {"train": [i % 2 for i in range(41)]}, {}, {})
        choice, _, _ = feature_layer._choose_layer(model, encoded, [2, 4], 0, "fp32", 8, 7)
        rank = distributed.rank()
    np.save(f"{out}/states-{rank}.npy", kept["states"])
    with open(f"{out}/choice-{rank}.json", "w") as f:
        json.dump({"layer": choice.layer, "scores": choice.scores, "texts": seen}, f)
    """
)


def test_the_layer_pass_is_shared_between_processes(tmp_path, tiny_model_dir):
    """Under torchrun each process runs half of the sampled texts through the layers and all of them
    score the gathered states: the same states and choice as one process, every text run once."""
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-4", layers=4)
    script = tmp_path / "layer_pass.py"
    script.write_text(LAYER_PASS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, launcher in (
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]),
        ("one", [sys.executable]),
    ):
        (tmp_path / name).mkdir()
        done = subprocess.run(
            [*launcher, str(script), str(model), str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads((tmp_path / "one" / "choice-0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"choice-{r}.json").read_text()) for r in (0, 1)]
    assert alone["texts"] == [41] and [r["texts"] for r in ranks] == [[21], [20]]
    want = np.load(tmp_path / "one" / "states-0.npy")
    for r in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / "two" / f"states-{r}.npy"), want, atol=1e-5)
        assert ranks[r]["layer"] == alone["layer"] and ranks[r]["scores"] == pytest.approx(alone["scores"])


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp"])
@pytest.mark.parametrize("task", ["multi-label", "regression"])
def test_the_other_tasks_train_under_a_launcher(tmp_path, tiny_model_dir, task, launcher):
    """A multi-label and a regression run under torchrun (DDP) and under FSDP (2 CPU processes): the
    sharded test scoring reassembles their outputs, the thresholds are tuned (multi-label) and the scale
    folded into the (sharded) head (regression) alike on every rank, and the saved run reloads to the
    numbers it wrote."""
    from llmclf.inference.classifier import Classifier
    from test_multilabel import fraction_args, topic_rows
    from test_regression import rating_rows

    multi = task == "multi-label"
    rows, column = (topic_rows(160), "topics") if multi else (rating_rows()[:160], "rating")
    data = write_csv(tmp_path / "d.csv", rows, ["text", column])
    extra = ["--task", task, "--label-column", column] + (["--label-separator", "|"] if multi else [])
    command = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        if launcher == "torchrun"
        else ["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU_CONFIG)]
    )
    run = launch(tmp_path, command, data, tiny_model_dir, f"{task}-run", fraction_args() + extra)
    out = run["out"]
    check_only_rank0_wrote(run, "Per label (after)" if multi else "Spearman")
    preds = pd.read_csv(out / "predictions_test.csv", keep_default_na=False)
    clf = Classifier.load(out)
    if multi:
        labels = json.loads((out / "labels.json").read_text())
        saved = preds[[f"prob_{label}" for label in labels]].to_numpy()
        np.testing.assert_allclose(clf.predict_proba(preds["text"].tolist()), saved, atol=1e-4)
        assert set(json.loads((out / "run_info.json").read_text())["thresholds"]) == set(labels)
    else:
        np.testing.assert_allclose(clf.scores(preds["text"].tolist()), preds["score"], rtol=1e-4, atol=1e-4)
