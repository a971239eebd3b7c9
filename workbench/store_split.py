"""Train / held-out split of an activation store by DOCUMENT (``ActivationStore.split``).

Rule (deterministic, independent of row order, shard layout and machine): every document id gets
the key ``blake2b("{seed}:{doc_id}")`` (first 8 bytes, big-endian); documents are ordered by key
and the first ``round(holdout * n_documents)`` are held out, so the held-out share of documents is
exact and the same seed always holds out the same documents. Every row and sequence of a
held-out document is held out: no text the SAE trained on is evaluated as "held out", which a
row-level split cannot promise (neighbouring tokens of one document are strongly correlated).

Too few documents: when ``round(holdout * n_documents) < 1`` (e.g. a store of one long document)
the unit falls back to the sequence window (same rule over sequence indices; windows of one
document can then land on both sides, and ``meta()["unit"]`` says ``"sequence"``). Fewer than two
units: an error. ``holdout == 0`` holds out nothing.

Memory: the split never holds a tensor over the store's rows (at 10^7 rows those are ~0.6 GB). The
rows of each side are a :class:`RowRanges` (sorted half-open row ranges): a store's rows are grouped
by sequence, so the held-out rows are about one run per held-out document (exact for any row order,
only more ranges), found by reading each shard's ``seq_index`` column alone.
``ActivationStore.batches(rows=...)`` turns ranges into row offsets one shard at a time.
Per-sequence tensors (``n_rows / seq_len`` entries) are kept as is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import WorkbenchError

RULE = ("units (documents, or sequence windows when the store has too few documents) ordered by "
        "blake2b('{seed}:{unit_id}'), the first round(holdout * n_units) held out")


def _key(seed: int, uid: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")


class RowRanges:
    """A set of store rows as sorted, disjoint, half-open ranges ``[starts[i], ends[i])`` (int64
    tensors; touching ranges are merged, so a shard wholly inside the set is one range). Memory in
    the number of ranges, not rows: what a train / held-out split by document is."""

    def __init__(self, starts, ends):
        s = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
        e = torch.as_tensor(ends, dtype=torch.long).reshape(-1)
        if s.shape != e.shape or bool((e < s).any()) or bool((s[1:] < e[:-1]).any()):
            raise ValueError("RowRanges needs sorted, disjoint [start, end) ranges")
        keep = e > s
        s, e = s[keep], e[keep]
        if s.numel() > 1:                              # merge ranges that touch
            new = torch.ones_like(s, dtype=torch.bool)
            new[1:] = s[1:] != e[:-1]
            first = torch.nonzero(new).flatten()
            last = torch.cat([first[1:] - 1, torch.tensor([s.numel() - 1])])
            s, e = s[first], e[last]
        self.starts, self.ends = s, e
        self._n = int((e - s).sum())

    @classmethod
    def from_indices(cls, idx) -> "RowRanges":
        """The distinct rows of an index tensor / list as their contiguous runs (also how ``_take`` reads a
        shard's sorted offsets as slices)."""
        i = torch.unique(torch.as_tensor(idx, dtype=torch.long).reshape(-1))
        if i.numel() == 0:
            return cls([], [])
        cut = torch.nonzero(i[1:] - i[:-1] != 1).flatten() + 1
        first = torch.cat([torch.tensor([0]), cut])
        last = torch.cat([cut - 1, torch.tensor([i.numel() - 1])])
        return cls(i[first], i[last] + 1)

    def numel(self) -> int:
        return self._n

    __len__ = numel

    @property
    def n_ranges(self) -> int:
        return int(self.starts.numel())

    def _clip(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranges cut to [start, stop), as offsets from start."""
        i = int(torch.searchsorted(self.ends, torch.tensor([start]), right=True)[0])
        j = int(torch.searchsorted(self.starts, torch.tensor([stop]), right=False)[0])
        return self.starts[i:j].clamp(min=start) - start, self.ends[i:j].clamp(max=stop) - start

    def count(self, start: int, stop: int) -> int:
        """Rows of the set inside [start, stop)."""
        s, e = self._clip(start, stop)
        return int((e - s).sum())

    def in_shard(self, start: int, stop: int) -> torch.Tensor | None:
        """Sorted offsets (from ``start``) of the set's rows inside [start, stop), or None when the set
        covers all of it (the caller reads it whole). Memory in the rows of that span only."""
        s, e = self._clip(start, stop)
        if s.numel() == 1 and int(s[0]) == 0 and int(e[0]) == stop - start and stop > start:
            return None
        n = e - s
        if s.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        base = torch.repeat_interleave(s - (torch.cumsum(n, 0) - n), n)   # offset of each range, minus its first slot
        return base + torch.arange(int(n.sum()))

    def indices(self) -> torch.Tensor:
        """Every row as a sorted LongTensor (8 bytes a row: for small sets and API callers)."""
        out = self.in_shard(0, int(self.ends[-1])) if self.n_ranges else torch.empty(0, dtype=torch.long)
        return torch.arange(int(self.ends[-1])) if out is None else out

    def complement(self, n: int) -> "RowRanges":
        """The rows of [0, n) not in the set."""
        s = torch.cat([torch.tensor([0]), self.ends])
        e = torch.cat([self.starts, torch.tensor([n])])
        return RowRanges(s, e)

    def __eq__(self, other) -> bool:
        if not isinstance(other, RowRanges):
            return NotImplemented
        return torch.equal(self.starts, other.starts) and torch.equal(self.ends, other.ends)

    __hash__ = None     # mutable tensors inside

    def __repr__(self) -> str:
        show = ", ".join(f"[{a}, {b})" for a, b in zip(self.starts[:3].tolist(), self.ends[:3].tolist()))
        more = f", ... ({self.n_ranges} ranges)" if self.n_ranges > 3 else ""
        return f"RowRanges({self._n} rows: {show}{more})"


def heldout_units(ids: list[int], holdout: float, seed: int) -> set[int]:
    """The held-out subset of the distinct unit ids (the rule above, without the fallback)."""
    uniq = sorted(set(int(i) for i in ids))
    n_out = int(round(holdout * len(uniq)))
    return set(sorted(uniq, key=lambda u: (_key(seed, u), u))[:n_out])


@dataclass
class StoreSplit:
    holdout: float
    seed: int
    unit: str                     # "document" | "sequence" | "none"
    n_units: int
    n_heldout_units: int
    train_rows: RowRanges         # row ranges (``.indices()``: the sorted row indices)
    heldout_rows: RowRanges
    train_seqs: torch.Tensor      # sorted sequence indices
    heldout_seqs: torch.Tensor
    note: str = ""

    def meta(self) -> dict[str, Any]:
        """JSON-able description (goes into SAE cfg metadata and eval results)."""
        n = self.train_rows.numel() + self.heldout_rows.numel()
        return {"holdout": self.holdout, "seed": self.seed, "unit": self.unit, "rule": RULE,
                "n_units": self.n_units, "n_heldout_units": self.n_heldout_units,
                "n_train_rows": int(self.train_rows.numel()), "n_heldout_rows": int(self.heldout_rows.numel()),
                "heldout_row_fraction": self.heldout_rows.numel() / n if n else 0.0,
                "n_heldout_sequences": int(self.heldout_seqs.numel()), "note": self.note}


def split_store(store, holdout: float = 0.05, seed: int = 0) -> StoreSplit:
    try:
        holdout = float(holdout)
    except (TypeError, ValueError):
        raise WorkbenchError(f"holdout must be a fraction in [0, 1), got {holdout!r}") from None
    if not 0.0 <= holdout < 1.0:
        raise WorkbenchError(f"holdout must be a fraction in [0, 1) (e.g. 0.05 = 5% of the documents), "
                             f"got {holdout}")
    doc_ids = store.doc_ids()              # per sequence; not sequences() / rows() / seq_index(): per-row
    n_seq = int(doc_ids.numel())           # tensors are hundreds of MB at 10^7 rows (rows: see _rows_of)
    if holdout == 0.0:
        nothing = RowRanges([], [])
        return StoreSplit(0.0, int(seed), "none", 0, 0, nothing.complement(store.n_rows), nothing,
                          torch.arange(n_seq), torch.arange(0), "holdout=0: nothing held out")
    n_docs = int(torch.unique(doc_ids).numel())
    note = ""
    if round(holdout * n_docs) >= 1:
        unit, ids = "document", doc_ids.tolist()
        out = heldout_units(ids, holdout, seed)
        held_seq = torch.tensor([i for i, u in enumerate(ids) if u in out], dtype=torch.long)
        n_units = n_docs
    else:
        if round(holdout * n_seq) < 1 and n_seq < 2:
            raise WorkbenchError(
                f"store {store.path} has {n_docs} document(s) and {n_seq} sequence(s): too few to hold "
                f"out {holdout:.0%} of them. Collect more text, or pass --holdout 0 to evaluate in-sample")
        unit, n_units = "sequence", n_seq
        ids = list(range(n_seq))
        out = heldout_units(ids, holdout, seed)
        if not out:                                  # at least one window, never all of them
            out = {min(ids, key=lambda u: (_key(seed, u), u))}
        held_seq = torch.tensor(sorted(out), dtype=torch.long)
        note = (f"the store has {n_docs} document(s), too few to hold out {holdout:.0%} by document; "
                f"held out {len(out)} of {n_seq} sequence windows instead (text of one document can "
                "be on both sides)")
    if len(out) >= n_units:
        raise WorkbenchError(f"holdout={holdout} would hold out all {n_units} {unit}s of {store.path}")
    is_held_seq = torch.zeros(n_seq, dtype=torch.bool)
    is_held_seq[held_seq] = True
    held = _rows_of(store, is_held_seq.numpy())
    return StoreSplit(holdout, int(seed), unit, n_units, len(out), held.complement(store.n_rows), held,
                      torch.nonzero(~is_held_seq).flatten(), held_seq, note)


def _rows_of(store, is_seq: np.ndarray) -> RowRanges:
    """The rows whose sequence is flagged in ``is_seq``, as ranges: each shard's ``seq_index`` column is read
    alone (memory: one shard's column, not the store's rows), its flagged runs become ranges."""
    starts, ends = [], []
    for i, meta in enumerate(store._shards_meta):
        if not int(meta["rows"]):
            continue
        flag = is_seq[np.asarray(store._shard(i).array("seq_index"))].astype(np.int8)
        edge = np.diff(flag, prepend=np.int8(0), append=np.int8(0))
        r0 = int(meta["row_start"])
        starts.append(torch.from_numpy(np.flatnonzero(edge == 1)) + r0)
        ends.append(torch.from_numpy(np.flatnonzero(edge == -1)) + r0)
    if not starts:
        return RowRanges([], [])
    return RowRanges(torch.cat(starts), torch.cat(ends))
