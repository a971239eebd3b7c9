"""The train / held-out split as row ranges (``RowRanges``): same rows as the per-row rule, no per-row tensor
over the store, and ``batches(rows=ranges)`` bit-identical to ``batches(rows=indices)``."""

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.store import ActivationStore, write_store
from workbench.store_split import RowRanges, heldout_units

from test_store import _synthetic


def _brute(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m


def test_row_ranges_match_their_indices():
    g = torch.Generator().manual_seed(0)
    n = 200
    for trial in range(30):
        keep = torch.rand(n, generator=g) < (0.05, 0.5, 0.95)[trial % 3]
        idx = torch.nonzero(keep).flatten()
        r = RowRanges.from_indices(idx[torch.randperm(idx.numel(), generator=g)].repeat(2))   # any order, dups
        assert torch.equal(r.indices(), idx) and r.numel() == len(r) == idx.numel()
        assert r.n_ranges == int((torch.diff(keep.int(), prepend=torch.tensor([0])) == 1).sum())   # merged runs
        assert torch.equal(r.complement(n).indices(), torch.nonzero(~keep).flatten())
        for a, b in ((0, n), (0, 1), (13, 77), (50, 50), (150, 200), (199, 200)):
            local = r.in_shard(a, b)
            want = torch.nonzero(keep[a:b]).flatten()
            if local is None:
                assert want.numel() == b - a > 0          # None only when the span is wholly selected
            else:
                assert torch.equal(local, want)
            assert r.count(a, b) == want.numel()
    assert RowRanges([0, 5], [5, 9]) == RowRanges([0], [9]) and RowRanges([0], [9]).in_shard(2, 9) is None
    assert RowRanges([], []).indices().numel() == 0 and "0 rows" in repr(RowRanges([], []))
    with pytest.raises(ValueError, match="sorted, disjoint"):
        RowRanges([0, 3], [5, 8])


def _flat(bs):
    return [b.clone() for b in bs]


@pytest.mark.parametrize("shard_rows", [7, 25, 64, 10_000])
def test_batches_of_ranges_equal_batches_of_indices(tmp_path, shard_rows):
    acts, tok, mask, docs, si, po = _synthetic(n_seq=60, seq_len=16, seed=1)
    s = write_store(tmp_path / "s", acts, tok, mask, docs, si, po, "m", shard_rows=shard_rows)
    for split_seed in (0, 1, 2):
        sp = s.split(0.2, split_seed)
        for ranges in (sp.train_rows, sp.heldout_rows):
            assert isinstance(ranges, RowRanges)
            idx = ranges.indices()
            for kw in ({"seed": 3, "buffer_rows": 30}, {"seed": 4}, {"seed": 5, "buffer_rows": 1},
                       {"shuffle": False}, {"shuffle": False, "drop_last": True}, {"seed": 6, "drop_last": True}):
                for hook in ("rowid", "blocks.0.hook_resid_post"):
                    a = _flat(s.batches(hook, 7, rows=ranges, **kw))
                    b = _flat(s.batches(hook, 7, rows=idx, **kw))
                    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b)), (kw, hook)
            got = torch.cat(_flat(s.batches("rowid", 5, seed=0, rows=ranges)))[:, 0].long()
            assert sorted(got.tolist()) == idx.tolist()
    with pytest.raises(WorkbenchError, match=r"rows must be indices in \[0, "):
        next(s.batches("rowid", 4, rows=RowRanges([0], [s.n_rows + 1])))


def test_split_reads_no_per_row_tensor_over_the_store(tmp_path, monkeypatch):
    """The split reads each shard's seq_index column alone (never ``seq_index()`` / ``rows()``, which hold
    every row), gives the rows the per-row rule gives, as one range per held-out run; ``batches`` over the
    ranges makes offsets one shard at a time."""
    acts, tok, mask, docs, si, po = _synthetic(n_seq=300, seq_len=8, seed=2)      # 100 documents of 3 windows
    s = write_store(tmp_path / "s", acts, tok, mask, docs, si, po, "m", shard_rows=23)
    assert len(s.shard_files()) > 40
    s = ActivationStore.open(s.path)

    def boom(*a, **k):
        raise AssertionError("a tensor over every row of the store")

    for name in ("seq_index", "rows", "sequences", "row_char_end"):
        monkeypatch.setattr(ActivationStore, name, boom)
    for seed in (0, 7):
        sp = s.split(0.05, seed)
        held_docs = heldout_units(docs.tolist(), 0.05, seed)
        is_held = torch.isin(docs[si], torch.tensor(sorted(held_docs)))          # the old per-row rule
        assert torch.equal(sp.heldout_rows.indices(), torch.nonzero(is_held).flatten())
        assert torch.equal(sp.train_rows.indices(), torch.nonzero(~is_held).flatten())
        runs = int((torch.diff(is_held.int(), prepend=torch.tensor([0])) == 1).sum())
        assert sp.heldout_rows.n_ranges == runs <= len(held_docs) == 5          # one range per held-out document
        assert sp.train_rows.n_ranges <= runs + 1
        assert sp.meta()["n_heldout_rows"] == int(is_held.sum()) and sp.meta()["n_train_rows"] == int((~is_held).sum())
    spans, real = [], RowRanges.in_shard

    def spy(self, a, b):
        spans.append(b - a)
        return real(self, a, b)

    monkeypatch.setattr(RowRanges, "in_shard", spy)
    monkeypatch.setattr(RowRanges, "indices", boom)
    n = sum(b.shape[0] for b in s.batches("rowid", 16, seed=1, rows=sp.train_rows, buffer_rows=50))
    assert n == sp.train_rows.numel() and spans and max(spans) <= 23


def test_split_of_rows_out_of_sequence_order(tmp_path):
    """Rows need not be grouped by sequence: the ranges still hold exactly the held-out documents' rows."""
    acts, tok, mask, docs, si, po = _synthetic(n_seq=90, seq_len=8, seed=3)
    perm = torch.randperm(si.numel(), generator=torch.Generator().manual_seed(0))
    s = write_store(tmp_path / "p", {h: a[perm] for h, a in acts.items()}, tok, mask, docs, si[perm], po[perm], "m",
                    shard_rows=31)
    sp = s.split(0.1, 0)
    is_held = torch.isin(docs[si[perm]], torch.tensor(sorted(heldout_units(docs.tolist(), 0.1, 0))))
    assert torch.equal(sp.heldout_rows.indices(), torch.nonzero(is_held).flatten())
    tr, ho = s.split_rows(0.1, 0)
    assert torch.equal(ho, sp.heldout_rows.indices()) and torch.equal(tr, sp.train_rows.indices())
    assert torch.equal(_brute(tr, s.n_rows) | _brute(ho, s.n_rows), torch.ones(s.n_rows, dtype=torch.bool))
