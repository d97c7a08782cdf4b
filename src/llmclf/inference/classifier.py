"""`Classifier`: a trained run folder, loaded for reuse from Python or the command line.

    clf = Classifier.load("runs/news")
    clf.labels                      # ['Business', 'Sci/Tech', 'Sports', 'World']
    clf.predict(["Stocks fell ..."])  # ['Business']
    clf.predict_proba(texts)        # (n, num_labels) array, rows sum to 1
    # a regression run (--task regression): clf.predict(texts) gives numbers, clf.scores(texts) an array
    # a multi-label run: clf.predict(texts) gives each text's list of labels, predict_proba each label's

Needs neither the training data nor network: the base model is the one the run recorded (the embedded
alias or a local folder, checked by hash; a hub model at the exact revision, from the local cache) and
the adapter is in the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmclf import runtime
from llmclf.config import MULTI_LABEL, SINGLE_LABEL
from llmclf.errors import LlmclfError
from llmclf.inference.lexical import FILES as LEXICAL_FILES
from llmclf.inference.lexical import LexicalHead, lexical_inputs
from llmclf.inference.metrics import compute_metrics, regression_metrics
from llmclf.inference.predict import predict_proba
from llmclf.inference.task import PROBLEM_TYPES, Task
from llmclf.manifest import MANIFEST, manifest_problem, read_manifest
from llmclf.model.adapter import ADAPTER_WEIGHTS, drop_lora_dropout, load_adapter, merge_lora
from llmclf.model.anatomy import upcast_head
from llmclf.model.loading import can_pack, load_classifier, pack_linears, unpack_linears
from llmclf.model.pooling import POOLINGS, pooling_of, use_pooling
from llmclf.model.provenance import resolve_recorded
from llmclf.runfolder import ADAPTER, CONFIG, LABELS, LEXICAL, RUN_INFO, TOKENIZER, RunFolder

VERIFIED = (CONFIG, LABELS, RUN_INFO, f"{ADAPTER}/{ADAPTER_WEIGHTS}", f"{ADAPTER}/adapter_config.json")
"""Files a run folder's manifest must list: what loading it reads."""


def open_verified(run_dir: str | Path) -> RunFolder:
    """A finished run folder whose loaded files all match its manifest, and hold nothing unlisted."""
    run = RunFolder.open(run_dir)
    problem = manifest_problem(run.root, expected=VERIFIED)
    if problem is None:
        listed = set((read_manifest(run.root)[0] or {}).get("files", {}))
        extra = sorted(
            p.relative_to(run.root).as_posix()
            for folder in (ADAPTER, TOKENIZER, LEXICAL)
            for p in run.path(folder).rglob("*")
            if p.is_file() and p.relative_to(run.root).as_posix() not in listed
        )
        problem = f"{extra[0]} is not in {MANIFEST} (added after training)" if extra else None
    if problem:
        raise LlmclfError(
            f"{run.root}: {problem}. The run folder was changed after training, or copied incompletely: copy "
            "it again from where it was written, or train again."
        )
    return run


def load_lexical(run: RunFolder, info: dict, num_labels: int) -> LexicalHead | None:
    """The run's lexical part where training kept it (a mixing weight above 0), from a run folder that
    `open_verified` has checked."""
    if not (info.get("lexical") or {}).get("weight"):
        return None
    # open_verified has checked every file the manifest lists: here the lexical files must be among them.
    listed = (read_manifest(run.root)[0] or {}).get("files", {})
    missing = [name for name in (f"{LEXICAL}/{f}" for f in LEXICAL_FILES) if name not in listed]
    if missing:
        raise LlmclfError(
            f"{run.root}: {MANIFEST} does not list {missing[0]}. run_info.json says the classifier has a "
            "lexical part; copy the run folder again from where it was written, or train again."
        )
    return LexicalHead.load(run.path(LEXICAL), num_labels)


def recorded_layer(info: dict, where: Path) -> tuple[int, int] | None:
    """(layer, of): the layer the run cut its model after and the base model's layer count (run_info's
    feature_layer), None where it kept every layer."""
    entry = info.get("feature_layer")
    if entry is None:
        return None
    layer, of = (entry.get("layer"), entry.get("of")) if isinstance(entry, dict) else (None, None)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (layer, of)) or not 1 <= layer <= of:
        raise LlmclfError(
            f"{where}: feature_layer is {entry!r}, expected {{'layer': N, 'of': M, ...}} with 1 <= N <= M. "
            "The file was changed after training: restore it, or train again."
        )
    return layer, of


MEAN_NOT_EXPORTABLE = (
    "This run's head reads the mean of the text's tokens (model.pooling mean), which a plain transformers "
    "model does not do: its export would read the last token and give other predictions. Serve the run "
    "folder with `llmclf serve` or `llmclf predict`, or train with --pooling last to export."
)


def check_exportable(run_dir: str | Path) -> None:
    """Refuse, before the slow load, a run whose export would not compute what the run does."""
    run = open_verified(run_dir)
    if recorded_pooling(run.run_info(), run.path(RUN_INFO)) == "mean":
        raise LlmclfError(f"{run.root}: {MEAN_NOT_EXPORTABLE}")


def recorded_pooling(info: dict, where: Path) -> str:
    """What the run's head reads (run_info's `pooling`; runs written before it read the last token)."""
    pooling = info.get("pooling", "last")
    if pooling not in POOLINGS:
        raise LlmclfError(
            f"{where}: pooling is {str(pooling)[:100]!r}, expected one of {', '.join(POOLINGS)}. The file was "
            "changed after training: restore it, or train again."
        )
    return pooling


def recorded_thresholds(info: dict, labels: list[str], where: Path) -> list[float]:
    """A multi-label run's decision thresholds, one per label (run_info's `thresholds`), checked."""
    entry = info.get("thresholds")
    values = [entry.get(label) for label in labels] if isinstance(entry, dict) else []
    ok = len(values) == len(labels) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values
    )
    if not ok or set(entry) != set(labels):
        raise LlmclfError(
            f"{where}: thresholds is {str(entry)[:200]!r}, expected a number in [0, 1] for each of the labels "
            f"{labels}. The file was changed after training: restore it, or train again."
        )
    return [float(v) for v in values]


def inference_settings(info: dict, attn_mode: str, requested: str | None = None) -> tuple[str, str]:
    """Precision and attention kernel for loading a run: the caller's `requested` precision (auto:
    measured on this machine), else as in training where this machine can run it (a bf16 run loaded on
    a CPU without native bf16, or an fp16 run on a CPU, falls back to fp32)."""
    if requested is not None:
        precision = runtime.resolve_precision(requested)
    else:
        precision = info["precision"]
        if precision != "fp32" and not runtime.cuda() and not (precision == "bf16" and runtime.cpu_bf16()):
            precision = "fp32"
    if attn_mode == "flash_attention_2":
        attn_mode = "auto"  # the same kernel where flash-attn is installed, SDPA elsewhere
    return precision, runtime.resolve_attn_implementation(attn_mode, precision)


def prepare_for_inference(model: Any, precision: str, *, quantized: bool, merge: bool) -> Any:
    """A loaded peft model made ready to predict:

    - LoRA folded into the base weights (`adapter.merge_lora`) where `merge` (`merge_default`). Otherwise
      the LoRA layers stay, without their eval-time dropout modules.
    - On a CPU, the bf16 weights reordered once for oneDNN (`loading.PackedLinear`): bit-identical
      outputs at about half the cost of a short pass (docs/performance.md#per-pass-overhead).
    """
    if merge:
        model = merge_lora(model)
    else:
        drop_lora_dropout(model)
    if precision == "bf16" and not quantized and can_pack(model):
        pack_linears(model)
        runtime.release_memory()  # the plain weights' pages (200 MiB for SmolLM2-135M), else kept by malloc
    return model


def merge_default(info: dict, precision: str, quantized: bool) -> bool:
    """Whether a run's classifier predicts with LoRA merged unless the caller says: as its evaluation after
    training did (`lora_merged` in run_info.json), so the probabilities stay those the run wrote. Runs
    written before the record evaluated unmerged; merging keeps fp32 outputs to float rounding, so of
    those only fp32 ones are merged."""
    recorded = info.get("lora_merged")
    if isinstance(recorded, bool):
        return recorded and not quantized
    return not quantized and precision not in ("bf16", "fp16")


class Classifier:
    """A fine-tuned text classifier: base model + LoRA adapter + head, with its label names."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        labels: list[str],
        *,
        max_length: int = 512,
        batch_size: int | str = "auto",
        precision: str | None = None,
        lexical: LexicalHead | None = None,
        pair_column: str | None = None,
        task: str = SINGLE_LABEL,
        thresholds: list[float] | None = None,
        label_separator: str = ",",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision  # bf16 / fp16: run under autocast, as the model was at training's end
        self.lexical = lexical  # TF-IDF + LR mixed into the model's probabilities (inference/lexical.py)
        self.pair_column = pair_column  # trained on text pairs (this column held the second texts)
        self.task = task  # single-label, or regression: the head outputs one number (saved scale folded in)
        self.label_separator = label_separator  # multi-label: joins a text's labels in files
        self._task = Task(task, self.labels, thresholds=None if thresholds is None else tuple(thresholds))
        self.model.eval()

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        *,
        full_precision: bool = False,
        base_model: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        precision: str | None = None,
        merge_lora: bool | None = None,
        verbose: bool | None = None,
    ) -> Classifier:
        """Load a run folder written by `llmclf train`.

        The folder is data: it is checked against its manifest, and the base model is the one it
        recorded (`base_model`: your own copy of it, checked to be the same). Running the model's own
        code (`trust_remote_code`) or reading pickle weights (`allow_pickle`) is the caller's choice,
        never the folder's. `precision` (bf16, fp16, fp32, auto) overrides the precision the run
        recorded (default: as trained, where this machine can run it). `full_precision` ignores 4-bit
        training (export). `merge_lora` folds LoRA into the base weights (default: as the run's own
        evaluation after training did, `lora_merged` in run_info.json, so the probabilities stay those the
        run wrote; False keeps the LoRA layers, a little slower per token, see docs/performance.md). What the
        libraries print while loading goes to the `llmclf` logger at DEBUG; `verbose=True` lets them print."""
        with runtime.library_output_to_log(verbose):
            return cls._load(
                open_verified(run_dir),
                full_precision=full_precision,
                base_model=base_model,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                precision=precision,
                merge_lora=merge_lora,
            )

    @classmethod
    def _load(
        cls,
        run: RunFolder,
        *,
        full_precision: bool,
        base_model: str | None,
        trust_remote_code: bool,
        allow_pickle: bool,
        precision: str | None,
        merge_lora: bool | None,
    ) -> Classifier:
        config, labels, info = run.config(), run.labels(), run.run_info()
        source, revision = resolve_recorded(info.get("base_model_identity"), base_model, run.path(RUN_INFO))
        precision, attn = inference_settings(info, config.model.attn_implementation, precision)
        quantize = bool(info.get("quantized")) and not full_precision
        if quantize and merge_lora:
            raise LlmclfError(
                "merge_lora: merging LoRA into a 4-bit base is lossy; load the run with full_precision=True."
            )
        # Same precision as in training, so probabilities match those written at the end of training.
        cut = recorded_layer(info, run.path(RUN_INFO))
        loaded = load_classifier(
            source,
            labels,
            quantize=quantize,
            trust_remote_code=trust_remote_code,
            for_training=False,
            tokenizer_source=str(run.path(TOKENIZER)),
            precision=precision,
            attn_implementation=attn,
            allow_pickle=allow_pickle,
            revision=revision,
            layers=cut[0] if cut else None,
            base_layers=cut[1] if cut else None,
            problem_type=None if config.task == SINGLE_LABEL else PROBLEM_TYPES[config.task],
        )
        if precision in ("bf16", "fp16") and not loaded.quantized:
            # Training kept the head in fp32 over the half-precision base (model.loading.add_lora): load the
            # saved fp32 head into an fp32 copy, not a rounded one.
            upcast_head(loaded.model)
        model = load_adapter(loaded.model, run.path(ADAPTER), labels)
        model = prepare_for_inference(
            model,
            precision,
            quantized=loaded.quantized,
            merge=merge_default(info, precision, loaded.quantized) if merge_lora is None else merge_lora,
        )
        use_pooling(model, recorded_pooling(info, run.path(RUN_INFO)))
        return cls(
            model,
            loaded.tokenizer,
            labels,
            max_length=config.data.max_length,
            batch_size=config.train.eval_batch_size,
            precision=precision,
            lexical=load_lexical(run, info, len(labels)),
            pair_column=config.data.text_pair_column,
            task=config.task,
            label_separator=config.data.label_separator,
            thresholds=recorded_thresholds(info, labels, run.path(RUN_INFO))
            if config.task == MULTI_LABEL
            else None,
        )

    def predict_proba(
        self,
        texts: list[str] | str,
        *,
        pairs: list[str] | str | None = None,
        batch_size: int | str | None = None,
        progress: bool | None = False,
    ) -> np.ndarray:
        """Probabilities, shape (len(texts), len(labels)), in input order: the model's, mixed with the
        lexical part's where the run has one. `pairs`: each text's second text, for a classifier
        trained on text pairs (data.text_pair_column)."""
        if self._task.regression:
            raise LlmclfError(
                "This is a regression model (--task regression): it outputs one number per text, not class "
                "probabilities. Use predict(texts) or scores(texts)."
            )
        texts, pairs = self._inputs(texts, pairs)
        probs = self._model_proba(texts, pairs, batch_size, progress)
        if self.lexical is None:
            return probs
        return self.lexical.combine(probs, self.lexical.log_proba(lexical_inputs(texts, pairs)))

    def model_proba(
        self,
        texts: list[str] | str,
        *,
        pairs: list[str] | str | None = None,
        batch_size: int | str | None = None,
        progress: bool | None = False,
    ) -> np.ndarray:
        """The model's own probabilities (n, labels), without the lexical part: what the exported
        transformers model computes."""
        return self._model_proba(*self._inputs(texts, pairs), batch_size, progress)

    def _model_proba(
        self, texts: list[str], pairs: list[str] | None, batch_size: int | str | None, progress: bool | None
    ) -> np.ndarray:
        """`model_proba` of inputs `_inputs` has checked."""
        if not texts:  # (0, labels): transformers 5's tokenizer fails on an empty list
            return np.zeros((0, len(self.labels)))
        with runtime.autocast(self.precision):
            return predict_proba(
                self.model,
                self.tokenizer,
                texts,
                pairs=pairs,
                batch_size=batch_size or self.batch_size,
                max_length=self.max_length,
                progress=progress,
            )

    def _inputs(
        self, texts: list[str] | str, pairs: list[str] | str | None
    ) -> tuple[list[str], list[str] | None]:
        """The texts (and pairs) as lists of non-blank strings, pairs given exactly where trained on."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
        if self.pair_column and pairs is None:
            raise LlmclfError(
                f"This classifier was trained on text pairs (second texts from column '{self.pair_column}'): "
                "give each text's second text, predict(texts, pairs=[...])."
            )
        if not self.pair_column and pairs is not None:
            raise LlmclfError(
                "This classifier was trained on single texts, not pairs: leave pairs out, or train on pairs "
                "with --text-pair-column."
            )
        if pairs is not None and len(pairs) != len(texts):
            raise LlmclfError(f"{len(texts)} texts but {len(pairs)} pairs: give one second text per text.")
        for what, values in (("Texts", texts), ("Second texts (pairs)", pairs or [])):
            bad = [i for i, t in enumerate(values) if not isinstance(t, str)]
            if bad:
                raise LlmclfError(f"{what} must be strings; item(s) {bad[:10]} are not.")
            blank = [i for i, t in enumerate(values) if not t.strip()]
            if blank:
                raise LlmclfError(
                    f"{what} {blank[:10]} are empty or blank: there is nothing to classify. Remove them."
                )
        return texts, pairs

    def scores(
        self,
        texts: list[str] | str,
        *,
        pairs: list[str] | str | None = None,
        batch_size: int | str | None = None,
        progress: bool | None = False,
    ) -> np.ndarray:
        """A regression model's numbers, shape (len(texts),), in the training column's units."""
        if not self._task.regression:
            raise LlmclfError(
                "This classifier predicts classes, not numbers: use predict(texts) or predict_proba(texts)."
            )
        return self._task.scale.original(
            self.model_proba(texts, pairs=pairs, batch_size=batch_size, progress=progress)
        )

    def predict(
        self,
        texts: list[str] | str,
        *,
        pairs: list[str] | str | None = None,
        batch_size: int | str | None = None,
    ) -> list[str] | list[float] | list[list[str]]:
        """Label names (regression: numbers; multi-label: each text's list of labels whose probability
        reaches their threshold), in input order."""
        if self._task.regression:
            return self.scores(texts, pairs=pairs, batch_size=batch_size).tolist()
        probs = self.predict_proba(texts, pairs=pairs, batch_size=batch_size)
        if self._task.multi_label:
            return self.chosen_labels(probs)
        return [self.labels[i] for i in probs.argmax(axis=1)]

    def evaluate(
        self,
        texts: list[str],
        true_labels: list[str] | list[float],
        *,
        pairs: list[str] | None = None,
        progress: bool | None = False,
    ) -> tuple[dict, np.ndarray]:
        """Metrics (as in training's after-evaluation) on labelled texts, and the probabilities
        (regression: the true numbers, and the predicted ones (n,))."""
        if self._task.regression:
            predicted = self.scores(texts, pairs=pairs, progress=progress)
            return regression_metrics([float(v) for v in true_labels], predicted), predicted
        if self._task.multi_label:
            return self._evaluate_label_sets(texts, true_labels, pairs, progress)
        unknown = sorted(set(true_labels) - set(self.labels))
        if unknown:
            raise LlmclfError(
                f"Label(s) {unknown} are not known to this classifier (it knows {self.labels}). Remove those "
                "rows or map them to known labels."
            )
        index = {label: i for i, label in enumerate(self.labels)}
        probs = self.predict_proba(texts, pairs=pairs, progress=progress)
        return compute_metrics([index[t] for t in true_labels], probs.argmax(axis=1), self.labels), probs

    def chosen_labels(self, probs: np.ndarray) -> list[list[str]]:
        """A multi-label classifier's labels per text from its probabilities (n, labels): those that
        reach their thresholds."""
        return [list(labels) for labels in self._task.predicted(probs)]

    @property
    def thresholds(self) -> dict[str, float] | None:
        """A multi-label classifier's decision threshold per label; None for other tasks."""
        if not self._task.multi_label:
            return None
        return self._task.threshold_map()

    def _evaluate_label_sets(
        self, texts: list[str], true_labels: list, pairs: list[str] | None, progress: bool | None
    ) -> tuple[dict, np.ndarray]:
        """Multi-label metrics of texts whose true labels are lists (or tuples) of names."""
        sets = [tuple(labels) for labels in true_labels]
        unknown = sorted({label for labels in sets for label in labels} - set(self.labels))
        if unknown:
            raise LlmclfError(
                f"Label(s) {unknown} are not known to this classifier (it knows {self.labels}). Remove them "
                "from those rows or map them to known labels."
            )
        probs = self.predict_proba(texts, pairs=pairs, progress=progress)
        return self._task.metrics(self._task.targets(sets), probs), probs

    def merged_model(self) -> Any:
        """A plain transformers model with the LoRA update folded in and the trained head kept."""
        from peft import PeftModel

        merged = self.model
        if getattr(merged.config, "quantization_config", None):
            raise LlmclfError("Merging into a 4-bit base is lossy; load the run in full precision to export.")
        if pooling_of(merged) == "mean":
            raise LlmclfError(MEAN_NOT_EXPORTABLE)
        unpack_linears(merged)  # plain bf16 weights again (loaded for inference on a CPU: packed)
        if isinstance(merged, PeftModel):
            merged = merge_lora(merged)
        merged.config.id2label = dict(enumerate(self.labels))
        merged.config.label2id = {label: i for i, label in enumerate(self.labels)}
        merged.config.pad_token_id = self.tokenizer.pad_token_id
        # what plain transformers and pipeline() apply to the logits: softmax, or nothing (regression)
        merged.config.problem_type = self._task.problem_type
        return merged
