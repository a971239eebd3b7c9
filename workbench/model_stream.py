"""Activations straight from the model, through a bounded shuffle buffer (no store on disk), for
:func:`analyses.sae.multi.train_saes`.

The corpus is packed into windows exactly as ``collect`` does (``workbench.corpus.pack``, same special-token
rule and BOS); documents are held out by the store split's key (``workbench.store_split._key``:
blake2b("{seed}:{doc_id}")): a document is held out when its key falls in the lowest ``holdout`` share of the
64-bit range (the streaming form of "order by key, hold out the first round(holdout * n)": the same
documents up to the rounding at the boundary, without knowing n in advance).

Shuffle buffer (``buffer_tokens`` rows, like SAELens' ActivationsStore: fill, shuffle, serve half, refill):
the training windows are cut into chunks of ``buffer_tokens / 2`` tokens; chunk c's rows are split at random
into halves A_c and B_c; cycle c serves a random permutation of B_{c-1} + A_c. So every served batch mixes
rows of two chunks (~buffer_tokens / seq_len sequences), at most ``buffer_tokens`` rows are held, and each row
waits at most one refill. Everything is seeded by (seed, c), so the stream position is just (cycle, rows of
that cycle served): a resume (after SIGKILL) re-tokenises up to chunk c-1 (no forward passes) and recomputes
chunks c-1 and c only, and gives exactly the same batches as an uninterrupted run.

``keep_store=DIR`` (``train-sae --keep-store``) also writes the activations into a store on the way, through
``workbench.store.StoreWriter`` (checksummed shards, progress.json, manifest last): shard c = chunk c's
windows, training and held-out ones, in corpus order (the held-out ones cost an extra forward), so the store
holds what ``collect`` would for the same corpus prefix and a later run can train from it. The batches served
do not change. A DIR holding a store of other settings (model, hooks, corpus, seq_len, buffer, holdout) is
refused naming what differs; a partial one of the same settings is resumed (missing chunks are computed on
the way), a complete one is reused as it is (nothing rewritten).

Under torchrun (a process group initialised before the first forward; ``train-sae`` does it), the forward
work is split: for each chunk, rank r runs the model on its contiguous share of the chunk's windows and the
rows are all-gathered in rank order, so every rank holds exactly the chunk one process computes (same rows,
same order) and serves the same batches. ``heldout_batches`` is split the same way (every rank must iterate
it alike). ``--keep-store`` is rank 0's alone: only rank 0 opens or writes the folder, and the extra forward
of a chunk's held-out windows (and, when resuming a partial kept store, of the chunks skipped to reach the
resume point) runs on rank 0 alone, unsplit. ``n_forward_tokens`` counts this rank's own rows.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator

import torch

from analyses.sae.base import SINGLE, Collective
from analyses.sae.multi import SourceExhausted
from analyses.sae.train import current_collective

from .corpus import iter_documents, pack
from .errors import WorkbenchError
from .store_split import _key

log = logging.getLogger(__name__)
BIG = 1 << 62


def is_heldout(doc_id: int, holdout: float, seed: int) -> bool:
    return holdout > 0 and _key(seed, doc_id) < holdout * 2.0 ** 64


class ModelStream:
    """A resumable stream of {hook: Tensor[batch_size, d]} computed by ``model`` on ``corpus``."""

    start = (0, 0)

    def __init__(self, model: Any, hooks: list[str], corpus: str, *, seq_len: int = 128, forward_batch: int = 16,
                 buffer_tokens: int = 1 << 16, seed: int = 0, holdout: float = 0.05, holdout_seed: int = 0,
                 special_tokens: str = "exclude", keep_store: str | None = None):
        from .collector import _Plan
        if buffer_tokens < 2 * seq_len:
            raise WorkbenchError(f"--buffer-tokens {buffer_tokens} holds less than two windows of {seq_len} "
                                 "tokens; give at least 2 x seq_len (SAELens-like mixing wants >= 2^16)")
        if not 0 <= holdout < 1:
            raise WorkbenchError(f"holdout must be a fraction in [0, 1), got {holdout}")
        self.model, self.corpus = model, corpus
        self.plan = _Plan.make(model, hooks, corpus, BIG, seq_len, forward_batch, torch.float32, special_tokens,
                               32, 0, None)
        self.hooks = self.plan.hooks
        self.widths = {h: int(model.d(h)) for h in self.hooks}
        self.buffer_tokens, self.seed = int(buffer_tokens), int(seed)
        self.holdout, self.holdout_seed = float(holdout), int(holdout_seed)
        self.windows_per_chunk = max(1, buffer_tokens // 2 // seq_len)
        self.forward_batch = forward_batch
        self.n_forward_tokens = 0          # rows computed by this process (for benchmarks, data parallel)
        self.writer, self.kept = None, None
        if keep_store and _rank() == 0:    # under torchrun rank 0 alone touches the kept store
            self._open_keep(keep_store)

    # ----- --keep-store
    def _keep_header(self) -> dict[str, Any]:
        p = self.plan
        settings = {"written_by": "train-sae --keep-store", "model": self.model.name, "hooks": self.hooks,
                    "corpus": p.fingerprint, "seq_len": p.seq_len, "dtype": "float32", "special_tokens": p.mode,
                    "excluded_ids": p.excluded, "prepend_bos": p.prepend_bos,
                    "bos_id": int(p.bos) if p.prepend_bos else None, "windows_per_doc": 0,
                    "buffer_tokens": self.buffer_tokens, "holdout": self.holdout, "holdout_seed": self.holdout_seed}
        return dict(model=self.model.name, hooks=self.widths, dtype="float32", seq_len=p.seq_len, settings=settings)

    def _open_keep(self, path: str) -> None:
        from pathlib import Path
        from .collector import _header
        from .errors import OutputExists
        from .store import MANIFEST, ActivationStore, StoreWriter, _settings_diff
        kw, path = self._keep_header(), Path(path)
        if (path / MANIFEST).exists():
            m = ActivationStore.open(path).manifest
            old = {**{k: m.get(k) for k in ("model", "hooks", "dtype", "seq_len")},
                   "settings": m.get("collect", {}).get("settings") or {}}
            diff = _settings_diff(old, _header(kw))
            if diff:
                raise WorkbenchError(f"--keep-store {path} holds a different activation store ({diff}); choose "
                                     "another folder, or train from that store with `train-sae STORE`")
            self.kept = {"path": str(path), "status": "reused"}
            log.info("--keep-store %s already holds this store complete: reused as it is", path)
            return
        try:
            self.writer = StoreWriter.start(path, **kw)
        except OutputExists as e:
            raise WorkbenchError(f"--keep-store: {e}") from None
        self.kept = {"path": str(path), "status": "resumed" if self.writer.shards else "new"}

    def _keep_chunk(self, c: int, item: tuple, acts: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """Write chunk c as shard c (once): its training windows' rows (computed) and its held-out ones."""
        from .collector import _batch_rows
        if self.writer is None or len(self.writer.shards) != c:
            return
        train, every = item
        held = [w for _, w, h in every if h]
        blocks = _blocks(train, acts, keep) + \
            (_blocks(held, *self._forward(held, meta=True, split=False)) if held else [])   # rank 0 only
        idx = [i for i, _, h in every if not h] + [i for i, _, h in every if h]
        blocks = [b for _, b in sorted(zip(idx, blocks), key=lambda t: t[0])]      # corpus order
        wins = [b[0] for b in blocks]
        pad = self.model.special_ids.get("pad")
        _, ids, mask, keepm, ends = _batch_rows(wins, self.plan, 0 if pad is None else int(pad),
                                               torch.tensor(self.plan.excluded, dtype=torch.long), BIG)
        rows = {h: torch.cat([b[1][h] for b in blocks]) for h in self.hooks}
        si = self.writer.n_seq + torch.arange(len(wins)).repeat_interleave(keepm.sum(1))
        self.writer.write_shard(rows, si, keepm.nonzero()[:, 1], ids, mask,
                                torch.tensor([w.doc_id for w in wins]), ends)

    def finish_store(self) -> dict[str, Any] | None:
        """Write the kept store's manifest (after training); returns its summary or None."""
        if self.writer is None:
            return self.kept
        p = self.plan
        self.writer.finalize(corpus=p.fingerprint, special_tokens={"mode": p.mode, "excluded_ids": p.excluded,
                                                                   "special_ids": p.special},
                             extra={"model_kind": getattr(self.model, "kind", None), "prepend_bos": p.prepend_bos,
                                    "kept_by": "train-sae --keep-store"})
        self.kept = {**self.kept, "rows": self.writer.n_rows, "shards": len(self.writer.shards)}
        self.writer = None
        return self.kept

    def check_batch(self, batch_size: int) -> None:
        if self.buffer_tokens < batch_size:
            raise WorkbenchError(f"--buffer-tokens {self.buffer_tokens} is smaller than one batch ({batch_size} "
                                 "rows): the buffer must hold at least one batch (SAELens uses ~2^16 rows or more)")

    def info(self) -> dict[str, Any]:
        return {"model": self.model.name, "corpus": self.corpus, "hooks": self.hooks, "seq_len": self.plan.seq_len,
                "buffer_tokens": self.buffer_tokens, "seed": self.seed, "holdout": self.holdout,
                "holdout_seed": self.holdout_seed, "holdout_rule": "blake2b('{seed}:{doc_id}') < holdout * 2^64"}

    # ----- windows and forward passes
    def _chunks(self) -> Iterator[tuple[list, list]]:
        """(the next windows_per_chunk training windows, [(corpus index, window, held out)] of every window
        read for them): the training windows are exactly ``_windows(False)`` cut into chunks."""
        p = self.plan
        ws = pack(iter_documents(self.corpus), self.model.tokenizer, p.seq_len,
                  bos_id=int(p.bos) if p.prepend_bos else None)
        train, every = [], []
        for i, w in enumerate(ws):
            h = is_heldout(w.doc_id, self.holdout, self.holdout_seed)
            every.append((i, w, h))
            if not h:
                train.append(w)
                if len(train) == self.windows_per_chunk:
                    yield train, every
                    train, every = [], []
        if train:
            yield train, every

    def _windows(self, heldout: bool) -> Iterator:
        p = self.plan
        ws = pack(iter_documents(self.corpus), self.model.tokenizer, p.seq_len,
                  bos_id=int(p.bos) if p.prepend_bos else None)
        return (w for w in ws if is_heldout(w.doc_id, self.holdout, self.holdout_seed) == heldout)

    def _forward(self, windows: list, meta: bool = False, split: bool = True):
        """{hook: rows} of the windows (kept tokens, window by window); with ``meta`` also the keep mask
        [n_windows, seq_len] saying which token each row is. With ``split`` under a process group, this
        rank computes its contiguous share of the windows and the rows are all-gathered (every rank must
        call it alike); ``split=False`` computes them all here (rank 0's --keep-store extras)."""
        coll = current_collective() if split else SINGLE
        if coll.world_size == 1:
            out, keep = self._forward_local(windows)
        else:
            n, w, r = len(windows), coll.world_size, coll.rank
            lo, hi = (i * (n // w) + min(i, n % w) for i in (r, r + 1))
            out, keep = _gather(coll, *self._forward_local(windows[lo:hi]), self.widths)
        return (out, keep) if meta else out

    def _forward_local(self, windows: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from .collector import _batch_rows
        p = self.plan
        pad = self.model.special_ids.get("pad")
        excl = torch.tensor(p.excluded, dtype=torch.long)
        parts: dict[str, list] = {h: [] for h in self.hooks}
        keeps = []
        for i in range(0, len(windows), self.forward_batch):
            batch = windows[i:i + self.forward_batch]
            batch, ids, mask, keep, _ = _batch_rows(batch, p, 0 if pad is None else int(pad), excl, BIG)
            keeps.append(keep)
            L = max(len(w.ids) for w in batch)
            with torch.inference_mode():
                acts = self.model.run(ids[:, :L].to(p.dev), mask[:, :L].to(p.dev), self.hooks)
                kd = keep[:, :L].to(p.dev)
                for h in self.hooks:
                    parts[h].append(acts[h].reshape(len(batch), L, -1)[kd].float().cpu())
            del acts
        out = {h: torch.cat(v) if v else torch.zeros(0, self.widths[h]) for h, v in parts.items()}
        self.n_forward_tokens += int(next(iter(out.values())).shape[0])
        return out, torch.cat(keeps) if keeps else torch.zeros(0, p.seq_len, dtype=torch.bool)

    def _gen(self, *tag: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + tag[0] * 8 + tag[1]) % (2 ** 62))

    def open(self, batch_size: int, pos: tuple) -> "_Reader":
        self.check_batch(batch_size)
        return _Reader(self, batch_size, int(pos[0]), int(pos[1]))

    def heldout_batches(self, batch_size: int, max_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
        """Held-out documents' rows, in corpus order, up to ``max_tokens`` (the end-of-run evaluation); the
        forward is split across ranks under torchrun, so every rank must iterate it alike."""
        ws, done = self._windows(True), 0
        while done < max_tokens:
            chunk = list(itertools.islice(ws, self.windows_per_chunk))
            if not chunk:
                return
            acts = self._forward(chunk)
            n = min(int(acts[self.hooks[0]].shape[0]), max_tokens - done)
            for i in range(0, n, batch_size):
                yield {h: a[i:min(i + batch_size, n)] for h, a in acts.items()}
            done += n


class _Reader:
    """Exactly ``batch_size`` rows per ``next()``; ``state()`` = (cycle, rows of that cycle served)."""

    def __init__(self, ms: ModelStream, batch_size: int, cycle: int, offset: int):
        self.ms, self.B, self.cycle, self.offset = ms, batch_size, cycle, offset
        self.chunks = ms._chunks()
        self.chunk_index = -1              # index of the last chunk read from `windows`
        self.halves: dict[int, tuple] = {}  # chunk -> (A, B) dicts of rows
        self.served: dict[str, torch.Tensor] | None = None
        self.ended = False

    def _chunk(self, c: int):
        if c < 0:
            return None
        if c not in self.halves:
            while self.chunk_index < c - 1:          # skip without computing (resume / first open)
                item = next(self.chunks, None)
                if item is None:
                    return None
                self.chunk_index += 1
                if self.ms.writer is not None and len(self.ms.writer.shards) == self.chunk_index:
                    self.ms._keep_chunk(self.chunk_index, item,    # rank 0 only (it alone holds the writer)
                                        *self.ms._forward(item[0], meta=True, split=False))
            item = next(self.chunks, None)
            self.chunk_index += 1
            if item is None:
                return None
            acts, keep = self.ms._forward(item[0], meta=True)
            self.ms._keep_chunk(c, item, acts, keep)
            n = int(acts[self.ms.hooks[0]].shape[0])
            perm = torch.randperm(n, generator=self.ms._gen(c, 1))
            a, b = perm[: n // 2], perm[n // 2:]
            self.halves[c] = ({h: x[a] for h, x in acts.items()}, {h: x[b] for h, x in acts.items()})
            for old in [k for k in self.halves if k < c - 1]:
                del self.halves[old]
        return self.halves[c]

    def _serve(self, c: int) -> dict[str, torch.Tensor] | None:
        prev, cur = self._chunk(c - 1), self._chunk(c)
        if cur is None and prev is None:
            return None
        parts = [x for x in ((prev[1] if prev else None), (cur[0] if cur else None)) if x is not None]
        rows = {h: torch.cat([p[h] for p in parts]) for h in self.ms.hooks}
        n = int(rows[self.ms.hooks[0]].shape[0])
        perm = torch.randperm(n, generator=self.ms._gen(c, 2))
        return {h: x[perm] for h, x in rows.items()}

    def state(self) -> tuple[int, int]:
        return self.cycle, self.offset

    def next(self) -> dict[str, torch.Tensor]:
        parts: list[dict] = []
        need = self.B
        cyc, off = self.cycle, self.offset
        while need > 0:
            if self.served is None or self._served_cycle != cyc:
                self.served = self._serve(cyc)
                self._served_cycle = cyc
                if self.served is None:
                    used = sum(int(p[self.ms.hooks[0]].shape[0]) for p in parts)
                    raise SourceExhausted(f"the corpus {self.ms.corpus!r} ended (cycle {cyc}; {used} rows of a "
                                          "last partial batch dropped)")
            n = int(self.served[self.ms.hooks[0]].shape[0])
            take = min(need, n - off)
            if take > 0:
                parts.append({h: x[off:off + take] for h, x in self.served.items()})
                need -= take
                off += take
            if off >= n:
                cyc, off = cyc + 1, 0
        self.cycle, self.offset = cyc, off
        return {h: torch.cat([p[h] for p in parts]) if len(parts) > 1 else parts[0][h] for h in self.ms.hooks}


def _blocks(windows: list, acts: dict[str, torch.Tensor], keep: torch.Tensor) -> list[tuple]:
    """(window, {hook: its rows}) per window, from rows laid out window by window."""
    bounds = [0] + torch.cumsum(keep.sum(1), 0).tolist()
    return [(w, {h: a[bounds[j]:bounds[j + 1]] for h, a in acts.items()}) for j, w in enumerate(windows)]


def _rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (0 outside torchrun)."""
    import os
    coll = current_collective()
    if coll.world_size > 1:
        return coll.rank
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0


def _gather(coll: Collective, out: dict[str, torch.Tensor], keep: torch.Tensor,
            widths: dict[str, int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every rank's rows and keep masks, concatenated in rank order (ranks hold different row counts)."""
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    hooks = list(widths)
    flat = torch.cat([out[h] for h in hooks], 1) if len(hooks) > 1 else out[hooks[0]]
    rows = coll.all_gather_cat(flat.to(dev)).view(-1, flat.shape[1]).cpu()
    km = coll.all_gather_cat(keep.to(dev, torch.float32)).view(-1, keep.shape[1]).cpu().bool()
    return dict(zip(hooks, rows.split([widths[h] for h in hooks], 1))), km
