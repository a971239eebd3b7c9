"""Errors a user can act on. The CLI prints these as one line and exits 2; anything else is a bug
and shows its traceback (see ``BUG_HINT``).

The subclasses that also derive from a builtin (``OutputExists`` is a ``FileExistsError``, ...)
let callers that catch the builtin keep working, while the CLI and the UI tell them apart from
the same builtin raised by a bug deep inside a library."""

import difflib

BUG_HINT = ("this is a bug in workbench, not a problem with your input; please report it with the "
            "traceback above at the project's issue tracker (see README.md)")


class WorkbenchError(Exception):
    """Bad input or state, with a message that says what was wrong and what would be right."""


class StoreCorrupted(WorkbenchError):
    """A store file is missing, truncated or edited (the message names the file)."""


class OutputExists(WorkbenchError, FileExistsError):
    """The output folder already holds something we will not overwrite."""


class NotFound(WorkbenchError, FileNotFoundError):
    """An input file or folder the user named does not exist."""


class UnknownName(WorkbenchError, KeyError):
    """A name (run id, ...) the user gave is not known; str() is the message, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def closest(name: str, options, n: int = 5) -> str:
    """'did you mean' text: the closest valid names, for error messages."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=n, cutoff=0.5)
    if not close:
        close = options[:n]
    more = "" if len(options) <= n else f" (of {len(options)})"
    return ", ".join(close) + more


USER_ERRORS = (WorkbenchError,)
"""What the faces report as bad input (one line); everything else is reported as a bug."""


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)
