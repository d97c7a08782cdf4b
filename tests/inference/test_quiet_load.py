"""`Classifier.load` prints nothing of the libraries' own (transformers' load report and weight bars,
bitsandbytes' note on an optional CPU kernel, deprecation warnings): it goes to the `llmclf` logger at
DEBUG, and `verbose=True` lets the libraries print as they would. Nothing is changed for good: the warning
filters, the library loggers and the progress-bar setting are as they were after loading."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from conftest import propagating
from llmclf import Classifier

CHATTER = ("LOAD REPORT", "newly initialized", "FutureWarning", "gemm_4bit", "Loading weights")


@pytest.fixture
def libraries_as_in_a_fresh_process(capfd, monkeypatch):
    """transformers warns and shows its bars, as in a new process (the CLI's tests set it to errors only),
    on the stderr that capfd reads (its handler keeps the stream it was made with); the `llmclf` logger
    without the stderr handler an earlier test's CLI call attached, as in a library user's process."""
    import transformers

    verbosity = transformers.logging.get_verbosity()  # (also sets up its logger's handler, if not yet)
    for handler in logging.getLogger("transformers").handlers:
        if type(handler) is logging.StreamHandler:  # its own (pytest attaches handlers of its own there)
            monkeypatch.setattr(handler, "stream", sys.stderr)
    monkeypatch.setattr(logging.getLogger("llmclf"), "handlers", [])
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.enable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    (
        transformers.utils.logging.enable_progress_bar
        if bars
        else transformers.utils.logging.disable_progress_bar
    )()


def test_load_prints_nothing_and_logs_the_libraries_at_debug(
    trained_run, capfd, caplog, libraries_as_in_a_fresh_process
):
    import transformers

    filters = list(warnings.filters)
    handlers = list(logging.getLogger("transformers").handlers)
    capfd.readouterr()
    with propagating("llmclf"), caplog.at_level(logging.DEBUG, logger="llmclf"):
        Classifier.load(trained_run)
    err = capfd.readouterr().err
    assert not [text for text in CHATTER if text in err], err
    debug = [r.getMessage() for r in caplog.records if r.name == "llmclf" and r.levelno == logging.DEBUG]
    # The tiny model is a causal LM: its classification head is new, and transformers reports it.
    assert any("LOAD REPORT" in m and "newly initialized" in m for m in debug), debug
    # Put back as they were.
    assert warnings.filters == filters
    assert logging.getLogger("transformers").handlers == handlers
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_verbose_load_lets_the_libraries_print(trained_run, capfd, libraries_as_in_a_fresh_process):
    capfd.readouterr()
    Classifier.load(trained_run, verbose=True)
    assert "newly initialized" in capfd.readouterr().err


def test_load_in_a_fresh_process_prints_nothing(trained_run):
    """The first load of a process also imports bitsandbytes (through peft), which logs its note on a
    missing optional CPU kernel there; nothing on stderr, all of it in the log when asked for."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="LOG %(name)s %(message)s")
        from llmclf import Classifier
        sys.stderr.write("<load>\\n")
        sys.stderr.flush()
        Classifier.load({str(trained_run)!r})
        sys.stderr.write("</load>\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    during = done.stderr.split("<load>\n", 1)[1].split("</load>", 1)[0]
    assert during.strip() == "", during
    assert "LOAD REPORT" in done.stdout and "newly initialized" in done.stdout
