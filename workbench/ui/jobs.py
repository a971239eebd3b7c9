"""Background runs for the Run page: a step started from the browser runs in a thread (via
``workbench.steps.run_step``, which records it in the workspace index), its log records and
progress bars are captured per thread (``workbench.logs.capture``: nothing process-wide such as
sys.stderr is swapped), and the page polls the job for a live display.

The registry is module-global, so a job survives page switches and reruns of the same server."""

from __future__ import annotations

import io
import re
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import BUG_HINT, is_user_error

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
    log: io.StringIO = field(default_factory=lambda: _BoundedLog())
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


class _BoundedLog(io.StringIO):
    """A job's log: keeps the last _MAX_LOG // 2 characters once it grows past _MAX_LOG."""

    def write(self, s: str) -> int:
        if self.tell() > _MAX_LOG:
            tail = self.getvalue()[-_MAX_LOG // 2:]
            self.seek(0)
            self.truncate()
            super().write(tail)
        return super().write(s)

    def isatty(self) -> bool:
        return False


def _work(job: Job, cfg: Any) -> None:
    from workbench.logs import capture
    from workbench.steps import run_step

    job.status = "running"
    try:
        with capture(job.log):
            job.result = run_step(job.step, cfg, workspace=job.workspace)
        job.status = "done"
    except BaseException as e:  # noqa: BLE001 - reported on the page
        job.error = str(e) if is_user_error(e) else f"{type(e).__name__}: {e}"
        if not is_user_error(e):
            job.log.write("\n" + traceback.format_exc(limit=8) + BUG_HINT + "\n")
        job.status = "failed"
    finally:
        job.ended = time.time()


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
