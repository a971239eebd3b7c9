"""Background runs for the Run page: a step started from the browser runs in a thread (via
``workbench.steps.run_step``, which records it in the workspace index), its stderr (tqdm progress
bars, log lines) is captured per thread, and the page polls the job for a live display.

The registry is module-global, so a job survives page switches and reruns of the same server."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

_LOCK = threading.Lock()
JOBS: dict[str, "Job"] = {}
_PCT = re.compile(r"(\d{1,3})%\|")
_MAX_LOG = 200_000


@dataclass
class Job:
    id: str
    step: str
    config: dict[str, Any]
    workspace: str
    status: str = "queued"            # queued | running | done | failed
    started: float = field(default_factory=time.time)
    ended: float | None = None
    log: io.StringIO = field(default_factory=io.StringIO)
    result: Any = None
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started

    def log_text(self) -> str:
        """The captured stderr with carriage-return redraws (tqdm) collapsed to their last state."""
        raw = self.log.getvalue()
        lines = []
        for line in raw.split("\n"):
            lines.append(line.split("\r")[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r"))
        return "\n".join(lines).strip("\n")

    def progress(self) -> float | None:
        """Fraction done of the latest tqdm bar, when there is one."""
        m = list(_PCT.finditer(self.log.getvalue()[-4000:]))
        return None if not m else min(100, int(m[-1].group(1))) / 100.0


class _ThreadStderr:
    """sys.stderr replacement: writes from a job's thread go to its log (and nowhere else),
    everything else to the real stderr."""

    def __init__(self, real):
        self._real = real
        self._routes: dict[int, io.StringIO] = {}

    def route(self, ident: int, buf: io.StringIO | None) -> None:
        if buf is None:
            self._routes.pop(ident, None)
        else:
            self._routes[ident] = buf

    def _target(self):
        return self._routes.get(threading.get_ident(), self._real)

    def write(self, s):
        t = self._target()
        if t is not self._real and t.tell() > _MAX_LOG:   # keep memory bounded
            tail = t.getvalue()[-_MAX_LOG // 2:]
            t.seek(0)
            t.truncate()
            t.write(tail)
        return t.write(s)

    def flush(self):
        t = self._target()
        if hasattr(t, "flush"):
            t.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._real, name)


def _router() -> _ThreadStderr:
    with _LOCK:
        if not isinstance(sys.stderr, _ThreadStderr):
            sys.stderr = _ThreadStderr(sys.stderr)
        return sys.stderr


def _work(job: Job, cfg: Any) -> None:
    from workbench.steps import run_step

    router = _router()
    router.route(threading.get_ident(), job.log)
    job.status = "running"
    try:
        job.result = run_step(job.step, cfg, workspace=job.workspace)
        job.status = "done"
    except BaseException as e:  # noqa: BLE001 - reported on the page
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        job.error = f"{type(e).__name__}: {msg}" if not _is_user_error(e) else str(msg)
        job.status = "failed"
    finally:
        job.ended = time.time()
        router.route(threading.get_ident(), None)


def _is_user_error(e: BaseException) -> bool:
    from workbench.errors import USER_ERRORS
    return isinstance(e, USER_ERRORS)


def start(step: str, cfg: Any, config: dict[str, Any], workspace: str) -> Job:
    """Start `run_step(step, cfg, workspace=workspace)` in a daemon thread."""
    job = Job(id=uuid.uuid4().hex[:8], step=step, config=config, workspace=workspace)
    job.thread = threading.Thread(target=_work, args=(job, cfg), name=f"workbench-{step}-{job.id}",
                                  daemon=True)
    with _LOCK:
        JOBS[job.id] = job
    job.thread.start()
    return job


def jobs(workspace: str | None = None) -> list[Job]:
    """Jobs started from this server, newest first (optionally only those of one workspace)."""
    with _LOCK:
        out = list(JOBS.values())
    if workspace is not None:
        out = [j for j in out if j.workspace == workspace]
    return sorted(out, key=lambda j: j.started, reverse=True)


def wait(job: Job, timeout: float | None = None) -> Job:
    if job.thread is not None:
        job.thread.join(timeout)
    return job
