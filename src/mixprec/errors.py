"""Errors mixprec raises for bad input.

``UsageError`` is a ``ValueError`` so Python callers can catch it as one; the CLI turns it
into a one-line message and exit code 2. Anything else escaping the CLI is a bug.
"""


class UsageError(ValueError):
    """Bad input from the user: a policy, file, task path, flag or checkpoint."""
