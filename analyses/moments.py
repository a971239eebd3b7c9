"""Streaming first and second moments in float64, the shared hot path of PCA and the subspace
comparisons: one pass over rows (a tensor, an array or batches from a store), shifted so a large
common offset costs no precision, with the CPU work shared out to one single-threaded BLAS
product per core."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ._util import blas_single_thread, blas_threads, check_finite_rows, torch_single_thread

__all__ = ["MomentAccumulator", "small_linalg", "as_batch", "CHUNK_ROWS", "PRECISIONS", "resolve_precision"]

CHUNK_ROWS = 8192          # rows per product on CUDA and at most on CPU (CPU chunks are sized to ~8 MiB)


@contextmanager
def small_linalg(t: torch.Tensor, max_d: int = 4096):
    """Run CPU LAPACK calls on small (d <= max_d) matrices single-threaded.

    Multi-threaded eigh/svd of a few-hundred-wide matrix gains little on an idle machine but slows
    down 20x or more when the cores are shared (OpenMP threads waiting on each other): measured
    4-6 s vs 0.2 s for a 576 x 576 eigh on a busy 2-core machine. GEMMs keep all threads."""
    if t.device.type != "cpu" or t.shape[-1] > max_d or torch.get_num_threads() == 1:
        yield
        return
    with torch_single_thread():     # counted: safe when UI jobs overlap in threads
        yield


def as_batch(b: Any) -> torch.Tensor:
    if isinstance(b, np.ndarray):
        b = torch.from_numpy(np.ascontiguousarray(b))
    elif not isinstance(b, torch.Tensor):
        b = torch.as_tensor(np.asarray(b))
    if b.ndim != 2:
        raise ValueError(f"batches must be 2-D [b, d] (rows = datapoints), got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        b = b.to(torch.float64)
    return b.detach()


PRECISIONS = ("auto", "mixed", "float64", "exact")


def resolve_precision(precision: str) -> str:
    """"exact" is an alias of "float64"; "auto" stays until the first batch shows its dtype:
    float64 rows -> "float64", float32 / half rows -> "mixed"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} ('mixed': float32 products "
                         f"per chunk added in float64, ~2e-8 relative error; 'float64'/'exact': float64 "
                         f"products; 'auto': mixed for float32/half rows, float64 for float64 rows), "
                         f"got {precision!r}")
    return "float64" if precision == "exact" else precision


class MomentAccumulator:
    """Streaming mean and (co)variance in float64 with a shift, on `device`.

    ``update(batch)`` adds rows; ``mean()``, ``scatter()`` (sum of centred outer products) and
    ``covariance()`` (scatter / (n - 1)) read the result.

    On CPU a batch is cut into row blocks that the BLAS threads share out: each thread centres its
    own cache-sized chunks and takes their symmetric rank-k product (syrk) single-threaded into
    its own float64 sums, which are added at the end. One multi-threaded syrk per chunk would
    leave a core idle (or spinning) while the other centres the next chunk; this way both cores do
    both. Sums therefore depend on the thread count at the last float64 digit (~1e-16 relative),
    nothing more. CUDA uses torch on the device (float64 products whatever ``precision``).

    ``precision`` defaults to "float64" here because the single-pair similarity functions built on
    it are the references checked against the published implementations; PCA defaults to "auto".
    """

    def __init__(self, d: int | None = None, device: torch.device | str = "cpu", name: str = "X",
                 check_finite: bool = True, precision: str = "float64"):
        self.precision = resolve_precision(precision)      # "auto" is decided by the first batch
        self.device = torch.device(device)
        self.d = d
        self.n = 0
        self.name = name
        self.check_finite = check_finite
        self._shift = None      # float64 [d]
        self._sum = None        # float64 [d] per CPU worker: sum of (x - shift)
        self._S = None          # float64 [d, d] per CPU worker: sum of (x - shift)(x - shift)^T
        self._bufs: dict[int, np.ndarray] = {}
        self._numpy = self.device.type == "cpu"   # False: the torch path (CUDA; tests run it on CPU)

    def _init(self, first: torch.Tensor) -> None:
        d = first.shape[1]
        if self.d is not None and self.d != d:
            raise ValueError(f"{self.name}: batch has {d} columns, expected {self.d}")
        self.d = d
        if self.precision == "auto":           # float64 rows keep float64 maths; narrower rows go mixed
            self.precision = "float64" if first.dtype == torch.float64 else "mixed"
        head = first[:1024]
        shift = head.cpu().numpy().mean(0, dtype=np.float64) if head.device.type == "cpu" and \
            head.dtype in (torch.float32, torch.float64) else head.to(torch.float64).mean(0).cpu().numpy()
        if self.precision == "mixed":
            shift = shift.astype(np.float32).astype(np.float64)   # float32 chunks centre exactly on it
        if self._numpy:
            self._shift = shift
            self._shift32 = shift.astype(np.float32)
            self._sum, self._S = [], []
        else:
            self._shift = torch.from_numpy(shift).to(self.device)
            self._sum = torch.zeros(d, dtype=torch.float64, device=self.device)
            self._S = torch.zeros((d, d), dtype=torch.float64, device=self.device)

    def update(self, batch: Any) -> "MomentAccumulator":
        b = as_batch(batch)
        if b.shape[0] == 0:
            return self
        if self._S is None:
            self._init(b)
        if b.shape[1] != self.d:
            raise ValueError(f"{self.name}: batch has {b.shape[1]} columns, expected {self.d} "
                             f"(shape {tuple(b.shape)})")
        if self._numpy:
            self._update_cpu(b.cpu())
        else:
            for s in range(0, b.shape[0], CHUNK_ROWS):
                self._update_torch(b[s:s + CHUNK_ROWS])
        return self

    # ---------------------------------------------------------------- CPU
    def _chunk_rows(self) -> int:
        item = 4 if self.precision == "mixed" else 8
        return int(min(CHUNK_ROWS, max(256, (8 << 20) // (self.d * item))))

    def _update_cpu(self, b: torch.Tensor) -> None:
        m, rows = b.shape[0], self._chunk_rows()
        workers = min(blas_threads(), -(-m // rows))
        while len(self._S) < max(workers, 1):      # one float64 accumulator per worker
            self._S.append(np.zeros((self.d, self.d)))
            self._sum.append(np.zeros(self.d))
        if workers <= 1:
            self._accumulate(0, b, self.n)
        else:
            per = -(-m // workers)
            parts = [(i, b[s:s + per], self.n + s) for i, s in enumerate(range(0, m, per))]
            with blas_single_thread() as pool:
                futures = [pool.submit(self._accumulate, *p) for p in parts]
                errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        self.n += m

    def _accumulate(self, w: int, b: torch.Tensor, offset: int) -> None:
        """Worker `w`: centre `b` chunk by chunk on the shift and add its sums (rows start at `offset`)."""
        dt = np.float32 if self.precision == "mixed" else np.float64
        shift = self._shift32 if dt is np.float32 else self._shift
        rows = self._chunk_rows()
        buf = self._bufs.get(w)
        if buf is None or buf.shape[0] < rows or buf.dtype != dt:
            buf = self._bufs[w] = np.empty((rows, self.d), dtype=dt)
        S, total = self._S[w], self._sum[w]
        for s in range(0, b.shape[0], rows):
            c = b[s:s + rows]
            if c.dtype not in (torch.float32, torch.float64):
                c = c.to(torch.float32)
            a = c.numpy()
            x = buf[:a.shape[0]]
            # precision="mixed": centre in float32 (exact when x and the shift are close: Sterbenz)
            # and take each chunk's product in float32, adding chunks in float64: the speed of a
            # float32 product without the large-mean cancellation of X^T X - n mu mu^T (relative
            # error ~1e-7 typical, ~1e-5 with a mean 1e4 x the spread, vs 3e-4 for float32 X^T X).
            np.subtract(a, shift, out=x)
            colsum = x.sum(0, dtype=np.float64) if dt is np.float64 else x.sum(0).astype(np.float64)
            if self.check_finite and not np.isfinite(colsum).all():
                check_finite_rows(c, self.name, offset=offset + s)
                raise ValueError(f"{self.name}: values too large: the float64 sums overflow "
                                 f"(rows {offset + s}..{offset + s + a.shape[0] - 1})")
            total += colsum
            S += x.T @ x                                   # numpy -> BLAS syrk
    # ---------------------------------------------------------------- CUDA (torch on the device)
    def _update_torch(self, c: torch.Tensor) -> None:
        c = c.to(self.device, non_blocking=True)
        buf = c.to(torch.float64) - self._shift
        colsum = buf.sum(0)
        if self.check_finite and not bool(torch.isfinite(colsum).all()):
            check_finite_rows(c, self.name, offset=self.n)
            raise ValueError(f"{self.name}: values too large: the float64 sums overflow")
        self._sum += colsum
        self._S.addmm_(buf.T, buf)
        self.n += c.shape[0]

    # ---------------------------------------------------------------- results
    def _totals(self):
        if isinstance(self._S, list):
            return self._sum_list(self._sum), self._sum_list(self._S)
        return self._sum, self._S

    @staticmethod
    def _sum_list(xs):
        out = xs[0].copy()
        for x in xs[1:]:
            out += x
        return out

    def mean(self) -> torch.Tensor:
        self._need()
        total, _ = self._totals()
        mean = self._shift + total / self.n
        return torch.from_numpy(mean) if isinstance(mean, np.ndarray) else mean.clone()

    def scatter(self) -> torch.Tensor:
        """sum_i (x_i - mean)(x_i - mean)^T, float64 [d, d] on the accumulator's device."""
        self._need()
        total, S = self._totals()
        delta = total / self.n
        if isinstance(delta, np.ndarray):
            S = S - self.n * np.outer(delta, delta)
            return torch.from_numpy((S + S.T) * 0.5)
        S = S - self.n * torch.outer(delta, delta)
        return (S + S.T) * 0.5

    def covariance(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError(f"{self.name}: need at least 2 rows for a covariance, got {self.n}")
        return self.scatter() / (self.n - 1)

    def _need(self):
        if self._S is None or self.n == 0:
            raise ValueError(f"{self.name} is empty (no rows)")
