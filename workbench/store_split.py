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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from .errors import WorkbenchError

RULE = ("units (documents, or sequence windows when the store has too few documents) ordered by "
        "blake2b('{seed}:{unit_id}'), the first round(holdout * n_units) held out")


def _key(seed: int, uid: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")


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
    train_rows: torch.Tensor      # sorted row indices
    heldout_rows: torch.Tensor
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
    doc_ids = store.doc_ids()              # not sequences() / rows(): token ids and positions are not needed,
    n_seq = int(doc_ids.numel())           # and at 10^7 rows they are hundreds of MB
    seq_index = store.seq_index()
    all_rows = torch.arange(seq_index.numel())
    if holdout == 0.0:
        return StoreSplit(0.0, int(seed), "none", 0, 0, all_rows, all_rows[:0],
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
    held_row = is_held_seq[seq_index]
    return StoreSplit(holdout, int(seed), unit, n_units, len(out), all_rows[~held_row], all_rows[held_row],
                      torch.nonzero(~is_held_seq).flatten(), held_seq, note)
