"""Command line: `llmclf train | predict | evaluate | export | serve | report | compare`.

User errors (`LlmclfError`) print one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import sys

from llmclf.cli import commands
from llmclf.cli.parser import build_parser
from llmclf.errors import LlmclfError
from llmclf.progress import log_to_stderr
from llmclf.reports.console import printable
from llmclf.runtime import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        quiet_libraries(args.verbose)
        log_to_stderr(args.quiet)
        return commands.dispatch(args)
    except LlmclfError as exc:
        if args.verbose:
            raise
        # the message may quote data (a label, a file name): control characters shown, not obeyed
        print("error: " + "\n".join(printable(line) for line in str(exc).split("\n")), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
