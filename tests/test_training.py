import numpy as np
import pytest
import torch

from conftest import on_device
from llmclf.data import to_dataset
from llmclf.modeling import add_lora, load_classifier
from llmclf.training import NonFiniteLossError, build_trainer, training_arguments

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
    from llmclf.training import init_head_from_probe, trainable_head

    labels = [str(i) for i in range(classes)]
    model = add_lora(
        load_classifier(str(tiny_model_dir), labels).model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0
    )
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), 40)
    hidden = trainable_head(model).weight.shape[1]
    features = rng.normal(size=(len(y), hidden)) + 1.5 * np.eye(classes, hidden)[y]  # separable-ish
    features[:, :3] *= 80.0  # outlier dimensions, as decoders have, carrying no label signal
    accuracy = init_head_from_probe(model, features.astype(np.float32), y.tolist(), None, seed=0)
    head = trainable_head(model)
    with torch.no_grad():
        logits = head(torch.as_tensor(features, dtype=head.weight.dtype, device=head.weight.device))
    assert accuracy > 0.8
    assert float((logits.argmax(-1).cpu().numpy() == y).mean()) == pytest.approx(accuracy)
