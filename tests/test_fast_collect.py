"""Collect near the bare forward: fused (SDPA) attention in Model.run, tokenising ahead."""

import threading
import time

import pytest
import torch

from workbench import collector
from workbench.collector import collect
from workbench.corpus import ReadAhead

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    from workbench.models import load_model
    return load_model("tiny-random:layers=2")


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's fused attention (what HF's "sdpa" attention calls)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _batch(tiny, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.vocab_size, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    return ids, mask


def _hf_resid(tiny, ids, mask, attn):
    """Residual stream after each layer from a plain HF model with the given attention."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny.source, dtype=torch.float32,
                                              attn_implementation=attn).eval()
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o)
                                                                       .detach().clone()))
               for layer in hf.model.layers]
    try:
        with torch.inference_mode():
            hf.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_run_uses_sdpa_and_matches_hf(tiny, sdpa_calls):
    ids, mask = _batch(tiny)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    assert tiny.attention_for(hooks) == "sdpa"
    got = tiny.run(ids, mask, hooks)
    assert len(sdpa_calls) == 2                        # one fused call per layer run
    real = mask.bool()
    for attn in ("eager", "sdpa"):
        ref = _hf_resid(tiny, ids, mask, attn)
        for layer in (0, 1):
            a, b = got[f"blocks.{layer}.hook_resid_post"][real], ref[layer][real]
            assert (a - b).abs().max().item() <= ATOL, (attn, layer)
    # hooks inside attention still fire on the fused path and equal the eager bridge's values
    sdpa_calls.clear()
    eager = {}
    with torch.inference_mode():
        tiny.bridge.run_with_hooks(ids, attention_mask=mask, return_type=None, fwd_hooks=[
            ("blocks.1.attn.hook_z", lambda t, hook: eager.setdefault("z", t.clone()))])
    assert sdpa_calls == []                           # the plain bridge stays eager
    z = eager["z"].reshape(*ids.shape, -1)
    assert (got["blocks.1.attn.hook_z"][real] - z[real]).abs().max().item() <= ATOL


def test_attention_pattern_hooks_stay_eager(tiny, sdpa_calls):
    ids, mask = _batch(tiny, seed=1)
    assert tiny.attention_for(["blocks.1.attn.hook_rot_q"]) == "eager"
    assert tiny.attention_for(["blocks.0.hook_resid_post", "blocks.1.attn.hook_rot_k"]) == "eager"
    out = tiny.run(ids, mask, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_rot_k"])
    assert sdpa_calls == []
    assert out["blocks.1.attn.hook_rot_k"].shape[:2] == ids.shape
    # the model is left as it was: eager config, bridge forwards restored
    assert tiny.hf_model.config._attn_implementation == "eager"
    assert all("forward" not in ab.__dict__ for ab in tiny._attention_bridges())


def test_logits_and_run_agree_at_a_hook(tiny, sdpa_calls):
    ids, mask = _batch(tiny, seed=2)
    run = tiny.run(ids, mask, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    seen = {}
    tiny.logits(ids, mask, hook="blocks.0.hook_resid_post",
                replace=lambda a: seen.setdefault("a", a.clone()))
    assert torch.equal(seen["a"], run)
    assert len(sdpa_calls) == 1 + 2                    # run: layer 0 only; logits: both layers


def test_read_ahead_order_errors_and_close():
    assert list(ReadAhead(range(50), 3)) == list(range(50))
    assert list(ReadAhead(iter(range(5)), 0)) == list(range(5))

    def broken():
        yield 1
        raise ValueError("bad line 2")
    it = iter(ReadAhead(broken(), 2))
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad line 2"):
        next(it)

    produced = []

    def slow():
        for i in range(1000):
            produced.append(i)
            yield i
    ra = ReadAhead(slow(), 2)
    time.sleep(0.2)
    assert len(produced) <= 2 + 2                      # bounded: the queue plus one in hand
    for i, _ in enumerate(ra):
        if i == 3:
            break
    ra.close()
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 20


def test_read_ahead_store_is_byte_identical(tiny, tmp_path, monkeypatch):
    """Tokenising ahead changes nothing on disk: same shards, same rows, same documents."""
    kw = dict(hooks=["blocks.1.hook_resid_post"], corpus="builtin", max_tokens=1500, seq_len=32,
              batch_size=4, progress=False, shard_mb=0.05)
    monkeypatch.setattr(collector, "READ_AHEAD", 0)
    a = collect(tiny, out=tmp_path / "inline", **kw)
    monkeypatch.setattr(collector, "READ_AHEAD", 3)
    b = collect(tiny, out=tmp_path / "ahead", **kw)
    assert len(a.shard_files()) > 2
    assert [p.read_bytes() for p in a.shard_files()] == [p.read_bytes() for p in b.shard_files()]
    assert a.manifest.get("documents") == b.manifest.get("documents")
    assert b.manifest["extra"]["attention"] == "sdpa"


def test_heap_trimmed_per_bytes_written_not_per_shard(tiny, tmp_path, monkeypatch):
    """Each malloc_trim makes the next forwards fault their buffers back in: trim once every
    TRIM_EVERY bytes of shards, not after every shard."""
    trims = []
    monkeypatch.setattr(collector, "_MALLOC_TRIM", lambda pad: trims.append(pad) or 1)
    monkeypatch.setattr(collector, "_TRIMMED", [0])
    kw = dict(hooks=["blocks.1.hook_resid_post"], corpus="builtin", max_tokens=1500, seq_len=32,
              batch_size=4, progress=False, shard_mb=0.05)
    s = collect(tiny, out=tmp_path / "a", **kw)
    n_shards = len(s.shard_files())
    assert n_shards > 2 and trims == []                # 1500 rows x 64 floats << 256 MiB
    monkeypatch.setattr(collector, "TRIM_EVERY", 1)
    collect(tiny, out=tmp_path / "b", **kw)
    assert len(trims) == n_shards
