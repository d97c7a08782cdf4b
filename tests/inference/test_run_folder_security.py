"""A run folder is data: it never decides to run code or which weights to load, and damage is an error.

Each attack edits a copy of a trained run and, where the point is not the manifest itself, rewrites the
manifest too (as someone crafting a folder would), so the check under test is the one that stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llmclf import Classifier
from llmclf.cli import main
from llmclf.errors import LlmclfError

TEXTS = ["Shares fell sharply", "A late goal won the derby"]


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


def reseal(run):
    """Rewrite the manifest after an edit: what a crafted folder would carry. (Public modules only, so
    that this file also runs against a checkout from before the fix and shows the attacks passing.)"""
    try:
        from llmclf.manifest import write_manifest
        from llmclf.training.saving import MANIFESTED
    except ImportError:  # a checkout from before run-folder manifests: nothing to rewrite
        return
    write_manifest(run, names=MANIFESTED)


def test_a_run_folder_cannot_make_llmclf_run_its_code(run_copy, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True  # the folder asks for it: it must not count
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    tokenizer = run_copy / "tokenizer"
    (tokenizer / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    settings["tokenizer_class"] = "EvilTokenizer"
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    reseal(run_copy)
    code = main(["predict", str(run_copy), "--text", "hi"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the run folder's code ran"
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err


def test_the_base_model_is_the_recorded_one_not_the_folders_config(run_copy, trained_run, tmp_path, tiny_model_dir):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: torch.randn_like(v) for k, v in weights.items()}, other / "model.safetensors")
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["name"] = str(other)  # the folder points at other weights: ignored
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    reseal(run_copy)
    got = Classifier.load(run_copy).predict_proba(TEXTS)
    want = Classifier.load(trained_run).predict_proba(TEXTS)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))
    # The caller's own copy is checked against the record: another model is refused, saying what differs.
    with pytest.raises(LlmclfError, match="model.safetensors differs"):
        Classifier.load(run_copy, base_model=str(other))
    same = tmp_path / "same-model"
    shutil.copytree(tiny_model_dir, same)
    torch.testing.assert_close(
        torch.tensor(Classifier.load(run_copy, base_model=str(same)).predict_proba(TEXTS)), torch.tensor(want)
    )


def test_a_changed_base_model_is_refused(run_copy, tmp_path, tiny_model_dir):
    moved = tmp_path / "base"
    shutil.copytree(tiny_model_dir, moved)
    info = json.loads((run_copy / "run_info.json").read_text())
    recorded = info["base_model_identity"]
    assert recorded["kind"] == "folder" and recorded["path"] == str(tiny_model_dir.resolve())
    recorded["path"] = str(moved)  # the run recorded this copy; then the copy changes
    (run_copy / "run_info.json").write_text(json.dumps(info))
    reseal(run_copy)
    Classifier.load(run_copy)  # unchanged: loads
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(LlmclfError, match="no longer the one this run was trained from: config.json differs"):
        Classifier.load(run_copy)
    shutil.rmtree(moved)
    with pytest.raises(LlmclfError, match="not on this machine.*--base-model"):
        Classifier.load(run_copy)


def test_an_adapter_without_its_lora_weights_is_refused(run_copy, capsys):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if "lora_" not in k}  # the head alone
    save_file(kept, weights)
    reseal(run_copy)
    assert main(["predict", str(run_copy), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors does not match the model it adapts: missing" in err and "lora_A" in err


def test_an_adapter_with_a_wrong_shape_or_an_extra_tensor_is_refused(run_copy):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.planted.weight"] = torch.zeros(2)
    save_file(tensors, weights)
    reseal(run_copy)
    with pytest.raises(LlmclfError, match="unexpected base_model.model.planted.weight"):
        Classifier.load(run_copy)
    del tensors["base_model.model.planted.weight"]
    name = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, weights)
    reseal(run_copy)
    with pytest.raises(LlmclfError, match="does not fit the base model|has shape"):
        Classifier.load(run_copy)


def test_labels_that_do_not_match_the_head_are_named(run_copy, capsys):
    labels = json.loads((run_copy / "labels.json").read_text())
    (run_copy / "labels.json").write_text(json.dumps([*labels, "Weather"]))
    reseal(run_copy)
    assert main(["predict", str(run_copy), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "4 outputs but labels.json lists 5 labels" in err and "Traceback" not in err
    for bad in ({"a": 1}, ["a", "a", "b", "c"], ["a", 2, "b", "c"], []):
        (run_copy / "labels.json").write_text(json.dumps(bad))
        reseal(run_copy)
        assert main(["predict", str(run_copy), "--text", "hi"]) == 2
        err = capsys.readouterr().err
        assert "labels.json must be a JSON list of distinct, non-empty label names" in err, (bad, err)


def test_the_manifest_catches_damage_and_planted_files(run_copy, capsys):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    assert main(["predict", str(run_copy), "--text", "hi"]) == 2
    assert "adapter_model.safetensors does not match its SHA-256" in capsys.readouterr().err
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (run_copy / "tokenizer" / "extra.py").write_text("print('hi')\n")
    assert main(["predict", str(run_copy), "--text", "hi"]) == 2
    assert "tokenizer/extra.py is not in llmclf_manifest.json" in capsys.readouterr().err
    os.remove(run_copy / "tokenizer" / "extra.py")
    os.remove(run_copy / "llmclf_manifest.json")
    assert main(["predict", str(run_copy), "--text", "hi"]) == 2
    assert "no llmclf_manifest.json" in capsys.readouterr().err


def test_label_order_does_not_depend_on_the_hash_seed():
    # "nan" parses as a float but compares with nothing: sorting numerically then depended on set order.
    script = "from llmclf.data import order_labels; print(order_labels(['3', 'nan', '1', '10', '2', 'inf']))"
    orders = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("0", "1", "2", "3", "4", "5")
    }
    assert len(orders) == 1, orders
