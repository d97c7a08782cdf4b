"""The one exception type users see.

Anything the user can fix (a path, a column, a config value, a missing package or token) is raised as
`LlmclfError` with a message that says what was found and what to do. The command line prints the
message and exits with status 2, without a traceback; library callers can catch it.
"""


class LlmclfError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    exit_code = 2
