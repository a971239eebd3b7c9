"""Logging and progress bars, per thread.

Steps log notes with ``logging.getLogger(__name__)`` (names under ``workbench.``; the analyses
log under ``analyses.``) and draw bars with ``bar(...)`` (tqdm). Where they go is decided by the
caller, not the step: the CLI shows them on stderr (``setup_cli``); a UI job captures those of
its own thread (``capture``) while other threads keep theirs, without touching ``sys.stderr``.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from typing import IO, Iterator

LOGGERS = ("workbench", "analyses")
_local = threading.local()


def progress_stream() -> IO[str]:
    """Where this thread's progress bars go: the job's capture, else stderr."""
    return getattr(_local, "stream", None) or sys.stderr


def bar(**kw):
    """A tqdm bar on this thread's progress stream."""
    from tqdm.auto import tqdm
    kw.setdefault("dynamic_ncols", True)
    return tqdm(file=progress_stream(), **kw)


class _ShortName(logging.Formatter):
    """'features: message' (the module's last name), as the old stderr prefixes read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.name.rsplit('.', 1)[-1]}: {record.getMessage()}"


class _ThisThread(logging.Filter):
    def __init__(self, ident: int):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


def setup_cli(level: int = logging.INFO) -> None:
    """Show workbench / analyses log records on stderr (once per process)."""
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        if not any(getattr(h, "_workbench_cli", False) for h in lg.handlers):
            h = logging.StreamHandler()          # sys.stderr at the time of each write
            h.setFormatter(_ShortName())
            h._workbench_cli = True              # type: ignore[attr-defined]
            lg.addHandler(h)


@contextmanager
def capture(stream: IO[str], level: int = logging.INFO) -> Iterator[None]:
    """Send this thread's log records and progress bars to `stream` (a UI job's log) while the
    block runs; records of other threads are not touched."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_ShortName())
    handler.addFilter(_ThisThread(threading.get_ident()))
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for lg in loggers:
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)
        lg.addHandler(handler)
    old = getattr(_local, "stream", None)
    _local.stream = stream
    try:
        yield
    finally:
        _local.stream = old
        for lg in loggers:
            lg.removeHandler(handler)
