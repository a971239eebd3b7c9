"""Matching latents across SAEs (analyses.matching, workbench.align, step match_saes).

Independent checks: the streaming sparse correlation against numpy's dense Pearson; matching
against a known permutation; scores of unrelated dictionaries against their own shuffled
baseline; token alignment against pairs worked out by hand from the tokenizers' pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.matching import (CorrelationAccumulator, dense_correlation, match_one_to_one, mutual_max,
                               paired_scores, rsa, split_groups)
from analyses.sae import SAEConfig, TopKSAE


# ------------------------------------------------------------------------------ synthetic helpers
def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def make_data(D: torch.Tensor, n: int, active: int, seed: int) -> torch.Tensor:
    """Rows made of `active` random features of the dictionary D with positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    m = D.shape[0]
    idx = torch.stack([torch.randperm(m, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) + 0.5
    C = torch.zeros(n, m).scatter_(1, idx, coef)
    return C @ D


def topk_sae(W_dec: torch.Tensor, k: int, meta: dict | None = None) -> TopKSAE:
    sae = TopKSAE(SAEConfig(arch="topk", d_in=W_dec.shape[1], d_sae=W_dec.shape[0], k=k,
                            metadata=dict(meta or {})))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def correlate(A, B, X, XB=None, bs=97):
    acc = CorrelationAccumulator(A.cfg.d_sae, B.cfg.d_sae)
    XB = X if XB is None else XB
    with torch.no_grad():
        for s in range(0, X.shape[0], bs):
            acc.update(A.encode_sparse(X[s:s + bs]), B.encode_sparse(XB[s:s + bs]))
    return acc


# ------------------------------------------------------------------------------ correlation
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_streaming_sparse_correlation_equals_dense_numpy(precision):
    rng = np.random.default_rng(0)
    n, da, db = 400, 30, 45
    A = rng.exponential(size=(n, da)) * (rng.random((n, da)) < 0.12)
    B = rng.exponential(size=(n, db)) * (rng.random((n, db)) < 0.2)
    B[:, :7] += 2.0 * A[:, :7]                       # some real correlation
    A[:, 3] = 0.0                                    # a dead latent: r = 0
    acc = CorrelationAccumulator(da, db, dtype=precision)
    for s in range(0, n, 61):                        # uneven batches, variable nnz per row
        acc.update(torch.tensor(A[s:s + 61]), torch.tensor(B[s:s + 61]))
    got = acc.correlation(torch.float64).numpy()
    tol = 1e-12 if precision == "float64" else 1e-5
    np.testing.assert_allclose(got, dense_correlation(A, B), atol=tol)
    assert np.all(got[3] == 0) and not acc.alive()[0][3]
    assert acc.n == n


def test_topk_codes_fixed_k_path_matches_dense():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 20, generator=g)
    A = topk_sae(unit(torch.randn(50, 20, generator=g)), 4)
    B = topk_sae(unit(torch.randn(70, 20, generator=g)), 6)
    acc = correlate(A, B, X)
    with torch.no_grad():
        ref = dense_correlation(A.encode(X), B.encode(X))
    np.testing.assert_allclose(acc.correlation(torch.float64).numpy(), ref, atol=1e-10)


def test_update_refuses_different_row_counts():
    acc = CorrelationAccumulator(3, 3)
    with pytest.raises(ValueError, match="same rows"):
        acc.update(torch.ones(4, 3), torch.ones(5, 3))


# ------------------------------------------------------------------------------ matching
def _permuted_pair(seed=0, m=48, d=96, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    D = unit(torch.randn(m, d, generator=g))
    perm = torch.randperm(m, generator=g)
    DB = unit(D[perm] + noise * torch.randn(m, d, generator=g))
    return D, DB, perm


def test_permuted_dictionary_is_matched_back_exactly():
    D, DB, perm = _permuted_pair()
    X = make_data(D, 3000, 3, seed=2)
    A, B = topk_sae(D, 4), topk_sae(DB, 4)
    corr = correlate(A, B, X).correlation()
    inv = torch.argsort(perm)                        # latent i of A is latent inv[i] of B
    for method in ("hungarian", "mutual"):
        m = match_one_to_one(corr, method)
        assert m["a"].tolist() == list(range(48))
        assert torch.equal(m["b"], inv), method
        assert bool(m["mutual"].all())
        assert float(m["corr"].min()) > 0.9
    ma, mb = mutual_max(corr)
    assert torch.equal(mb[torch.argsort(ma)], inv)
    s = paired_scores(D[torch.arange(48)], DB[inv], n_shuffles=20, seed=0)
    # RSA of random unit rows: their RDM entries all sit near 1, so 5% noise moves ranks a lot;
    # linear CKA of 48 rows in 96 dims is ~0.68 even for shuffled pairs (n < d)
    for metric, floor in (("svcca", 0.95), ("rsa", 0.7), ("linear_cka", 0.9)):
        assert s[metric]["score"] > floor, (metric, s[metric])
        assert s[metric]["score"] > s[metric]["baseline_mean"] + 5 * s[metric]["baseline_std"]
        assert s[metric]["p_value"] == pytest.approx(1 / 21)


def test_independent_dictionaries_score_at_the_shuffled_baseline():
    g = torch.Generator().manual_seed(3)
    m, d, n = 64, 48, 4000
    A = topk_sae(unit(torch.randn(m, d, generator=g)), 4)
    B = topk_sae(unit(torch.randn(m, d, generator=g)), 4)
    # independent activity: each SAE sees its own random rows, so no latent pair shares anything
    XA, XB = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    corr = correlate(A, B, XA, XB).correlation()
    assert float(corr.abs().max()) < 0.15
    mt = match_one_to_one(corr, "hungarian")
    s = paired_scores(A.W_dec.detach()[mt["a"]], B.W_dec.detach()[mt["b"]], n_shuffles=40, seed=1)
    for metric, v in s.items():
        z = (v["score"] - v["baseline_mean"]) / v["baseline_std"]
        assert abs(z) < 3.5, (metric, v["score"], v["baseline_mean"], v["baseline_std"])
        assert v["p_value"] > 0.01, metric


def test_width_pair_splits_into_groups():
    g = torch.Generator().manual_seed(4)
    D = unit(torch.randn(32, 96, generator=g))
    narrow = unit(D[0::2] + D[1::2])                 # narrow latent i = features 2i and 2i+1
    X = make_data(D, 4000, 3, seed=5)
    A, B = topk_sae(narrow, 3), topk_sae(D, 4)
    corr = correlate(A, B, X).correlation()
    groups = split_groups(corr, 0.3)
    assert len(groups) == 16
    assert sorted((g["parent"], sorted(g["children"])) for g in groups) == \
        [(i, [2 * i, 2 * i + 1]) for i in range(16)]


def test_rsa_matches_scipy_spearman_on_pdist():
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 8)), rng.normal(size=(30, 5))
    Y[:, :3] += X[:, :3]
    ref = spearmanr(pdist(X, "correlation"), pdist(Y, "correlation")).statistic
    assert rsa(X, Y) == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------------------ token alignment
def test_pair_by_char_end_rules():
    from workbench.align import pair_by_char_end
    # store A: doc 0 ends 1, 2, 5, 13, 13, 13 (a character in three byte pieces), doc 1 ends 3; -1 special
    doc_a = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])
    end_a = torch.tensor([-1, 1, 2, 5, 13, 13, 13, 3])
    doc_b = torch.tensor([0, 0, 0, 1, 1])
    end_b = torch.tensor([5, 13, 14, 3, -1])
    r = pair_by_char_end(doc_a, end_a, doc_b, end_b)
    assert list(zip(r["a"].tolist(), r["b"].tolist())) == [(3, 0), (6, 1), (7, 3)]
    assert r["unpaired_a"].tolist() == [0, 1, 2, 4, 5]
    assert r["unpaired_b"].tolist() == [2, 4]
    assert r["duplicates_a"].tolist() == [4, 5]


def _store_from_text(tmp_path, name, spec, docs, d=8, seed=0):
    """A store whose rows are every non-special token of `docs` under the tokenizer of `spec`."""
    from workbench.corpus import Document, pack
    from workbench.models import load_tokenizer
    from workbench.store import write_store
    tok = load_tokenizer(spec)
    wins = list(pack([Document(i, f"d{i}", t) for i, t in enumerate(docs)], tok, 64))
    L = 64
    ids = torch.zeros(len(wins), L, dtype=torch.long)
    mask = torch.zeros(len(wins), L, dtype=torch.bool)
    ends = torch.full((len(wins), L), -1, dtype=torch.int32)
    for i, w in enumerate(wins):
        ids[i, :len(w.ids)] = torch.tensor(w.ids)
        mask[i, :len(w.ids)] = True
        ends[i, :len(w.ids)] = torch.tensor(w.char_end, dtype=torch.int32)
    si, po = (mask & (ends >= 0)).nonzero(as_tuple=True)
    acts = {"h": torch.randn(si.numel(), d, generator=torch.Generator().manual_seed(seed))}
    s = write_store(tmp_path / name, acts, ids, mask, torch.tensor([w.doc_id for w in wins]), si, po,
                    spec, corpus={"spec": "hand-made"}, char_end=ends)
    return s, tok


def test_token_alignment_across_tokenisers(tmp_path):
    """SmolLM2 (byte-level BPE) vs MiniLM (WordPiece, lower-cased): pairs worked out by hand."""
    from workbench.align import align_tokens
    docs = ["Héllo wörld 東京", "the cat unbelievably sat"]
    sa, ta = _store_from_text(tmp_path, "smol", "smollm2-135m", docs)
    sb, tb = _store_from_text(tmp_path, "mini", "minilm-l6", docs)
    assert sa.has_char_offsets and sb.has_char_offsets
    r = align_tokens(sa, sb)

    def piece(store, tok, rows):
        ids = store.sequences()["token_ids"][store.rows()["seq_index"][rows], store.rows()["position"][rows]]
        return tok.convert_ids_to_tokens(ids.tolist())
    pairs = list(zip(piece(sa, ta, r["a"]), piece(sb, tb, r["b"])))
    # 'H' 'é' 'llo' | 'hello': only 'llo' ends where 'hello' ends; '東' is 3 byte pieces ending at
    # the same character: the last one pairs; 'unbelie' 'v' 'ably' vs 'un' '##bel' '##ie' '##va' '##bly'
    assert pairs == [("llo", "hello"), ("ld", "world"), ("±", "東"), ("¬", "京"),
                     ("the", "the"), ("Ġcat", "cat"), ("Ġunbelie", "##ie"), ("ably", "##bly"), ("Ġsat", "sat")]
    assert sorted(piece(sa, ta, r["unpaired_a"])) == sorted(["H", "Ã©", "Ġw", "Ã¶r", "Ġæ", "Ŀ", "äº", "v"])
    assert sorted(piece(sb, tb, r["unpaired_b"])) == sorted(["un", "##bel", "##va"])
    assert r["report"]["same_char_as_next_a"] == 3


def test_old_store_reports_missing_offsets(tmp_path):
    from workbench.align import align_tokens
    from workbench.errors import WorkbenchError
    from workbench.store import write_store
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.bool)
    si, po = mask.nonzero(as_tuple=True)
    s = write_store(tmp_path / "old", {"h": torch.randn(8, 3)}, ids, mask, torch.arange(2), si, po, "m")
    assert not s.has_char_offsets
    with pytest.raises(WorkbenchError, match="no character offsets"):
        s.row_char_end()
    with pytest.raises(WorkbenchError, match="no character offsets"):
        align_tokens(s, s)


# ------------------------------------------------------------------------------ the step
def _synthetic_workspace(tmp_path, widths=False):
    from workbench.store import write_store
    D, DB, perm = _permuted_pair(seed=6, m=40, d=64)
    X = make_data(D, 2500, 3, seed=7)
    n = X.shape[0]
    L = 50
    si, po = torch.arange(n) // L, torch.arange(n) % L
    ids = torch.randint(5, 100, (n // L, L))
    store = write_store(tmp_path / "stores" / "s", {"blocks.0.hook_resid_post": X}, ids,
                        torch.ones(n // L, L, dtype=torch.bool), torch.arange(n // L), si, po, "synthetic",
                        shard_rows=700)
    meta = {"store": str(store.path), "hook_name": "blocks.0.hook_resid_post"}
    A = topk_sae(D, 4, meta)
    B = topk_sae(unit(D[0::2] + D[1::2]), 3, meta) if widths else topk_sae(DB, 4, meta)
    A.save(tmp_path / "saes" / "a")
    B.save(tmp_path / "saes" / "b")
    return store, perm


def test_match_saes_step_end_to_end(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.match import read_match_result
    _, perm = _synthetic_workspace(tmp_path)
    out = tmp_path / "results" / "m"
    res = run_step("match_saes", {"sae_a": str(tmp_path / "saes" / "a"), "sae_b": str(tmp_path / "saes" / "b"),
                                  "out": str(out), "batch_size": 256, "n_shuffles": 10})
    r = read_match_result(out)
    assert r.align == "same" and r.n_rows == 2500 and r.method == "hungarian"
    assert torch.equal(r.pair_b[torch.argsort(r.pair_a)], torch.argsort(perm))
    assert r.fraction_mutual_above_threshold == 1.0
    D, DB, _ = _permuted_pair(seed=6, m=40, d=64)       # decoder cosines by hand
    torch.testing.assert_close(r.pair_cos, (D[r.pair_a] * DB[r.pair_b]).sum(1), atol=1e-5, rtol=0)
    for metric in ("svcca", "rsa", "linear_cka"):
        v = r.scores[metric]
        assert v["score"] > v["baseline_mean"] + 4 * v["baseline_std"], (metric, v)
        assert r.scores[metric]["p_value"] == pytest.approx(1 / 11)
    assert "few pairs" in r.meta["warning"]            # 40 pairs in 64 dims: CCA is degenerate
    assert (out / "histogram.html").exists() and (out / "scores.html").exists()
    assert res.metrics["svcca"] == pytest.approx(r.scores["svcca"]["score"])


def test_match_saes_step_width_pair_and_given_store(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.match import read_match_result
    store, _ = _synthetic_workspace(tmp_path, widths=True)
    out = tmp_path / "results" / "w"
    run_step("match_saes", {"sae_a": str(tmp_path / "saes" / "b"), "sae_b": str(tmp_path / "saes" / "a"),
                            "store": str(store.path), "out": str(out), "n_shuffles": 5, "max_rows": 2000})
    r = read_match_result(out)
    assert r.n_rows == 2000 and r.meta["narrow"] == "a" and r.meta["n_splits"] == 20
    assert sorted(sorted(g["children"]) for g in r.splits) == [[2 * i, 2 * i + 1] for i in range(20)]


def test_match_saes_refuses_sae_without_store(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.steps import run_step
    topk_sae(unit(torch.randn(8, 4)), 2).save(tmp_path / "x")
    with pytest.raises(WorkbenchError, match="does not record the store"):
        run_step("match_saes", {"sae_a": str(tmp_path / "x"), "sae_b": str(tmp_path / "x"),
                                "out": str(tmp_path / "o")})


def test_match_page_shows_scores_and_pairs(tmp_path):
    from streamlit.testing.v1 import AppTest
    from workbench.steps import run_step
    from workbench.workspace import Workspace
    Workspace(tmp_path)                                # a workspace: stores/, saes/, results/
    _synthetic_workspace(tmp_path)
    run_step("match_saes", {"sae_a": str(tmp_path / "saes" / "a"), "sae_b": str(tmp_path / "saes" / "b"),
                            "n_shuffles": 5}, workspace=str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.session_state["workspace"] = str(tmp_path)
    at.run()
    at.switch_page("workbench/ui/pages/match.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [m.value for m in at.metric][:2] == ["40", "100.0%"]
    assert len(at.dataframe) == 2                      # scores vs baseline, matched pairs
    assert any("features" in i.value for i in at.info)  # no dashboards without features results


# ------------------------------------------------------------------------------ real models (slow)
@pytest.mark.slow
def test_real_models_token_alignment_compare_and_match(tmp_path, capsys):
    """smollm2-135m and minilm-l6 on the same ~2k-token corpus, through the CLI: collect (offsets
    recorded), compare --align token, small SAEs, match-saes across the two tokenisers. The pairs
    are checked against the tokenizers themselves: both tokens of a pair end in the same letter."""
    import json
    from workbench.cli import main
    from workbench.models import load_tokenizer
    from workbench.steps.compare import read_compare_result
    from workbench.steps.match import align_rows, read_match_result
    from workbench.store import ActivationStore
    ws = tmp_path / "ws"
    stores = {}
    for name, spec, hook in (("smol", "smollm2-135m", "blocks.6.hook_resid_post"),
                             ("mini", "minilm-l6", "blocks.3.hook_resid_post")):
        stores[name] = ws / "stores" / name
        assert main(["collect", "--model", spec, "--hooks", hook, "--max-tokens", "2000", "--seq-len", "128",
                     "--device", "cpu", "--out", str(stores[name]), "--workspace", str(ws)]) == 0
        assert ActivationStore.open(stores[name]).has_char_offsets
        assert main(["train-sae", str(stores[name]), "--arch", "topk", "--d-sae", "64", "--k", "8",
                     "--n-tokens", "4000", "--batch-size", "256", "--eval-tokens", "0", "--device", "cpu",
                     "--out", str(ws / "saes" / name), "--workspace", str(ws)]) == 0
    sa, sb = (ActivationStore.open(stores[n]) for n in ("smol", "mini"))
    ia, ib, mode, report = align_rows(sa, sb, "auto")
    assert mode == "token" and 0.5 * min(sa.n_rows, sb.n_rows) < report["paired"] < min(sa.n_rows, sb.n_rows)
    assert report["unpaired_a"] == sa.n_rows - report["paired"]       # reported, not guessed
    # independent check: the two tokens of a pair end with the same character (MiniLM lower-cases)
    ta, tb = load_tokenizer("smollm2-135m"), load_tokenizer("minilm-l6")

    def last_chars(store, tok, rows, decode):
        r = store.rows()
        ids = store.sequences()["token_ids"][r["seq_index"][rows], r["position"][rows]].tolist()
        return [decode(tok, i)[-1:].lower() for i in ids]
    ca = last_chars(sa, ta, ia, lambda t, i: t.decode([i]))
    cb = last_chars(sb, tb, ib, lambda t, i: t.convert_ids_to_tokens(i))
    ascii_pairs = [(x, y) for x, y in zip(ca, cb) if x.isascii() and x.isalnum()]
    assert len(ascii_pairs) > 0.5 * len(ca)
    assert sum(x == y for x, y in ascii_pairs) >= 0.99 * len(ascii_pairs)

    out = ws / "results" / "cmp"
    assert main(["compare", str(stores["smol"]), str(stores["mini"]), "--metric", "linear_cka", "--align", "token",
                 "--device", "cpu", "--out", str(out)]) == 0
    c = read_compare_result(out)
    assert c.align == "token" and c.n_rows == report["paired"]
    assert 0 < float(c.matrix[0][0]) <= 1
    capsys.readouterr()
    assert main(["match-saes", str(ws / "saes" / "smol"), str(ws / "saes" / "mini"), "--n-shuffles", "5",
                 "--out", str(ws / "results" / "match"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    m = read_match_result(ws / "results" / "match")
    assert m.align == "token" and m.n_rows == report["paired"] == summary["n_rows"]
    assert m.pair_cos is None                       # 576 vs 384 dimensions: no decoder cosines
    assert m.meta["model_a"] == "smollm2-135m" and m.meta["model_b"] == "minilm-l6"
    assert m.pair_a.numel() == 64 and set(m.scores) >= {"svcca", "rsa"}
