"""`llmclf.train` from Python: data given in memory (a DataFrame, a list of dicts, a `datasets.Dataset`),
the command line's options as keyword arguments, and the run folder that keeps a copy of the data."""

import hashlib
import json
import shutil

import pandas as pd
import pytest
import yaml

import llmclf
from conftest import read_demo_rows
from llmclf import Classifier, LlmclfError, train
from llmclf.config import load_config
from llmclf.data import load_splits, read_table
from llmclf.datafiles import from_memory
from llmclf.runfolder import RunFolder
from llmclf.training.checkpoints import splits_digest

# conftest.TRAIN_ARGS as keyword arguments: the shared small, exact (fp32) settings.
OPTIONS = {
    "quantize": "none",
    "precision": "fp32",
    "train_per_class": 20,
    "val_per_class": 5,
    "test_per_class": 10,
    "epochs": 2,
    "lr": 2e-3,
    "batch_size": 8,
    "max_length": 64,
    "seed": 7,
}
SPLIT = {k: OPTIONS[k] for k in ("train_per_class", "val_per_class", "test_per_class", "seed")}


@pytest.fixture(scope="module")
def frames(small_csv):
    """The small data as a frame indexed by its own ids, and an evaluation frame of other demo texts."""
    train_frame = pd.read_csv(small_csv).set_index("id")
    seen = set(train_frame["text"])
    rest = [r for r in read_demo_rows() if r["text"] not in seen]
    picked = []
    for label in sorted(train_frame["label"].unique()):
        picked += [r for r in rest if r["label"] == label][:15]
    return train_frame, pd.DataFrame(picked)


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory, tiny_model_dir, frames):
    train_frame, eval_frame = frames
    out = tmp_path_factory.mktemp("api") / "run"
    result = train(
        data=train_frame, eval_data=eval_frame, model=tiny_model_dir, output=out, quiet=True, **OPTIONS
    )
    return result


def test_training_from_a_dataframe_writes_the_run_folder(frame_run, frames):
    out = frame_run.output
    assert out.is_dir() and frame_run.written and frame_run.seconds > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert frame_run.metrics == saved and set(saved) == {"before", "after"}
    assert saved["after"]["n"] == 40  # 10 per class from the evaluation frame
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["Business", "Sci/Tech", "Sports", "World"]
    clf = Classifier.load(out)
    assert clf.labels == labels
    got = clf.predict(["Stocks rallied after the rate cut", "The striker scored twice"])
    assert len(got) == 2 and set(got) <= set(labels)


def test_the_run_folder_records_the_frames_and_keeps_a_copy(frame_run, frames):
    out, (train_frame, eval_frame) = frame_run.output, frames
    config = yaml.safe_load((out / "config.yaml").read_text())["data"]
    in_memory = json.loads((out / "run_info.json").read_text())["data_in_memory"]
    manifest = json.loads((out / "llmclf_manifest.json").read_text())["files"]
    for key, frame, name in (
        ("data", train_frame, "data.jsonl"),
        ("eval_data", eval_frame, "eval_data.jsonl"),
    ):
        sha = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert in_memory[key] == {"kind": "DataFrame", "rows": len(frame), "sha256": sha, "file": name}
        assert (
            config["path" if key == "data" else "eval_data"]
            == f"<DataFrame: {len(frame)} rows, sha256 {sha[:16]}>"
        )
        assert manifest[name]["sha256"] == sha  # checked with the rest when the run folder is loaded
        copy = pd.read_json(out / name, lines=True)
        assert list(copy.columns) == ["text", "label"]  # the columns used, not the frame's others
        assert copy["text"].tolist() == frame["text"].tolist()
    assert json.loads((out / "data_summary.json").read_text())["source"] == config["path"]


def test_the_keyword_form_resolves_as_the_command_line_and_the_config_forms(frame_run, tiny_model_dir):
    options = {**OPTIONS, "model": str(tiny_model_dir), "lora_r": 8, "lexical": "off", "output": "runs/x"}
    by_keywords = llmclf.train_config(data="news.csv", text_column="body", **options)
    nested = {
        "data": {
            "path": "news.csv",
            "text_column": "body",
            **{k: OPTIONS[k] for k in ("train_per_class", "val_per_class", "test_per_class", "max_length")},
        },
        "model": {"name": str(tiny_model_dir), "quantize": "none", "precision": "fp32"},
        "lora": {"r": 8},
        "train": {k: OPTIONS[k] for k in ("epochs", "lr", "batch_size", "seed")} | {"lexical": "off"},
        "output": "runs/x",
    }
    assert by_keywords == load_config(None, nested)  # what `llmclf train --data news.csv ...` builds
    assert llmclf.train_config(nested) == by_keywords  # a nested dict as the base
    assert llmclf.train_config(config=by_keywords) == by_keywords  # a RunConfig as the base
    assert llmclf.train_config(by_keywords, epochs=3).train.epochs == 3  # options over the base
    assert llmclf.train_config(preset="recipe", lr=2e-4).lora.alpha == 8  # a preset under the options
    # The run from frames resolved the same settings as the keywords: only where the data came from differs.
    saved = RunFolder(frame_run.output).config()
    expected = llmclf.train_config(
        data=saved.data.path,
        eval_data=saved.data.eval_data,
        model=str(tiny_model_dir),
        output=str(frame_run.output),
        **OPTIONS,
    )
    assert saved == expected


def test_an_unknown_option_is_refused_with_the_closest(tmp_path, frames):
    out = tmp_path / "never"
    cases = [
        ("epoch", "epochs"),
        ("r", "lora_r"),
        ("learning_rate", "lr"),
        ("train_per_klass", "train_per_class"),
    ]
    for option, closest in cases:
        with pytest.raises(LlmclfError) as err:
            train(data=frames[0], output=out, **{option: 2})
        assert f"Unknown option {option}=" in str(err.value) and f"Did you mean {closest}=?" in str(err.value)
    with pytest.raises(LlmclfError, match=r"Invalid config value train\.lr='fast'"):  # the config's own words
        train(data=frames[0], output=out, lr="fast")
    with pytest.raises(LlmclfError, match="not over a RunConfig"):
        train(load_config(), preset="recipe")
    assert not out.exists()


def test_a_bad_frame_names_the_column_or_the_rows(tmp_path, frames, tiny_model_dir):
    out = tmp_path / "run"
    good = frames[0]
    renamed = good.rename(columns={"text": "body"})
    with pytest.raises(LlmclfError) as err:
        train(data=renamed, model=tiny_model_dir, output=out, **OPTIONS)
    msg = str(err.value)
    assert "column(s) ['text'] not found" in msg and "['body', 'label']" in msg and "text_column=" in msg
    holes = good.copy()
    holes.loc["r3", "text"] = "  "
    holes.loc["r7", "label"] = None
    with pytest.raises(LlmclfError) as err:
        train(data=holes, model=tiny_model_dir, output=out, **OPTIONS)
    msg = str(err.value)
    assert "empty or missing text(s) in column 'text' at index r3" in msg
    assert "missing label(s) in column 'label' at index r7" in msg
    assert "the frame's index" in msg and "drop_invalid=True" in msg
    assert not out.exists()  # nothing left behind: the same call can run again
    for bad, needle in [
        (42, "takes a file path, a pandas DataFrame"),
        ([{"text": "a", "label": "x"}, "b"], "item 1 of the list is str"),
        (good.iloc[:0], "has no rows"),
    ]:
        with pytest.raises(LlmclfError, match=needle):
            train(data=bad, output=out)
    nullable = good.astype({"text": "string"})  # pandas' own missing value, pd.NA
    nullable.loc["r5", "text"] = pd.NA
    with pytest.raises(LlmclfError, match="missing text.s. in column 'text' at index r5"):
        load_splits(from_memory(nullable, "text", "label").table, "text", "label", **SPLIT)
    # drop_invalid leaves them out, counted
    splits = load_splits(
        from_memory(holes, "text", "label").table, "text", "label", drop_invalid=True, **SPLIT
    )
    assert any("dropped 2 invalid row(s) (drop_invalid=True)" in note for note in splits.notes)
    assert "  " not in set(splits.train["text"])


def test_a_list_of_dicts_and_a_dataset_read_as_the_frame(frames):
    datasets = pytest.importorskip("datasets")
    frame = frames[0].reset_index(drop=True)
    names = sorted(frame["label"].unique())
    records = frame[["text", "label"]].to_dict("records")
    ds = datasets.Dataset.from_dict(
        {"text": frame["text"].tolist(), "label": [names.index(v) for v in frame["label"]]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
        ),
    )
    digests, copies = set(), set()
    for data, kind in ((frame, "DataFrame"), (records, "list"), (ds, "Dataset")):
        memory = from_memory(data, "text", "label")
        assert memory.kind == kind and memory.marker.startswith(f"<{kind}: {len(frame)} rows, sha256 ")
        digests.add(splits_digest(load_splits(memory.table, "text", "label", **SPLIT)))
        copies.add(memory.copy)  # the Dataset's ClassLabel ids written as their names
    assert len(digests) == 1 and len(copies) == 1
    with pytest.raises(LlmclfError, match="stands for data given in memory"):
        read_table(from_memory(frame, "text", "label").marker)


def test_resume_checks_the_frame_and_the_copy_reproduces_the_run(frame_run, frames, tmp_path, tiny_model_dir):
    interrupted = tmp_path / "run"
    shutil.copytree(frame_run.output, interrupted)
    (interrupted / "metrics.json").unlink()  # as an interrupted run leaves it
    saved = json.loads((interrupted / "fingerprint.json").read_text())
    train_frame, eval_frame = frames
    memory = from_memory(train_frame, "text", "label"), from_memory(eval_frame, "text", "label", "eval_data")
    again = load_splits(memory[0].table, "text", "label", eval_data=memory[1].table, **SPLIT)
    assert splits_digest(again) == saved["data"]["sha256"]  # the same frames resume the run
    edited = train_frame.copy()
    edited.iloc[0, edited.columns.get_loc("text")] += " (edited)"
    with pytest.raises(LlmclfError, match="Cannot resume.*the data differs"):
        train(
            data=edited,
            eval_data=eval_frame,
            model=tiny_model_dir,
            output=interrupted,
            resume="last",
            **OPTIONS,
        )
    # The run folder's copies, as files, make the same splits: the config form resumes the frames' run.
    config = RunFolder(interrupted).config()
    config.data.path = str(interrupted / "data.jsonl")
    config.data.eval_data = str(interrupted / "eval_data.jsonl")
    config.output = str(interrupted)
    result = train(config, resume="last", quiet=True)  # a RunConfig alone, as before the keywords
    assert result.metrics == frame_run.metrics
    pd.testing.assert_frame_equal(
        pd.read_csv(interrupted / "predictions_test.csv"),
        pd.read_csv(frame_run.output / "predictions_test.csv"),
    )
