"""Which decoder layer the head reads: a probe on every candidate layer's state, chosen by cross-validation.

An intermediate layer of a decoder is often a better text feature than the last one, which is shaped to
predict the next token. The model runs once over the training texts (and the test texts, whose last-layer
states give the zero-shot figure before training); each candidate layer's state at the last real token,
normed by the final norm as a model cut after that layer would feed its head, is scored by a
leave-one-out ridge classifier (closed form: one fit per layer). The model is then cut after the chosen
layer (`truncate`): the layers above are not trained, run, saved or exported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmclf.batches import length_batches
from llmclf.model.anatomy import decoder_of, unwrap
from llmclf.model.pooling import pool

log = logging.getLogger("llmclf")
RIDGE_ALPHAS = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
"""Ridge penalties (on standardised features) the leave-one-out score chooses from, per layer."""
MEAN_MARGIN = 0.02
"""How much higher the mean of the tokens must score than the last token for `auto` to take it: a
mean-pooled run cannot be exported as a plain transformers model, so a near-tie keeps the last token."""
MAX_TEXTS = 2000
"""Training texts scored per layer at most (a stratified sample beyond): enough to rank layers."""


@dataclass
class LayerChoice:
    """The chosen layer (1-based, counted from the embeddings) and the evidence behind it."""

    layer: int
    total: int
    candidates: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # leave-one-out balanced accuracy (R²) per candidate
    chosen_by: str = "cross-validation"
    pooling: str = "last"
    """What the head reads of the layer's output (model.pooling): `last` or `mean`."""
    mean_scores: list[float] = field(default_factory=list)
    """The candidates' scores with mean pooling, where it was scored too (`scores`: the last token's)."""

    def info(self) -> dict[str, Any]:
        """What run_info.json records (a reloaded run cuts the model at `layer` again)."""
        return {
            "layer": self.layer,
            "of": self.total,
            "chosen_by": self.chosen_by,
            "candidates": self.candidates,
            "scores": [round(s, 4) for s in self.scores],
            "pooling": self.pooling,
            "mean_scores": [round(s, 4) for s in self.mean_scores],
        }


def candidate_layers(total: int) -> list[int]:
    """Every second layer of the top two thirds, the last always included: (1-based) layer numbers."""
    return sorted({*range(total, total // 3, -2), total})


@torch.inference_mode()
def layer_states(
    model: Any,
    ids: list[list[int]],
    layers: list[int],
    pad_id: int,
    batch_size: int | str = "auto",
    poolings: tuple[str, ...] = ("last",),
    inputs_of: dict[int, list[torch.Tensor | None]] | None = None,
) -> np.ndarray:
    """(len(poolings) * len(layers), len(ids), hidden) float32, pooling-major: each listed layer's output
    through the final norm, pooled per text (`pooling.pool`: the last real token, or the mean of the real
    tokens). Layers above the highest listed one are not run.

    `inputs_of`: {layer index s (0-based, 0 < s < the highest listed layer): a list of len(ids)}, filled
    in place with each text's input to layer s, (tokens, hidden) in bf16 on the CPU: the activation
    cache's states, kept from this pass instead of run again."""
    decoder = decoder_of(model)
    wanted = {layer - 1: k for k, layer in enumerate(layers)}  # 0-based module index -> row
    captured: dict[tuple[int, str], torch.Tensor] = {}
    mask = torch.zeros(0, 0, dtype=torch.long)  # the current batch's attention mask
    batch_rows: list[int] = []  # the current batch's texts, by their index in `ids`
    norm = decoder.norm.forward  # its own computation, without any pooling hook on the module

    def keep(index: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            states = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
            on = mask.to(states.device)
            for name in poolings:  # pooled at once: a batch holds one (batch, hidden) row per candidate
                # the last token alone is normed (cheap); the mean is of the normed tokens, as the head reads
                captured[index, name] = (
                    norm(pool(states, on, name)) if name == "last" else pool(norm(states), on, name)
                )

        return hook

    def keep_input(start: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            states = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
            kept = states.to(torch.bfloat16).cpu()
            for row, i in enumerate(batch_rows):
                inputs_of[start][i] = kept[row, : len(ids[i])].clone()

        return hook

    handles = [decoder.layers[i].register_forward_hook(keep(i)) for i in wanted]
    for start in inputs_of or {}:  # the input of layer `start` is the output of layer `start - 1`
        handles.append(decoder.layers[start - 1].register_forward_hook(keep_input(start)))
    stop = max(layers)
    kept_layers = decoder.layers
    decoder.layers = kept_layers[:stop]  # the layers above the highest candidate are never needed
    device = next(model.parameters()).device
    out = np.zeros((len(poolings) * len(layers), len(ids), decoder.config.hidden_size), dtype=np.float32)
    try:
        for idx in length_batches([len(i) for i in ids], batch_size, device):
            width = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding, as the activation cache
                batch[row, : len(ids[i])], mask[row, : len(ids[i])] = torch.tensor(ids[i]), 1
            batch_rows = [int(i) for i in idx]
            decoder(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False)
            for p, name in enumerate(poolings):
                for index, k in wanted.items():
                    out[p * len(layers) + k, idx] = captured[index, name].float().cpu().numpy()
    finally:
        decoder.layers = kept_layers
        for handle in handles:
            handle.remove()
    return out


def score_layers(states: np.ndarray, labels: np.ndarray) -> list[float]:
    """Leave-one-out balanced accuracy of a ridge classifier on each layer's standardised states
    (layers, n, hidden), the best over RIDGE_ALPHAS per layer."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.metrics import balanced_accuracy_score

    scores = []
    for x in states:
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
        # its own best_score_ is wrong for two classes (scikit-learn 1.9 scores 1.0 on noise): the
        # leave-one-out decision values (n, 1 or classes, alphas) are scored here instead
        ridge = RidgeClassifierCV(alphas=RIDGE_ALPHAS, scoring="accuracy", store_cv_results=True)
        fitted = ridge.fit(x, labels)
        values = fitted.cv_results_
        best = 0.0
        for k in range(values.shape[2]):
            column = values[:, :, k]
            picked = (column[:, 0] > 0).astype(int) if column.shape[1] == 1 else column.argmax(axis=1)
            best = max(best, float(balanced_accuracy_score(labels, fitted.classes_[picked])))
        scores.append(best)
    return scores


def score_layers_regression(states: np.ndarray, targets: np.ndarray) -> list[float]:
    """Leave-one-out R² (1 - its squared error over the targets' variance) of a ridge regression on each
    layer's standardised states (layers, n, hidden), the best over RIDGE_ALPHAS per layer."""
    from sklearn.linear_model import RidgeCV

    variance = float(np.var(targets)) or 1.0
    scores = []
    for x in states:
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
        fitted = RidgeCV(alphas=RIDGE_ALPHAS, scoring="neg_mean_squared_error").fit(x, targets)
        scores.append(1.0 + float(fitted.best_score_) / variance)
    return scores


def quantile_bins(targets: np.ndarray, bins: int = 10) -> np.ndarray:
    """Numbers as the index of their quantile bin: strata for sampling regression targets."""
    edges = np.quantile(targets, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, targets, side="right")


def choose(
    states: np.ndarray,
    labels: np.ndarray,
    candidates: list[int],
    total: int,
    *,
    regression: bool = False,
    poolings: tuple[str, ...] = ("last",),
) -> LayerChoice:
    """The best-scoring layer (the deeper one on a tie) of the best pooling: the mean of the tokens only
    where it beats the last token by MEAN_MARGIN. `states`: (len(poolings) * len(candidates), n, hidden),
    pooling-major as `layer_states` gives them; `labels` are numbers for `regression`."""
    scores = score_layers_regression(states, labels) if regression else score_layers(states, labels)
    n = len(candidates)
    by_pooling = {name: scores[p * n : (p + 1) * n] for p, name in enumerate(poolings)}
    margin = {name: MEAN_MARGIN if name == "mean" and len(poolings) > 1 else 0.0 for name in poolings}
    pooling = max(poolings, key=lambda name: max(by_pooling[name]) - margin[name])
    row = by_pooling[pooling]
    best = max(range(n), key=lambda k: (row[k], candidates[k]))
    return LayerChoice(
        candidates[best],
        total,
        candidates,
        by_pooling.get("last", []),
        pooling=pooling,
        mean_scores=by_pooling.get("mean", []),
    )


def sample_rows(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of `limit` rows (all rows when there are fewer), each class keeping its share and at
    least one row, the rest drawn at random: a class with a single row is kept, not an error."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(rows)[: max(1, len(rows) * limit // n)]
        for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    kept = np.concatenate(picked)
    rest = np.setdiff1d(np.arange(n), kept)
    extra = rng.choice(rest, size=max(0, limit - len(kept)), replace=False)
    return np.sort(np.concatenate([kept, extra]))


def truncate(model: Any, layer: int) -> int:
    """Cut the decoder after `layer` (1-based): the final norm and the head then read that layer's output,
    and the config says so (a saved or exported model has `layer` layers). Returns the layers removed."""
    decoder = decoder_of(model)
    total = len(decoder.layers)
    if layer >= total:
        return 0
    decoder.layers = decoder.layers[:layer]
    for config in {id(c): c for c in (decoder.config, unwrap(model).config)}.values():
        config.num_hidden_layers = layer
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layer]
    return total - layer
