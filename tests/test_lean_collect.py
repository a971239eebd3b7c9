"""Collect's remaining speed machinery: Model.run skipping the bridge's duplicate norm statistics,
and the background shard writer (same bytes as writing inline; its errors surface, never a
half-recorded store)."""

import concurrent.futures as cf
import contextlib
import hashlib
import json
import threading

import pytest
import torch

from workbench import collector
from workbench.collector import collect
from workbench.errors import WorkbenchError
from workbench.models import Model
from workbench.store import PROGRESS, ActivationStore, StoreWriter

KW = dict(hooks=["blocks.1.hook_resid_post"], corpus="builtin", max_tokens=1500, seq_len=32,
          batch_size=4, progress=False, shard_mb=0.05)


@pytest.fixture(scope="module")
def tiny():
    from workbench.models import load_model
    return load_model("tiny-random:layers=2")


@pytest.fixture
def rsqrt_calls(monkeypatch):
    """Counts torch.rsqrt calls: one per RMSNorm in HF's LlamaRMSNorm, one more per norm when
    the bridge computes its observe-only hook_scale / hook_normalized statistics."""
    calls = []
    real = torch.rsqrt

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(torch, "rsqrt", counting)
    return calls


def _batch(tiny):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, tiny.vocab_size, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    return ids, mask


def _hf_norms(tiny, layers):
    return sum(type(m).__name__.endswith("RMSNorm") for layer in tiny.hf_model.model.layers[:layers]
               for m in layer.modules())


def test_run_computes_each_norm_once_with_the_same_values(tiny, rsqrt_calls, monkeypatch):
    ids, mask = _batch(tiny)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.ln2.hook_out", "blocks.1.hook_resid_mid"]
    lean = tiny.run(ids, mask, hooks)
    n_lean = len(rsqrt_calls)
    assert n_lean == _hf_norms(tiny, 2) == 4              # HF's norms of blocks 0-1, nothing more
    monkeypatch.setattr(Model, "_lean_norms", lambda self, want: contextlib.nullcontext())
    del rsqrt_calls[:]
    full = tiny.run(ids, mask, hooks)
    assert len(rsqrt_calls) == 2 * n_lean                 # the bridge's own path: every norm twice
    for h in hooks:
        assert torch.equal(lean[h], full[h]), h


def test_norm_statistic_hooks_still_fire(tiny, rsqrt_calls, monkeypatch):
    """A wanted hook_scale / hook_normalized, or one hooked by someone else, keeps that norm on
    the bridge's path (and its values match the bridge's own forward)."""
    ids, mask = _batch(tiny)
    hooks = ["blocks.0.ln1.hook_normalized", "blocks.1.hook_resid_post"]
    got = tiny.run(ids, mask, hooks)
    assert len(rsqrt_calls) == _hf_norms(tiny, 2) + 1      # only ln1 of block 0 runs its statistics
    x = tiny.run(ids, mask, ["blocks.0.ln1.hook_in"])["blocks.0.ln1.hook_in"]
    eps = tiny.hf_model.model.layers[0].input_layernorm.variance_epsilon
    want = x * (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5     # independent RMS normalisation
    real = mask.bool()
    torch.testing.assert_close(got["blocks.0.ln1.hook_normalized"][real], want[real], rtol=1e-5, atol=1e-6)

    seen = []
    hp = tiny.bridge.hook_dict["blocks.1.ln2.hook_scale"]
    hp.add_hook(lambda t, hook: seen.append(t.shape), dir="fwd")
    try:
        tiny.run(ids, mask, ["blocks.1.hook_resid_post"])
    finally:
        hp.remove_hooks("fwd")
    assert seen == [torch.Size([3, 20, 1])]
    monkeypatch.setattr(Model, "_lean_norms", lambda self, want: contextlib.nullcontext())
    full = tiny.run(ids, mask, hooks)
    for h in hooks:
        assert torch.equal(got[h], full[h]), h


def _sync_submit(pool, pending, writer, buf):
    """The shard written inline, on the main thread: what the background writer must equal."""
    f = cf.Future()
    f.set_result(writer.write_shard(*buf.tensors()))
    return f


def test_background_writer_equals_inline_writes(tiny, tmp_path, monkeypatch):
    bg = collect(tiny, out=tmp_path / "bg", **KW)
    monkeypatch.setattr(collector, "_submit", _sync_submit)
    inline = collect(tiny, out=tmp_path / "inline", **KW)
    assert len(bg.shard_files()) > 3
    assert [p.read_bytes() for p in bg.shard_files()] == [p.read_bytes() for p in inline.shard_files()]
    assert bg.n_rows == inline.n_rows == KW["max_tokens"]


def test_writer_error_surfaces_and_the_store_resumes(tiny, tmp_path, monkeypatch):
    """A failed shard write in the writer thread fails collect with that error; progress.json
    then lists only complete shards (checksums match), and a rerun finishes byte-identical."""
    ref = collect(tiny, out=tmp_path / "ref", **KW)
    real = StoreWriter.write_shard
    where = []

    def failing(self, *a, **k):
        if len(self.shards) == 2:
            where.append(threading.current_thread().name)
            raise OSError(28, "No space left on device (injected)")
        return real(self, *a, **k)
    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    with pytest.raises(OSError, match="injected"):
        collect(tiny, out=tmp_path / "x", **KW)
    assert where and where[0].startswith("store-writer")          # it did fail in the thread
    assert not any(t.name.startswith("store-writer") and t.is_alive() for t in threading.enumerate())
    with pytest.raises(WorkbenchError, match="incomplete"):
        ActivationStore.open(tmp_path / "x")
    progress = json.loads((tmp_path / "x" / PROGRESS).read_text())
    assert len(progress["shards"]) == 2
    for e in progress["shards"]:
        assert hashlib.sha256((tmp_path / "x" / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    x = collect(tiny, out=tmp_path / "x", **KW)
    assert [p.read_bytes() for p in x.shard_files()] == [p.read_bytes() for p in ref.shard_files()]


def test_writer_thread_runs_no_torch_op(tiny, tmp_path, monkeypatch):
    """The shard is joined and converted to its stored dtypes on the collecting thread, so the
    writer thread never starts a second OpenMP team (which would switch libgomp's threads from
    spinning to sleeping, and the forward passes into another regime than a plain forward)."""
    joined_on, handed = [], []
    real_tensors = collector._ShardBuffer.tensors

    def tensors(self):
        joined_on.append(threading.current_thread().name)
        return real_tensors(self)
    real_write = StoreWriter.write_shard

    def write(self, acts, si, po, tok, mask, doc, ends=None):
        handed.append((threading.current_thread().name, [t.dtype for t in (si, po, tok, mask, doc)],
                       None if ends is None else ends.dtype))
        return real_write(self, acts, si, po, tok, mask, doc, ends)
    monkeypatch.setattr(collector._ShardBuffer, "tensors", tensors)
    monkeypatch.setattr(StoreWriter, "write_shard", write)
    s = collect(tiny, out=tmp_path / "a", **KW)
    assert len(handed) == len(s.shard_files()) > 2
    assert set(joined_on) == {threading.main_thread().name}
    for thread, dtypes, ends in handed:
        assert thread.startswith("store-writer")
        assert dtypes == [torch.int32, torch.int32, torch.int32, torch.bool, torch.int64]
        assert ends in (None, torch.int32)
