"""How a training run scores the test split and reads the head's features, decided once per run.

- `Backend`: the model runs as it is (one process, or DDP processes, where the test split is scored in
  shards and gathered);
- `CachedBackend`: the frozen lower layers ran once (the activation cache), so scoring before training
  and the probe's features cost only the top layers;
- `EncoderBackend`: an encoder (BERT family) runs whole, every layer adapted, no cache: it is small, so
  the probe head's test accuracy is measured with one more pass over the test split;
- `FsdpBackend`: no process holds the whole model, so everything runs through the Trainer.

The pipeline asks the backend; it never tests the launch mode or the cache itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmclf import distributed, runtime
from llmclf.config import TrainConfig
from llmclf.inference.predict import head_inputs, sharded_predict_proba
from llmclf.model.anatomy import check_layers, is_encoder
from llmclf.model.layer_cache import (
    ActivationCache,
    LowerStates,
    cached_or_built,
    pooled_features,
    predict_proba_cached,
)
from llmclf.progress import Timings
from llmclf.training import fsdp
from llmclf.training.trainer import resolve_step_tokens

log = logging.getLogger("llmclf")
CACHE_DTYPE = torch.bfloat16
"""Cached activations are stored in bf16: half the memory of fp32, and plenty for frozen features."""


@dataclass
class Encoded:
    """The tokenised splits: token ids, label ids and each text's row in the activation cache."""

    ids: dict[str, list[list[int]]]
    labels: dict[str, list[int]]
    rows: dict[str, list[int]]
    truncated: dict[str, int]


class Backend:
    """The model run as it is; under a launcher the test split is scored in shards (DDP)."""

    cache: ActivationCache | None = None
    sharded = False  # FSDP: no process holds the whole model

    def __init__(
        self, model: Any, tokenizer: Any, precision: str, batch_size: int | str, quiet: bool
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.precision, self.batch_size, self.quiet = precision, batch_size, quiet
        self.trainer: Any = None

    def step_tokens(self, configured: int | str | None) -> int | None:
        """Padded tokens per training pass; under a launcher batches stay whole (each backward syncs)."""
        return resolve_step_tokens(configured) if distributed.world_size() == 1 else None

    def adopt(self, trainer: Any) -> None:
        """The Trainer that will train `model` (FSDP shards the model here)."""
        self.trainer = trainer

    def score(self, ids: list[list[int]], desc: str) -> np.ndarray:
        """Class probabilities (n, labels) of the whole model, every row once."""
        with runtime.autocast(self.precision):
            return sharded_predict_proba(
                self.model,
                self.tokenizer,
                ids,
                batch_size=self.batch_size,
                desc=desc,
                progress=False if self.quiet else None,
            )

    def score_frozen(self, ids: list[list[int]], rows: list[int], desc: str) -> np.ndarray:
        """Probabilities before any training (where cached, from the cache)."""
        return self.score(ids, desc)

    def features(self, ids: list[list[int]], rows: list[int]) -> np.ndarray:
        """The head's input (n, hidden) for each text: what the linear probe is fitted on."""
        with runtime.autocast(self.precision):
            return head_inputs(self.model, self.tokenizer, ids, batch_size=self.batch_size)

    def probe_probs(self, rows: list[int]) -> np.ndarray | None:
        """The probe head's test probabilities when they come nearly free (cached), else None."""
        return None

    def trained_state(self) -> dict[str, torch.Tensor] | None:
        """The trained weights to save, when the model does not hold them whole (FSDP); else None."""
        return None


class CachedBackend(Backend):
    """The frozen lower layers' outputs cached once per text; scoring before training runs the top only."""

    def __init__(self, *args: Any, cache: ActivationCache) -> None:
        super().__init__(*args)
        self.cache = cache

    def score_frozen(self, ids: list[list[int]], rows: list[int], desc: str) -> np.ndarray:
        with runtime.autocast(self.precision):
            return predict_proba_cached(self.model, self.cache, rows, batch_size=self.batch_size)

    def features(self, ids: list[list[int]], rows: list[int]) -> np.ndarray:
        with runtime.autocast(self.precision):
            return pooled_features(self.model, self.cache, rows, batch_size=self.batch_size)

    def probe_probs(self, rows: list[int]) -> np.ndarray | None:
        return self.score_frozen([], rows, "probe")


class EncoderBackend(Backend):
    """An encoder run whole (no cache; `anatomy.resolve_top_layers`): the probe head is scored on the test
    split with one more pass, cheap for a model of this size."""

    def __init__(self, *args: Any, ids: list[list[int]]) -> None:
        super().__init__(*args)
        self.ids = ids  # every text's token ids, by its row (train, val, test in turn)

    def probe_probs(self, rows: list[int]) -> np.ndarray | None:
        return self.score([self.ids[row] for row in rows], "scoring the probe head")


class FsdpBackend(Backend):
    """The model sharded by the Trainer: every forward pass, and the saving, go through the Trainer."""

    sharded = True

    def step_tokens(self, configured: int | str | None) -> int | None:
        return None

    def adopt(self, trainer: Any) -> None:
        fsdp.adopt(trainer)  # shards the model now, before evaluation and the probe use it
        self.trainer = trainer

    def score(self, ids: list[list[int]], desc: str) -> np.ndarray:
        with runtime.autocast(self.precision):
            return fsdp.predict_proba(self.trainer, ids)

    def features(self, ids: list[list[int]], rows: list[int]) -> np.ndarray:
        with runtime.autocast(self.precision):
            return fsdp.head_inputs(self.trainer, ids)

    def trained_state(self) -> dict[str, torch.Tensor] | None:
        # Collective: every process calls it; rank 0 gets the full dict.
        return fsdp.trainable_state_dict(self.trainer.model)


CACHED, UNCACHED, LAUNCHED = "cached", "uncached", "launched"


def cache_use(top_layers: int | None, train: TrainConfig) -> str:
    """Whether a run that adapts `top_layers` (None: every layer) keeps its frozen layers' outputs:
    CACHED; UNCACHED where nothing is frozen or train.activation_cache is off; LAUNCHED where one would
    pay but the run is under a launcher or FSDP (a cached forward would bypass the gradient sync)."""
    if top_layers is None or train.activation_cache == "off":
        return UNCACHED
    return LAUNCHED if fsdp.requested() or distributed.world_size() > 1 else CACHED


def choose(
    model: Any,
    tokenizer: Any,
    encoded: Encoded,
    *,
    top_layers: int | None,
    precision: str,
    source: str,
    quantized: bool,
    train: TrainConfig,
    quiet: bool,
    timings: Timings,
    known: LowerStates | None = None,
) -> Backend:
    """The backend of this run; builds the activation cache (timed as `cache`) when the run uses one,
    taking the `known` states the layer choice's passes kept."""
    args = (model, tokenizer, precision, train.eval_batch_size, quiet)
    use = cache_use(top_layers, train)
    if use == LAUNCHED:
        log.info("note: the activation cache runs in one process; under a launcher every step runs the model")
    if fsdp.requested():
        return FsdpBackend(*args)
    if top_layers is None and is_encoder(model):
        return EncoderBackend(
            *args, ids=[ids for name in ("train", "val", "test") for ids in encoded.ids[name]]
        )
    if use != CACHED:
        return Backend(*args)
    with timings("cache"), runtime.autocast(precision):
        first_layer = check_layers(model, top_layers)
        cache, reused = cached_or_built(
            model,
            [ids for name in ("train", "val", "test") for ids in encoded.ids[name]],
            first_layer,
            pad_id=tokenizer.pad_token_id,
            batch_size=train.eval_batch_size,
            dtype=CACHE_DTYPE,
            precision=precision,
            disk_dir=runtime.cache_dir() / "activations" if train.activation_cache == "disk" else None,
            model_source=source,
            quantized=quantized,
            known=known,
        )
    runtime.release_memory()
    log.info(
        "Frozen layers 0-%d %s for %d texts%s (%.0f MiB, %.0f s)",
        first_layer - 1,
        "read from the disk cache" if reused else "run once",
        len(cache),
        f" ({cache.kept} of them kept from the layer choice's pass)" if cache.kept else "",
        cache.nbytes / 2**20,
        timings.seconds["cache"],
    )
    return CachedBackend(*args, cache=cache)
