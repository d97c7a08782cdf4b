"""The training step that decides which layer the head reads (model.feature_layer) and cuts the model
there, before LoRA is added: the layers above are then never trained, cached, run or saved."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmclf import distributed, runtime
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import decoder_of, is_encoder, num_layers
from llmclf.model.layer_cache import LowerStates
from llmclf.model.layer_choice import (
    MAX_TEXTS,
    LayerChoice,
    candidate_layers,
    choose,
    layer_states,
    quantile_bins,
    sample_rows,
    truncate,
)
from llmclf.model.pooling import POOLINGS, check_pooling
from llmclf.training import fsdp
from llmclf.training.backend import Encoded

log = logging.getLogger("llmclf")
SHARED_BYTES = 1 << 30
"""At most this much memory (bf16) for the activation cache's states that the layer pass keeps: those of
the deepest candidates' first adapted layers that fit (the chosen layer is most often a deep one); where
the chosen one's were not kept (long texts, a wide model), the cache runs its own pass."""


@dataclass
class FeatureLayer:
    """The outcome of the step: the layer (None where the model was left whole and nothing was chosen)
    and, where the model was cut, the whole model's zero-shot test probabilities (test rows, labels)."""

    choice: LayerChoice | None
    zero_shot_probs: np.ndarray | None = None
    pooling: str = "last"
    """What the head reads of the layer's output (model.pooling resolved): `last` or `mean`."""
    lower: LowerStates | None = None
    """The activation cache's states of the texts the step ran (training sample, test), kept for it."""
    train_features: np.ndarray | None = None
    """(train, hidden): the head's input for every training text, in order, where the layer pass ran
    them all (one process): the probe is fitted on these instead of running the layers again."""

    def take_lower(self) -> LowerStates | None:
        """`lower`, handed over once: the cache takes the states, so they are not held twice."""
        lower, self.lower = self.lower, None
        return lower

    def take_train_features(self) -> np.ndarray | None:
        """`train_features`, handed over once: not held past the probe step."""
        features, self.train_features = self.train_features, None
        return features


def pick_feature_layer(
    setting: int | str,
    model: Any,
    encoded: Encoded,
    *,
    pooling: str = "auto",
    pad_id: int,
    zero_shot: torch.Tensor | None,
    precision: str,
    batch_size: int | str,
    seed: int,
    recorded: dict | None = None,
    regression: bool = False,
    start_of: Callable[[int], int | None] | None = None,
) -> FeatureLayer:
    """Resolve `setting` (auto, last, a layer number) and `pooling` (auto, last, mean) on this model and
    cut the model after the layer. `auto` pooling is chosen with the layer where layers are scored, else
    the last token.

    `zero_shot`: the label words' head (labels, hidden), scored on the whole model's last-layer test
    states while they are at hand, since the cut model no longer computes them (None: not needed).
    `recorded`: the choice an interrupted run made (a resumed run takes it instead of choosing again).
    `regression`: the training targets are numbers (or multi-hot rows), scored by a ridge regression's
    error. `start_of`: the activation cache's first layer were the model cut after layer L (None where
    there is no cache): the passes of this step keep those states for it (`FeatureLayer.lower`)."""
    fixed = "last" if pooling == "auto" else pooling  # where nothing is scored
    if fixed == "mean":
        if fsdp.requested():
            raise LlmclfError(
                "--pooling mean: under FSDP the head reads the last token. Give --pooling auto or last, or "
                "train without FSDP."
            )
        check_pooling(model, fixed)
    applies = _applies(setting, model)
    candidates = candidate_layers(num_layers(model)) if setting == "auto" and applies else []
    if not applies or (setting == "auto" and len(candidates) == 1):  # nothing to choose, no cut
        probs = lower = None
        if fixed == "mean":  # the head will not read the last token, where the label words are scored
            start = start_of(num_layers(model)) if start_of is not None else None
            probs, lower = _zero_shot_probs(model, encoded, zero_shot, precision, pad_id, batch_size, start)
        return FeatureLayer(None, probs, fixed, lower)
    total = num_layers(model)
    lower = features = None
    if setting == "auto":
        if recorded is not None:
            choice = recorded_choice(recorded, total, candidates, pooling)
            log.info("Reusing the feature layer chosen by the interrupted run (layer %d).", choice.layer)
        else:
            poolings = tuple(POOLINGS) if pooling == "auto" else (pooling,)
            choice, lower, features = _choose_layer(
                model,
                encoded,
                candidates,
                pad_id,
                precision,
                batch_size,
                seed,
                regression,
                poolings,
                start_of,
            )
    elif 1 <= int(setting) <= total:
        choice = LayerChoice(int(setting), total, chosen_by="config", pooling=fixed)
    else:
        raise LlmclfError(
            f"--feature-layer {setting}: this model has {total} decoder layers; give 1 .. {total}, last or auto."
        )
    probs = None
    start = start_of(choice.layer) if start_of is not None else None
    if choice.layer < total or choice.pooling == "mean":  # the whole model's last token, before the cut
        probs, tested = _zero_shot_probs(model, encoded, zero_shot, precision, pad_id, batch_size, start)
        if tested is not None:  # the same start as the training sample's: both are start_of(choice.layer)
            sampled = lower.rows if lower is not None and lower.start == tested.start else {}
            lower = LowerStates(tested.start, {**sampled, **tested.rows})
    removed = truncate(model, choice.layer)
    log.info("%s", describe(choice, removed))
    return FeatureLayer(choice, probs, choice.pooling, lower, features)


def _zero_shot_probs(
    model: Any,
    encoded: Encoded,
    zero_shot: torch.Tensor | None,
    precision: str,
    pad_id: int,
    batch_size: int | str,
    start: int | None = None,
) -> tuple[np.ndarray | None, LowerStates | None]:
    """The label words' zero-shot test probabilities (test rows, labels), scored on the whole model's last
    token (the next-word position), for where the head will not read that state itself: the model is
    about to be cut, or the head reads the mean of the tokens. None without label words. With `start`
    (the activation cache's first layer), also the test texts' states at it."""
    if zero_shot is None:
        return None, None
    total = num_layers(model)
    ids = encoded.ids["test"]
    keep = {start: [None] * len(ids)} if start is not None and 0 < start < total else None
    with runtime.autocast(precision):
        last = layer_states(model, ids, [total], pad_id, batch_size, inputs_of=keep)[0]
    logits = torch.from_numpy(last) @ zero_shot.float().T  # (test, labels)
    lower = None if keep is None else LowerStates(start, dict(zip(encoded.rows["test"], keep[start])))
    return torch.softmax(logits, dim=-1).double().numpy(), lower


def _choose_layer(
    model: Any,
    encoded: Encoded,
    candidates: list[int],
    pad_id: int,
    precision: str,
    batch_size: int | str,
    seed: int,
    regression: bool = False,
    poolings: tuple[str, ...] = ("last",),
    start_of: Callable[[int], int | None] | None = None,
) -> tuple[LayerChoice, LowerStates | None, np.ndarray | None]:
    """Score the candidates (each layer, pooled each way) on a sample of the training texts. Under a
    launcher each process runs its share of the texts and all of them score the gathered states, so every
    process cuts at one layer. With `start_of`, the pass also keeps the sample's states at each
    candidate's cache start, and returns those of the chosen one. Also returns the chosen layer and
    pooling's states of every training text where the sample is all of them, in one process (else None)."""
    labels = np.asarray(encoded.labels["train"])
    if labels.ndim == 2:  # multi-hot rows (multi-label): sampled by each text's first label
        strata = labels.argmax(axis=1)
    else:
        strata = quantile_bins(labels) if regression else labels
    rows = sample_rows(strata, MAX_TEXTS, seed)  # enough to rank layers; the pass costs one per text
    world, rank = distributed.world_size(), distributed.rank()
    share = f" (a share on each of {world} processes)" if world > 1 else ""
    pooled = " (last token and mean)" if len(poolings) > 1 else ""
    log.info(
        "Scoring %d layers' states%s on %d training texts%s ...", len(candidates), pooled, len(rows), share
    )
    mine = [encoded.ids["train"][i] for i in rows[rank::world]]
    keep = _starts_to_keep(model, mine, candidates, start_of) if world == 1 else None
    with runtime.autocast(precision):
        # (poolings * candidates, my rows, hidden)
        part = layer_states(model, mine, candidates, pad_id, batch_size, poolings, inputs_of=keep)
    states = np.empty((part.shape[0], len(rows), part.shape[2]), dtype=np.float32)
    for r, gathered in enumerate(distributed.all_gather(part)):
        states[:, r::world] = gathered
    choice = choose(
        states, labels[rows], candidates, num_layers(model), regression=regression, poolings=poolings
    )
    whole = world == 1 and len(rows) == len(labels)  # rows: sorted, so in training order
    at = list(poolings).index(choice.pooling) * len(candidates) + candidates.index(choice.layer)
    features = states[at].copy() if whole else None  # a copy: the other layers' states are let go
    start = start_of(choice.layer) if start_of is not None else None
    if not keep or start not in keep:
        return choice, None, features
    cache_rows = [encoded.rows["train"][i] for i in rows]
    return choice, LowerStates(start, dict(zip(cache_rows, keep[start]))), features


def _starts_to_keep(
    model: Any, ids: list[list[int]], candidates: list[int], start_of: Callable[[int], int | None] | None
) -> dict[int, list] | None:
    """{a candidate's cache start: a list to fill}, for the deepest candidates' starts that fit
    SHARED_BYTES (None where none fits)."""
    if start_of is None:
        return None
    starts = [s for layer in candidates if (s := start_of(layer)) is not None and 0 < s < layer]
    each = sum(len(i) for i in ids) * decoder_of(model).config.hidden_size * 2  # bf16, one start's states
    kept = sorted(set(starts), reverse=True)[: SHARED_BYTES // max(each, 1)]
    return {s: [None] * len(ids) for s in kept} or None


def recorded_choice(recorded: dict, total: int, candidates: list[int], setting: str = "auto") -> LayerChoice:
    """The interrupted run's choice (its feature_layer.json, untrusted), checked against this model and
    the pooling `setting` (auto: either)."""
    layer, scores = recorded.get("layer"), recorded.get("scores")
    pooling, mean_scores = recorded.get("pooling", "last"), recorded.get("mean_scores", [])
    ok = (
        recorded.get("of") == total
        and recorded.get("candidates") == candidates
        and isinstance(layer, int)
        and layer in candidates
        and pooling in POOLINGS
        and setting in ("auto", pooling)
        and all(_scores_ok(row, len(candidates)) for row in (scores, mean_scores))
        and len({"last": scores, "mean": mean_scores}[pooling]) == len(candidates)  # the chosen one's scores
    )
    if not ok:
        raise LlmclfError(
            f"Cannot resume: the run folder's feature_layer.json records layer {layer!r} of "
            f"{recorded.get('of')!r} read by pooling {str(pooling)[:20]!r}, which is not one of this model's "
            f"candidates {candidates} (of {total}) with its scores, or not --pooling {setting}. Start a new "
            "run (another --output, or --overwrite)."
        )
    numbers = [float(s) for s in mean_scores]
    return LayerChoice(
        layer, total, candidates, [float(s) for s in scores], pooling=pooling, mean_scores=numbers
    )


def _scores_ok(row: Any, n: int) -> bool:
    """A recorded list of scores: one number per candidate, or none (that pooling was not scored)."""
    return (
        isinstance(row, list)
        and len(row) in (0, n)
        and all(isinstance(s, int | float) and not isinstance(s, bool) for s in row)
    )


def _applies(setting: int | str, model: Any) -> bool:
    """Whether the setting changes anything here: not `last`, a decoder the cache supports, one process
    holding the whole model (under FSDP the model is sharded: the last layer, with a note)."""
    if setting == "last":
        return False
    if is_encoder(model):
        if setting != "auto":
            raise LlmclfError(
                f"--feature-layer {setting}: this model is an encoder, whose head reads its own pooling of the "
                "last layer. Give --feature-layer auto or last."
            )
        return False
    try:
        decoder_of(model)
    except LlmclfError:
        if setting != "auto":
            raise
        return False
    if fsdp.requested():
        if setting != "auto":
            raise LlmclfError(
                f"--feature-layer {setting}: under FSDP the model is sharded across processes and the head "
                "reads the last layer. Give --feature-layer auto or last, or train without FSDP."
            )
        log.info("note: under FSDP the head reads the last layer (model.feature_layer is not applied)")
        return False
    return True


def describe(choice: LayerChoice, removed: int) -> str:
    """One line for the log: which layer, why, and what it saves."""
    why = ""
    if choice.chosen_by == "cross-validation":
        best = max(choice.scores + choice.mean_scores)
        last = choice.scores[choice.candidates.index(choice.total)] if choice.scores else None
        why = (
            f" (cross-validated probe: {best:.3f}"
            + ("" if last is None else f", last layer's last token {last:.3f}")
            + ")"
        )
    if choice.pooling == "mean":
        why += ", the mean of each text's tokens (`llmclf export` refuses such runs; --pooling last exports)"
    if removed:
        return (
            f"Features from layer {choice.layer} of {choice.total}{why}: the {removed} layers above are "
            "not trained, run or saved."
        )
    return f"Features from the last layer ({choice.total}){why}."
