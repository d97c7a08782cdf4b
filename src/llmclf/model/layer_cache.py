"""Frozen-layer activation caching: run the frozen lower decoder layers once per example, reuse them.

When LoRA adapts only the top K of a decoder's L layers (`--lora-layers K`), layers 0 .. L-K-1 never
change during training. Their output for a text is then a constant, so we compute it once, keep it (in
memory, optionally on disk in bf16) and train, validate and evaluate by running only the top K layers,
the final norm and the head. Training the top 4 of SmolLM2's 30 layers costs about 4/30 of a full step
per example per epoch; evaluation passes become nearly free, and so do further epochs and trials.

The trick stays inside the model's own code: for the lower pass the upper layers are swapped for a
pass-through (and the final norm for an identity); for the upper pass the lower layers are swapped for a
pass-through and the cached states go in as `inputs_embeds`. Positions and masks are then computed by
the model as usual, so the result equals a full forward (tested to float tolerance). This relies on the
decoder feeding `inputs_embeds` straight into layer 0, which holds for the families listed in
`SUPPORTED` (Gemma, for one, rescales the embeddings and is not listed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmclf.batches import length_batches
from llmclf.manifest import sha256_file
from llmclf.model.anatomy import activate, decoder_of, head_of, unwrap
from llmclf.runfolder import atomic_write

log = logging.getLogger("llmclf")
SMALL_FILE = 1 << 20  # files up to this size are hashed whole for the cache key; larger ones sampled
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: returns its input hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _swapped(decoder: Any, keep: range, drop_norm: bool) -> Iterator[None]:
    """Temporarily replace every layer outside `keep` by a pass-through (indices stay, so per-layer
    settings such as sliding-window types still line up); optionally make the final norm an identity."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList([layer if i in keep else _PassThrough() for i, layer in enumerate(layers)])
    if drop_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def lower_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Hidden states after layer `start - 1` (the input of layer `start`), shape (batch, seq, hidden)."""
    decoder = decoder_of(model)
    with _swapped(decoder, range(start), drop_norm=True):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def pooled_from_states(
    model: Any, states: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Run layers `start ..` and the final norm on cached states; take each row's last real token.

    states: (batch, seq, hidden), right-padded; attention_mask: (batch, seq). Returns (batch, hidden):
    the same vector the model's own pooling feeds to the head (rightmost non-pad token; under mean
    pooling, `pooling.use_pooling`, the final norm's hook has put the mean there).
    """
    decoder = decoder_of(model)
    with _swapped(decoder, range(start, len(decoder.layers)), drop_norm=False):
        out = decoder(inputs_embeds=states, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    last = attention_mask.sum(dim=1) - 1  # right padding: the last real token of each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def logits_from_states(
    model: Any, states: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Class logits (batch, num_labels) from cached lower-layer states."""
    return head_of(model)(pooled_from_states(model, states, attention_mask, start))


@dataclass
class LowerStates:
    """Lower-layer states of some texts, computed by another pass that ran those layers anyway (the layer
    choice's): the activation cache takes them instead of running the layers again."""

    start: int
    """The first layer above them: each state is the input of layer `start`."""
    rows: dict[int, torch.Tensor]
    """The cache's row -> that text's states, (tokens, hidden)."""


class ActivationCache:
    """Lower-layer states of many texts, kept as one flat tensor (total_tokens, hidden) plus offsets.

    Row i's states are `flat[offsets[i]:offsets[i + 1]]`, shape (len(input_ids[i]), hidden).
    """

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor, start: int, kept: int = 0) -> None:
        self.flat, self.offsets, self.start = flat, offsets, start
        self.kept = kept  # rows taken from another pass (`build`'s `known`) rather than run here

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def rows(self, index: list[int] | np.ndarray) -> list[torch.Tensor]:
        return [self.flat[self.offsets[i] : self.offsets[i + 1]] for i in index]

    def batch(
        self, index: list[int] | np.ndarray, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded states (batch, longest, hidden) in `dtype` and the attention mask (batch, longest)."""
        rows = self.rows(index)
        longest = max(len(r) for r in rows)
        states = torch.zeros(len(rows), longest, self.flat.shape[1], dtype=dtype)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for j, r in enumerate(rows):
            states[j, : len(r)] = r.to(dtype)
            mask[j, : len(r)] = 1
        return states, mask

    @classmethod
    def build(
        cls,
        model: Any,
        input_ids: list[list[int]],
        start: int,
        *,
        pad_id: int,
        batch_size: int | str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        progress: Any = None,
        known: LowerStates | None = None,
    ) -> ActivationCache:
        """Run layers 0 .. start-1 once over every text (longest first, batches padded on the right);
        `known`: states another pass computed, taken as they are where they start at `start`."""
        device = next(model.parameters()).device
        lengths = np.array([len(ids) for ids in input_ids])
        offsets = torch.zeros(len(input_ids) + 1, dtype=torch.long)
        offsets[1:] = torch.from_numpy(np.cumsum(lengths))
        hidden = unwrap(model).config.get_text_config().hidden_size
        flat = torch.empty(int(offsets[-1]), hidden, dtype=dtype)
        given = known.rows if known is not None and known.start == start else {}
        for i, states in given.items():
            if tuple(states.shape) != (lengths[i], hidden):
                raise ValueError(
                    f"row {i}: states of shape {tuple(states.shape)}, {(lengths[i], hidden)} expected"
                )
            flat[offsets[i] : offsets[i + 1]] = states.to(dtype)
        if given and progress is not None:
            progress(len(given))
        rest = np.array([i for i in range(len(input_ids)) if i not in given], dtype=np.int64)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():  # mixed precision, if any, is the caller's autocast context
                for batch in length_batches(lengths[rest], batch_size, device):
                    idx = rest[batch]
                    longest = int(lengths[idx].max())
                    ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
                    mask = torch.zeros(len(idx), longest, dtype=torch.long)
                    for j, i in enumerate(idx):
                        ids[j, : lengths[i]] = torch.tensor(input_ids[i])
                        mask[j, : lengths[i]] = 1
                    states = lower_states(model, ids.to(device), mask.to(device), start).cpu()
                    for j, i in enumerate(idx):
                        flat[offsets[i] : offsets[i + 1]] = states[j, : lengths[i]].to(dtype)
                    if progress is not None:
                        progress(len(idx))
        finally:
            model.train(was_training)
        return cls(flat, offsets, start, kept=len(given))

    # ----------------------------------------------------------------------------------- on disk
    def save(self, path: Path) -> None:
        """Write the cache as safetensors, with the SHA-256 of its tensors in the metadata."""
        from safetensors.torch import save_file

        tensors = {"flat": self.flat.contiguous(), "offsets": self.offsets.contiguous()}
        meta = {"start": str(self.start), "sha256": _tensors_sha(tensors["flat"], tensors["offsets"])}
        # a reader never sees a half-written cache
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), meta))

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        start: int | None = None,
        dtype: torch.dtype | None = None,
        lengths: list[int] | None = None,
        hidden: int | None = None,
    ) -> ActivationCache:
        """Read a saved cache and check it: the SHA-256 recorded at save time, and (when given) the first
        layer, the storage dtype, each row's length and the hidden size the caller expects. A file that
        does not match raises ValueError saying what differs (it is never returned)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names, meta = set(handle.keys()), handle.metadata() or {}
            if names != {"flat", "offsets"}:
                raise ValueError(f"it holds the tensors {sorted(names)}, not flat and offsets")
            shapes = {name: handle.get_slice(name).get_shape() for name in names}
            problem = _shape_problem(shapes["flat"], shapes["offsets"], lengths, hidden)
            if problem:
                raise ValueError(problem)
            flat, offsets = handle.get_tensor("flat"), handle.get_tensor("offsets")
        problem = _content_problem(flat, offsets, meta, start, dtype, lengths)
        if problem:
            raise ValueError(problem)
        return cls(flat, offsets, int(meta["start"]))


def _tensors_sha(flat: torch.Tensor, offsets: torch.Tensor) -> str:
    """SHA-256 of the cache's tensors: dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in (offsets, flat):
        tensor = tensor.contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _shape_problem(
    flat: list[int], offsets: list[int], lengths: list[int] | None, hidden: int | None
) -> str | None:
    """What is wrong with a saved cache's tensor shapes, read before its tensors are."""
    if len(flat) != 2 or len(offsets) != 1:
        return f"flat has shape {flat} and offsets {offsets}: not (tokens, hidden) and (rows + 1,)"
    if lengths is not None and offsets[0] != len(lengths) + 1:
        return f"it has {offsets[0] - 1} rows, {len(lengths)} were expected"
    if hidden is not None and flat[1] != hidden:
        return f"its hidden size is {flat[1]}, the model's is {hidden}"
    if lengths is not None and flat[0] != sum(lengths):
        return f"it holds {flat[0]} token states, the texts have {sum(lengths)} tokens"
    return None


def _content_problem(
    flat: torch.Tensor,
    offsets: torch.Tensor,
    meta: dict,
    start: int | None,
    dtype: torch.dtype | None,
    lengths: list[int] | None,
) -> str | None:
    """What is wrong with a saved cache's metadata, dtypes, offsets or checksum."""
    if not str(meta.get("start", "")).isdigit() or (start is not None and int(meta["start"]) != start):
        return f"it starts at layer {meta.get('start')!r}, {start} was expected"
    if offsets.dtype != torch.int64 or (dtype is not None and flat.dtype != dtype):
        return f"its dtypes are {flat.dtype} and {offsets.dtype}, {dtype} and torch.int64 were expected"
    steps = offsets[1:] - offsets[:-1]
    if len(offsets) == 0 or offsets[0] != 0 or bool((steps < 0).any()) or offsets[-1] != flat.shape[0]:
        return "its row offsets are not 0, ascending, up to its number of token states"
    if lengths is not None and steps.tolist() != list(lengths):
        return "its rows' lengths are not those of the texts"
    if meta.get("sha256") != _tensors_sha(flat, offsets):
        return "its tensors do not match the SHA-256 recorded when it was saved"
    return None


def _file_digest(path: Path, size: int) -> str:
    """SHA-256 of a small file; of a large one, its safetensors header (if any) and sampled blocks, so
    that weights of the same size and layout (another fine-tune) get another key without hashing
    gigabytes."""
    if size <= SMALL_FILE:
        return sha256_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if path.suffix == ".safetensors":
            raw = handle.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            digest.update(handle.read(min(length, 100 << 20)))
        for i in range(SAMPLES + 1):
            handle.seek((size - SAMPLE_BYTES) * i // SAMPLES)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def model_identity(model_source: str, revision: str | None = None) -> list[Any]:
    """What tells the model's weights apart. A local folder: every file's name, size and date, the
    SHA-256 of small files (config, tokenizer) and a digest of large ones (`_file_digest`). A hub id: the
    id and the revision (commit) when known."""
    source = Path(model_source)
    if not source.is_dir():
        return [model_source, revision]
    files = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        if ".cache" in relative.parts:  # the hub's download bookkeeping inside a model folder
            continue
        stat = path.stat()
        files.append(
            [relative.as_posix(), stat.st_size, int(stat.st_mtime), _file_digest(path, stat.st_size)]
        )
    return [model_source, files, revision]


def cache_key(
    model_source: str,
    quantized: bool,
    start: int,
    dtype: torch.dtype,
    precision: str,
    input_ids: list[list[int]],
    revision: str | None = None,
) -> str:
    """Everything the cached states depend on: the weights (`model_identity`: a folder's files, a hub
    model's revision), quantisation, depth, storage dtype, compute precision (bf16/fp16/fp32) and the
    exact token ids."""
    digest = hashlib.sha256()
    identity = model_identity(model_source, revision)
    digest.update(json.dumps([identity, quantized, start, str(dtype), precision]).encode())
    for ids in input_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def cached_or_built(
    model: Any,
    input_ids: list[list[int]],
    start: int,
    *,
    pad_id: int,
    batch_size: int | str,
    dtype: torch.dtype,
    precision: str,
    disk_dir: Path | None,
    model_source: str,
    quantized: bool,
    revision: str | None = None,
    progress: Any = None,
    known: LowerStates | None = None,
) -> tuple[ActivationCache, bool]:
    """The cache for these texts: from `disk_dir` when an identical one was saved, else built (and saved
    there when `disk_dir` is given). Returns (cache, reused). `precision` only keys the disk cache: the
    caller runs this under its own autocast context for that precision. `revision`: a hub model's commit
    (default: the one transformers recorded when loading it). A saved file that does not verify is
    rebuilt, with a note. `known`: states of some texts another pass computed (`ActivationCache.build`)."""
    path = None
    if disk_dir is not None:
        config = unwrap(model).config
        revision = revision or getattr(config, "_commit_hash", None)
        key = cache_key(model_source, quantized, start, dtype, precision, input_ids, revision)
        path = disk_dir / f"{key}.safetensors"
        if path.is_file():
            expected = {
                "lengths": [len(ids) for ids in input_ids],
                "hidden": config.get_text_config().hidden_size,
            }
            try:
                return ActivationCache.load(path, start=start, dtype=dtype, **expected), True
            except Exception as exc:  # the file is data from disk: whatever is wrong, it is rebuilt
                log.info(
                    "note: the activation cache %s is not usable (%s): running the frozen layers again.",
                    path,
                    exc,
                )
    cache = ActivationCache.build(
        model,
        input_ids,
        start,
        pad_id=pad_id,
        batch_size=batch_size,
        dtype=dtype,
        progress=progress,
        known=known,
    )
    if path is not None:
        cache.save(path)
    return cache, False


def predict_proba_cached(
    model: Any,
    cache: ActivationCache,
    rows: list[int] | np.ndarray,
    *,
    batch_size: int | str = "auto",
) -> np.ndarray:
    """Class probabilities (len(rows), num_labels) from cached states: the head on the pooled features."""
    if len(rows) == 0:
        return np.zeros((0, unwrap(model).config.num_labels))
    features = pooled_features(model, cache, rows, batch_size=batch_size)
    head = head_of(model)
    weight = next(head.parameters())
    with torch.inference_mode():
        logits = head(torch.from_numpy(features).to(weight.device, weight.dtype))  # (rows, num_labels)
    return activate(logits, model).cpu().numpy().astype(np.float64)  # probabilities, or numbers


def pooled_features(
    model: Any,
    cache: ActivationCache,
    rows: list[int] | np.ndarray,
    *,
    batch_size: int | str = "auto",
) -> np.ndarray:
    """The head's input (len(rows), hidden) for cached rows: what a linear probe is fitted on.
    Length-sorted batches, results in `rows` order."""
    rows = np.asarray(rows)
    lengths = (cache.offsets[1:] - cache.offsets[:-1]).numpy()[rows]
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # mixed precision, if any, is the caller's autocast context
            for idx in length_batches(lengths, batch_size, device):
                states, mask = cache.batch(rows[idx])
                pooled = pooled_from_states(model, states.to(device), mask.to(device), cache.start)
                if out is None:
                    out = np.zeros((len(rows), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
