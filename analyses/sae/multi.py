"""Many SAEs from one stream of batches: every global batch is read (or computed) once and fed to all
of them (the "many SAEs, one pass" of sparsify, and SAELens issue 540).

``source`` forms (all give, per step, a batch of exactly ``batch_size`` rows for every hook):

* a tensor / array [n, d] (one hook) or a dict ``{hook: tensor [n, d_hook]}`` with the same rows;
* a callable ``source(epoch)`` -> iterable of batches, each a tensor (one hook) or a dict
  ``{hook: Tensor[b, d_hook]}`` (same rows for every hook), the same for the same epoch;
* a list of such batches;
* a *resumable stream* (e.g. ``workbench.model_stream.ModelStream``): an object with ``widths``
  ({hook: d}), ``start`` (its initial position) and ``open(batch_size, pos)`` returning an iterator-like
  object with ``next() -> {hook: Tensor[batch_size, d]}`` (raising :class:`SourceExhausted` at the end of
  the data) and ``state() -> tuple`` (the position to reopen at). It is never re-read from the start.

Each spec is a dict: ``hook`` (may be omitted with one hook), ``arch``, ``d_sae``, ``k``, ``lr``, ``seed``,
``checkpoint_dir``, ``metadata``, ``calibration``, ``warmup_steps``, ``decay_frac``, ``b_dec_init``,
``normalize``, ``init``, ``subspace``, ``keep_subspace`` and architecture options. Every SAE keeps its own
optimiser, RNG state, checkpoint (fingerprint) and schedule, and the step loop is the single-SAE trainer's
own (``_Trainer._one_step``), so an SAE ends with the same weights as ``train_sae`` run alone on the same
batches with the same seed; each resumes from its own checkpoint (SAEs that are ahead skip batches until
the others catch up). Shared by all: ``n_tokens`` and ``batch_size`` (one stream), and the data order,
seeded by ``data_seed`` (default: the first spec's seed, which is what ``train_sae`` uses for a tensor).

Data parallel (``torchrun``, or a process group already initialised), as ``train_sae``: every rank reads
the same global batches (the sources above are seeded, a model stream gathers its split forward), each SAE's
step trains on this rank's slice with gradients and statistics all-reduced, rank 0 alone writes checkpoints
and shows progress, so N ranks end with the one-process weights up to float rounding.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from typing import Any, Callable

import torch

from .._util import check_finite_rows
from ._source import SAETrainingError, _Source, _Stream, _as_batch
from .train import (CALIBRATION_TOKENS, MAX_BATCH, RunSettings, _subspace_init, _Trainer, default_batch_size,
                    default_dead_tokens, init_seed, make_sae, setup_dist)
from .registry import get_arch
from .base import Collective

__all__ = ["train_saes", "SourceExhausted"]
log = logging.getLogger(__name__)

SPEC_KEYS = {"hook", "arch", "d_sae", "k", "lr", "seed", "checkpoint_dir", "metadata", "calibration",
             "warmup_steps", "decay_frac", "b_dec_init", "normalize", "init", "subspace", "keep_subspace"}


class SourceExhausted(Exception):
    """Raised by a resumable stream's ``next()`` when its data ends (a corpus shorter than the budget)."""


# ------------------------------------------------------------------------------------- sources

def _cat(b: Any, hooks: list[str] | None) -> torch.Tensor:
    if isinstance(b, dict):
        parts = [_as_batch(b[h]) for h in hooks]
        n = {int(p.shape[0]) for p in parts}
        if len(n) != 1:
            raise ValueError(f"a batch has different row counts per hook ({sorted(n)}); every hook must give "
                             "the same rows")
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return _as_batch(b)


class _Columns:
    """A concatenated-columns source ([b, sum d]) split back per hook; drives ``_Stream``."""

    start = (0, 0)

    def __init__(self, source: Any, batch_size: int, seed: int):
        if isinstance(source, dict):          # {hook: tensor}: one tensor, shuffled like train_sae's
            ts = {h: torch.as_tensor(v) for h, v in source.items()}
            self.hooks = list(ts)
            self.widths = {h: int(t.shape[1]) for h, t in ts.items()}
            self.flat = self.inner = _Source(_cat(ts, self.hooks), batch_size, seed)
            return
        self.inner = _Source(source, batch_size, seed)
        first = next(iter(self.inner.epoch(0)), None)
        if first is None:
            raise SAETrainingError("the source yielded no rows")
        if isinstance(first, dict):
            self.hooks = list(first)
            self.widths = {h: int(_as_batch(first[h]).shape[1]) for h in self.hooks}
            self.flat = _Source(lambda e: (_cat(b, self.hooks) for b in self.inner.epoch(e)), batch_size, seed)
            self.flat.rows_per_epoch = self.inner.rows_per_epoch
        else:
            self.hooks = [None]
            self.widths = {None: int(_as_batch(first).shape[1])}
            self.flat = self.inner

    def slices(self) -> dict[Any, slice]:
        out, i = {}, 0
        for h in self.hooks:
            out[h] = slice(i, i + self.widths[h])
            i += self.widths[h]
        return out

    def open(self, batch_size: int, pos: tuple) -> "_ColumnStream":
        return _ColumnStream(_Stream(self.flat, batch_size, *pos), self.slices())


class _ColumnStream:
    def __init__(self, stream: _Stream, slices: dict):
        self.stream, self.slices = stream, slices

    def next(self) -> dict:
        x = self.stream.next()
        return {h: x[:, s] for h, s in self.slices.items()}

    def state(self) -> tuple:
        return self.stream.state()


class _Replay:
    """The reader that gave the first batch, replaying it once (a model stream computes it only once)."""

    def __init__(self, reader: Any, first: dict, start: tuple):
        self.reader, self.first, self.start = reader, first, start

    def next(self) -> dict:
        if self.first is not None:
            b, self.first = self.first, None
            return b
        return self.reader.next()

    def state(self) -> tuple:
        return self.start if self.first is not None else self.reader.state()


class _Feed:
    """What a trainer sees as its stream: the batch the driver handed it, at the shared position."""

    def __init__(self, driver: "_Driver"):
        self.driver, self.batch = driver, None

    def next(self) -> torch.Tensor:
        b, self.batch = self.batch, None
        return b

    def state(self) -> tuple:
        return tuple(self.driver.stream.state())


class _MultiTrainer(_Trainer):
    hook: Any = None
    rng: Any = None
    cal: Any = None            # deque of the last training batches (BatchTopK threshold)
    reopen: Callable | None = None

    def _calibration_batches(self, calibration: Any):
        if calibration is not None:
            return super()._calibration_batches(calibration)
        run, st = self.run, self.st
        n = run.calibration_batches()
        out = list(self.cal or [])
        if len(out) < n and st.cal_pos is not None:      # resumed inside the calibration window: re-read
            stream = self.reopen(st.cal_pos)
            out = [stream.next()[self.hook] for _ in range(n)]
        if not out:
            raise ValueError("no batches to calibrate the threshold on")
        xs = [b.to(self.dev, torch.float32) * st.scale for b in out]
        for i, b in enumerate(xs):
            check_finite_rows(b, f"calibration batch {i}")
        return xs, {"data": "last_training_batches", "tokens": int(sum(b.shape[0] for b in xs)), "batches": len(xs)}


# ------------------------------------------------------------------------------------- driver

def _is_stream(source: Any) -> bool:
    return hasattr(source, "open") and hasattr(source, "widths") and not isinstance(source, dict)


def train_saes(source: Any, specs: list[dict], n_tokens: int | None = None, batch_size: int | None = None,
               device: str = "auto", checkpoint_every: int | None = None, progress: Any = True, *,
               data_seed: int | None = None, autocast: bool | None = None,
               calibration_tokens: int = CALIBRATION_TOKENS, log_every: int = 10,
               callback: Callable[[int, int, dict], None] | None = None, on_error: str = "raise") -> list:
    """Train one SAE per spec from one pass over ``source``; returns the SAEs in spec order (with
    ``on_error="keep"``, an SAE that diverged is replaced by its :class:`SAETrainingError` and the others
    go on). ``callback(i, step, info)`` after each SAE's step. See the module docstring."""
    if not specs:
        raise ValueError("give at least one SAE spec")
    if on_error not in ("raise", "keep"):
        raise ValueError(f"on_error must be raise or keep, got {on_error!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, s in enumerate(specs):
        get_arch(s.get("arch", "topk"))
        if s.get("lr") is not None and not float(s["lr"]) > 0:
            raise ValueError(f"spec {i}: lr must be > 0, got {s['lr']!r}")
    coll, own_pg, dev = setup_dist(device)      # data parallel under torchrun (see the module docstring)
    try:
        return _train(source, specs, n_tokens, batch_size, dev, coll, checkpoint_every,
                      progress if coll.rank == 0 else False, data_seed, autocast, calibration_tokens, log_every,
                      callback, on_error)
    finally:
        if own_pg:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(source, specs, n_tokens, batch_size, dev, coll, checkpoint_every, progress, data_seed, autocast,
           calibration_tokens, log_every, callback, on_error) -> list:
    dseed = int(specs[0].get("seed", 0) if data_seed is None else data_seed)
    if _is_stream(source):
        if n_tokens is None:
            raise ValueError("n_tokens is needed with a stream source (it is never counted in advance)")
        src = source
    else:
        src = _Columns(source, batch_size or MAX_BATCH, dseed)
    hooks = list(src.widths)
    for i, s in enumerate(specs):
        h = s.get("hook", hooks[0] if len(hooks) == 1 else "")
        if h not in src.widths and hooks != [None]:
            raise ValueError(f"spec {i}: hook {h!r} is not in the source; it has {', '.join(map(str, hooks))}")
    if batch_size is None:
        batch_size = default_batch_size(int(n_tokens) if n_tokens is not None else src.flat.count_rows())
        if not _is_stream(source):
            src.flat.chunk = src.inner.chunk = batch_size
    drv = _Driver(src, batch_size, dev, coll)
    trainers, workspace = [], {}
    for i, s in enumerate(specs):
        trainers.append(drv.build(i, s, n_tokens, checkpoint_every, autocast, calibration_tokens, log_every))
        trainers[-1].workspace = workspace      # one pre-activation buffer per shape, shared by the pass
    return drv.run(trainers, progress, callback, on_error)


class _Driver:
    def __init__(self, src: Any, batch_size: int, dev: torch.device, coll: Collective):
        self.src, self.B, self.dev, self.coll = src, batch_size, dev, coll
        self._first: dict | None = None
        self._first_reader: Any = None
        self.stream = None

    def first(self) -> dict:
        if self._first is None:
            self._first_reader = self.src.open(self.B, tuple(self.src.start))
            self._first = self._first_reader.next()
        return self._first

    def build(self, i: int, s: dict, n_tokens, checkpoint_every, autocast, calibration_tokens, log_every):
        s = dict(s)
        hook = s.pop("hook", None)
        hook = hook if hook in self.src.widths else next(iter(self.src.widths))   # one unnamed hook
        arch, d_sae, k = s.pop("arch", "topk"), s.pop("d_sae", None), s.pop("k", None)
        seed, lr = int(s.pop("seed", 0)), s.pop("lr", None)
        ckpt, metadata, calibration = s.pop("checkpoint_dir", None), s.pop("metadata", None), s.pop("calibration", None)
        init, subspace, keep = s.pop("init", "random"), s.pop("subspace", None), s.pop("keep_subspace", False)
        d_in = int(self.src.widths[hook])
        run = RunSettings.build(arch=arch, d_in=d_in, d_sae=d_sae, k=k, n_tokens=n_tokens,
                                src=getattr(self.src, "flat", None), batch_size=self.B, lr=lr, seed=seed,
                                dev=self.dev, checkpoint_every=checkpoint_every,
                                warmup_steps=s.pop("warmup_steps", None), decay_frac=s.pop("decay_frac", 0.2),
                                b_dec_init=s.pop("b_dec_init", "median"), normalize=s.pop("normalize", True),
                                autocast=autocast, calibration_tokens=calibration_tokens)
        torch.manual_seed(seed)
        sae = make_sae(arch, d_in, run.d_sae, k, device="cpu", metadata=dict(metadata or {}), **s)
        sae.reset_parameters(torch.Generator().manual_seed(init_seed(seed)))
        resumes = ckpt is not None and (os.path.exists(os.path.join(ckpt, "checkpoint.pt")))
        need_first = init != "random" or not resumes
        first = self.first()[hook] if need_first else None
        keep_basis = _subspace_init(sae, first, init, subspace, keep, seed) if init != "random" else \
            _subspace_init(sae, None, init, subspace, keep, seed)
        if "dead_tokens" in type(sae).options and sae.cfg.dead_tokens is None:
            sae.cfg.dead_tokens = default_dead_tokens(run.total, self.B, sae.cfg.d_sae, sae.cfg.k)
        tr = _MultiTrainer(sae, run, getattr(self.src, "flat", None), self.coll, self.dev, ckpt, False, None, log_every)
        tr.keep_basis = keep_basis.to(self.dev) if keep_basis is not None else None
        if init != "random":
            tr.fingerprint["init"] = dict(sae.cfg.metadata["workbench"]["init"])
        tr.start(first)
        tr.stream, tr.hook, tr.index, tr.calibration, tr.error = _Feed(self), hook, i, calibration, None
        tr.reopen = lambda pos: self.src.open(self.B, tuple(pos))
        tr.rng = torch.get_rng_state()
        tr.rng_cuda = torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None
        tr.cal = collections.deque(maxlen=run.calibration_batches()) if sae.needs_calibration else None
        return tr

    def _swap_in(self, tr) -> None:
        torch.set_rng_state(tr.rng)
        if tr.rng_cuda is not None:
            torch.cuda.set_rng_state(tr.rng_cuda, self.dev)

    def _swap_out(self, tr) -> None:
        tr.rng = torch.get_rng_state()
        if tr.rng_cuda is not None:
            tr.rng_cuda = torch.cuda.get_rng_state(self.dev)

    def run(self, trainers: list, progress, callback, on_error) -> list:
        total = trainers[0].run.total
        if any(t.run.total != total for t in trainers):   # all share n_tokens and batch_size: a bug
            raise AssertionError("SAEs of one pass must share the number of steps")
        g = min(t.st.step for t in trainers)
        lead = next(t for t in trainers if t.st.step == g)
        if self._first is not None and tuple(lead.st.pos) == tuple(self.src.start):
            self.stream = _Replay(self._first_reader, self._first, tuple(self.src.start))  # no second read
        else:
            self.stream = self.src.open(self.B, tuple(lead.st.pos))
        bar = _bar(progress, total * self.B, g * self.B, len(trainers)) if g < total else None
        import time
        t0 = time.time()
        for t in trainers:
            t.bar, t.t_start = None, t0
            t.sae.train()
        self.exhausted = None
        try:
            while g < total:
                pos = tuple(self.stream.state())
                try:
                    batch = self.stream.next()
                except SourceExhausted as e:
                    self.exhausted = {"steps": g, "tokens": g * self.B, "budget_tokens": total * self.B,
                                      "reason": str(e)}
                    log.warning("the data ended after %d of %d steps (%d of %d tokens): finishing the SAEs "
                                "with the tokens seen", g, total, g * self.B, total * self.B)
                    break
                for t in trainers:
                    if t.error is not None or t.st.step != g:
                        continue
                    if g == total - t.run.calibration_batches():
                        t.st.cal_pos = pos
                    x = batch[t.hook]
                    if t.cal is not None:
                        t.cal.append(x)
                    t.stream.batch = x
                    self._swap_in(t)
                    try:
                        t._one_step()
                        if t.ckpt is not None and (t.st.step % t.run.every == 0 or t.st.step == total):
                            t._write_checkpoint()
                    except SAETrainingError as e:
                        if on_error == "raise":
                            raise
                        t.error = e
                        log.error("SAE %d (%s) stopped: %s", t.index, t.hook, e)
                    finally:
                        self._swap_out(t)
                    if callback is not None:
                        callback(t.index, t.st.step, dict(t.last))
                g += 1
                if bar is not None:
                    bar.update(self.B)
                    if g % 10 == 0 or g == total:
                        bar.set_postfix(FVU="/".join(f"{t.last['fvu']:.3f}" for t in trainers), refresh=False)
        finally:
            if bar is not None:
                bar.close()
        out = []
        for t in trainers:
            if t.error is not None:
                out.append(t.error)
                continue
            t.sae.eval()
            self._swap_in(t)
            sae = t.finish(t.calibration)
            if self.exhausted is not None:
                wb = sae.cfg.metadata["workbench"]
                wb.update({"n_tokens": t.st.step * self.B, "steps": t.st.step, "data_exhausted": dict(self.exhausted)})
            out.append(sae)
        return out


def _bar(progress: Any, total: int, initial: int, n: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=f"train {n} SAEs",
                dynamic_ncols=True, file=progress if hasattr(progress, "write") else sys.stderr)
