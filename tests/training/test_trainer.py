import numpy as np
import pytest
import torch

from conftest import on_device
from llmclf.data import to_dataset
from llmclf.model.loading import add_lora, load_classifier
from llmclf.training.trainer import NonFiniteLossError, build_trainer, split_batch, training_arguments

LABELS = ["a", "b", "c"]
TEXTS = ["the market fell", "a new phone", "the team won", "rain in the city", "shares rose", "a late goal"]


def make_trainer(tiny_model_dir, tmp_path, weights, **overrides):
    loaded = load_classifier(str(tiny_model_dir), LABELS)
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    ids = loaded.tokenizer(TEXTS)["input_ids"]
    ds = to_dataset(ids, [0, 1, 2, 0, 0, 2])
    kwargs = dict(
        epochs=1,
        lr=1e-3,
        batch_size=3,
        eval_batch_size=3,
        weight_decay=0.0,
        seed=0,
        has_val=False,
        n_train=len(ds),
        quiet=True,
    )
    kwargs.update(overrides)
    args = training_arguments(str(tmp_path / "ckpt"), **kwargs)
    return build_trainer(model, loaded.tokenizer, ds, None, args, weights), loaded.tokenizer, ids


def test_weighted_loss_matches_the_weighted_mean_of_cross_entropies(tiny_model_dir, tmp_path):
    weights = [0.2, 0.3, 0.5]
    trainer, tok, ids = make_trainer(tiny_model_dir, tmp_path, weights)
    labels = torch.tensor([0, 1, 2, 0, 0, 2])
    model = trainer.model.eval()
    batch = on_device(model, tok.pad({"input_ids": ids}, return_tensors="pt"))
    with torch.no_grad():
        loss = trainer.compute_loss(model, {**batch, "labels": labels.to(batch["input_ids"].device)})
        logits = model(**batch).logits.cpu()
    per_example = -torch.log_softmax(logits, -1)[torch.arange(6), labels]
    w = torch.tensor(weights)[labels]
    assert loss.item() == pytest.approx((w * per_example).sum().item() / w.sum().item(), rel=1e-5)
    unweighted, _, _ = make_trainer(tiny_model_dir, tmp_path, None)
    with torch.no_grad():
        plain = unweighted.compute_loss(model, {**batch, "labels": labels.to(batch["input_ids"].device)})
    assert plain.item() == pytest.approx(per_example.mean().item(), rel=1e-5)
    assert abs(plain.item() - loss.item()) > 1e-4  # the weights really change the loss


def test_nan_loss_stops_training_with_a_message(tiny_model_dir, tmp_path):
    trainer, _, _ = make_trainer(tiny_model_dir, tmp_path, None)
    head = trainer.model.base_model.model.score.modules_to_save["default"]
    head.register_forward_hook(lambda module, inp, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match="Training loss became nan at step 1"):
        trainer.train()


@pytest.mark.parametrize("classes", [2, 3])
def test_probe_head_reproduces_the_probe_on_raw_features_with_outlier_dimensions(tiny_model_dir, classes):
    """The probe is fitted on standardised features; the head must carry the scale back (W / s)."""
    from llmclf.model.anatomy import trainable_head
    from llmclf.training.probe import init_head_from_probe

    labels = [str(i) for i in range(classes)]
    model = add_lora(
        load_classifier(str(tiny_model_dir), labels).model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0
    )
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), 40)
    hidden = trainable_head(model).weight.shape[1]
    features = rng.normal(size=(len(y), hidden)) + 1.5 * np.eye(classes, hidden)[y]  # separable-ish
    features[:, :3] *= 80.0  # outlier dimensions, as decoders have, carrying no label signal
    accuracy = init_head_from_probe(
        model, features.astype(np.float32), y.tolist(), None, seed=0, soften=False
    ).train_accuracy
    head = trainable_head(model)
    with torch.no_grad():
        logits = head(torch.as_tensor(features, dtype=head.weight.dtype, device=head.weight.device))
    assert accuracy > 0.8
    assert float((logits.argmax(-1).cpu().numpy() == y).mean()) == pytest.approx(accuracy)


def test_split_batch_cuts_rows_into_parts_padded_to_their_own_longest():
    lengths = [9, 2, 5, 3]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    inputs = {
        "input_ids": torch.arange(36).reshape(4, 9),
        "attention_mask": mask,
        "labels": torch.tensor([0, 1, 2, 0]),
    }
    assert split_batch(inputs, max_tokens=36) is None  # fits as it is
    parts = split_batch(inputs, max_tokens=12)
    # Longest first: 9 alone (9 + 5 would pad to 18), then 5 and 3 (10 tokens), then 2.
    assert [p["labels"].tolist() for p in parts] == [[0], [2, 0], [1]]
    assert [tuple(p["input_ids"].shape) for p in parts] == [(1, 9), (2, 5), (1, 2)]
    assert parts[1]["input_ids"].tolist() == [list(range(18, 23)), list(range(27, 32))]
    assert parts[1]["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    # Left padding: a row's positions would shift if its padding were cut, so parts keep the width.
    left = {**inputs, "attention_mask": mask.flip(1)}
    assert [tuple(p["input_ids"].shape) for p in split_batch(left, max_tokens=12)] == [(1, 9), (2, 9), (1, 9)]


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_a_batch_run_in_parts_gives_the_whole_batch_loss_and_gradients(tiny_model_dir, tmp_path, weights):
    trainer, tok, ids = make_trainer(tiny_model_dir, tmp_path, weights)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    batch = {**tok.pad({"input_ids": ids}, return_tensors="pt"), "labels": torch.tensor([0, 1, 2, 0, 0, 2])}
    calls = []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: calls.append(1) or compute_loss(*a, **k)
    results = []
    for step_tokens in (None, 6):
        trainer.step_tokens = step_tokens
        model.zero_grad()
        calls.clear()
        loss = trainer.training_step(model, dict(batch)).item()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, len(calls)))
    (whole, whole_grads, whole_calls), (split, split_grads, split_calls) = results
    assert whole_calls == 1 and split_calls >= 3  # the split really ran in parts
    assert split == pytest.approx(whole, rel=1e-5)
    assert whole_grads.keys() == split_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_step_tokens_takes_auto_a_positive_count_or_empty(monkeypatch):
    from llmclf.config import build_config
    from llmclf.errors import LlmclfError
    from llmclf.training.trainer import CPU_STEP_TOKENS, resolve_step_tokens

    assert build_config({}).train.step_tokens == "auto"
    assert build_config({"train": {"step_tokens": None}}).train.step_tokens is None  # batches stay whole
    for bad in (0, -5, "many"):
        with pytest.raises(LlmclfError, match="train.step_tokens"):
            build_config({"train": {"step_tokens": bad}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_step_tokens("auto") == CPU_STEP_TOKENS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_step_tokens("auto") == 16_384 and resolve_step_tokens(300) == 300


@pytest.mark.parametrize("classes", [2, 5])
def test_a_probe_that_separates_its_training_texts_is_softened_to_its_held_out_loss(tiny_model_dir, classes):
    """Few texts per class in many dimensions: the probe separates them (training loss near 0), which
    would leave fine-tuning nothing to learn from. The head starts with the same predictions, but its
    logits divided by a temperature at which the training loss equals the cross-validated loss."""
    from llmclf.model.anatomy import trainable_head
    from llmclf.training.probe import init_head_from_probe

    labels = [str(i) for i in range(classes)]
    model = add_lora(
        load_classifier(str(tiny_model_dir), labels).model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0
    )
    head = trainable_head(model)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), 12)
    features = (rng.normal(size=(len(y), head.weight.shape[1])) + 1.5 * np.eye(classes, 64)[y]).astype(
        np.float32
    )

    def train_loss() -> tuple[float, np.ndarray]:
        with torch.no_grad():
            logits = head(torch.as_tensor(features, dtype=head.weight.dtype)).float()
        return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y))), logits.argmax(-1).numpy()

    hard = init_head_from_probe(model, features, y.tolist(), None, seed=0, soften=False)
    hard_loss, hard_pred = train_loss()
    soft = init_head_from_probe(model, features, y.tolist(), None, seed=0)
    soft_loss, soft_pred = train_loss()
    assert hard.train_accuracy == 1.0 and hard.temperature == 1.0
    assert hard_loss < 0.5 * soft.cv_log_loss  # the fitted probe: far more confident on its own texts
    assert soft.temperature > 1.5
    assert soft_loss == pytest.approx(soft.cv_log_loss, rel=1e-3)
    np.testing.assert_array_equal(soft_pred, hard_pred)
