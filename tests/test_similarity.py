"""analyses.similarity against slow numpy transcriptions of the original algorithms
(tests/ref_similarity.py), invariances, perfect scores, bad inputs, matrices."""

import math

import numpy as np
import pytest
import torch

import ref_similarity as R
from analyses import similarity as S

RNG = np.random.default_rng(1234)


def _rot(d, rng):
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


def make_cases():
    rng = np.random.default_rng(7)
    n = 240
    X = rng.standard_normal((n, 20))
    cases = {
        "independent": (X, rng.standard_normal((n, 14))),
        "affine": (X, X @ rng.standard_normal((20, 12)) + 0.3 * rng.standard_normal((n, 12)) + 5.0),
        "near_rotation": (X, X @ _rot(20, rng) + 0.01 * rng.standard_normal((n, 20))),
        "shared_latent": (np.hstack([X[:, :5], rng.standard_normal((n, 9))]) @ rng.standard_normal((14, 14)),
                          np.hstack([X[:, :5] + 0.1 * rng.standard_normal((n, 5)), rng.standard_normal((n, 7))])
                          * 3 - 50.0),   # (noisy: exactly shared latents make PWCCA's basis arbitrary)
        "n_less_than_d": (rng.standard_normal((30, 50)), rng.standard_normal((30, 42))),
        "n_less_than_d_related": None,
        "float32": (X.astype(np.float32), (X[:, :10] @ rng.standard_normal((10, 16))).astype(np.float32)
                    + rng.standard_normal((n, 16)).astype(np.float32)),
    }
    Z = rng.standard_normal((25, 60))
    cases["n_less_than_d_related"] = (Z, Z @ rng.standard_normal((60, 40)) + 0.5 * rng.standard_normal((25, 40)))
    return cases


CASES = make_cases()
ATOL = 1e-6


def f64(a):
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_cka_family_matches_reference(name):
    X, Y = CASES[name]
    x, y = f64(X), f64(Y)
    assert S.linear_cka(X, Y) == pytest.approx(R.cka_gram(R.gram_linear(x), R.gram_linear(y)), abs=ATOL)
    ref_deb = R.cka_gram(R.gram_linear(x), R.gram_linear(y), debiased=True)
    assert S.linear_cka(X, Y, debiased=True) == pytest.approx(ref_deb, abs=ATOL)
    assert ref_deb == pytest.approx(R.debiased_cka_song(x, y), abs=1e-9)      # Song's formula == U-centring
    assert S.rbf_cka(X, Y) == pytest.approx(R.cka_gram(R.gram_rbf(x, 0.5), R.gram_rbf(y, 0.5)), abs=ATOL)
    assert S.rbf_cka(X, Y, threshold=1.0, debiased=True) == pytest.approx(
        R.cka_gram(R.gram_rbf(x, 1.0), R.gram_rbf(y, 1.0), debiased=True), abs=ATOL)
    assert S.procrustes_distance(X, Y) == pytest.approx(R.procrustes_ref(x, y), abs=ATOL)
    assert S.mutual_knn(X, Y, k=5) == pytest.approx(R.mutual_knn_ref(x, y, k=5), abs=ATOL)


@pytest.mark.parametrize("name", [c for c in CASES if "n_less" not in c])
def test_cca_family_matches_reference(name):
    X, Y = CASES[name]
    x, y = f64(X), f64(Y)
    ref = R.cca_core_ref(x.T, y.T, 1e-10)["rho"]
    rho = S.cca(X, Y).numpy()
    assert rho.shape == (min(x.shape[1], y.shape[1]),)
    np.testing.assert_allclose(rho, ref, atol=ATOL)
    assert np.all(np.diff(rho) <= 1e-12)                                        # descending
    assert S.svcca(X, Y) == pytest.approx(R.svcca_ref(x, y, 0.99), abs=ATOL)
    assert S.svcca(X, Y, keep=0.5) == pytest.approx(R.svcca_ref(x, y, 0.5), abs=ATOL)
    assert S.svcca(X, Y, keep=6) == pytest.approx(R.svcca_ref(x, y, 6), abs=ATOL)
    # PWCCA: the original on centred inputs (sign-free), both argument orders (X side / Y side)
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert S.pwcca(xc, yc) == pytest.approx(R.pwcca_ref(xc, yc), abs=ATOL)
    assert S.pwcca(yc, xc) == pytest.approx(R.pwcca_ref(yc, xc), abs=ATOL)
    # uncentred: the original with the same (deterministic) singular-vector signs
    assert S.pwcca(X, Y) == pytest.approx(R.pwcca_ref(x, y, flip_signs=True), abs=ATOL)
    assert S.pwcca(Y, X) == pytest.approx(R.pwcca_ref(y, x, flip_signs=True), abs=ATOL)


def test_pwcca_uncentred_within_original_sign_spread():
    X, Y = CASES["affine"]
    rng = np.random.default_rng(0)
    r = R.cca_core_ref(X.T, Y.T)
    keep, acts, m = r["y_keep"], Y.T, r["m2"]         # Y has fewer neurons: weights from Y
    vals = []
    for _ in range(100):
        vh = r["vh"] * rng.choice([-1.0, 1.0], size=(r["vh"].shape[0], 1))
        q, _ = np.linalg.qr((vh @ (acts[keep] - m[keep]) + m[keep]).T)
        w = np.abs(q.T @ acts[keep].T).sum(1)
        vals.append(float(np.sum(w / w.sum() * r["rho"])))
    v = S.pwcca(X, Y)
    assert min(vals) - 1e-9 <= v <= max(vals) + 1e-9


def test_feature_space_equals_gram_form_and_minibatch():
    X, Y = CASES["shared_latent"]
    K, L = R.gram_linear(X), R.gram_linear(Y)
    Kc, Lc = R.center_gram(K), R.center_gram(L)
    cos = np.sum(Kc * Lc) / (np.linalg.norm(Kc) * np.linalg.norm(Lc))
    assert S.linear_cka(X, Y) == pytest.approx(cos, abs=1e-10)
    pairs = [(X[i:i + 60], Y[i:i + 60]) for i in range(0, 240, 60)]
    assert S.minibatch_cka(pairs) == pytest.approx(R.minibatch_cka_ref(pairs), abs=1e-9)
    assert S.minibatch_cka(iter([(torch.from_numpy(a), b) for a, b in pairs])) == pytest.approx(
        R.minibatch_cka_ref(pairs), abs=1e-9)
    # one minibatch == debiased CKA
    assert S.minibatch_cka([(X, Y)]) == pytest.approx(S.linear_cka(X, Y, debiased=True), abs=1e-9)


def test_invariances():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 16))
    Y = X[:, :8] @ rng.standard_normal((8, 12)) + 0.5 * rng.standard_normal((300, 12))
    Q = _rot(12, rng)
    A = rng.standard_normal((12, 12)) + 3 * np.eye(12)       # invertible
    base = {m: f(X, Y) for m, f in [("cka", S.linear_cka), ("dcka", lambda a, b: S.linear_cka(a, b, True)),
                                     ("rbf", S.rbf_cka), ("proc", S.procrustes_distance),
                                     ("knn", lambda a, b: S.mutual_knn(a, b, 8))]}
    # CKA / RBF CKA / Procrustes / k-NN: orthogonal maps and isotropic scaling (+ shifts for the centred ones)
    Yr = 2.5 * Y @ Q
    assert S.linear_cka(X, Yr + 7) == pytest.approx(base["cka"], abs=1e-10)
    assert S.linear_cka(X, Yr, debiased=True) == pytest.approx(base["dcka"], abs=1e-10)
    assert S.rbf_cka(X, Yr + 7) == pytest.approx(base["rbf"], abs=1e-10)
    assert S.procrustes_distance(X, Y @ Q + 7) == pytest.approx(base["proc"], abs=1e-10)
    assert S.mutual_knn(X, Y @ Q * 3) == pytest.approx(S.mutual_knn(X, Y), abs=1e-12)
    # CCA / SVCCA(keep = all): any invertible linear map (exactly so without the epsilon ridge,
    # which is added after scaling and so is not itself invariant)
    np.testing.assert_allclose(S.cca(X, Y @ A - 3, epsilon=0).numpy(), S.cca(X, Y, epsilon=0).numpy(), atol=1e-9)
    np.testing.assert_allclose(S.cca(X, Y @ A - 3).numpy(), S.cca(X, Y).numpy(), atol=1e-5)
    assert S.svcca(X, Y @ A, keep=12, epsilon=0) == pytest.approx(S.svcca(X, Y, keep=12, epsilon=0), abs=1e-9)
    # SVCCA within the kept subspace: a map acting inside the top-k PC subspace of Y
    Yc = Y - Y.mean(0)
    _, _, Vt = np.linalg.svd(Yc, full_matrices=False)
    V = Vt[:5].T
    B = _rot(5, rng) @ np.diag(rng.uniform(3, 6, 5)) @ _rot(5, rng)   # invertible, keeps the subspace on top
    Y2 = Yc @ V @ B @ V.T + Yc @ (np.eye(12) - V @ V.T)
    assert S.svcca(X, Y2, keep=5, epsilon=0) == pytest.approx(S.svcca(X, Yc, keep=5, epsilon=0), abs=1e-9)
    # not invariant where it should not be: CKA changes under a generic linear map
    assert abs(S.linear_cka(X, Y @ A) - base["cka"]) > 1e-3


def test_identical_inputs_score_perfectly():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((200, 10)) @ rng.standard_normal((10, 10))
    for Y in (X, X.copy(), torch.from_numpy(X)):
        assert S.linear_cka(X, Y) == pytest.approx(1.0, abs=1e-12)
        assert S.linear_cka(X, Y, debiased=True) == pytest.approx(1.0, abs=1e-12)
        assert S.rbf_cka(X, Y) == pytest.approx(1.0, abs=1e-12)
        assert S.rbf_cka(X, Y, debiased=True) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(S.cca(X, Y).numpy(), 1.0, atol=1e-6)
        assert S.svcca(X, Y) == pytest.approx(1.0, abs=1e-6)
        assert S.pwcca(X, Y) == pytest.approx(1.0, abs=1e-6)
        assert S.procrustes_distance(X, Y) == pytest.approx(0.0, abs=1e-6)
        assert S.mutual_knn(X, Y, k=10) == 1.0
    assert S.minibatch_cka([(X[:100], X[:100]), (X[100:], X[100:])]) == pytest.approx(1.0, abs=1e-12)


def test_independent_inputs_score_low():
    rng = np.random.default_rng(8)
    X, Y = rng.standard_normal((4000, 8)), rng.standard_normal((4000, 8))
    assert S.linear_cka(X, Y) < 0.01
    assert abs(S.linear_cka(X, Y, debiased=True)) < 0.002
    assert S.procrustes_distance(X, Y) > 1.3


def test_bad_inputs():
    X = RNG.standard_normal((20, 5))
    with pytest.raises(ValueError, match=r"\(20, 5\).*\(19, 5\)"):
        S.linear_cka(X, X[:19])
    bad = X.copy()
    bad[7, 2] = np.nan
    for f in (S.linear_cka, S.rbf_cka, S.svcca, S.procrustes_distance, S.mutual_knn, S.pwcca):
        with pytest.raises(ValueError, match="first bad row: 7"):
            f(X, bad)
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="X has NaN or inf values \\(first bad row: 3\\)"):
        S.cca(bad, X)
    with pytest.raises(ValueError, match="at least 4 rows"):
        S.linear_cka(X[:3], X[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 4 rows"):
        S.rbf_cka(X[:3], X[:3], debiased=True)
    with pytest.raises(ValueError, match=">= 4"):
        S.minibatch_cka([(X[:3], X[:3])])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        S.svcca(X, X, keep=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        S.svcca(X, X, keep=0.0)
    with pytest.raises(ValueError, match="keep=6"):
        S.svcca(X, X, keep=6)
    with pytest.raises(ValueError, match="k=20"):
        S.mutual_knn(X, X, k=20)
    with pytest.raises(ValueError, match="more datapoints than neurons"):
        S.cca(X[:5], X[:5])
    with pytest.raises(ValueError, match="2-D"):
        S.linear_cka(X[0], X[0])
    with pytest.raises(ValueError, match="unknown metric"):
        S.similarity_matrix([X], metric="cka")


def test_torch_float32_inputs_and_device():
    X, Y = CASES["float32"]
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    assert S.linear_cka(Xt, Yt) == pytest.approx(S.linear_cka(f64(X), f64(Y)), abs=1e-12)
    assert S.cca(Xt, Yt).device == Xt.device and S.cca(Xt, Yt).dtype == torch.float64


def test_constant_side_gives_zero_not_crash():
    X = RNG.standard_normal((50, 4))
    C = np.ones((50, 3))
    assert S.svcca(X, C) == 0.0 and S.pwcca(X, C) == 0.0 and S.cca(X, C).numel() == 0
    assert math.isnan(S.linear_cka(X, C))


@pytest.mark.parametrize("metric", S.METRICS)
def test_matrix_matches_pairwise(metric):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((300, 6))
    reps = [base @ rng.standard_normal((6, 10 + 2 * i)) + 0.5 * rng.standard_normal((300, 10 + 2 * i)) + i
            for i in range(3)]
    f = {"linear_cka": S.linear_cka, "debiased_cka": lambda a, b: S.linear_cka(a, b, True),
         "rbf_cka": S.rbf_cka, "svcca": S.svcca, "pwcca": S.pwcca, "procrustes": S.procrustes_distance,
         "mutual_knn": lambda a, b: S.mutual_knn(a, b, 10)}[metric]
    ref = np.array([[f(a, b) for b in reps] for a in reps])
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-5)):
        M = S.similarity_matrix(reps, metric=metric, dtype=dtype).numpy()
        np.testing.assert_allclose(M, ref, atol=max(tol, 5e-8 if metric == "procrustes" else 0))
    M = S.similarity_matrix(reps[:1], reps[1:], metric=metric, dtype="float64").numpy()
    np.testing.assert_allclose(M, ref[:1, 1:], atol=1e-9)
