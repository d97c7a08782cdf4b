"""`Classifier`: a trained run folder, loaded for reuse from Python or the command line.

    clf = Classifier.load("runs/news")
    clf.labels                      # ['Business', 'Sci/Tech', 'Sports', 'World']
    clf.predict(["Stocks fell ..."])  # ['Business']
    clf.predict_proba(texts)        # (n, num_labels) array, rows sum to 1

Needs neither the training data nor network: the base model is resolved as at training time (the
embedded alias or a local folder; a hub model from the local cache) and the adapter is in the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmclf import runtime
from llmclf.errors import LlmclfError
from llmclf.inference.metrics import compute_metrics
from llmclf.inference.predict import predict_proba
from llmclf.model.anatomy import upcast_head
from llmclf.model.loading import load_classifier
from llmclf.model.sources import resolve_model_source
from llmclf.runfolder import ADAPTER, LABELS, RUN_INFO, TOKENIZER, RunFolder


def inference_settings(info: dict, attn_mode: str) -> tuple[str, str]:
    """Precision and attention kernel for loading a run: as in training where this machine can run them
    (a bf16 run loaded on a CPU without native bf16, or an fp16 run on a CPU, falls back to fp32)."""
    precision = info["precision"]
    if precision != "fp32" and not runtime.cuda() and not (precision == "bf16" and runtime.cpu_bf16()):
        precision = "fp32"
    if attn_mode == "flash_attention_2":
        attn_mode = "auto"  # the same kernel where flash-attn is installed, SDPA elsewhere
    return precision, runtime.resolve_attn_implementation(attn_mode, precision)


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision  # bf16 / fp16: run under autocast, as the model was at training's end
        self.model.eval()

    @classmethod
    def load(cls, run_dir: str | Path, *, full_precision: bool = False) -> Classifier:
        """Load a run folder written by `llmclf train`; `full_precision` ignores 4-bit training (export)."""
        from peft import PeftModel

        run = RunFolder.open(run_dir)
        config = run.config()
        labels = run.read_json(LABELS)
        info = run.read_json(RUN_INFO)
        source = resolve_model_source(config.model.name)
        precision, attn = inference_settings(info, config.model.attn_implementation)
        # Same precision as in training, so probabilities match those written at the end of training.
        loaded = load_classifier(
            source,
            labels,
            quantize=bool(info.get("quantized")) and not full_precision,
            trust_remote_code=config.model.trust_remote_code,
            for_training=False,
            tokenizer_source=str(run.path(TOKENIZER)),
            precision=precision,
            attn_implementation=attn,
            allow_pickle=config.model.allow_pickle,
        )
        half = precision in ("bf16", "fp16")
        if half and not loaded.quantized:
            # Training kept the head in fp32 over the half-precision base (model.loading.add_lora): load the
            # saved fp32 head into an fp32 copy, not a rounded one.
            upcast_head(loaded.model)
        model = PeftModel.from_pretrained(loaded.model, str(run.path(ADAPTER)))
        if not loaded.quantized and not half:
            # Fold LoRA into the base weights: same outputs (to float rounding), no adapter matmuls per
            # layer. Not into bf16/fp16 weights: the sum would be rounded, and differ from training's.
            model = model.merge_and_unload()
        return cls(
            model,
            loaded.tokenizer,
            labels,
            max_length=config.data.max_length,
            batch_size=config.train.eval_batch_size,
            precision=precision,
        )

    def predict_proba(
        self, texts: list[str] | str, *, batch_size: int | str | None = None, progress: bool | None = False
    ) -> np.ndarray:
        """Probabilities, shape (len(texts), len(labels)), in input order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise LlmclfError(f"Texts must be strings; item(s) {bad[:10]} are not.")
        with runtime.autocast(self.precision):
            return predict_proba(
                self.model,
                self.tokenizer,
                texts,
                batch_size=batch_size or self.batch_size,
                max_length=self.max_length,
                progress=progress,
            )

    def predict(self, texts: list[str] | str, *, batch_size: int | str | None = None) -> list[str]:
        """Label names, in input order."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        return [self.labels[i] for i in probs.argmax(axis=1)]

    def evaluate(
        self, texts: list[str], true_labels: list[str], *, progress: bool | None = False
    ) -> tuple[dict, np.ndarray]:
        """Metrics (as in training's after-evaluation) on labelled texts, and the probabilities."""
        unknown = sorted(set(true_labels) - set(self.labels))
        if unknown:
            raise LlmclfError(
                f"Label(s) {unknown} are not known to this classifier (it knows {self.labels}). Remove those "
                "rows or map them to known labels."
            )
        index = {label: i for i, label in enumerate(self.labels)}
        probs = self.predict_proba(texts, progress=progress)
        return compute_metrics([index[t] for t in true_labels], probs.argmax(axis=1), self.labels), probs

    def merged_model(self) -> Any:
        """A plain transformers model with the LoRA update folded in and the trained head kept."""
        from peft import PeftModel

        merged = self.model
        if getattr(merged.config, "quantization_config", None):
            raise LlmclfError("Merging into a 4-bit base is lossy; load the run in full precision to export.")
        if isinstance(merged, PeftModel):
            merged = merged.merge_and_unload()
        merged.config.id2label = dict(enumerate(self.labels))
        merged.config.label2id = {label: i for i, label in enumerate(self.labels)}
        merged.config.pad_token_id = self.tokenizer.pad_token_id
        return merged
