"""Slow, obviously-correct numpy transcriptions of the published similarity algorithms, written
from their descriptions and original code (read, not copied), used as the independent reference
for tests/test_similarity.py and benchmarks/bench_similarity.py. Never imported by the package.

Orientation: the SVCCA family works on neurons x datapoints like google/svcca; the others on
datapoints x features. Everything is float64 numpy and builds whatever n x n matrices it likes.
"""

from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------- CKA (Kornblith et al. 2019)
def gram_linear(x):
    return x @ x.T


def gram_rbf(x, threshold=0.5):
    g = x @ x.T
    nrm = np.diag(g)
    d2 = nrm[:, None] + nrm[None, :] - 2 * g
    med = np.median(d2)                       # whole matrix, zero diagonal included
    return np.exp(-d2 / (2 * threshold ** 2 * med))


def center_gram(k, unbiased=False):
    k = np.array(k, dtype=np.float64, copy=True)
    n = k.shape[0]
    if not unbiased:
        h = np.eye(n) - np.ones((n, n)) / n     # H K H, spelled out
        return h @ k @ h
    np.fill_diagonal(k, 0.0)
    col = k.sum(axis=0) / (n - 2)
    col = col - col.sum() / (2 * (n - 1))
    k = k - col[:, None] - col[None, :]
    np.fill_diagonal(k, 0.0)
    return k


def cka_gram(kx, ky, debiased=False):
    a, b = center_gram(kx, debiased), center_gram(ky, debiased)
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def hsic_unbiased(k, l):
    """Song et al. 2012 eq. 5, written straight from the formula."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    val = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
           - 2.0 / (n - 2) * (one @ kt @ lt @ one))
    return val / (n * (n - 3))


def debiased_cka_song(x, y):
    k, l = gram_linear(x), gram_linear(y)
    return hsic_unbiased(k, l) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))


def minibatch_cka_ref(pairs):
    xy = xx = yy = 0.0
    for x, y in pairs:
        k, l = gram_linear(x), gram_linear(y)
        xy += hsic_unbiased(k, l)
        xx += hsic_unbiased(k, k)
        yy += hsic_unbiased(l, l)
    return xy / np.sqrt(xx * yy)


# ----------------------------------------------------------------- google/svcca cca_core
def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return v @ np.diag(np.sqrt(w)) @ v.T


def cca_core_ref(acts1, acts2, epsilon=1e-10):
    """acts: neurons x datapoints. Returns dict with rho, u, vh, x_keep, y_keep, means."""
    p = acts1.shape[0]
    cov = np.cov(np.vstack([acts1, acts2]))          # rows are variables, n - 1
    sxx, sxy = cov[:p, :p].copy(), cov[:p, p:].copy()
    syy = cov[p:, p:].copy()
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    sxx /= xmax
    syy /= ymax
    sxy /= np.sqrt(xmax * ymax)
    xk = np.abs(np.diag(sxx)) >= epsilon
    yk = np.abs(np.diag(syy)) >= epsilon
    sxx, syy, sxy = sxx[xk][:, xk], syy[yk][:, yk], sxy[xk][:, yk]
    sxx = sxx + epsilon * np.eye(sxx.shape[0])
    syy = syy + epsilon * np.eye(syy.shape[0])
    ixx = _psd_sqrt(np.linalg.pinv(sxx))
    iyy = _psd_sqrt(np.linalg.pinv(syy))
    u, s, vh = np.linalg.svd(ixx @ sxy @ iyy)          # full matrices, like the original
    return {"rho": np.abs(s), "u": u, "vh": vh, "x_keep": xk, "y_keep": yk,
            "m1": acts1.mean(axis=1, keepdims=True), "m2": acts2.mean(axis=1, keepdims=True)}


def svcca_ref(x, y, keep=0.99, epsilon=1e-10):
    """x, y: datapoints x features (transposed here to the original orientation)."""
    def reduce(a):
        a = a.T - a.T.mean(axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        if isinstance(keep, float):
            frac = np.cumsum(s ** 2) / np.sum(s ** 2)
            k = int(np.argmax(frac >= keep)) + 1
        else:
            k = keep
        return s[:k, None] * vt[:k]
    r = cca_core_ref(reduce(x), reduce(y), epsilon)
    return float(np.mean(r["rho"]))


def pwcca_ref(x, y, epsilon=1e-10, flip_signs=False):
    """pwcca.compute_pwcca (the fixed version: second side uses acts2 and kept-neuron means).
    flip_signs: make each singular vector's largest-|.| entry positive (instead of LAPACK's choice),
    which only matters for uncentred inputs."""
    a1, a2 = x.T, y.T
    r = cca_core_ref(a1, a2, epsilon)
    if r["x_keep"].sum() <= r["y_keep"].sum():
        keep, acts, m, basis = r["x_keep"], a1, r["m1"], r["u"].T
    else:
        keep, acts, m, basis = r["y_keep"], a2, r["m2"], r["vh"]
    if flip_signs:
        big = np.argmax(np.abs(basis), axis=1)
        basis = basis * np.sign(basis[np.arange(basis.shape[0]), big])[:, None]
    dirns = basis @ (acts[keep] - m[keep]) + m[keep]
    q, _ = np.linalg.qr(dirns.T)
    w = np.abs(q.T @ acts[keep].T).sum(axis=1)
    w = w / w.sum()
    return float(np.sum(w * r["rho"]))


# ----------------------------------------------------------------- netrep Procrustes (alpha = 1)
def procrustes_ref(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    d = max(x.shape[1], y.shape[1])
    x = np.hstack([x, np.zeros((x.shape[0], d - x.shape[1]))])
    y = np.hstack([y, np.zeros((y.shape[0], d - y.shape[1]))])
    u, _, vt = np.linalg.svd(x.T @ y)
    tx, ty = x @ u, y @ vt.T
    c = np.sum(tx * ty) / (np.linalg.norm(tx) * np.linalg.norm(ty))
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


# ----------------------------------------------------------------- platonic-rep mutual k-NN
def mutual_knn_ref(x, y, k=10):
    def nn(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -1e8)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    na, nb = nn(x), nn(y)
    n = x.shape[0]
    ma, mb = np.zeros((n, n)), np.zeros((n, n))
    rows = np.arange(n)[:, None]
    ma[rows, na] = 1.0
    mb[rows, nb] = 1.0
    return float(((ma * mb).sum(1) / k).mean())
