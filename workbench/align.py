"""Token-level alignment of two stores made with different tokenisers, by character offsets.

The collector records, for every token, the character of its document where the token ENDS
(``store.row_char_end()``; from the fast tokenizer's ``offset_mapping``, -1 for special tokens).
Two rows are the same place in the text when they come from the same document (same corpus, so
the same doc ids) and end at the same character. Within one store several tokens can end at the
same character: a byte-level BPE cuts a multi-byte character into pieces that all map to that
character (SmolLM2 writes '東' as 3 tokens with ends 21, 21, 21). The LAST of them is the token
that completes the character, so it is the one paired; the others are reported as unpaired, as are
tokens whose end is not a token end in the other store ('H' | 'é' | 'llo' vs 'hello': only the end
of 'llo' pairs). Nothing is guessed.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import WorkbenchError


def pair_by_char_end(doc_a: torch.Tensor, end_a: torch.Tensor, doc_b: torch.Tensor,
                     end_b: torch.Tensor) -> dict[str, Any]:
    """Pair rows of A and B whose (document, character end) are equal.

    Inputs are per-row [n] tensors (end -1: no offset, never paired). Returns {"a", "b"} (row
    indices, ascending in a), "unpaired_a", "unpaired_b" (row indices), "duplicates_a",
    "duplicates_b" (rows that end at the same character as a later token of their store)."""
    doc_a, end_a, doc_b, end_b = (torch.as_tensor(t).long().reshape(-1) for t in (doc_a, end_a, doc_b, end_b))
    if doc_a.shape != end_a.shape or doc_b.shape != end_b.shape:
        raise ValueError("doc and end must have one entry per row on each side")
    span = int(max(int(end_a.max()) if end_a.numel() else 0, int(end_b.max()) if end_b.numel() else 0)) + 2

    def last_of_each(doc, end):
        valid = end >= 0
        idx = valid.nonzero().flatten()
        key = doc[idx] * span + end[idx]
        # the last row per key: sort by (key, row) and keep where the next key differs
        order = torch.argsort(key, stable=True)      # idx ascending: equal keys stay in row order
        k, r = key[order], idx[order]
        last = torch.ones_like(k, dtype=torch.bool)
        if k.numel() > 1:
            last[:-1] = k[1:] != k[:-1]
        return k[last], r[last], r[~last], (~valid).nonzero().flatten()

    ka, ra, dup_a, none_a = last_of_each(doc_a, end_a)
    kb, rb, dup_b, none_b = last_of_each(doc_b, end_b)
    in_b = torch.isin(ka, kb)
    pos = torch.searchsorted(kb, ka[in_b])
    a, b = ra[in_b], rb[pos]
    order = torch.argsort(a)
    a, b = a[order], b[order]
    paired_a = torch.zeros(doc_a.numel(), dtype=torch.bool)
    paired_a[a] = True
    paired_b = torch.zeros(doc_b.numel(), dtype=torch.bool)
    paired_b[b] = True
    return {"a": a, "b": b, "unpaired_a": (~paired_a).nonzero().flatten(),
            "unpaired_b": (~paired_b).nonzero().flatten(), "duplicates_a": dup_a.sort().values,
            "duplicates_b": dup_b.sort().values, "no_offset_a": none_a, "no_offset_b": none_b}


def align_tokens(store_a, store_b) -> dict[str, Any]:
    """Rows of two stores that are the same token position of the text (see the module docstring).
    Needs both stores collected with character offsets and from the same corpus; WorkbenchError
    naming what is missing otherwise. Returns pair_by_char_end's dict plus a "report"."""
    for s in (store_a, store_b):
        if not s.has_char_offsets:
            raise WorkbenchError(f"store {s.path} has no character offsets (collected before they were "
                                 "recorded, or with a slow tokenizer); collect it again to align tokens "
                                 "across tokenisers")
    ca, cb = store_a.manifest.get("corpus"), store_b.manifest.get("corpus")
    if ca is None or cb is None or ca != cb:
        raise WorkbenchError(f"token alignment needs both stores made from the same corpus (same documents); "
                             f"{store_a.path}: {ca!r}, {store_b.path}: {cb!r}")
    res = pair_by_char_end(_doc_of_rows(store_a), store_a.row_char_end(),
                           _doc_of_rows(store_b), store_b.row_char_end())
    res["report"] = {"paired": int(res["a"].numel()), "rows_a": store_a.n_rows, "rows_b": store_b.n_rows,
                     "unpaired_a": int(res["unpaired_a"].numel()), "unpaired_b": int(res["unpaired_b"].numel()),
                     "same_char_as_next_a": int(res["duplicates_a"].numel()),
                     "same_char_as_next_b": int(res["duplicates_b"].numel())}
    return res


def _doc_of_rows(store) -> torch.Tensor:
    return store.sequences()["doc_ids"][store.rows()["seq_index"]]
