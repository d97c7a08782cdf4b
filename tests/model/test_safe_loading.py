"""Safe loading: safetensors only unless --allow-pickle, no remote code unless asked, run folders confined."""

import json
import os
import shutil

import pytest
import torch

from conftest import on_device
from llmclf import Classifier
from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.manifest import write_manifest
from llmclf.model.loading import load_classifier
from llmclf.training.saving import MANIFESTED

LABELS = ["a", "b"]


@pytest.fixture
def pickled(tmp_path, tiny_model_dir):
    """The tiny model with its weights as pytorch_model.bin only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def test_pickle_weights_need_allow_pickle_and_load_weights_only(pickled, tiny_model_dir, monkeypatch):
    with pytest.raises(LlmclfError, match="--allow-pickle"):
        load_classifier(str(pickled), LABELS)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.manual_seed(0)
    got = load_classifier(str(pickled), LABELS, allow_pickle=True)
    assert seen and all(w is True for w in seen)  # never a full unpickle
    torch.manual_seed(0)
    want = load_classifier(str(tiny_model_dir), LABELS)  # same weights from safetensors, same random head
    batch = want.tokenizer(["one text", "and another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            got.model(**on_device(got.model, batch)).logits, want.model(**on_device(want.model, batch)).logits
        )


def test_cli_refuses_a_pickle_model_without_the_flag(pickled, small_csv, tmp_path, capsys):
    code = main(["train", "--data", str(small_csv), "--model", str(pickled), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "\nerror: " in "\n" + err and "--allow-pickle" in err and "Traceback" not in err


def test_model_needing_remote_code_is_refused_and_its_code_never_runs(
    tmp_path, tiny_model_dir, small_csv, capsys
):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "llmclf-custom"
    config["auto_map"] = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForSequenceClassification": "custom_code.CustomModel",
    }
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (custom / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code = main(["train", "--data", str(small_csv), "--model", str(custom), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err, err
    assert not marker.exists()


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


def test_links_out_of_the_run_folder_are_refused(run_copy, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    shutil.move(weights, outside / "adapter_model.safetensors")
    os.symlink(outside / "adapter_model.safetensors", weights)
    for argv in (
        ["predict", str(run_copy), "--text", "x"],
        ["evaluate", str(run_copy), "--data", str(run_copy / "predictions_test.csv")],
        ["export", str(run_copy), "--output", str(tmp_path / "exported")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            "outside the run folder" in err and "adapter_model.safetensors" in err and "Traceback" not in err
        )
    assert not (tmp_path / "exported").exists()


def test_links_inside_the_run_folder_and_a_linked_run_folder_are_fine(run_copy, tmp_path):
    (run_copy / "labels_copy.json").symlink_to(run_copy / "labels.json")
    linked = tmp_path / "linked-run"
    linked.symlink_to(run_copy)  # the folder the user named may itself be a link
    assert Classifier.load(linked).labels == json.loads((run_copy / "labels.json").read_text())


def test_adapter_base_model_path_is_not_followed(run_copy, tmp_path, trained_run):
    cfg_path = run_copy / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "not-there")  # points outside, at nothing
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LlmclfError, match="adapter_config.json has .* bytes, the manifest says"):
        Classifier.load(run_copy)  # an edited file is caught by the manifest
    write_manifest(run_copy, names=MANIFESTED)  # an editor who also rewrites the manifest
    texts = ["Shares fell sharply", "A late goal"]
    # The base model is the one the run recorded, the adapter from inside the folder only.
    got = Classifier.load(run_copy).predict_proba(texts)
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(Classifier.load(trained_run).predict_proba(texts))
    )


def test_pickle_adapter_is_refused(run_copy, capsys):
    from safetensors.torch import load_file

    adapter = run_copy / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    assert main(["predict", str(run_copy), "--text", "x"]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err


def test_only_safetensors_are_written(trained_run):
    pickles = [p for p in trained_run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not pickles
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()
