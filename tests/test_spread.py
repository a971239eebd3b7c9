"""Spread measures (Marbut et al. 2023) and TwoNN intrinsic dimension (Facco et al. 2017) on synthetic
data whose answer is known, against independent computations (numpy formulas, sklearn neighbours)."""

import math

import numpy as np
import pytest
import torch

from analyses.geometry import anisotropy
from analyses.spread import (eigen_entropy, eigenvalue_early_enrichment, partition_ratio, pc_spread,
                             spread_report, two_nn_distances, twonn, twonn_fit)


def _cov_eig(X):
    X = np.asarray(X, dtype=np.float64)
    return np.linalg.eigvalsh(np.cov(X, rowvar=False))


# --------------------------------------------------------------------------- spectrum measures

def test_extremes_and_hand_formula():
    d = 10
    assert eigenvalue_early_enrichment(np.ones(d)) == pytest.approx(0.0, abs=1e-12)
    assert eigenvalue_early_enrichment([5.0] + [0.0] * (d - 1)) == pytest.approx(1.0)
    assert eigen_entropy(np.ones(d)) == pytest.approx(1.0)
    assert eigen_entropy([5.0] + [0.0] * (d - 1)) == pytest.approx(0.0, abs=1e-12)
    # hand computation for [3, 1] (d=2): C = [0.75, 1]; sum(C - k/d) = 0.25; sum(1 - k/d) = 0.5
    assert eigenvalue_early_enrichment([1.0, 3.0]) == pytest.approx(0.5)
    p = np.array([3.0, 1.0]) / 4
    assert eigen_entropy([3.0, 1.0]) == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert pc_spread([1.0, 3.0]) == pytest.approx(0.5)


def _distributions(d=64, n=4000, seed=0):
    """Synthetic distributions ordered by construction from most to least spread: isotropic Gaussian,
    uniform hypercube (same isotropy), Gaussian with a decaying spectrum, Gaussian in a d/4-dimensional
    subspace, 4 clusters in a 3-d subspace, a line. The hard cases for the old measures: the isotropic
    cloud moved away from the origin (same spread, average cosine near 1) and the same cloud scaled."""
    rng = np.random.default_rng(seed)
    iso = rng.standard_normal((n, d))
    cube = rng.uniform(-1, 1, (n, d))
    decay = rng.standard_normal((n, d)) * (0.97 ** np.arange(d))
    sub = np.zeros((n, d))
    sub[:, : d // 4] = rng.standard_normal((n, d // 4))
    centres = rng.standard_normal((4, 3)) * 5
    clus = np.zeros((n, d))
    clus[:, :3] = centres[rng.integers(0, 4, n)] + 0.1 * rng.standard_normal((n, 3))
    line = np.outer(rng.standard_normal(n), rng.standard_normal(d))
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))          # random rotation: no measure may care
    return {k: v @ Q for k, v in [("isotropic", iso), ("hypercube", cube), ("decaying", decay),
                                  ("subspace", sub), ("clusters", clus), ("line", line)]}


def test_recommended_measures_rank_the_distributions():
    dists = _distributions()
    order = ["isotropic", "decaying", "subspace", "clusters", "line"]
    for measure in (pc_spread, eigen_entropy):
        vals = [measure(_cov_eig(dists[k])) for k in order]
        assert all(a > b for a, b in zip(vals, vals[1:])), (measure.__name__, vals)
        # isotropic Gaussian and the uniform hypercube are both perfectly spread (up to sampling)
        assert measure(_cov_eig(dists["isotropic"])) > 0.9
        assert measure(_cov_eig(dists["hypercube"])) > 0.9


def test_recommended_measures_ignore_shift_scale_and_dimension():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3000, 32))
    base = [pc_spread(_cov_eig(X)), eigen_entropy(_cov_eig(X))]
    for Y in (X + 10.0, 1e-3 * X):
        assert [pc_spread(_cov_eig(Y)), eigen_entropy(_cov_eig(Y))] == pytest.approx(base, abs=1e-9)
    wide = rng.standard_normal((6000, 128))         # an isotropic cloud in 4x the dimension
    assert pc_spread(_cov_eig(wide)) == pytest.approx(base[0], abs=0.05)
    assert eigen_entropy(_cov_eig(wide)) == pytest.approx(base[1], abs=0.02)


def test_old_measures_misrank_what_the_paper_says():
    """Average cosine sees an isotropic cloud moved off the origin as fully collapsed (~1) and a line
    through the origin as spread (~0); I(V) changes with the scale of identical-shaped data."""
    dists = _distributions(n=2000)
    shifted = dists["isotropic"] + 20.0
    cos_shift = anisotropy(shifted, seed=0)
    cos_line = abs(anisotropy(dists["line"], seed=0))   # line: cos is +-1 per pair, mean ~0
    assert cos_shift > 0.9 and cos_line < 0.1           # wrong order: the line is the least spread
    assert pc_spread(_cov_eig(shifted)) > pc_spread(_cov_eig(dists["line"])) + 0.5   # the new ones do not
    iv = [partition_ratio(s * dists["isotropic"]) for s in (0.1, 1.0, 3.0)]
    assert iv[0] > 0.9 and iv[2] < 0.5                  # same shape, different "spread"


def test_partition_ratio_against_numpy():
    rng = np.random.default_rng(2)
    V = rng.standard_normal((300, 8)) * 0.5
    w, U = np.linalg.eigh(V.T @ V)
    Z = np.concatenate([np.exp(V @ U).sum(0), np.exp(-V @ U).sum(0)])     # both signs of each c
    assert partition_ratio(V) == pytest.approx(Z.min() / Z.max(), rel=1e-10)
    # eigh's sign choice must not matter: -V has the same eigenvectors, with c and -c swapped
    assert partition_ratio(-V) == pytest.approx(partition_ratio(V), rel=1e-10)


# --------------------------------------------------------------------------------------- TwoNN

def test_two_nn_distances_match_sklearn():
    from sklearn.neighbors import NearestNeighbors
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 20))
    r1, r2 = two_nn_distances(X, chunk=128)
    dist, _ = NearestNeighbors(n_neighbors=3).fit(X).kneighbors(X)
    np.testing.assert_allclose(r1.numpy(), dist[:, 1], rtol=1e-9)
    np.testing.assert_allclose(r2.numpy(), dist[:, 2], rtol=1e-9)


def _twonn_reference(X, discard=0.1):
    """Facco et al. 2017 written out with sklearn neighbours and numpy least squares through 0."""
    from sklearn.neighbors import NearestNeighbors
    dist, _ = NearestNeighbors(n_neighbors=3).fit(X).kneighbors(X)
    mu = np.sort(dist[:, 2] / dist[:, 1])
    n = len(mu)
    F = np.arange(1, n + 1) / n
    m = int(np.floor(n * (1 - discard)))
    x, y = np.log(mu[:m]), -np.log(1 - F[:m])
    return float(np.linalg.lstsq(x[:, None], y, rcond=None)[0][0])


def _embed(Z, D, rng, noise):
    Q, _ = np.linalg.qr(rng.standard_normal((D, Z.shape[1])))
    return Z @ Q.T + noise * rng.standard_normal((Z.shape[0], D))


@pytest.mark.parametrize("d", [2, 5, 8])
def test_twonn_recovers_linear_subspace_dimension(d):
    rng = np.random.default_rng(d)
    X = _embed(rng.standard_normal((2000, d)), 50, rng, noise=1e-3)
    est = twonn(X)
    assert est == pytest.approx(_twonn_reference(X), rel=1e-9)
    assert abs(est - d) < 0.15 * d + 0.3, est


def test_twonn_swiss_roll_is_two_dimensional():
    from sklearn.datasets import make_swiss_roll
    Z, _ = make_swiss_roll(3000, noise=0.0, random_state=0)
    rng = np.random.default_rng(0)
    X = _embed(Z, 50, rng, noise=1e-3)
    fit = twonn_fit(X)
    assert abs(fit["dimension"] - 2.0) < 0.3, fit["dimension"]
    assert abs(fit["mle"] - 2.0) < 0.3
    assert fit["n_used"] == 3000 and len(fit["log_mu"]) == 2700      # top 10% of mu discarded


def test_twonn_drops_duplicates_and_subsamples():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 3))
    X = np.concatenate([X, X[:50]])                  # 50 exact duplicates: r1 = 0 for 100 rows
    fit = twonn_fit(X)
    assert fit["n_duplicates"] == 100 and math.isfinite(fit["dimension"])
    assert twonn_fit(X, max_rows=200)["n_used"] <= 200
    with pytest.raises(ValueError, match="discard"):
        twonn(X, discard=1.0)
    with pytest.raises(ValueError, match="at least 3"):
        twonn(X[:2])


def test_spread_report_labels_the_unreliable_measures():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((800, 12))
    rep = spread_report(_cov_eig(X), torch.from_numpy(X), twonn_rows=400)
    assert {"eee", "pc_spread", "eigen_entropy", "twonn_id", "unreliable_avg_cosine",
            "unreliable_partition_ratio"} <= set(rep)
    assert "avg_cosine" not in rep and "partition_ratio" not in rep
