"""Fast steering decode (workbench/_fast_decode.py): the plain Hugging Face model with one torch hook
gives the TransformerBridge path's logits at every decode step (steered and not, greedy and sampled),
keeps the SAE error-term splice exact, and falls back to the bridge where no module fits."""

import threading

import pytest
import torch

from workbench import interventions as iv
from workbench._fast_decode import FastDecoder, fast_decoder
from workbench.errors import WorkbenchError
from workbench.models import load_model

TEXT = "the quick brown fox jumps over the lazy dog"
HOOKS = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny-random (Llama) and a tiny GPT-2 folder (another module layout: h.i, h.i.attn, h.i.mlp)."""
    from tiny_hf_folders import make_folder
    gpt2 = make_folder("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2")
    return {"llama": load_model("tiny-random", device="cpu"), "gpt2": load_model(str(gpt2), device="cpu")}


def _sae(d: int, seed: int = 0):
    from analyses.sae import make_sae
    torch.manual_seed(seed)
    sae = make_sae("topk", d_in=d, d_sae=64, k=8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def _both(m, ids, hook, inter, n=6, **kw):
    """(tokens, per-step logits) of the fast path and of the bridge path."""
    out = []
    for path in ("fast", "bridge"):
        rec: list = []
        out.append((iv.generate(m, ids, hook, inter, n, path=path, record=rec, **kw), torch.stack(rec)))
    return out


def _steer(m, hook, ids, skip):
    """Two clamped latents everywhere, a direction added everywhere and a stronger one added at two
    generated positions only (so the position offset of each decode step matters)."""
    sae = _sae(m.d(hook))
    g = torch.Generator().manual_seed(1)
    u, w = torch.nn.functional.normalize(torch.randn(2, m.d(hook), generator=g), dim=1)
    s = ids.shape[1]
    edits = iv.latent_edits([3, 7], [25.0, 8.0], "clamp", 64) + [
        iv.Edit(4.0, "add", direction=u), iv.Edit(40.0, "add", direction=w, positions=(s, s + 2))]
    return iv.Intervention(edits, sae, skip=skip)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", HOOKS)
def test_fast_path_equals_bridge_at_every_step(models, family, hook):
    """generate() alone and generate_pair() (both rows in one batch) on the fast path give the bridge
    path's logits at every step, unsteered and steered, and the same greedy and sampled tokens."""
    m = models[family]
    assert iv.decode_path(m, hook) == "fast"
    ids, skip = iv.tokenize(m, TEXT)
    steer = _steer(m, hook, ids, skip)
    pair_rec: tuple[list, list] = ([], [])
    pair = iv.generate_pair(m, ids, hook, steer, 6, path="fast", records=pair_rec)
    runs = {}
    for r, (name, inter) in enumerate((("clean", None), ("steered", steer))):
        (tok_f, log_f), (tok_b, log_b) = _both(m, ids, hook, inter)
        assert tok_f == tok_b == pair[r], (name, tok_f, tok_b, pair[r])
        torch.testing.assert_close(log_f, log_b, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.stack(pair_rec[r]), log_b, rtol=0, atol=1e-4)
        runs[name] = log_f
    # the steered comparison means something: the edit moves the logits
    assert (runs["steered"][0] - runs["clean"][0]).abs().max() > 1e-2
    # sampled generation draws the same tokens too (each row of the pair with its own sampler)
    sampled = [iv.generate(m, ids, hook, x, 5, temperature=0.9, seed=4, path="bridge") for x in (None, steer)]
    assert [iv.generate(m, ids, hook, x, 5, temperature=0.9, seed=4, path="fast") for x in (None, steer)] == sampled
    assert list(iv.generate_pair(m, ids, hook, steer, 5, temperature=0.9, seed=4, path="fast")) == sampled


def test_pair_rows_stop_at_their_own_eos(models, monkeypatch):
    """A row of the pair that emits EOS stops there while the other goes on, as alone."""
    m = models["llama"]
    hook = HOOKS[0]
    ids, skip = iv.tokenize(m, TEXT)
    steer = iv.Intervention(iv.latent_edits([3], [60.0], "add", 64), _sae(m.d(hook)), skip=skip)
    clean, steered = (iv.generate(m, ids, hook, x, 8, path="bridge") for x in (None, steer))
    for row, other in ((steered, clean), (clean, steered)):
        stop = next((t for t in row[1:4] if t not in other), None)
        if stop is None:
            continue
        monkeypatch.setitem(m.special_ids, "eos", stop)
        want = [iv.generate(m, ids, hook, x, 8, path="bridge") for x in (None, steer)]
        assert min(len(w) for w in want) < 8 and max(len(w) for w in want) == 8
        assert list(iv.generate_pair(m, ids, hook, steer, 8, path="fast")) == want
        return
    pytest.fail("no token of one generation is missing from the other: pick another steer")


@pytest.mark.parametrize("hook", HOOKS)
def test_error_term_splice_exact_on_fast_path(models, hook):
    """Clamping a latent to its own activation (and the bare splice) reproduces the unsteered logits."""
    m = models["llama"]
    ids, skip = iv.tokenize(m, TEXT)
    sae = _sae(m.d(hook), seed=2)
    x = m.run(ids, None, [hook])[hook][0]
    with torch.no_grad():
        f = sae.encode(x)
    p = ids.shape[1] - 1                      # the last prompt position: every decode step reads it
    i = int(f[p].argmax())
    assert f[p, i] > 0
    own = iv.Intervention([iv.Edit(float(f[p, i]), "clamp", latent=i, positions=(p,))], sae, skip=skip)
    bare = iv.Intervention([], sae, skip=skip, splice=True)
    clean: list = []
    ref = iv.generate(m, ids, hook, None, 6, path="fast", record=clean)
    for inter in (own, bare):
        rec: list = []
        assert iv.generate(m, ids, hook, inter, 6, path="fast", record=rec) == ref
        torch.testing.assert_close(torch.stack(rec), torch.stack(clean), rtol=1e-5, atol=1e-5)
    # a different value at the same place does change them (the splice is really there)
    big = iv.Intervention([iv.Edit(float(f[p, i]) + 50, "clamp", latent=i, positions=(p,))], sae, skip=skip)
    rec = []
    iv.generate(m, ids, hook, big, 1, path="fast", record=rec)
    assert (rec[0] - clean[0]).abs().max() > 1e-3


def test_steer_table_same_on_both_paths(models):
    m = models["llama"]
    hook = "blocks.0.hook_resid_post"
    sae = _sae(m.d(hook), seed=3)
    kw = dict(sae=sae, model=m, hook=hook, latents=[5], values=[30.0], mode="add", max_new_tokens=5)
    fast = iv.steer(TEXT, **kw)
    slow = iv.steer(TEXT, path="bridge", **kw)
    assert fast.attrs["path"] == "fast" and slow.attrs["path"] == "bridge"
    for k in ("unsteered_ids", "steered_ids"):
        assert fast.attrs[k] == slow.attrs[k]
    assert fast.attrs["steered_ids"] != fast.attrs["unsteered_ids"]
    for col in ("p_clean", "p_steered", "kl"):
        torch.testing.assert_close(torch.tensor(fast[col].to_numpy()), torch.tensor(slow[col].to_numpy()),
                                   rtol=1e-4, atol=1e-5, equal_nan=True)


def test_fallback_to_bridge(models, monkeypatch):
    m = models["llama"]
    hook = "blocks.1.hook_resid_mid"          # inside a decoder layer: no HF module outputs it
    assert iv.decode_path(m, hook) == "bridge"
    with pytest.raises(WorkbenchError, match="no fast decode path.*resid_mid"):
        iv.generate(m, iv.tokenize(m, TEXT)[0], hook, None, 2, path="fast")
    with pytest.raises(WorkbenchError, match="path must be one of"):
        iv.generate(m, iv.tokenize(m, TEXT)[0], hook, None, 2, path="quick")
    sae = _sae(m.d(hook))
    df = iv.steer(TEXT, sae=sae, model=m, hook=hook, latents=[1], values=[9.0], max_new_tokens=3)
    assert df.attrs["path"] == "bridge"
    # a model family with no module table: every hook takes the bridge
    monkeypatch.setattr(m.hf_model.config, "model_type", "some_new_arch")
    assert not FastDecoder(m).ok


def test_probe_refuses_a_wrong_module(models, monkeypatch):
    """A hook mapped to a module whose output is not its activation is caught at the probe."""
    from analyses.sae import sparsify
    m = models["llama"]
    layout = dict(sparsify.LAYOUTS["llama"], attn="layers.{i}.mlp")
    monkeypatch.setitem(sparsify.LAYOUTS, "llama", layout)
    fd = FastDecoder(m)
    assert "blocks.1.hook_attn_out" in fd.paths and "blocks.1.hook_attn_out" not in fd.ok
    assert "blocks.1.hook_mlp_out" in fd.ok and "blocks.1.hook_resid_post" in fd.ok


def test_hook_applies_to_its_own_thread_and_copy_only(models):
    m = models["llama"]
    hook = "blocks.0.hook_resid_post"
    fd = fast_decoder(m, hook, "fast")
    ids = iv.tokenize(m, TEXT)[0]
    clean = fd.logits(ids, hook)
    bridge_clean = m.logits(ids)
    other = {}
    with fd.hooked(hook, lambda a: a + 5.0):
        mine = fd.logits(ids, hook)
        t = threading.Thread(target=lambda: other.setdefault("x", fd.logits(ids, hook)))
        t.start()
        t.join()
        bridge_now = m.logits(ids)            # the plain copy's hook never reaches the bridge's modules
    assert (mine - clean).abs().max() > 1e-2
    torch.testing.assert_close(other["x"], clean, rtol=0, atol=0)
    torch.testing.assert_close(bridge_now, bridge_clean, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_fast_equals_bridge():
    """The real embedded model: fast and bridge decode agree at every step, steered and not."""
    m = load_model("smollm2-135m", device="cpu")
    hook = "blocks.6.hook_resid_post"
    ids, skip = iv.tokenize(m, "The capital of France is")
    from analyses.sae import make_sae
    torch.manual_seed(0)
    sae = make_sae("topk", d_in=m.d_model, d_sae=1024, k=16).eval()
    steer = iv.Intervention(iv.latent_edits([10], [60.0], "add", 1024), sae, skip=skip)
    assert iv.decode_path(m, hook) == "fast"
    logs = {}
    pair_rec: tuple[list, list] = ([], [])
    pair = iv.generate_pair(m, ids, hook, steer, 6, path="fast", records=pair_rec)
    for r, (name, inter) in enumerate((("clean", None), ("steered", steer))):
        (tok_f, log_f), (tok_b, log_b) = _both(m, ids, hook, inter, n=6)
        assert tok_f == tok_b == pair[r]
        tol = 1e-4 * float(log_b.abs().max())
        torch.testing.assert_close(log_f, log_b, rtol=1e-5, atol=tol)
        torch.testing.assert_close(torch.stack(pair_rec[r]), log_b, rtol=1e-5, atol=tol)
        logs[name] = log_f
    assert (logs["steered"] - logs["clean"]).abs().max() > 0.1
