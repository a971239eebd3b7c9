"""analyses.pca.PCA against scikit-learn, streaming == in memory, precision, errors, disk; step `pca`."""

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SKPCA

from analyses.pca import PCA


def lowrank(n=3000, d=40, r=8, noise=0.3, offset=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    scales = np.linspace(6, 2, r)
    X = (rng.standard_normal((n, r)) * scales) @ np.linalg.qr(rng.standard_normal((d, r)))[0].T
    X = X + noise * rng.standard_normal((n, d)) + rng.standard_normal(d) * 3 + offset
    return X.astype(dtype)


def proj(V):
    V = np.asarray(V, dtype=np.float64)
    return V.T @ np.linalg.solve(V @ V.T, V)


def check_against(p, s, k, rel=1e-6, comp=1e-4):
    ev = p.explained_variance_.numpy()
    np.testing.assert_allclose(ev, s.explained_variance_[:k], rtol=rel)
    np.testing.assert_allclose(p.explained_variance_ratio_.numpy(), s.explained_variance_ratio_[:k], rtol=rel)
    np.testing.assert_allclose(p.singular_values_.numpy(), s.singular_values_[:k], rtol=rel)
    np.testing.assert_allclose(p.mean_.numpy(), s.mean_, rtol=1e-10, atol=1e-10)
    # the same subspace AND the same signs, entry by entry
    np.testing.assert_allclose(proj(p.components_.numpy()), proj(s.components_[:k]), atol=comp)
    np.testing.assert_allclose(p.components_.numpy(), s.components_[:k], atol=comp)


@pytest.mark.parametrize("solver", ["full", "covariance_eigh"])
def test_exact_matches_sklearn(solver):
    X = lowrank()
    k = 12
    p = PCA(k).fit(X)
    s = SKPCA(k, svd_solver=solver).fit(X)
    check_against(p, s, k)
    assert p.n_samples_ == 3000 and p.n_features_in_ == 40
    assert p.noise_variance_ == pytest.approx(s.noise_variance_, rel=1e-6)
    np.testing.assert_allclose(p.transform(X), s.transform(X), atol=1e-8)
    Z = s.transform(X)
    np.testing.assert_allclose(p.inverse_transform(Z), s.inverse_transform(Z), atol=1e-8)


def test_whiten_matches_sklearn():
    X = lowrank(seed=3)
    p = PCA(5, whiten=True).fit(X)
    s = SKPCA(5, whiten=True, svd_solver="full").fit(X)
    np.testing.assert_allclose(p.transform(X), s.transform(X), atol=1e-8)
    Z = p.transform(X)
    np.testing.assert_allclose(p.inverse_transform(Z), s.inverse_transform(Z), atol=1e-7)
    assert np.allclose(Z.var(axis=0, ddof=1), 1.0, atol=1e-8)


def test_randomized_matches_sklearn_exact_on_gapped_data():
    X = lowrank(n=1500, d=150, r=8, noise=0.05, seed=1)
    k = 8
    p = PCA(k, method="randomized").fit(X)
    s = SKPCA(k, svd_solver="full").fit(X)
    check_against(p, s, k, rel=1e-6, comp=1e-4)


def test_randomized_streaming_uses_covariance():
    X = lowrank(n=2000, d=60, r=6, noise=0.05, seed=2)
    p = PCA(6, method="randomized").fit(iter(np.array_split(X, 7)))
    s = SKPCA(6, svd_solver="full").fit(X)
    check_against(p, s, 6)


def test_n_less_than_d():
    X = lowrank(n=30, d=80, r=5, seed=4)
    p = PCA(20).fit(X)
    s = SKPCA(20, svd_solver="full").fit(X)
    check_against(p, s, 20, rel=1e-6, comp=1e-4)


@pytest.mark.parametrize("precision", ["exact", "auto"])
def test_streaming_equals_in_memory(precision):
    """Exact: batching changes nothing but the last float64 digits. Default (float32 rows ->
    mixed): the shift and the float32 chunk products depend on the batching, within ~1e-5."""
    X = lowrank(n=5000, d=32, seed=5).astype(np.float32)
    full = PCA(10, precision=precision).fit(X)
    ev_tol, comp_tol, mean_tol = (1e-10, 1e-9, 1e-12) if precision == "exact" else (2e-5, 1e-5, 1e-6)
    for batches in ([torch.from_numpy(b) for b in np.array_split(X, 13)],       # list of tensors
                    (b for b in np.array_split(X, 3)),                           # generator of arrays
                    lambda: iter(torch.from_numpy(X).split(999))):               # factory
        st = PCA(10, precision=precision).fit(batches)
        assert st.n_samples_ == 5000
        assert st.precision_ == full.precision_ == ("float64" if precision == "exact" else "mixed")
        np.testing.assert_allclose(st.explained_variance_.numpy(), full.explained_variance_.numpy(), rtol=ev_tol)
        # components 9-10 are near-degenerate (eigenvalues 0.104, 0.100): compare the gapped ones
        np.testing.assert_allclose(st.components_.numpy()[:8], full.components_.numpy()[:8], atol=comp_tol)
        np.testing.assert_allclose(st.mean_.numpy(), full.mean_.numpy(), rtol=mean_tol)


def test_large_mean_loses_no_precision():
    X = lowrank(n=4000, d=30, seed=6)
    ref = SKPCA(10, svd_solver="full").fit(X)               # centred SVD: the precise answer
    for Xs in (X + 1e4, X + 1e6):
        p = PCA(10).fit(Xs)
        np.testing.assert_allclose(p.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-9)
        np.testing.assert_allclose(p.components_.numpy(), ref.components_, atol=1e-7)
        # and streaming the offset data in small batches
        st = PCA(10).fit(np.array_split(Xs, 17))
        np.testing.assert_allclose(st.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-9)


def test_large_mean_float32():
    X32 = (lowrank(n=4000, d=30, seed=7) + 1e4).astype(np.float32)
    ref = SKPCA(10, svd_solver="full").fit(X32.astype(np.float64))   # exact maths on the same values
    p = PCA(10, precision="exact").fit(torch.from_numpy(X32))
    np.testing.assert_allclose(p.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(p.components_.numpy(), ref.components_, atol=1e-6)
    # the default (mixed for float32 rows): a mean 1e4 x the spread costs it no more than ~1e-5,
    # where scikit-learn's float32 covariance_eigh loses ~1e-3 or more
    d = PCA(10).fit(torch.from_numpy(X32))
    assert d.precision_ == "mixed"
    err = np.abs(d.explained_variance_.numpy() / ref.explained_variance_ - 1).max()
    sk = SKPCA(10, svd_solver="covariance_eigh").fit(X32)
    err_sk = np.abs(sk.explained_variance_ / ref.explained_variance_ - 1).max()
    assert err < 1e-4 and err < err_sk / 10, (err, err_sk)
    np.testing.assert_allclose(d.components_.numpy(), ref.components_, atol=1e-4)


def test_types_and_sign_rule():
    X = lowrank(n=500, d=10, seed=8)
    p = PCA(4).fit(torch.from_numpy(X))
    assert isinstance(p.transform(torch.from_numpy(X)), torch.Tensor)
    assert isinstance(p.transform(X), np.ndarray)
    assert isinstance(p.fit_transform(X), np.ndarray)
    V = p.components_
    assert bool((V.gather(1, V.abs().argmax(1, keepdim=True)) > 0).all())
    Vs = p.components_ @ p.components_.T
    assert torch.allclose(Vs, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_errors():
    X = lowrank(n=50, d=10)
    with pytest.raises(ValueError, match=r"n_components=11.*min\(50, 10\)"):
        PCA(11).fit(X)
    with pytest.raises(ValueError, match=r"min\(5, 10\)"):
        PCA(6).fit(X[:5])
    bad = X.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="first bad row: 17"):
        PCA(3).fit(bad)
    bad2 = X.copy()
    bad2[33, 0] = np.inf
    with pytest.raises(ValueError, match="first bad row: 33"):
        PCA(3).fit(np.array_split(bad2, 5))            # streaming names the global row
    with pytest.raises(ValueError, match="first bad row: 33"):
        PCA(3, method="randomized").fit(bad2)
    with pytest.raises(ValueError, match="first bad row: 17"):
        PCA(3, method="randomized").fit(torch.from_numpy(bad).to(torch.bfloat16))
    with pytest.raises(ValueError, match="too large"):             # finite, but the sums overflow
        PCA(3, method="randomized").fit(np.full((50, 10), 1e308))
    with pytest.raises(ValueError, match="columns"):
        PCA(3).fit([X[:20], X[20:, :5]])
    with pytest.raises(ValueError, match="method"):
        PCA(3, method="arpack")
    with pytest.raises(ValueError, match="empty"):
        PCA(3).fit(iter([]))
    p = PCA(3).fit(X)
    with pytest.raises(ValueError, match="fitted on 10"):
        p.transform(X[:, :4])


def test_save_load(tmp_path):
    X = lowrank(n=600, d=12, seed=9)
    p = PCA(5, whiten=True).fit(X)
    p.save(tmp_path / "pca")
    meta = json.loads((tmp_path / "pca" / "pca.json").read_text())
    assert meta["n_samples_"] == 600 and meta["whiten"] is True
    q = PCA.load(tmp_path / "pca")
    np.testing.assert_allclose(q.transform(X), p.transform(X), atol=1e-12)
    np.testing.assert_allclose(q.eigenvalues_.numpy(), p.eigenvalues_.numpy())
    assert q.n_samples_ == 600 and q.n_features_in_ == 12
    with pytest.raises(FileNotFoundError):
        PCA.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------- step `pca`
def _store(path, n_seq=24, seq_len=16, d=12, seed=0, override=None):
    from workbench.store import write_store
    g = torch.Generator().manual_seed(seed)
    n = n_seq * seq_len
    base = torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g) * 3
    acts = {"blocks.0.hook_resid_post": base + 0.1 * torch.randn(n, d, generator=g) + 5,
            "blocks.1.hook_resid_post": torch.randn(n, d + 4, generator=g)}
    acts.update(override or {})
    return write_store(path, acts, token_ids=torch.randint(0, 50, (n_seq, seq_len), generator=g),
                       attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool),
                       doc_ids=torch.arange(n_seq) // 3,
                       seq_index=torch.arange(n_seq).repeat_interleave(seq_len),
                       position=torch.arange(seq_len).repeat(n_seq), model_name="synthetic-test",
                       shard_rows=100), acts


def test_pca_step(tmp_path):
    from workbench.results import read_result, read_tensors
    from workbench.steps import run_step
    from workbench.steps.pca import read_pca_result

    store, acts = _store(tmp_path / "store")
    h = "blocks.0.hook_resid_post"
    res = run_step("pca", {"store": str(store.path), "hook": h, "k": 4, "batch_size": 50,
                           "out": str(tmp_path / "res"), "device": "cpu"})
    meta = read_result(tmp_path / "res", "pca")
    assert meta["n_samples"] == 384 and meta["d"] == 12 and meta["hook"] == h
    assert meta["geometry"]["n_dirs_90"] <= 3
    assert (tmp_path / "res" / "scree.html").exists() and (tmp_path / "res" / "projection.html").exists()
    t = read_tensors(tmp_path / "res")
    s = SKPCA(4, svd_solver="full").fit(acts[h].double().numpy())
    # default precision (mixed): errors ~1e-8 of the largest eigenvalue
    assert meta["precision"] == "mixed"
    np.testing.assert_allclose(t["explained_variance"].numpy(), s.explained_variance_, rtol=1e-6,
                               atol=1e-7 * s.explained_variance_[0])
    # (component 4 is in the noise floor, 1e-4 of the top variance: only the exact path pins it)
    np.testing.assert_allclose(t["components"].numpy()[:3], s.components_[:3], atol=1e-4)
    run_step("pca", {"store": str(store.path), "hook": h, "k": 4, "batch_size": 50, "precision": "exact",
                     "out": str(tmp_path / "exact"), "device": "cpu"})
    assert read_result(tmp_path / "exact", "pca")["precision"] == "float64"
    np.testing.assert_allclose(read_tensors(tmp_path / "exact")["explained_variance"].numpy(),
                               s.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(read_tensors(tmp_path / "exact")["components"].numpy(), s.components_, atol=1e-6)
    assert t["eigenvalues"].shape == (12,) and t["projection"].shape[1] == 2
    loaded = read_pca_result(tmp_path / "res").pca()
    np.testing.assert_allclose(loaded.transform(acts[h].double().numpy())[:, :3],
                               s.transform(acts[h].double().numpy())[:, :3], atol=1e-4)
    assert res.metrics["participation_ratio"] > 1
    # refuses to clobber, errors are clear
    with pytest.raises(FileExistsError):
        run_step("pca", {"store": str(store.path), "hook": h, "k": 4, "out": str(tmp_path / "res")})
    from workbench.errors import WorkbenchError
    with pytest.raises(WorkbenchError, match=r"min\(n_rows, d\)"):
        run_step("pca", {"store": str(store.path), "hook": h, "k": 13, "out": str(tmp_path / "r2")})
    with pytest.raises(WorkbenchError, match="choose one with --hook"):
        run_step("pca", {"store": str(store.path), "k": 2, "out": str(tmp_path / "r3")})
    with pytest.raises(WorkbenchError, match="blocks.1.hook_resid_post"):
        run_step("pca", {"store": str(store.path), "hook": "blocks.1.hook_resid_pst", "k": 2,
                         "out": str(tmp_path / "r4")})


def test_pca_step_reports_and_drops_massive_rows(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.results import read_result
    from workbench.steps import run_step

    store, acts = _store(tmp_path / "store")
    h = "blocks.0.hook_resid_post"
    X = acts[h].double()
    norms = X.norm(dim=1)
    big = norms > 10 * norms.median()
    assert int(big.sum()) == 0                      # the synthetic store has none: add some
    X2 = X.clone()
    X2[::64] *= 200.0
    st2, _ = _store(tmp_path / "store2", override={h: X2.float()})
    warn = run_step("pca", {"store": str(st2.path), "hook": h, "k": 3, "out": str(tmp_path / "w"),
                            "max_norm_ratio": 0})
    assert "max-norm-ratio" in warn.summary["warning"] and warn.summary["rows_dropped"] == 0
    meta = read_result(tmp_path / "w", "pca")
    assert meta["massive_rows"]["rows"] == X2.shape[0] // 64 and meta["massive_rows"]["sq_norm_share"] > 0.9
    res = run_step("pca", {"store": str(st2.path), "hook": h, "k": 3,           # the default: 10
                           "out": str(tmp_path / "c")})
    assert f"{X2.shape[0] // 64} rows left out" in res.summary["note"] and "--max-norm-ratio 0" in res.summary["note"]
    keep = torch.ones(X2.shape[0], dtype=torch.bool)
    keep[::64] = False
    s = SKPCA(3, svd_solver="full").fit(X2[keep].numpy())
    meta = read_result(tmp_path / "c", "pca")
    assert meta["rows_dropped"] == int((~keep).sum()) and meta["n_samples"] == int(keep.sum())
    np.testing.assert_allclose(meta["explained_variance_ratio"], s.explained_variance_ratio_, rtol=1e-5)
    assert "warning" not in res.summary
    with pytest.raises(WorkbenchError, match="max-norm-ratio"):
        run_step("pca", {"store": str(st2.path), "hook": h, "k": 3, "max_norm_ratio": 1,
                         "out": str(tmp_path / "e")})


def test_pca_cli(tmp_path, capsys):
    from workbench.cli import main
    store, _ = _store(tmp_path / "store", seed=1)
    rc = main(["pca", str(store.path), "--hook", "blocks.1.hook_resid_post", "--k", "3",
               "--method", "randomized", "--out", str(tmp_path / "res"), "--json"])
    assert rc in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 3 and out["method"] == "randomized"


def test_mixed_precision_is_close_and_beats_float32_covariance():
    """precision='mixed' (float32 chunk products, float64 accumulation) trades a little precision
    for speed, but never suffers the large-mean cancellation of a plain float32 X^T X."""
    X32 = (lowrank(n=4000, d=30, seed=7) + 1e4).astype(np.float32)
    ref = SKPCA(10, svd_solver="full").fit(X32.astype(np.float64))
    mixed = PCA(10, precision="mixed").fit(torch.from_numpy(X32))
    err = np.abs(mixed.explained_variance_.numpy() / ref.explained_variance_ - 1).max()
    assert err < 1e-4
    sk32 = SKPCA(10, svd_solver="covariance_eigh").fit(X32)
    err_sk = np.abs(sk32.explained_variance_ / ref.explained_variance_ - 1).max()
    assert err < err_sk / 10, (err, err_sk)
    assert np.abs(np.abs((mixed.components_.numpy() * ref.components_).sum(1)) - 1).max() < 1e-6
    with pytest.raises(ValueError, match="precision"):
        PCA(3, precision="half")


def test_default_precision_is_mixed_for_float32_rows_and_exact_on_request():
    """The default is the fast path (float32 rows -> mixed: float32 chunk products, float64 sums),
    far more accurate than scikit-learn's default float32 covariance; float64 rows and
    precision="exact" (= "float64") keep float64 products, exact to ~1e-13 against scikit-learn."""
    X = lowrank(n=3000, d=40, seed=12)
    X32 = X.astype(np.float32)
    ref = SKPCA(8, svd_solver="full").fit(X32.astype(np.float64))
    default = PCA(8).fit(torch.from_numpy(X32))
    assert default.precision == "auto" and default.precision_ == "mixed"
    np.testing.assert_allclose(default.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-5)
    for exact in (PCA(8, precision="exact"), PCA(8, precision="float64")):
        exact.fit(torch.from_numpy(X32))
        assert exact.precision_ == "float64"
        np.testing.assert_allclose(exact.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-12)
    p64 = PCA(8).fit(X)                                  # float64 rows: float64 maths, as scikit-learn
    assert p64.precision_ == "float64"
    np.testing.assert_allclose(p64.explained_variance_.numpy(), SKPCA(8, svd_solver="full").fit(X).explained_variance_,
                               rtol=1e-12)


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_cpu_accumulator_split_over_threads_equals_serial(monkeypatch, precision):
    """On CPU the accumulator shares a batch out to one single-threaded BLAS product per core; the
    split must change nothing but float64 rounding (mixed: float32 chunk rounding), must report the
    first bad row across workers, and must leave numpy's BLAS thread count as it found it."""
    import analyses.moments as P
    from analyses import _util
    from analyses.moments import MomentAccumulator

    X = lowrank(n=30000, d=30, seed=11, offset=50.0).astype(np.float32)
    ref = np.cov(X.astype(np.float64), rowvar=False)
    before = _util.blas_threads()
    out = {}
    for workers in (1, 3):
        monkeypatch.setattr(P, "blas_threads", lambda w=workers: w)
        acc = MomentAccumulator(30, "cpu", precision=precision).update(X)
        assert len(acc._S) == workers                    # really split (rows per chunk < 30000 / 3)
        out[workers] = acc.covariance().numpy(), acc.mean().numpy()
        err = np.abs(out[workers][0] - ref).max() / np.abs(ref).max()
        assert err < (1e-14 if precision == "float64" else 1e-6), err
    tol = 1e-14 if precision == "float64" else 1e-6
    np.testing.assert_allclose(out[3][0], out[1][0], rtol=0, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(out[3][1], X.astype(np.float64).mean(0), rtol=1e-12 if precision == "float64" else 1e-7)
    assert _util.blas_threads() == before

    Xbad = X.copy()
    Xbad[25001, 3] = np.nan                              # in the last worker's rows
    Xbad[29999, 0] = np.inf
    with pytest.raises(ValueError, match="first bad row: 25001"):
        MomentAccumulator(30, "cpu", precision=precision).update(Xbad)
    assert _util.blas_threads() == before


def test_accumulator_without_threadpoolctl_runs_serially(monkeypatch):
    from analyses import _util
    from analyses.moments import MomentAccumulator

    monkeypatch.setattr(_util, "_BLAS_CTL", False)
    assert _util.blas_threads() == 1
    X = lowrank(n=20000, d=12, seed=12)
    acc = MomentAccumulator(12, "cpu").update(X)
    assert len(acc._S) == 1
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(X, rowvar=False), rtol=1e-12, atol=1e-12)


def test_accumulator_works_in_a_forked_child():
    """The worker pool is per process: a child forked after a fit must not wait on the parent's
    (non-existent) threads."""
    import multiprocessing as mp

    from analyses.moments import MomentAccumulator

    X = lowrank(n=30000, d=20, seed=13)
    MomentAccumulator(20, "cpu").update(X)               # parent creates its pool
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        cov = pool.apply_async(_child_cov, (X,)).get(timeout=30)
    np.testing.assert_allclose(cov, np.cov(X, rowvar=False), rtol=1e-12, atol=1e-12)


def _child_cov(X):
    from analyses.moments import MomentAccumulator
    return MomentAccumulator(X.shape[1], "cpu").update(X).covariance().numpy()


def test_accumulator_torch_path_equals_numpy_path():
    """The torch branch is what CUDA runs; on CPU it must give what the numpy branch gives, NaN
    rows included (the GPU itself is exercised by benchmarks/bench_pca.py where one exists)."""
    from analyses.moments import MomentAccumulator

    X = lowrank(n=20000, d=25, seed=14, offset=1e3)
    accs = []
    for torch_path in (False, True):
        acc = MomentAccumulator(25, "cpu")
        acc._numpy = not torch_path
        for b in np.array_split(X, 7):
            acc.update(torch.from_numpy(b))
        accs.append(acc)
    assert isinstance(accs[1]._S, torch.Tensor)              # really the torch branch
    np.testing.assert_allclose(accs[1].covariance().numpy(), np.cov(X, rowvar=False), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(accs[1].covariance().numpy(), accs[0].covariance().numpy(), rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(accs[1].mean().numpy(), X.mean(0), rtol=1e-13)
    bad = X.copy()
    bad[12345, 2] = np.nan
    acc = MomentAccumulator(25, "cpu")
    acc._numpy = False
    with pytest.raises(ValueError, match="first bad row: 12345"):
        acc.update(bad)
