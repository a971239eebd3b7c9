"""Training data for the SAE trainer: the accepted source forms behind one interface (``_Source``) and a
resumable stream of global batches of exactly ``batch_size`` rows (``_Stream``). See train.py for the forms."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .._util import as_tensor


class SAETrainingError(RuntimeError):
    """Training cannot go on (NaN/inf or exploding loss, bad data, mismatched checkpoint)."""


class _Source:
    """Uniform view of the accepted sources: ``epoch(e)`` -> iterable of 2-D tensors."""

    def __init__(self, source: Any, batch_size: int, seed: int):
        self.rows_per_epoch: int | None = None
        self.seed = seed
        self.chunk = batch_size
        if isinstance(source, (torch.Tensor, np.ndarray)):
            X = as_tensor(source, name="activations")
            if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                X = X.float()
            self.X = X
            self.rows_per_epoch = X.shape[0]
            self.fn = self._tensor_epoch
        elif isinstance(source, (list, tuple)):
            batches = list(source)
            self.fn = lambda e: batches
        elif callable(source):
            try:
                sig = inspect.signature(source)
                takes = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                            for p in sig.parameters.values())
            except (TypeError, ValueError):
                takes = True
            self.fn = (lambda e: source(e)) if takes else (lambda e: source())
        else:
            raise TypeError("source must be a tensor/array [n, d], a callable epoch -> iterable of [b, d] "
                            f"batches, or a list of batches; got {type(source).__name__} (a one-shot "
                            "iterator cannot be re-read for later epochs or resume: wrap it in a callable)")

    def _tensor_epoch(self, e: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(self.X.shape[0], generator=g)
        for i in range(0, len(perm), self.chunk):
            yield self.X[perm[i:i + self.chunk]]

    def epoch(self, e: int) -> Iterable:
        return self.fn(e)

    def count_rows(self) -> int:
        if self.rows_per_epoch is None:
            self.rows_per_epoch = sum(int(_as_batch(b).shape[0]) for b in self.epoch(0))
        return self.rows_per_epoch


def _as_batch(b: Any) -> torch.Tensor:
    if isinstance(b, torch.Tensor) and b.ndim == 2:
        return b
    return as_tensor(b, name="batch", check_finite=False)


class _Stream:
    """Global batches of exactly ``batch_size`` rows; position = (epoch, rows of that epoch consumed)."""

    def __init__(self, src: _Source, batch_size: int, epoch: int = 0, offset: int = 0):
        self.src, self.B = src, batch_size
        self.epoch, self.offset = epoch, offset
        self._it: Iterator | None = None
        self._pending: torch.Tensor | None = None
        self.rows_seen = 0

    def _open(self) -> None:
        it = iter(self.src.epoch(self.epoch))
        skip = self.offset
        self._pending = None
        while skip > 0:
            try:
                b = _as_batch(next(it))
            except StopIteration:
                raise SAETrainingError(f"cannot resume: epoch {self.epoch} of the source has fewer than "
                                       f"{self.offset} rows now; the data changed since the checkpoint") from None
            if b.shape[0] <= skip:
                skip -= b.shape[0]
            else:
                self._pending = b[skip:]
                skip = 0
        self._it = it

    def state(self) -> tuple[int, int]:
        return self.epoch, self.offset

    def next(self) -> torch.Tensor:
        parts, need, empty_epochs = [], self.B, 0
        while need > 0:
            if self._it is None:
                self._open()
            if self._pending is not None:
                b, self._pending = self._pending, None
            else:
                try:
                    b = _as_batch(next(self._it))
                except StopIteration:
                    empty_epochs = empty_epochs + 1 if self.offset == 0 else 0
                    if empty_epochs >= 2:
                        raise SAETrainingError("the source yielded no rows") from None
                    self.epoch += 1
                    self.offset = 0
                    self._it = None
                    continue
            if b.shape[0] == 0:
                continue
            if b.shape[0] > need:
                self._pending = b[need:]
                b = b[:need]
            parts.append(b)
            need -= b.shape[0]
            self.offset += b.shape[0]
        self.rows_seen += self.B
        return torch.cat(parts) if len(parts) > 1 else parts[0]
