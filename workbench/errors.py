"""Errors a user can act on. The CLI prints these as one line and exits 2; anything else is a bug."""

import difflib


class WorkbenchError(Exception):
    """Bad input or state, with a message that says what was wrong and what would be right."""


class StoreCorrupted(WorkbenchError):
    """A store file is missing, truncated or edited (the message names the file)."""


def closest(name: str, options, n: int = 5) -> str:
    """'did you mean' text: the closest valid names, for error messages."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=n, cutoff=0.5)
    if not close:
        close = options[:n]
    more = "" if len(options) <= n else f" (of {len(options)})"
    return ", ".join(close) + more


USER_ERRORS = (WorkbenchError, ValueError, FileNotFoundError, FileExistsError, KeyError,
               NotADirectoryError, IsADirectoryError, PermissionError)
