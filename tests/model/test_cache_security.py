"""Caches on disk are untrusted data: a GGUF conversion or an activation cache that is damaged,
incomplete, planted, or made from other weights is rebuilt (with a note), never used and never an
exception.

The GGUF tests replace transformers' slow GGUF reader (tens of seconds) by the tiny model, so that only
llmclf's caching is exercised.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import propagating
from llmclf.model.layer_cache import ActivationCache, cache_key, cached_or_built
from llmclf.model.loading import load_classifier
from llmclf.model.sources import convert_gguf

IDS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]


def notes(caplog):
    return "\n".join(r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ GGUF conversion
@pytest.fixture
def conversions(monkeypatch, tiny_model_dir):
    """Count conversions; each 'reads' the GGUF file as the tiny model."""
    import transformers

    calls = []

    class Model:
        @staticmethod
        def from_pretrained(folder, gguf_file=None, **kwargs):
            calls.append(gguf_file)
            return transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir)

    class Tokenizer:
        @staticmethod
        def from_pretrained(folder, gguf_file=None, **kwargs):
            return transformers.PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(transformers, "AutoTokenizer", Tokenizer)
    return calls


def gguf_file(tmp_path, name="tiny.gguf"):
    path = tmp_path / name
    path.write_bytes(b"GGUF" + os.urandom(256))
    return path


def use_cache(monkeypatch, folder):
    monkeypatch.setenv("LLMCLF_CACHE", str(folder))
    return folder


def is_conversion(folder):
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type") == "llama" and (folder / "model.safetensors").is_file()


def test_an_intact_conversion_is_reused(tmp_path, monkeypatch, conversions):
    use_cache(monkeypatch, tmp_path / "cache")
    gguf = gguf_file(tmp_path)
    first = convert_gguf(gguf)
    assert convert_gguf(gguf) == first and len(conversions) == 1 and is_conversion(first)


def test_a_planted_config_is_not_taken_for_a_conversion(tmp_path, monkeypatch, conversions, caplog):
    gguf = gguf_file(tmp_path)
    use_cache(monkeypatch, tmp_path / "first")
    name = convert_gguf(gguf).name  # the folder name this GGUF file gets in any cache
    planted = use_cache(monkeypatch, tmp_path / "shared") / "models" / name
    planted.mkdir(parents=True)
    (planted / "config.json").write_text("{}")
    with propagating("llmclf"), caplog.at_level("INFO", logger="llmclf"):
        got = convert_gguf(gguf)
    assert got == planted and len(conversions) == 2 and is_conversion(got)
    assert "note:" in notes(caplog) and "not usable" in notes(caplog)


@pytest.mark.parametrize("damage", ["truncated weights", "edited config", "manifest removed", "extra file"])
def test_a_damaged_conversion_is_converted_again(tmp_path, monkeypatch, conversions, damage):
    use_cache(monkeypatch, tmp_path / "cache")
    gguf = gguf_file(tmp_path)
    folder = convert_gguf(gguf)
    if damage == "truncated weights":
        with (folder / "model.safetensors").open("r+b") as handle:
            handle.truncate(1000)
    elif damage == "edited config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    elif damage == "manifest removed":
        (folder / "llmclf_manifest.json").unlink(missing_ok=True)  # (the code before manifests wrote none)
    else:
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert convert_gguf(gguf) == folder and len(conversions) == 2
    assert (
        is_conversion(folder) and json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    )
    assert not (folder / "model.safetensors.index.json").exists()


def test_a_conversion_of_another_gguf_or_a_link_is_converted_again(tmp_path, monkeypatch, conversions):
    mine, other = gguf_file(tmp_path, "mine.gguf"), gguf_file(tmp_path, "other.gguf")
    use_cache(monkeypatch, tmp_path / "scratch")
    mine_name, other_dir = convert_gguf(mine).name, convert_gguf(other)
    models = use_cache(monkeypatch, tmp_path / "shared") / "models"
    models.mkdir(parents=True)
    shutil.copytree(other_dir, models / mine_name)  # a complete conversion, of another file
    assert convert_gguf(mine) == models / mine_name and len(conversions) == 3
    shutil.rmtree(models / mine_name)
    (models / mine_name).symlink_to(other_dir, target_is_directory=True)  # a link to a conversion elsewhere
    got = convert_gguf(mine)
    assert len(conversions) == 4 and not got.is_symlink() and is_conversion(got)
    assert is_conversion(other_dir)  # what the link pointed to is left alone


# ----------------------------------------------------------------------------------- activation cache
@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False).model


def cached(model, disk, source, ids=IDS):
    return cached_or_built(
        model,
        ids,
        1,
        pad_id=0,
        batch_size=4,
        dtype=torch.float32,
        precision="fp32",
        disk_dir=disk,
        model_source=str(source),
        quantized=False,
    )


def saved_file(disk):
    (path,) = disk.glob("*.safetensors")
    return path


def test_an_intact_activation_cache_is_reused(model, tiny_model_dir, tmp_path):
    built, reused = cached(model, tmp_path, tiny_model_dir)
    again, reused_again = cached(model, tmp_path, tiny_model_dir)
    assert (reused, reused_again) == (False, True)
    assert torch.equal(again.flat, built.flat) and torch.equal(again.offsets, built.offsets)


def _flip_last_byte(path, flat, offsets, start):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))


def _garbage(path, flat, offsets, start):
    path.write_bytes(os.urandom(200))


def _other_hidden_size(path, flat, offsets, start):
    ActivationCache(torch.zeros(flat.shape[0], 32), offsets, start).save(path)


def _other_rows(path, flat, offsets, start):
    ActivationCache(flat, torch.tensor([0, 2, 4, 6, int(flat.shape[0])]), start).save(path)


def _descending_offsets(path, flat, offsets, start):
    ActivationCache(flat, torch.tensor([0, 6, 4, 9, 10]), start).save(path)


def _no_checksum(path, flat, offsets, start):
    save_file({"flat": flat.contiguous(), "offsets": offsets}, str(path), {"start": str(start)})


def _other_layer(path, flat, offsets, start):
    ActivationCache(flat, offsets, start + 1).save(path)


def _extra_tensor(path, flat, offsets, start):
    save_file({"flat": flat, "offsets": offsets, "more": torch.zeros(1)}, str(path), {"start": str(start)})


@pytest.mark.parametrize(
    "damage",
    [
        _flip_last_byte,
        _garbage,
        _other_hidden_size,
        _other_rows,
        _descending_offsets,
        _no_checksum,
        _other_layer,
        _extra_tensor,
    ],
)
def test_a_bad_activation_cache_is_rebuilt_not_used(model, tiny_model_dir, tmp_path, caplog, damage):
    built, _ = cached(model, tmp_path, tiny_model_dir)
    path = saved_file(tmp_path)
    damage(path, built.flat.clone(), built.offsets.clone(), built.start)
    with propagating("llmclf"), caplog.at_level("INFO", logger="llmclf"):
        got, reused = cached(model, tmp_path, tiny_model_dir)
    assert reused is False
    assert torch.equal(got.flat, built.flat) and torch.equal(got.offsets, built.offsets) and got.start == 1
    assert "note:" in notes(caplog) and path.name in notes(caplog)
    assert cached(model, tmp_path, tiny_model_dir)[1] is True  # the rebuilt file replaced the bad one


def test_activation_cache_key_follows_the_hub_revision(model, tmp_path, monkeypatch):
    monkeypatch.setattr(model.config, "_commit_hash", "a" * 40, raising=False)
    assert cached(model, tmp_path, "someorg/somemodel")[1] is False
    assert cached(model, tmp_path, "someorg/somemodel")[1] is True
    monkeypatch.setattr(model.config, "_commit_hash", "b" * 40, raising=False)  # the hub model was updated
    assert cached(model, tmp_path, "someorg/somemodel")[1] is False


def _same_size_and_date(path, write):
    stat = path.stat()
    write()
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("where", ["model", ".cache/llmclf/models/model"])  # the second: a GGUF conversion
def test_activation_cache_key_follows_the_model_files(tiny_model_dir, tmp_path, where):
    folder = tmp_path / where
    shutil.copytree(tiny_model_dir, folder)
    torch.manual_seed(0)
    save_file({"w": torch.randn(600, 1024)}, str(folder / "big.safetensors"))  # over 1 MiB: sampled

    def key():
        return cache_key(str(folder), False, 1, torch.float32, "fp32", IDS)

    keys = [key()]
    config = folder / "config.json"
    text = config.read_text()
    assert '"rms_norm_eps": 1e-06' in text
    _same_size_and_date(config, lambda: config.write_text(text.replace("1e-06", "2e-06")))
    keys.append(key())
    weights = folder / "big.safetensors"
    _same_size_and_date(weights, lambda: save_file({"w": torch.randn(600, 1024)}, str(weights)))
    keys.append(key())
    assert len(set(keys)) == 3, keys  # an edited config or other weights (same size, date, layout)
    assert key() == keys[-1]
