"""llmclf: turn a decoder LLM into a text classifier by (Q)LoRA fine-tuning.

from llmclf import Classifier, RunConfig, load_config, train

result = train(load_config("examples/demo.yaml"))   # the run folder, metrics before/after, seconds
clf = Classifier.load(result.output)
clf.predict(["Stocks rallied after the rate cut"])
"""

import os

from llmclf.errors import LlmclfError
from llmclf.version import __version__

# oneDNN keeps one compiled kernel per input shape in two caches (1,024 entries each by default), and
# texts come in every length: capped so that a bf16 process stops growing (docs/performance.md). Read at
# the first oneDNN call, so set on import; a value the user set wins.
KERNEL_CACHE_CAPACITY = "64"
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, KERNEL_CACHE_CAPACITY)

__all__ = ["Classifier", "LlmclfError", "RunConfig", "RunResult", "__version__", "load_config", "train"]


def __getattr__(name: str):
    # Lazy, so that `import llmclf` (and `llmclf --help`, `report`, `compare`) does not import torch.
    if name == "Classifier":
        from llmclf.inference.classifier import Classifier

        return Classifier
    if name in ("train", "RunResult"):
        from llmclf.training import pipeline

        return pipeline.run_training if name == "train" else pipeline.RunResult
    if name in ("RunConfig", "load_config"):
        from llmclf import config

        return getattr(config, name)
    raise AttributeError(name)
