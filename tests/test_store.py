"""Activation store: round trips, dtypes, integrity checks, streaming batches (synthetic data)."""

import json
import pickle

import pytest
import torch

from workbench import store as store_mod
from workbench.errors import StoreCorrupted, WorkbenchError
from workbench.store import ActivationStore, write_store


def _synthetic(n_seq=12, seq_len=10, d=(6, 5), seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(5, 1000, (n_seq, seq_len), generator=g)
    mask = torch.ones(n_seq, seq_len, dtype=torch.bool)
    lengths = torch.randint(2, seq_len + 1, (n_seq,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = False
        tok[i, n:] = 0
    si, po = mask.nonzero(as_tuple=True)
    n = len(si)
    acts = {"blocks.0.hook_resid_post": torch.randn(n, d[0], generator=g) * 3,
            "blocks.1.hook_resid_post": torch.randn(n, d[1], generator=g)}
    # a hook whose value identifies its row: lets tests follow rows through shuffling
    acts["rowid"] = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    docs = torch.arange(n_seq) // 3
    return acts, tok, mask, docs, si, po


@pytest.fixture
def synth(tmp_path):
    acts, tok, mask, docs, si, po = _synthetic()
    s = write_store(tmp_path / "s", acts, tok, mask, docs, si, po, "synthetic", shard_rows=17,
                    documents=[f"doc{i}" for i in range(4)], extra={"note": "x"})
    return s, (acts, tok, mask, docs, si, po)


def test_round_trip_float32(synth):
    s, (acts, tok, mask, docs, si, po) = synth
    s2 = ActivationStore.open(s.path)
    assert s2.model_name == "synthetic"
    assert s2.hooks == list(acts)
    assert s2.n_rows == len(si) and s2.d("blocks.0.hook_resid_post") == 6 and s2.d("blocks.1.hook_resid_post") == 5
    assert len(s2.shard_files()) == -(-len(si) // 17) > 3
    for h, a in acts.items():
        assert torch.equal(s2.read(h), a)
    # slices across shard boundaries, negative indices, empty slice
    h = "blocks.0.hook_resid_post"
    assert torch.equal(s2.read(h, 10, 40), acts[h][10:40])
    assert torch.equal(s2.read(h, -5), acts[h][-5:])
    assert s2.read(h, 7, 7).shape == (0, 6)
    assert s2.read(h, 3, 9, dtype=torch.float64).dtype == torch.float64
    assert s2.documents() == ["doc0", "doc1", "doc2", "doc3"]
    assert s2.manifest["extra"] == {"note": "x"}
    info = s2.info()
    assert info["n_rows"] == len(si) and info["hooks"]["blocks.1.hook_resid_post"] == 5
    json.dumps(info)
    with pytest.raises(WorkbenchError, match="out of range"):
        s2.read(h, 0, s2.n_rows + 1)
    with pytest.raises(WorkbenchError, match="blocks.0.hook_resid_post"):
        s2.read("blocks.0.hook_resid_pos")


def test_rows_and_sequences_map_rows_to_tokens(synth):
    s, (acts, tok, mask, docs, si, po) = synth
    rows, seqs = s.rows(), s.sequences()
    assert rows["seq_index"].dtype == torch.long and torch.equal(rows["seq_index"], si)
    assert torch.equal(rows["position"], po)
    assert torch.equal(seqs["token_ids"], tok) and seqs["token_ids"].dtype == torch.long
    assert seqs["attention_mask"].dtype == torch.bool and torch.equal(seqs["attention_mask"], mask)
    assert torch.equal(seqs["doc_ids"], docs)
    # every row sits on a real (non-padding) token
    assert bool(seqs["attention_mask"][rows["seq_index"], rows["position"]].all())
    assert int(mask.sum()) == s.n_rows


@pytest.mark.parametrize("dtype,rtol", [("float16", 2 ** -10), ("bfloat16", 2 ** -7)])
def test_low_precision_round_trip(tmp_path, dtype, rtol):
    acts, tok, mask, docs, si, po = _synthetic()
    s = write_store(tmp_path / dtype, acts, tok, mask, docs, si, po, "m", dtype=dtype, shard_rows=20)
    assert s.manifest["dtype"] == dtype
    assert s.dtype == getattr(torch, dtype)
    for h, a in acts.items():
        got = s.read(h)
        assert got.dtype == getattr(torch, dtype)
        assert torch.allclose(got.float(), a, rtol=rtol, atol=1e-6)
        assert not torch.equal(got.float(), a) or h == "rowid"   # it really was rounded
    # the file really holds 2-byte values
    total = sum(a.numel() for a in acts.values()) * 2
    assert sum(p.stat().st_size for p in s.shard_files()) < total * 1.5 + 4096 * len(s.shard_files())


def test_verify_catches_truncated_shard(synth):
    s, _ = synth
    bad = s.shard_files()[2]
    data = bad.read_bytes()
    bad.write_bytes(data[:-10])
    with pytest.raises(StoreCorrupted, match=bad.name) as e:
        ActivationStore.open(s.path)
    assert "truncated" in str(e.value)
    bad.unlink()
    with pytest.raises(StoreCorrupted, match=f"{bad.name}: missing"):
        ActivationStore.open(s.path)


def test_verify_catches_edited_shard(synth):
    s, _ = synth
    s.verify()
    bad = s.shard_files()[1]
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    s2 = ActivationStore.open(s.path)            # cheap open: sizes still fine
    with pytest.raises(StoreCorrupted, match=bad.name) as e:
        s2.verify()
    assert "sha256" in str(e.value)
    with pytest.raises(StoreCorrupted, match=bad.name):
        ActivationStore.open(s.path, verify=True)


def test_open_refuses_folder_without_manifest(synth, tmp_path):
    s, _ = synth
    (s.path / "manifest.json").rename(s.path / "progress.json")
    with pytest.raises(WorkbenchError, match="incomplete.*resume"):
        ActivationStore.open(s.path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no manifest.json"):
        ActivationStore.open(tmp_path / "empty")
    with pytest.raises(WorkbenchError, match="does not exist"):
        ActivationStore.open(tmp_path / "nope")


def test_batches_every_row_once_shuffled_deterministic(synth):
    s, (acts, *_), = synth
    n = s.n_rows

    def ids(**kw):
        return [b[:, 0].long().tolist() for b in s.batches("rowid", 8, **kw)]

    a = ids(seed=0, buffer_rows=20)
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(n))                       # every row exactly once
    assert all(len(b) == 8 for b in a[:-1]) and 0 < len(a[-1]) <= 8
    assert flat != list(range(n))                               # shuffled
    assert ids(seed=0, buffer_rows=20) == a                     # deterministic for a seed
    assert ids(seed=1, buffer_rows=20) != a
    b = ids(seed=0, buffer_rows=20, drop_last=True)
    assert all(len(x) == 8 for x in b) and len(b) == n // 8
    # default buffer (whole store fits): still exactly once
    assert sorted(i for b in ids(seed=3) for i in b) == list(range(n))
    # no shuffle: store order
    seq = torch.cat(list(s.batches("blocks.0.hook_resid_post", 7, shuffle=False)))
    assert torch.equal(seq, acts["blocks.0.hook_resid_post"])
    bt = next(iter(s.batches("blocks.1.hook_resid_post", 4, dtype=torch.float64)))
    assert bt.dtype == torch.float64 and bt.shape == (4, 5)


def _count_rows_read(monkeypatch) -> list[int]:
    """A one-element list that counts the activation rows read from shards from now on."""
    loaded = [0]
    orig = store_mod._Shard.tensor

    def counting(self, name, start=0, stop=None):
        t = orig(self, name, start, stop)
        if name.startswith("acts."):
            loaded[0] += t.shape[0]
        return t

    monkeypatch.setattr(store_mod._Shard, "tensor", counting)
    return loaded


def test_batches_memory_bounded(tmp_path, monkeypatch):
    acts, tok, mask, docs, si, po = _synthetic(n_seq=60, seq_len=16)
    s = write_store(tmp_path / "big", acts, tok, mask, docs, si, po, "m", shard_rows=25)
    assert len(s.shard_files()) >= 10
    loaded = _count_rows_read(monkeypatch)
    yielded, peak, bs, buffer_rows = 0, 0, 10, 30
    for b in s.batches("rowid", bs, seed=5, buffer_rows=buffer_rows):
        yielded += b.shape[0]
        peak = max(peak, loaded[0] - yielded)   # rows read from disk but not yet handed out
    assert yielded == s.n_rows == loaded[0]
    # at most one window (>= buffer_rows, plus the last shard that crossed it) plus a carry
    assert peak <= buffer_rows + 25 + bs, peak


def test_batches_mix_rows_across_shards(tmp_path):
    acts, tok, mask, docs, si, po = _synthetic(n_seq=60, seq_len=16)
    s = write_store(tmp_path / "mix", acts, tok, mask, docs, si, po, "m", shard_rows=25)
    first = next(iter(s.batches("rowid", 32, seed=0, buffer_rows=60)))
    shards_hit = {int(i) // 25 for i in first[:, 0].long()}
    assert len(shards_hit) >= 2


def test_write_store_validation(tmp_path, synth):
    acts, tok, mask, docs, si, po = _synthetic()
    bad_po = po.clone()
    # point one row at a padding position
    pad = (~mask).nonzero()[0]
    si2 = si.clone()
    si2[0], bad_po[0] = pad[0], pad[1]
    with pytest.raises(WorkbenchError, match="padding"):
        write_store(tmp_path / "x", acts, tok, mask, docs, si2, bad_po, "m")
    with pytest.raises(WorkbenchError, match="n_rows"):
        write_store(tmp_path / "y", {"h": torch.zeros(3, 2)}, tok, mask, docs, si, po, "m")
    with pytest.raises(WorkbenchError, match="dtype"):
        write_store(tmp_path / "z", acts, tok, mask, docs, si, po, "m", dtype="int8")
    s, _ = synth
    with pytest.raises(FileExistsError, match="overwrite"):
        write_store(s.path, acts, tok, mask, docs, si, po, "m")
    s3 = write_store(s.path, {"h": torch.ones(len(si), 2)}, tok, mask, docs, si, po, "m2", overwrite=True)
    assert s3.hooks == ["h"] and s3.model_name == "m2" and len(s3.shard_files()) == 1


def test_store_pickles(synth):
    s, (acts, *_) = synth
    s.read("rowid", 0, 3)
    s2 = pickle.loads(pickle.dumps(s))
    assert torch.equal(s2.read("rowid"), acts["rowid"])


def test_cli_store_info_verify(synth, capsys):
    from workbench.cli import main
    s, _ = synth
    assert main(["store", "info", str(s.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_rows"] == s.n_rows and out["model"] == "synthetic"
    assert main(["store", "verify", str(s.path)]) == 0
    assert "ok" in capsys.readouterr().out
    f = s.shard_files()[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert main(["store", "verify", str(s.path)]) == 2
    assert f.name in capsys.readouterr().err


# ------------------------------------------------------------------ document split, row-restricted batches

def test_split_rows_by_document(tmp_path):
    from workbench.store_split import _key
    acts, tok, mask, docs, si, po = _synthetic(n_seq=90, seq_len=8)     # 30 documents of 3 windows
    a = write_store(tmp_path / "a", acts, tok, mask, docs, si, po, "m", shard_rows=40)
    b = write_store(tmp_path / "b", acts, tok, mask, docs, si, po, "m", shard_rows=1000)
    tr, ho = a.split_rows(0.1, seed=0)
    assert torch.equal(torch.sort(torch.cat([tr, ho]))[0], torch.arange(a.n_rows))   # a partition
    doc_of_row = docs[si]
    held_docs = set(doc_of_row[ho].tolist())
    assert len(held_docs) == 3                                           # round(0.1 * 30)
    assert not held_docs & set(doc_of_row[tr].tolist())                  # whole documents
    # the rule, computed independently: the 3 document ids with the smallest blake2b keys
    assert held_docs == set(sorted(range(30), key=lambda d: _key(0, d))[:3])
    for x, y in zip(a.split_rows(0.1, seed=0), b.split_rows(0.1, seed=0)):
        assert torch.equal(x, y)                                         # shard layout does not matter
    assert not torch.equal(a.split_rows(0.1, seed=1)[1], ho)
    sp = a.split(0.1, 0)
    assert sp.meta()["unit"] == "document" and sp.meta()["n_heldout_rows"] == ho.numel()
    for st in (a, b, ActivationStore.open(tmp_path / "a")):      # the lean readers the split uses, cold and cached
        assert torch.equal(st.doc_ids(), docs) and torch.equal(st.seq_index(), si)
        st.rows(), st.sequences()
        assert torch.equal(st.doc_ids(), docs) and torch.equal(st.seq_index(), si)
    assert set(sp.heldout_seqs.tolist()) == {i for i in range(90) if int(docs[i]) in held_docs}
    tr0, ho0 = a.split_rows(0.0)
    assert ho0.numel() == 0 and tr0.numel() == a.n_rows
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(WorkbenchError, match=r"fraction in \[0, 1\)"):
            a.split_rows(bad)


def test_split_falls_back_to_sequences_with_too_few_documents(tmp_path):
    acts, tok, mask, docs, si, po = _synthetic(n_seq=40, seq_len=8)
    one = write_store(tmp_path / "one", acts, tok, mask, torch.zeros(40, dtype=torch.long), si, po, "m")
    sp = one.split(0.05, 0)
    assert sp.unit == "sequence" and sp.heldout_seqs.numel() == 2 and "too few" in sp.note
    assert set(si[sp.heldout_rows.indices()].tolist()) == set(sp.heldout_seqs.tolist())
    acts1 = {h: v[si == 0] for h, v in acts.items()}
    n0 = int((si == 0).sum())
    single = write_store(tmp_path / "single", acts1, tok[:1], mask[:1], torch.zeros(1, dtype=torch.long),
                         torch.zeros(n0, dtype=torch.long), po[si == 0], "m")
    with pytest.raises(WorkbenchError, match="too few to hold out.*--holdout 0"):
        single.split_rows(0.05)


def test_batches_restricted_to_rows(tmp_path, monkeypatch):
    acts, tok, mask, docs, si, po = _synthetic(n_seq=60, seq_len=16)
    s = write_store(tmp_path / "r", acts, tok, mask, docs, si, po, "m", shard_rows=25)
    n = s.n_rows
    _, held = s.split_rows(0.2, seed=0)
    loaded = _count_rows_read(monkeypatch)
    got = [b[:, 0].long() for b in s.batches("rowid", 7, seed=3, rows=held, buffer_rows=30)]
    flat = torch.cat(got)
    assert sorted(flat.tolist()) == held.tolist()                  # those rows, each once
    assert loaded[0] == held.numel()                               # only they were read (runs)
    assert flat.tolist() != held.tolist()                          # shuffled
    assert torch.equal(torch.cat([b[:, 0].long() for b in s.batches("rowid", 7, seed=3, rows=held,
                                                                     buffer_rows=30)]), flat)
    ordered = torch.cat(list(s.batches("blocks.0.hook_resid_post", 5, shuffle=False, rows=held)))
    assert torch.equal(ordered, acts["blocks.0.hook_resid_post"][held])
    assert all(b.shape[0] == 5 for b in list(s.batches("rowid", 5, shuffle=False, rows=held, drop_last=True)))
    scattered = torch.arange(0, n, 3).flip(0)                      # unsorted, every third row: fancy index path
    got = torch.cat(list(s.batches("rowid", 8, seed=0, rows=torch.cat([scattered, scattered[:4]]))))[:, 0]
    assert sorted(got.long().tolist()) == sorted(scattered.tolist())
    with pytest.raises(WorkbenchError, match=r"rows must be indices in \[0, "):
        next(s.batches("rowid", 4, rows=torch.tensor([n])))


def test_row_index_and_sequences_at_read_only_what_is_asked(tmp_path):
    """The lean readers equal the whole-store ones on any rows / sequences, in the order asked, across shards
    (several shard sizes), with and without character offsets; out-of-range indices are refused."""
    acts, tok, mask, docs, si, po = _synthetic(n_seq=30, seq_len=8)
    g = torch.Generator().manual_seed(0)
    ends = torch.cumsum(torch.randint(1, 5, tok.shape, generator=g), 1)
    for shard_rows, char_end in ((7, None), (40, ends), (10_000, None)):
        st = write_store(tmp_path / f"s{shard_rows}", acts, tok, mask, docs, si, po, "m", shard_rows=shard_rows,
                         char_end=char_end)
        rows, seqs = st.rows(), st.sequences()
        pick = torch.tensor([5, 0, st.n_rows - 1, 17, 17, 3])
        s_, p_ = st.row_index(pick)
        assert torch.equal(s_, rows["seq_index"][pick]) and torch.equal(p_, rows["position"][pick])
        assert all(t.numel() == 0 for t in st.row_index(torch.tensor([], dtype=torch.long)))
        sp = torch.tensor([29, 0, 11, 11, 4])
        got = st.sequences_at(sp)
        assert set(got) == set(seqs)
        for k, v in seqs.items():
            assert torch.equal(got[k], v[sp]), k
        with pytest.raises(WorkbenchError, match=r"rows must be indices"):
            st.row_index([st.n_rows])
        with pytest.raises(WorkbenchError, match=r"sequences must be indices"):
            st.sequences_at([-1])
