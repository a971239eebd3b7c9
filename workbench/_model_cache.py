"""The user cache of converted models: folders built once, atomically, and reused.

A cached model is a plain Hugging Face folder under `cache_root()`. It is built in a temp folder
next to its final place, a marker file is written last, and the temp folder is renamed into
place; a folder without the marker (a crash mid-build, a copy in progress) is never used. A lock
file keeps two processes from converting the same model at once (the second waits and reuses).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .results import atomic_write_json

MARKER = ".workbench-complete.json"


def cache_root() -> Path:
    """`$WORKBENCH_CACHE/models` when set, else `~/.cache/workbench/models`."""
    env = os.environ.get("WORKBENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"
    return base / "models"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:          # no flock (Windows): the atomic rename alone keeps it safe
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_folder(name: str, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """Return `cache_root()/name`, calling `build(tmp_dir)` first if it is not complete yet."""
    root = cache_root()
    target = root / name
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if is_complete(target):          # another process finished it while we waited
            return target
        # under the lock, anything half-built for this name is a leftover of a dead process
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)       # mkdtemp makes it 0700; a cache folder is ordinary
            t0 = time.time()
            build(tmp)
            info = dict(meta or {}, name=name, built_seconds=round(time.time() - t0, 2),
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            atomic_write_json(tmp / MARKER, info)     # fsynced before the folder is renamed
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
