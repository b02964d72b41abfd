"""Exceptions with a user-facing meaning.

`UserError` is bad input: the CLI prints its message as one line and exits with code 2.
Anything else that escapes a pass is a failure (exit code 1).
"""


class UserError(Exception):
    """Bad input or usage; the message says what is wrong and what to do."""


class PassFailed(Exception):
    """A pass ran but its result failed a check (e.g. validation above tolerance)."""
