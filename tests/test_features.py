"""Feature-dashboard data (analyses.features + step `features`) against brute force on a small
synthetic store: every panel is recomputed densely here and compared."""

import math

import pytest
import torch

from analyses.features import (FeatureStatsAccumulator, decoder_neighbours, feature_stats, logit_table,
                               neuron_alignment)
from workbench.store import write_store
from workbench.steps import features as F

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE, VOCAB = 8, 24, 60
N_TOP, N_BUCKETS, PER_BUCKET, HIST, CONTEXT = 6, 4, 3, 8, 2


class StandInSAE:
    """Same attributes as analyses.sae SAEs; activations quantised to 0.25 so ties happen."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN)
        self.W_dec = torch.randn(D_SAE, D_IN, generator=g)
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.b_enc = torch.linspace(-1.5, 0.2, D_SAE)        # densities from rare to common
        self.b_dec = torch.zeros(D_IN)
        self.W_enc[:, 3] = 0.0                                # latent 3 never fires (dead)
        self.b_enc[3] = -1.0
        self.cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
                    "metadata": {"hook_name": HOOK, "model_name": "synthetic"}}

    def encode(self, x):
        z = torch.relu((x.float() - self.b_dec) @ self.W_enc + self.b_enc)
        return (z * 4).round() / 4

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


def _synthetic_store(path, n_seq=14, seq_len=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(5, VOCAB, (n_seq, seq_len), generator=g)
    mask = torch.ones(n_seq, seq_len, dtype=torch.bool)
    lengths = torch.randint(4, seq_len + 1, (n_seq,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = False
        tok[i, n:] = 0
    tok[:, 0] = 1                                           # BOS: a token that is NOT a row
    rowmask = mask.clone()
    rowmask[:, 0] = False
    si, po = rowmask.nonzero(as_tuple=True)
    acts = {HOOK: torch.randn(len(si), D_IN, generator=g) * 2}
    docs = torch.arange(n_seq) // 2
    return write_store(path, acts, tok, mask, docs, si, po, "synthetic", shard_rows=23)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    store = _synthetic_store(tmp / "store")
    sae = StandInSAE()
    W_U = torch.randn(D_IN, VOCAB, generator=torch.Generator().manual_seed(5))
    meta, tensors, strings = F.compute_features(
        sae, store, batch_size=7, context=CONTEXT, n_top=N_TOP, n_buckets=N_BUCKETS, per_bucket=PER_BUCKET,
        hist_bins=HIST, n_neighbours=5, n_neurons=3, n_logits=4, logit_bins=10, W_U=W_U,
        tokenizer=FakeTokenizer(), device="cpu")
    meta.update(sae="x", store=str(store.path) if hasattr(store, "path") else "", model="synthetic")
    F.write_features(tmp / "out", meta, tensors, strings)
    fd = F.load_features(tmp / "out")
    A = sae.encode(store.read(HOOK, dtype=torch.float32))      # dense brute force [n, d_sae]
    return {"store": store, "sae": sae, "W_U": W_U, "fd": fd, "A": A, "t": tensors, "meta": meta}


def _sorted_top(col, k):
    """Rows of one latent's column by value desc, then row asc; firing rows only."""
    rows = sorted(range(col.numel()), key=lambda r: (-float(col[r]), r))
    return [r for r in rows if col[r] > 0][:k]


def test_counts_density_max_mean(setup):
    A, fd = setup["A"], setup["fd"]
    fires = A > 0
    assert fd.n_tokens == A.shape[0]
    assert torch.equal(fd.t["count"], fires.sum(0))
    assert torch.allclose(fd.density(), fires.double().mean(0))
    assert torch.allclose(fd.t["max"], A.max(0).values)
    mean = torch.where(fires.sum(0) > 0, (A * fires).sum(0) / fires.sum(0).clamp(min=1), torch.zeros(D_SAE))
    assert torch.allclose(fd.t["mean"], mean, atol=1e-6)
    assert fd.t["count"][3] == 0 and fd.latent(3)["top_examples"] == [] and fd.latent(3)["buckets"] == []
    assert (fd.t["count"] > 0).sum() >= D_SAE - 1


def test_top_examples_equal_sorted_columns(setup):
    A, t = setup["A"], setup["t"]
    n_ties = 0
    for f in range(D_SAE):
        want = _sorted_top(A[:, f], N_TOP)
        got = [r for r in t["top_rows"][f].tolist() if r >= 0]
        assert got == want, f"latent {f}"
        assert torch.equal(t["top_values"][f, :len(want)], A[want, f])
        assert (t["top_rows"][f, len(want):] == -1).all()
        n_ties += int((A[want, f][1:] == A[want, f][:-1]).sum())
    assert n_ties > 0   # the quantised data really exercises the tie rule


def test_order_and_batch_size_do_not_matter(setup):
    A = setup["A"]
    perm = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(3))

    def batches(bs, order):
        return lambda: ((A[order[s:s + bs]], order[s:s + bs]) for s in range(0, len(order), bs))

    kw = dict(n_top=N_TOP, n_buckets=N_BUCKETS, per_bucket=PER_BUCKET, hist_bins=HIST)
    a = feature_stats(batches(5, torch.arange(A.shape[0])), D_SAE, **kw)
    b = feature_stats(batches(64, perm), D_SAE, chunk_elems=D_SAE * 3, **kw)   # tiny chunks
    for name in ("count", "max", "top_rows", "top_values", "bucket_rows", "bucket_values", "hist_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.top_rows, setup["t"]["top_rows"])


def test_reencoding_pass_2_gives_the_same_result(setup):
    """Pass 2 normally reuses pass 1's sparse codes; without the cache (or over budget) it encodes
    again — same numbers either way."""
    kw = dict(batch_size=7, context=CONTEXT, n_top=N_TOP, n_buckets=N_BUCKETS, per_bucket=PER_BUCKET,
              hist_bins=HIST, n_neighbours=5, n_neurons=3, device="cpu")
    assert setup["meta"]["codes_cached"]
    for cache_mb in (0, 1e-4):
        meta, t, _ = F.compute_features(setup["sae"], setup["store"], cache_mb=cache_mb, **kw)
        assert not meta["codes_cached"]
        for name, v in t.items():
            assert torch.equal(v.nan_to_num(-7), setup["t"][name].nan_to_num(-7)), name


def test_dense_codes_use_the_chunk_prefilter():
    g = torch.Generator().manual_seed(0)
    A = (torch.rand(300, 10, generator=g) * 8).round() / 8 + 0.01    # every latent fires everywhere
    acc = FeatureStatsAccumulator(10, n_top=4, n_buckets=0, hist_bins=0)
    for s in range(0, 300, 100):
        acc.update(A[s:s + 100], torch.arange(s, s + 100))
    acc.end_pass()
    st = acc.result()
    for f in range(10):
        assert st.top_rows[f].tolist() == _sorted_top(A[:, f], 4)


def test_buckets_hold_examples_of_their_bin(setup):
    A, t = setup["A"], setup["t"]
    mx = A.max(0).values
    checked = 0
    for f in range(D_SAE):
        col = A[:, f]
        if mx[f] == 0:
            assert (t["bucket_rows"][f] == -1).all()
            continue
        binof = ((col / mx[f]) * N_BUCKETS).floor().clamp(0, N_BUCKETS - 1).long()
        for b in range(N_BUCKETS):
            members = ((col > 0) & (binof == b)).nonzero().flatten()
            assert int(t["bucket_counts"][f, b]) == members.numel()
            rows = [r for r in t["bucket_rows"][f, b].tolist() if r >= 0]
            assert len(rows) == min(PER_BUCKET, members.numel())
            assert len(set(rows)) == len(rows)
            lo, hi = float(mx[f]) * b / N_BUCKETS, float(mx[f]) * (b + 1) / N_BUCKETS
            for r, v in zip(rows, t["bucket_values"][f, b].tolist()):
                assert v == float(col[r]) and lo <= v and (v < hi or (b == N_BUCKETS - 1 and v <= hi))
                checked += 1
            vals = t["bucket_values"][f, b, :len(rows)]
            assert (vals[:-1] >= vals[1:]).all()                      # shown value-descending
    assert checked > 50


def test_histograms_sum_to_counts_and_match_dense(setup):
    A, t, fd = setup["A"], setup["t"], setup["fd"]
    assert torch.equal(t["hist_counts"].sum(1), t["count"])
    mx = A.max(0).values
    for f in range(D_SAE):
        col = A[:, f][A[:, f] > 0]
        if col.numel() == 0:
            continue
        hb = (col / mx[f] * HIST).floor().clamp(0, HIST - 1).long()
        assert torch.equal(t["hist_counts"][f], torch.bincount(hb, minlength=HIST))
    h = fd.latent(5)["histogram"]
    assert len(h["edges"]) == HIST + 1 and sum(h["counts"]) == int(t["count"][5])
    assert h["edges"][-1] == pytest.approx(float(mx[5]))


def test_logit_table_equals_dense(setup):
    sae, W_U, t, fd = setup["sae"], setup["W_U"], setup["t"], setup["fd"]
    L = sae.W_dec @ W_U
    top = L.sort(dim=1, descending=True)
    bot = L.sort(dim=1)
    assert torch.equal(t["logit_top_ids"], top.indices[:, :4])
    assert torch.allclose(t["logit_top_values"], top.values[:, :4], atol=1e-5)
    assert torch.equal(t["logit_bottom_ids"], bot.indices[:, :4])
    assert torch.allclose(t["logit_bottom_values"], bot.values[:, :4], atol=1e-5)
    assert (t["logit_hist_counts"].sum(1) == VOCAB).all()
    assert torch.allclose(t["logit_hist_range"], torch.stack([L.min(1).values, L.max(1).values], 1), atol=1e-5)
    d = fd.latent(7)["logits"]
    assert [x["id"] for x in d["top"]] == top.indices[7, :4].tolist()
    assert d["top"][0]["token"] == f"<{int(top.indices[7, 0])}>"
    assert fd.has_logits and fd.meta["logits_reason"] == ""
    # blocked computation gives the same as one block
    lt = logit_table(sae.W_dec, W_U, k=4, bins=10, max_block_elems=VOCAB * 5)
    assert torch.equal(lt["top_ids"], t["logit_top_ids"]) and torch.equal(lt["hist_counts"], t["logit_hist_counts"])


def test_neighbours_equal_dense_cosine_argsort(setup):
    W = setup["sae"].W_dec
    Wn = W / W.norm(dim=1, keepdim=True)
    C = Wn @ Wn.T
    C.fill_diagonal_(-float("inf"))
    want = C.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(setup["t"]["neighbour_ids"], want)
    assert torch.allclose(setup["t"]["neighbour_cos"], C.gather(1, want), atol=1e-6)
    ids, cos = decoder_neighbours(W, n=5, block=7)          # blocks that do not divide d_sae
    assert torch.equal(ids, want)
    assert setup["fd"].latent(0)["neighbours"][0]["latent"] == int(want[0, 0])


def test_neuron_alignment(setup):
    W = setup["sae"].W_dec
    ids, vals, frac = neuron_alignment(W, n=3)
    want = W.abs().argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(ids, want) and torch.equal(vals, W.gather(1, want))
    assert torch.allclose(frac, W.abs().gather(1, want) / W.abs().sum(1, keepdim=True))
    assert setup["fd"].latent(2)["neurons"][0]["neuron"] == int(want[2, 0])


def test_example_windows_map_back_to_tokens(setup):
    store, A, fd = setup["store"], setup["A"], setup["fd"]
    rows, seqs = store.rows(), store.sequences()
    si, po = rows["seq_index"], rows["position"]
    tok, mask = seqs["token_ids"], seqs["attention_mask"]
    rowmap = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(si, po))}
    n_none = n_checked = 0
    for f in range(D_SAE):
        d = fd.latent(f)
        exs = d["top_examples"] + [e for b in d["buckets"] for e in b["examples"]]
        for ex in exs:
            r = ex["row"]
            s, p = int(si[r]), int(po[r])
            assert (ex["seq"], ex["pos"]) == (s, p) and ex["doc"] == s // 2
            positions = [q for q in range(p - CONTEXT, p + CONTEXT + 1) if 0 <= q < tok.shape[1] and mask[s, q]]
            assert ex["token_ids"] == [int(tok[s, q]) for q in positions]
            assert ex["tokens"] == [f"<{int(tok[s, q])}>" for q in positions]
            assert positions[ex["center"]] == p
            assert ex["acts"][ex["center"]] == pytest.approx(ex["value"], rel=1e-3)
            assert ex["value"] == pytest.approx(float(A[r, f]))
            for q, a in zip(positions, ex["acts"]):
                if (s, q) in rowmap:
                    assert a == pytest.approx(float(A[rowmap[(s, q)], f]), rel=1e-3, abs=1e-3)
                else:
                    assert a is None and q == 0      # BOS is not a row
                    n_none += 1
            n_checked += 1
    assert n_checked > 100 and n_none > 0


def test_example_windows_read_sequences_a_chunk_at_a_time(setup, monkeypatch):
    """The windows of the examples' rows are the same whatever the chunk of sequences read at once, and no
    read asks for more than a chunk (a wide SAE's examples reach every sequence: reading them all at once
    held every token of the store)."""
    from types import SimpleNamespace
    store, t = setup["store"], setup["t"]
    seqs, rows = store.sequences(), store.rows()
    st = SimpleNamespace(top_rows=t["top_rows"], bucket_rows=t["bucket_rows"])
    asked, real = [], type(store).sequences_at

    def spy(self, idx):
        asked.append(len(idx))
        return real(self, idx)

    monkeypatch.setattr(type(store), "sequences_at", spy)
    whole = F._example_windows(st, store, CONTEXT, chunk=10 ** 6)
    assert whole["ref_rows"].numel() > 20 and len(torch.unique(whole["ref_seq"])) > 5 and asked == [
        len(torch.unique(whole["ref_seq"]))]
    s_, p_ = rows["seq_index"][whole["ref_rows"]], rows["position"][whole["ref_rows"]]
    assert torch.equal(whole["ref_seq"], s_) and torch.equal(whole["ref_doc"], seqs["doc_ids"][s_])
    for j, (s1, p1) in enumerate(zip(s_.tolist(), p_.tolist())):           # brute force, one window at a time
        want = [int(seqs["token_ids"][s1, q]) if 0 <= q < store.seq_len and seqs["attention_mask"][s1, q] else -1
                for q in range(p1 - CONTEXT, p1 + CONTEXT + 1)]
        assert whole["window_token_ids"][j].tolist() == want
    for chunk in (1, 2, 5):
        asked.clear()
        got = F._example_windows(st, store, CONTEXT, chunk=chunk)
        assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in got)
        assert max(asked) <= chunk and sum(asked) == len(torch.unique(whole["ref_seq"]))


def test_out_of_range_latent_names_valid_range(setup):
    fd = setup["fd"]
    for bad in (D_SAE, -1, 10 ** 6):
        with pytest.raises(F.LatentOutOfRange, match=rf"0\.\.{D_SAE - 1}"):
            fd.latent(bad)
    with pytest.raises(IndexError):
        fd.latent(D_SAE)
    assert fd.latent(D_SAE - 1)["latent"] == D_SAE - 1


def test_table(setup):
    df = setup["fd"].table()
    assert list(df.columns[:6]) == ["latent", "count", "density", "log10_density", "max", "mean"]
    assert len(df) == D_SAE and "top_tokens" in df and "top_logits" in df
    assert df.loc[3, "log10_density"] == -10 and df.loc[3, "top_tokens"] == ""
    f = int(df["count"].idxmax())
    top_row = int(setup["t"]["top_rows"][f, 0])
    s, p = int(setup["store"].rows()["seq_index"][top_row]), int(setup["store"].rows()["position"][top_row])
    first = repr(f"<{int(setup['store'].sequences()['token_ids'][s, p])}>")
    assert df.loc[f, "top_tokens"].split(" | ")[0] == first


def test_step_end_to_end(setup, tmp_path, monkeypatch):
    """run_step with the stand-in SAE; the logit table is either there or absent with a reason."""
    from workbench.steps import run_step
    monkeypatch.setattr(F, "_load_sae", lambda path, device="cpu": setup["sae"])
    (tmp_path / "sae").mkdir()
    res = run_step("features", {"sae": str(tmp_path / "sae"), "store": str(setup["store"].path),
                                "out": str(tmp_path / "o"), "n_top": N_TOP, "context": CONTEXT,
                                "batch_size": 50, "device": "cpu"})
    fd = F.load_features(res.artifacts["features"])
    assert fd.meta["hook"] == HOOK and fd.d_sae == D_SAE
    assert torch.equal(fd.t["top_rows"], setup["t"]["top_rows"])
    assert fd.has_logits or fd.meta["logits_reason"]
    with pytest.raises(FileExistsError):
        run_step("features", {"sae": str(tmp_path / "sae"), "store": str(setup["store"].path),
                              "out": str(tmp_path / "o")})


def test_wrong_d_in_is_a_clear_error(setup):
    from workbench.errors import WorkbenchError
    sae = StandInSAE()
    sae.W_dec = torch.randn(D_SAE, D_IN + 1)
    with pytest.raises(WorkbenchError, match=r"d_in=9.*d=8"):
        F.compute_features(sae, setup["store"], device="cpu")


def test_latent_activations_for_text(setup):
    sae = setup["sae"]

    class FakeModel:
        device = torch.device("cpu")

        class tokenizer:  # noqa: N801
            def __call__(self, text, return_tensors=None):
                ids = torch.tensor([[ord(c) % VOCAB for c in text]])
                return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def batch_decode(self, seqs):
                return [f"<{s[0]}>" for s in seqs]

        tokenizer = tokenizer()

        def run(self, ids, mask, hooks):
            g = torch.Generator().manual_seed(int(ids.sum()))
            self.last = torch.randn(1, ids.shape[1], D_IN, generator=g)
            return {h: self.last for h in hooks}

    m = FakeModel()
    tokens, acts = F.latent_activations_for_text(sae, "hello", model=m)
    assert tokens == [f"<{ord(c) % VOCAB}>" for c in "hello"]
    assert acts.shape == (5, D_SAE) and torch.equal(acts, sae.encode(m.last[0]))


def test_unknown_hook_fails_before_writing(setup, tmp_path, monkeypatch):
    from workbench.errors import WorkbenchError
    from workbench.steps import run_step
    monkeypatch.setattr(F, "_load_sae", lambda path, device="cpu": setup["sae"])
    (tmp_path / "sae").mkdir()
    with pytest.raises(WorkbenchError, match=HOOK.replace(".", r"\.")):
        run_step("features", {"sae": str(tmp_path / "sae"), "store": str(setup["store"].path),
                              "hook": "blocks.9.hook_resid_pre", "out": str(tmp_path / "o")})
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ logit tables: final norm folded in
# sae_vis / Neuronpedia take W_dec @ W_U of a TransformerLens model with fold_ln: the final norm's gain
# is part of W_U (and LayerNorm's mean removal: W_U centred over d_model). Checked against the plain
# Hugging Face weights and against the model's own logits.

@pytest.fixture(scope="module")
def gain_folders(tmp_path_factory):
    from tiny_hf_folders import make_folder
    tmp = tmp_path_factory.mktemp("gain")
    return {fam: make_folder(fam, tmp / fam) for fam in ("llama", "gpt2")}


def test_W_U_folded_rmsnorm_is_gain_times_lm_head(gain_folders):
    from transformers import AutoModelForCausalLM

    from workbench import load_model
    m = load_model(str(gain_folders["llama"]), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(gain_folders["llama"]))
    g, W = hf.model.norm.weight.detach(), hf.lm_head.weight.detach()          # [d], [vocab, d]
    assert not torch.allclose(g, torch.ones_like(g))                           # else the test cannot fail
    assert torch.equal(m.final_norm_weight, g)
    assert torch.allclose(m.W_U_folded, W.T * g[:, None], atol=1e-6)
    # the model's logits are (x / rms(x)) @ W_U_folded: the fold is what the forward computes
    ids = torch.randint(200, 3000, (2, 7), generator=torch.Generator().manual_seed(1))
    x = m.run(ids, None, ["ln_final.hook_in"])["ln_final.hook_in"]
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps)
    assert torch.allclose(m.logits(ids), xn @ m.W_U_folded, atol=1e-4)


def test_W_U_folded_layernorm_is_centred(gain_folders):
    from transformers import AutoModelForCausalLM

    from workbench import load_model
    m = load_model(str(gain_folders["gpt2"]), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(gain_folders["gpt2"]))
    ln = hf.transformer.ln_f
    g, b, W = ln.weight.detach(), ln.bias.detach(), hf.lm_head.weight.detach().T
    want = W * g[:, None]
    want = want - want.mean(0, keepdim=True)
    assert torch.allclose(m.W_U_folded, want, atol=1e-6)
    ids = torch.randint(200, 3000, (2, 7), generator=torch.Generator().manual_seed(2))
    x = m.run(ids, None, ["ln_final.hook_in"])["ln_final.hook_in"]
    xc = x - x.mean(-1, keepdim=True)
    xn = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + ln.eps)
    # the bias adds b @ W_U to every position whatever the direction: not part of a direction's effect
    assert torch.allclose(m.logits(ids) - b @ W, xn @ m.W_U_folded, atol=1e-4)


def test_features_step_logit_table_uses_the_folded_unembedding(gain_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from analyses.sae import make_sae
    from workbench.steps import run_step
    folder = gain_folders["llama"]
    g = torch.Generator().manual_seed(3)
    n_seq, L = 6, 8
    tok = torch.randint(200, 3000, (n_seq, L), generator=g)
    mask = torch.ones(n_seq, L, dtype=torch.bool)
    si, po = mask.nonzero(as_tuple=True)
    store = write_store(tmp_path / "store", {HOOK: torch.randn(len(si), 64, generator=g)}, tok, mask,
                        torch.arange(n_seq), si, po, str(folder))
    torch.manual_seed(0)
    sae = make_sae("topk", 64, 32, k=4, metadata={"hook_name": HOOK, "model_name": str(folder)})
    sae.save(tmp_path / "sae")
    res = run_step("features", {"sae": str(tmp_path / "sae"), "store": str(store.path), "out": str(tmp_path / "o"),
                                "n_logits": 5, "device": "cpu"})
    fd = F.load_features(res.artifacts["features"])
    assert fd.has_logits and "final-norm gain" in fd.meta["logit_unembedding"]
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    W = hf.lm_head.weight.detach().T
    L_fold = sae.W_dec.detach() @ (W * hf.model.norm.weight.detach()[:, None])
    assert torch.equal(fd.t["logit_top_ids"], L_fold.topk(5, dim=1).indices)
    assert torch.equal(fd.t["logit_bottom_ids"], L_fold.topk(5, dim=1, largest=False).indices)
    assert torch.allclose(fd.t["logit_top_values"], L_fold.topk(5, dim=1).values, atol=1e-4)
    raw = (sae.W_dec.detach() @ W).topk(5, dim=1).indices
    assert not torch.equal(raw, fd.t["logit_top_ids"])        # the unfolded W_U would rank other tokens


@pytest.mark.slow
def test_W_U_folded_smollm2_matches_hf_weights():
    """SmolLM2's final RMSNorm gain is far from flat: the fold changes which tokens a direction promotes."""
    from transformers import AutoModelForCausalLM

    from workbench import load_model
    m = load_model("smollm2-135m", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(m.source)
    g, W = hf.model.norm.weight.detach().float(), hf.lm_head.weight.detach().float().T
    assert float(g.std()) > 0.05
    assert torch.allclose(m.W_U_folded.float(), W * g[:, None], atol=1e-5)
    ids = m.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    x = m.run(ids, None, ["ln_final.hook_in"])["ln_final.hook_in"]
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps)
    assert torch.allclose(m.logits(ids), xn @ m.W_U_folded, atol=1e-3, rtol=1e-4)


def test_trim_heap_binds_glibc():
    """features trims the C heap every few batches; on glibc the binding must resolve (else it would
    silently do nothing and resident memory would creep up with the rows streamed again)."""
    import platform
    import analyses._util as u
    u.trim_heap()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert u._LIBC and hasattr(u._LIBC, "malloc_trim")
