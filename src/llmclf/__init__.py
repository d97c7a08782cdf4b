"""llmclf: turn a decoder LLM into a text classifier by (Q)LoRA fine-tuning."""

from llmclf.errors import LlmclfError

__version__ = "0.1.0"

__all__ = ["Classifier", "LlmclfError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import llmclf` (and `llmclf --help`) does not pay for importing torch.
    if name == "Classifier":
        from llmclf.prediction import Classifier

        return Classifier
    raise AttributeError(name)
