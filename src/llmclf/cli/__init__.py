"""The `llmclf` command."""

from llmclf.cli.main import main

__all__ = ["main"]
