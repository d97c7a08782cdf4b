"""llmclf: turn a decoder LLM into a text classifier by (Q)LoRA fine-tuning."""

import os

from llmclf.errors import LlmclfError

KERNEL_CACHE_CAPACITY = "64"
"""oneDNN, which runs bf16 matmuls on CPU, keeps a compiled kernel per input shape: up to 1,024 in each
of two caches (oneDNN's and PyTorch's ideep LRU). Texts come in every length, so with the defaults a
bf16 process grew by ~16 MiB per new length, 1.3 GiB over one AG News epoch; 64 entries hold one
training step's shapes and stop the growth (and ran 15% faster). Read at the first oneDNN call, so set
here, on import; a value the user set wins."""
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, KERNEL_CACHE_CAPACITY)

__version__ = "0.1.0"

__all__ = ["Classifier", "LlmclfError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import llmclf` (and `llmclf --help`) does not pay for importing torch.
    if name == "Classifier":
        from llmclf.prediction import Classifier

        return Classifier
    raise AttributeError(name)
