"""Small helpers shared by the analyses: input conversion, device choice, validation."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 0


@contextmanager
def torch_single_thread():
    """torch intra-op threads at 1 while the block runs. torch's setting is process-wide, so
    concurrent users (UI jobs run in threads) share one counted scope: the first one in saves
    and lowers it, the last one out restores it (a plain save/set/restore per caller could
    leave the process at 1 thread when two overlap)."""
    global _THREADS_USERS, _THREADS_SAVED
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def resolve_device(device: str | torch.device | None = "auto",
                   like: torch.Tensor | None = None) -> torch.device:
    """The one device rule. An explicit device is used as given. 'auto' (or '') -> the device of
    `like` (data the caller already holds) when that is an accelerator, else cuda when available,
    else cpu. None -> 'auto', except that with `like` it means "where the data is" (no move)."""
    if device is None and like is not None:
        return like.device
    if device is None or device in ("auto", ""):
        if like is not None and like.device.type != "cpu":
            return like.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# The one name -> torch dtype map (stores, models and SAEs each accept a subset of it; see
# `dtype_key`). Aliases are the spellings users and other libraries write (SAELens: "torch.float32").
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64",
                 "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_key(dtype: str | torch.dtype, allowed=DTYPES) -> str:
    """'float16', 'torch.float16', 'fp16', 'half' or torch.float16 -> 'float16' (the key in DTYPES);
    ValueError naming the `allowed` keys for anything else."""
    key = str(dtype).strip().lower()
    key = key[len("torch."):] if key.startswith("torch.") else key
    key = DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return key


def as_tensor(x: Any, *, name: str = "X", dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, check_finite: bool = True) -> torch.Tensor:
    """numpy / torch / nested lists -> 2-D tensor [n, d]; clear errors for wrong shape or NaN/inf."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"{name} must be a torch tensor or numpy array [n, d], got {type(x).__name__}") from e
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d] (rows = datapoints), got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        t = t.to(torch.float64)
    if dtype is not None or device is not None:
        t = t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)
    if check_finite:
        check_finite_rows(t, name)
    return t


def check_finite_rows(t: torch.Tensor, name: str = "X", offset: int = 0) -> None:
    """Raise naming the first row with NaN / inf (offset: row number of t[0] in the whole input)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row = int(bad.any(dim=-1).nonzero()[0, 0]) + offset
        raise ValueError(f"{name} has NaN or inf values (first bad row: {row}); "
                         "clean or drop those rows before analysing")


def iter_batches(source: Any) -> Iterator[torch.Tensor]:
    """A tensor/array is one batch; an iterable of batches is passed through."""
    if isinstance(source, (torch.Tensor, np.ndarray)):
        yield as_tensor(source, check_finite=False)
        return
    if callable(source):
        source = source()
    for b in source:
        yield as_tensor(b, check_finite=False)


def is_batch_iterable(x: Any) -> bool:
    return not isinstance(x, (torch.Tensor, np.ndarray)) and isinstance(x, Iterable)


def atomic_write(path, write, mode: str = "w") -> None:
    """Write `path` via a temp file in the same folder + fsync + rename, so readers (and a resume
    after a kill) see the old file or the new one, never half of one. `write(f)` fills the file."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- BLAS threads
_BLAS_LOCK = None
_BLAS_POOL = None
_BLAS_CTL = None


def _controller():
    global _BLAS_CTL
    if _BLAS_CTL is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CTL = ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - no threadpoolctl or no BLAS found: run serially
            _BLAS_CTL = False
    return _BLAS_CTL


def blas_threads() -> int:
    """Threads numpy's BLAS would use for one call (1 when that cannot be found out)."""
    ctl = _controller()
    if not ctl or not ctl.lib_controllers:
        return 1
    return max(1, min(c.num_threads for c in ctl.lib_controllers))


@contextmanager
def blas_single_thread():
    """numpy's BLAS limited to one thread per call while inside; yields a thread pool with one
    worker per former BLAS thread, so independent single-threaded products run side by side.
    Serialised by a lock (the BLAS thread count is process-wide); a forked child makes its own
    pool and lock (threads do not survive a fork)."""
    global _BLAS_LOCK, _BLAS_POOL
    if _BLAS_LOCK is None or _BLAS_LOCK[0] != os.getpid():
        _BLAS_LOCK = (os.getpid(), threading.Lock())
        _BLAS_POOL = None
    n = blas_threads()
    with _BLAS_LOCK[1]:
        if _BLAS_POOL is None or _BLAS_POOL._max_workers < n:
            _BLAS_POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="workbench-blas")
        with _controller().limit(limits=1):
            yield _BLAS_POOL


_LIBC: Any = None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Long
    streamed passes free large buffers every batch; glibc raises its mmap threshold after such frees and
    then keeps the freed memory in its heap, so resident memory crept up with the rows streamed
    (features over 2M rows: 5.6 GB anonymous memory, ~2.3 KB per row). Trimming every few batches keeps
    it flat, at ~1 ms a call."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
