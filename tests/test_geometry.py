"""analyses.geometry: known spectra, agreement with direct computations, anisotropy."""

import math

import numpy as np
import pytest
import torch

from analyses import geometry as G
from analyses.pca import PCA


def test_participation_ratio_known_spectra():
    assert G.participation_ratio(np.ones(50)) == pytest.approx(50.0)
    assert G.participation_ratio([5.0, 0, 0, 0]) == pytest.approx(1.0)
    ev = np.array([4.0, 2.0, 1.0, 1.0])
    assert G.participation_ratio(ev) == pytest.approx(ev.sum() ** 2 / (ev ** 2).sum())
    assert G.participation_ratio(ev * 1e6) == pytest.approx(G.participation_ratio(ev))   # scale-free


def test_n_directions():
    ev = np.array([50.0, 30.0, 10.0, 9.0, 1.0])                     # cumulative .5 .8 .9 .99 1
    assert G.n_directions(ev, 0.5) == 1
    assert G.n_directions(ev, 0.9) == 3
    assert G.n_directions(ev, 0.95) == 4
    assert G.n_directions(ev, 0.99) == 4
    assert G.n_directions(ev, 1.0) == 5
    assert G.n_directions(ev[::-1].copy(), 0.9) == 3                 # order does not matter
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        G.n_directions(ev, 1.5)


def test_effective_rank_is_rankme():
    assert G.effective_rank(np.ones(64)) == pytest.approx(64.0, rel=1e-4)
    assert G.effective_rank([1.0, 0, 0]) == pytest.approx(1.0, abs=1e-4)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 20)) @ rng.standard_normal((20, 20))
    Xc = X - X.mean(0)
    s = np.linalg.svd(Xc, compute_uv=False)                          # RankMe on singular values
    p = s / s.sum() + 1e-7
    ref = math.exp(-(p * np.log(p)).sum())
    ev = np.linalg.eigvalsh(np.cov(X.T))
    assert G.effective_rank(ev) == pytest.approx(ref, rel=1e-6)


def test_anisotropy():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(30)
    same_dir = np.outer(rng.uniform(1, 3, 100), v)
    assert G.anisotropy(same_dir) == pytest.approx(1.0, abs=1e-12)
    iso = rng.standard_normal((2000, 64))
    assert abs(G.anisotropy(iso)) < 0.02
    shifted = iso + 5.0                                             # a common offset: anisotropic
    assert G.anisotropy(shifted) > 0.9
    # direct computation over the same seeded pairs
    a1 = G.anisotropy(iso, n_pairs=500, seed=3)
    assert a1 == G.anisotropy(torch.from_numpy(iso), n_pairs=500, seed=3)
    assert a1 != G.anisotropy(iso, n_pairs=500, seed=4)
    X = rng.standard_normal((5, 3))
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, 5, (40,), generator=g)
    j = (i + torch.randint(1, 5, (40,), generator=g)) % 5
    cos = [X[a] @ X[b] / np.linalg.norm(X[a]) / np.linalg.norm(X[b]) for a, b in zip(i.tolist(), j.tolist())]
    assert G.anisotropy(X, n_pairs=40, seed=0) == pytest.approx(np.mean(cos), abs=1e-12)
    assert all(a != b for a, b in zip(i.tolist(), j.tolist()))
    with pytest.raises(ValueError, match="at least 2 rows"):
        G.anisotropy(X[:1])


def test_report_from_pca():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3000, 6)) @ rng.standard_normal((6, 40)) + 0.05 * rng.standard_normal((3000, 40))
    p = PCA(10).fit(X)
    rep = G.geometry_report(p.eigenvalues_, X)
    ev = np.linalg.eigvalsh(np.cov(X.T))
    assert rep["d"] == 40
    assert rep["participation_ratio"] == pytest.approx(G.participation_ratio(ev), rel=1e-9)
    assert rep["n_dirs_99"] <= 6 and rep["frac_dirs_99"] == rep["n_dirs_99"] / 40
    assert rep["total_variance"] == pytest.approx(ev.sum(), rel=1e-9)
    assert "anisotropy" in rep and -1 <= rep["anisotropy"] <= 1
    assert "anisotropy" not in G.geometry_report(p.eigenvalues_)
    with pytest.raises(ValueError, match="NaN"):
        G.geometry_report([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        G.geometry_report([])
