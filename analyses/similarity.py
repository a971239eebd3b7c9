"""Representation similarity: CKA (linear, debiased, RBF, minibatch), CCA / SVCCA / PWCCA,
Procrustes angular distance and mutual k-NN alignment, plus layer x layer matrices.

Inputs are torch tensors or numpy arrays [n, d] with rows = datapoints (the transpose of the
original SVCCA code's neurons x datapoints); X and Y must have the same rows (same n). Everything
runs on the inputs' device (a GPU when they are there) and accumulates in float64: second moments
are summed over row chunks after shifting by the column means, so only p x p / p x q matrices
(never n x n) are formed, except by the kernel methods that need one (rbf_cka, mutual_knn).

Conventions (see each function): linear/debiased/RBF CKA follow Kornblith et al. 2019 and the
google-research `representation_similarity` code; CCA, SVCCA and PWCCA follow google/svcca
(`cca_core.get_cca_similarity`, `pwcca.compute_pwcca`); Procrustes follows netrep's
`LinearMetric(alpha=1, score_method="angular")`; mutual k-NN follows the platonic-representation
code (Huh et al. 2024); minibatch CKA follows Nguyen et al. 2021.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ._util import as_tensor, resolve_device
from .moments import CHUNK_ROWS, MomentAccumulator, small_linalg
from .pca import svd_flip_rows

__all__ = ["linear_cka", "rbf_cka", "minibatch_cka", "cca", "svcca", "pwcca",
           "procrustes_distance", "mutual_knn", "similarity_matrix", "METRICS"]

METRICS = ("linear_cka", "debiased_cka", "rbf_cka", "svcca", "pwcca", "procrustes", "mutual_knn")
PINV_RCOND = 1e-15        # numpy.linalg.pinv's default cut-off, which cca_core relies on
F64 = torch.float64


# ============================================================================ inputs and moments
def _pair(X: Any, Y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    same = X is Y
    Xt = as_tensor(X, name="X")
    Yt = Xt if same else as_tensor(Y, name="Y")
    if Xt.shape[0] != Yt.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (datapoints): X has shape "
                         f"{tuple(Xt.shape)}, Y has shape {tuple(Yt.shape)}")
    if Xt.shape[0] < 2:
        raise ValueError(f"need at least 2 rows (datapoints), got shape {tuple(Xt.shape)}")
    if not same and Yt.device != Xt.device:
        dev = Xt.device if Xt.device.type != "cpu" else Yt.device
        Xt, Yt = Xt.to(dev), Yt.to(dev)
    return Xt, Yt


class _Moments:
    """Centred second moments of X and Y in float64 (scatter matrices, not divided by n - 1)."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, rows: bool = False):
        self.n = n = X.shape[0]
        p, q = X.shape[1], Y.shape[1]
        dev = X.device
        same = Y is X
        acc = MomentAccumulator(p if same else p + q, dev, check_finite=False)
        for s in range(0, n, CHUNK_ROWS):
            acc.update(X[s:s + CHUNK_ROWS] if same else
                       torch.cat([X[s:s + CHUNK_ROWS].to(F64), Y[s:s + CHUNK_ROWS].to(F64)], 1))
        S = acc.scatter().to(dev)
        mean = acc.mean().to(dev)
        if same:
            self.Sxx = self.Syy = self.Sxy = S
            self.mx = self.my = mean
        else:
            self.Sxx, self.Syy, self.Sxy = S[:p, :p], S[p:, p:], S[:p, p:]
            self.mx, self.my = mean[:p], mean[p:]
        if rows:   # squared norms of the centred rows
            self.rx = _row_sq_norms(X, self.mx)
            self.ry = self.rx if same else _row_sq_norms(Y, self.my)


def _row_sq_norms(X: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    out = torch.empty(X.shape[0], dtype=F64, device=X.device)
    for s in range(0, X.shape[0], CHUNK_ROWS):
        out[s:s + CHUNK_ROWS] = ((X[s:s + CHUNK_ROWS].to(F64) - mean) ** 2).sum(1)
    return out


def _hsic_u_centred(sxy_sq: float, rx: torch.Tensor, ry: torch.Tensor, n: int) -> float:
    """n(n-3) * unbiased HSIC (Song et al. 2012) of two linear kernels, in feature space, from
    centred data: ||Xc^T Yc||_F^2, and the squared norms of the centred rows.

    With zero-diagonal Gram matrices K~, L~ of centred rows: tr(K~L~) = ||Xc^T Yc||^2 - rx.ry,
    1'K~1 = -sum(rx), K~1 = -rx, so tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1
    = ||Xc^T Yc||^2 - n/(n-2) rx.ry + sum(rx) sum(ry)/((n-1)(n-2))."""
    return (sxy_sq - n / (n - 2.0) * float(rx @ ry)
            + float(rx.sum()) * float(ry.sum()) / ((n - 1.0) * (n - 2.0)))


# ============================================================================ CKA
def linear_cka(X: Any, Y: Any, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019), feature-space form:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) — the cosine between the double-centred Gram
    matrices, without forming them (O(n p q) time, O(p q) memory).

    ``debiased=True``: every HSIC replaced by the unbiased estimator of Song et al. 2012 (feature-space
    form as in `feature_space_linear_cka(debiased=True)` of google-research
    `representation_similarity`); needs n >= 4 and can be negative.
    """
    X, Y = _pair(X, Y)
    n = X.shape[0]
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 rows, got n={n}")
    m = _Moments(X, Y, rows=debiased)
    return _linear_cka_from(m.Sxx, m.Syy, m.Sxy, n, getattr(m, "rx", None), getattr(m, "ry", None),
                            debiased)


def _linear_cka_from(Sxx, Syy, Sxy, n, rx=None, ry=None, debiased=False) -> float:
    sxy = float((Sxy * Sxy).sum())
    sxx = float((Sxx * Sxx).sum())
    syy = float((Syy * Syy).sum())
    if not debiased:
        return _safe_div(sxy, math.sqrt(sxx) * math.sqrt(syy))
    hxy = _hsic_u_centred(sxy, rx, ry, n)
    hxx = _hsic_u_centred(sxx, rx, rx, n)
    hyy = _hsic_u_centred(syy, ry, ry, n)
    return _safe_div(hxy, math.sqrt(max(hxx, 0.0)) * math.sqrt(max(hyy, 0.0)))


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _median_np(t: torch.Tensor) -> torch.Tensor:
    """numpy.median semantics (mean of the two middle values for an even count)."""
    flat = t.reshape(-1)
    N = flat.numel()
    hi = torch.kthvalue(flat, N // 2 + 1).values
    if N % 2:
        return hi
    return (torch.kthvalue(flat, N // 2).values + hi) / 2


def _gram_rbf(X: torch.Tensor, threshold: float) -> torch.Tensor:
    """exp(-d_ij^2 / (2 sigma^2)), sigma = threshold * sqrt(median of all n x n squared distances,
    zero diagonal included) — `gram_rbf` of google-research representation_similarity."""
    Xc = X.to(F64) - X.to(F64).mean(0)          # distances are shift invariant; centring helps precision
    G = Xc @ Xc.T
    sq = torch.diagonal(G)
    D2 = sq[:, None] + sq[None, :] - 2.0 * G
    med = _median_np(D2)
    if not float(med) > 0:
        raise ValueError("rbf_cka: the median squared distance is 0 (most rows are identical); "
                         "the RBF bandwidth is undefined")
    return torch.exp(-D2 / (2.0 * threshold ** 2 * med))


def _center_gram(K: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Biased: H K H. Unbiased (U-centring, as `center_gram(unbiased=True)`): zero the diagonal,
    subtract row/column means taken with n - 2 and corrected by their total / (2 (n - 1))."""
    K = K.clone()
    n = K.shape[0]
    if unbiased:
        K.fill_diagonal_(0.0)
        means = K.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        K.fill_diagonal_(0.0)
    else:
        means = K.mean(0)
        means = means - means.mean() / 2
        K -= means[:, None]
        K -= means[None, :]
    return K


def _cka_gram(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> float:
    Kc, Lc = _center_gram(K, debiased), _center_gram(L, debiased)
    return _safe_div(float((Kc * Lc).sum()), float(torch.linalg.norm(Kc)) * float(torch.linalg.norm(Lc)))


def rbf_cka(X: Any, Y: Any, threshold: float = 0.5, debiased: bool = False) -> float:
    """CKA with RBF kernels (Kornblith et al. 2019; google-research `cka(gram_rbf(X, threshold),
    gram_rbf(Y, threshold), debiased)`): sigma = threshold * sqrt(median squared distance);
    biased centring unless ``debiased``. Builds n x n matrices: subsample rows for large n."""
    X, Y = _pair(X, Y)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if debiased and X.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 rows, got n={X.shape[0]}")
    return _cka_gram(_gram_rbf(X, threshold), _gram_rbf(Y, threshold), debiased)


def _hsic_u_batch(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float, float]:
    """Unbiased HSIC (Song et al. 2012) of linear kernels for one minibatch: (xy, xx, yy)."""
    n = X.shape[0]
    Xc = X.to(F64) - X.to(F64).mean(0)      # the estimator is translation invariant; centring is for precision
    Yc = Y.to(F64) - Y.to(F64).mean(0)
    rx, ry = (Xc * Xc).sum(1), (Yc * Yc).sum(1)
    c = n * (n - 3.0)
    xy = _hsic_u_centred(float(((Xc.T @ Yc) ** 2).sum()), rx, ry, n) / c
    xx = _hsic_u_centred(float(((Xc.T @ Xc) ** 2).sum()), rx, rx, n) / c
    yy = _hsic_u_centred(float(((Yc.T @ Yc) ** 2).sum()), ry, ry, n) / c
    return xy, xx, yy


def minibatch_cka(pairs: Iterable[tuple[Any, Any]]) -> float:
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021): the unbiased HSIC estimator averaged
    over minibatches, mean(HSIC_1(X_i, Y_i)) / sqrt(mean(HSIC_1(X_i, X_i)) mean(HSIC_1(Y_i, Y_i))).
    ``pairs``: any iterable of (X_batch, Y_batch) with the same rows (>= 4 each)."""
    sxy = sxx = syy = 0.0
    k = 0
    for i, (xb, yb) in enumerate(pairs):
        Xb, Yb = _pair(xb, yb)
        if Xb.shape[0] < 4:
            raise ValueError(f"minibatch {i} has {Xb.shape[0]} rows; the unbiased HSIC needs >= 4")
        a, b, c = _hsic_u_batch(Xb, Yb)
        sxy, sxx, syy, k = sxy + a, sxx + b, syy + c, k + 1
    if k == 0:
        raise ValueError("minibatch_cka got no minibatches")
    return _safe_div(sxy / k, math.sqrt(max(sxx / k, 0.0)) * math.sqrt(max(syy / k, 0.0)))


# ============================================================================ CCA family
class _CCASide:
    """One side of cca_core.get_cca_similarity: covariance (with n - 1) scaled by its largest absolute
    entry, neurons with scaled variance < epsilon dropped, epsilon * I added, inverse square root."""

    def __init__(self, C: torch.Tensor, epsilon: float):
        self.scale = float(C.abs().max())
        Cs = C / self.scale if self.scale > 0 else C * float("nan")
        self.keep = torch.abs(torch.diagonal(Cs)) >= epsilon       # NaN (constant input) -> dropped
        self.idx = self.keep.nonzero().reshape(-1)
        self.k = int(self.idx.numel())
        if self.k:
            Ck = Cs[self.idx][:, self.idx] + epsilon * torch.eye(self.k, dtype=F64, device=C.device)
            # pinv (cut-off 1e-15 * largest) then the symmetric square root, via one eigh
            with small_linalg(Ck):
                w, V = torch.linalg.eigh(Ck)
            w_inv = torch.where(w > PINV_RCOND * w.abs().max(), 1.0 / w, torch.zeros_like(w))
            self.W = (V * torch.sqrt(w_inv.clamp_min(0.0))) @ V.T


def _cca_core(sx: _CCASide, sy: _CCASide, Cxy: torch.Tensor, vectors: bool = False):
    """Canonical correlations (descending, min(kx, ky) of them) from two prepared sides and the
    (unscaled, n - 1) cross-covariance; with vectors=True also the SVD factors (u, vh)."""
    if sx.k == 0 or sy.k == 0:
        z = torch.zeros(0, dtype=F64, device=Cxy.device)
        return (z, None, None) if vectors else z
    C = Cxy[sx.idx][:, sy.idx] / math.sqrt(sx.scale * sy.scale)
    arr = sx.W @ C @ sy.W
    with small_linalg(arr):
        if vectors:
            u, s, vh = torch.linalg.svd(arr, full_matrices=False)
            return s.abs(), u, vh
        return torch.linalg.svdvals(arr).abs()


def _check_cca_rows(n: int, p: int, q: int, what: str) -> None:
    if n <= max(p, q):
        raise ValueError(f"{what} needs more datapoints than neurons on each side (the original "
                         f"cca_core asserts neurons < datapoints): n={n}, X has {p} columns, Y has {q}; "
                         "use svcca with keep < n, or more rows")


def cca(X: Any, Y: Any, epsilon: float = 1e-10) -> torch.Tensor:
    """Canonical correlations, descending (min(p, q) of them after dropping), with the conventions of
    google/svcca `cca_core.get_cca_similarity`: covariances with n - 1; Sigma_xx scaled by its largest
    absolute entry, Sigma_yy likewise, Sigma_xy by the square root of both; neurons whose scaled
    variance is below ``epsilon`` dropped; epsilon * I added to both auto-covariances; the
    correlations are the singular values of Sigma_xx^-1/2 Sigma_xy Sigma_yy^-1/2 (pinv + symmetric
    square root). Returns a float64 tensor on the inputs' device (empty when a side is all dropped)."""
    X, Y = _pair(X, Y)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    _check_cca_rows(n, p, q, "cca")
    m = _Moments(X, Y)
    return _cca_core(_CCASide(m.Sxx / (n - 1), epsilon), _CCASide(m.Syy / (n - 1), epsilon), m.Sxy / (n - 1))


def _n_keep(evals: torch.Tensor, keep: int | float, side: str, d: int) -> int:
    if isinstance(keep, (bool, np.bool_)):
        raise ValueError(f"keep must be a float in (0, 1] or an int in [1, d], got {keep!r}")
    if isinstance(keep, (int, np.integer)):
        if not 1 <= keep <= d:
            raise ValueError(f"keep={keep} directions is more than {side} has (d={d}); "
                             f"use an int in [1, {d}] or a variance fraction in (0, 1]")
        return int(keep)
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} as a variance fraction must be in (0, 1]")
    cum = torch.cumsum(evals.clamp_min(0.0), 0)
    if float(cum[-1]) <= 0:
        return 1
    return min(int((cum / cum[-1] < keep).sum()) + 1, evals.numel())


class _SVSide:
    """SVCCA's first step for one side: top-k principal directions of the centred data."""

    def __init__(self, C: torch.Tensor, keep: int | float, side: str, epsilon: float):
        with small_linalg(C):
            w, V = torch.linalg.eigh(C)
        w, V = w.flip(0), V.flip(1)
        self.k = _n_keep(w, keep, side, C.shape[0])
        self.V = V[:, :self.k]
        self.cca = _CCASide(self.V.T @ C @ self.V, epsilon)     # covariance of the kept PC scores


def svcca(X: Any, Y: Any, keep: int | float = 0.99, epsilon: float = 1e-10) -> float:
    """SVCCA (Raghu et al. 2017): per side centre, SVD, keep the top-k principal-component scores
    (``keep`` int = k; float = smallest k whose squared singular values reach that fraction of the
    total variance, chosen per side), then CCA on the scores with the `cca_core` conventions (see
    `cca`); score = plain mean of the min(k_x, k_y) canonical correlations."""
    X, Y = _pair(X, Y)
    n = X.shape[0]
    m = _Moments(X, Y)
    sx = _SVSide(m.Sxx / (n - 1), keep, "X", epsilon)
    sy = sx if Y is X else _SVSide(m.Syy / (n - 1), keep, "Y", epsilon)
    return _svcca_pair(sx, sy, m.Sxy / (n - 1))


def _svcca_pair(sx: _SVSide, sy: _SVSide, Cxy: torch.Tensor) -> float:
    rho = _cca_core(sx.cca, sy.cca, sx.V.T @ Cxy @ sy.V)
    return float(rho.mean()) if rho.numel() else 0.0


class _PWSide:
    """What PWCCA needs of one side: the CCA side plus the raw scatter and mean of its neurons."""

    def __init__(self, S: torch.Tensor, mean: torch.Tensor, n: int, epsilon: float):
        self.cca = _CCASide(S / (n - 1), epsilon)
        self.S, self.mean, self.n = S, mean, n


def pwcca(X: Any, Y: Any, epsilon: float = 1e-10) -> float:
    """Projection-weighted CCA (Morcos et al. 2018), as google/svcca `pwcca.compute_pwcca`:
    the weights come from X unless X keeps more neurons than Y (then from Y); with that side's kept
    neurons as rows A (neurons x datapoints), its neuron means m and u its singular vectors from the
    CCA step (left for X, right for Y; no Sigma^-1/2 factor, as the original), H = u^T (A - m) + m;
    QR-orthonormalise H^T = P R; alpha_i = sum_j |<P_i, a_j>| over the rows of A as given (not
    centred); PWCCA = sum_i alpha_i rho_i / sum_i alpha_i.

    Computed from second moments only: H H^T = u^T C u + n m m^T and H A^T = u^T C + n m m^T
    (C = centred scatter), so P^T A^T = L^-1 H A^T with L the Cholesky factor of H H^T (the same
    Gram-Schmidt basis as the QR, up to signs that |.| removes). Falls back to an explicit QR when
    H is numerically rank deficient.

    Signs: because of the "+ m" term, the result on uncentred inputs depends on the signs of the
    singular vectors, which the original leaves to LAPACK (a spread of up to ~4e-3). Here each
    singular vector's largest-|.| entry is made positive (scikit-learn's svd_flip rule), so results
    are deterministic across devices; on centred inputs signs do not matter and the original's
    numbers are reproduced exactly. Centre your inputs for comparable numbers."""
    X, Y = _pair(X, Y)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    _check_cca_rows(n, p, q, "pwcca")
    m = _Moments(X, Y)
    sx = _PWSide(m.Sxx, m.mx, n, epsilon)
    sy = sx if Y is X else _PWSide(m.Syy, m.my, n, epsilon)
    return _pwcca_pair(sx, sy, m.Sxy, data=(X, Y))


def _pwcca_pair(sx: _PWSide, sy: _PWSide, Sxy: torch.Tensor, data=None) -> float:
    n = sx.n
    rho, u, vh = _cca_core(sx.cca, sy.cca, Sxy / (n - 1), vectors=True)
    if rho.numel() == 0:
        return 0.0
    if sx.cca.k <= sy.cca.k:
        side, Wt, which = sx, u.T, 0           # rows of Wt = left singular vectors
    else:
        side, Wt, which = sy, vh, 1            # rows of vh = right singular vectors
    Wt = svd_flip_rows(Wt)   # deterministic signs (matter only for uncentred inputs, see docstring)
    idx = side.cca.idx
    C = side.S[idx][:, idx]
    mk = side.mean[idx]
    WC = Wt @ C
    nmm = n * torch.outer(mk, mk)
    HHt = WC @ Wt.T + nmm
    HAt = WC + nmm
    with small_linalg(HHt):
        L, info = torch.linalg.cholesky_ex((HHt + HHt.T) * 0.5)
        G = torch.linalg.solve_triangular(L, HAt, upper=False) if int(info) == 0 else None
    if G is None:
        if data is None:
            raise ValueError("pwcca: the projected directions are rank deficient")
        if callable(data):
            data = data()
        A = data[which].to(F64)[:, idx]                         # [n, k] rows = datapoints
        Ht = (A - mk) @ Wt.T + mk                                 # H^T [n, k]
        P, _ = torch.linalg.qr(Ht)
        G = P.T @ A
    w = G.abs().sum(1)
    w = w / w.sum()
    return float((w[:rho.numel()] * rho).sum())


# ============================================================================ Procrustes, k-NN
def procrustes_distance(X: Any, Y: Any) -> float:
    """Angular Procrustes distance (Williams et al. 2021; netrep `LinearMetric(alpha=1,
    center_columns=True, zero_pad=True, score_method="angular")`), in radians:
    arccos(||Xc^T Yc||_* / (||Xc||_F ||Yc||_F)); zero-padding the narrower side changes nothing."""
    X, Y = _pair(X, Y)
    m = _Moments(X, Y)
    return _procrustes_from(m.Sxx, m.Syy, m.Sxy)


def _procrustes_from(Sxx, Syy, Sxy) -> float:
    with small_linalg(Sxy):
        nuc = float(torch.linalg.svdvals(Sxy).sum())
    den = math.sqrt(max(float(torch.trace(Sxx)), 0.0)) * math.sqrt(max(float(torch.trace(Syy)), 0.0))
    if den == 0:
        return float("nan")
    return float(math.acos(min(1.0, max(-1.0, nuc / den))))


def _knn(X: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [n, k] of each row's k nearest rows by cosine similarity, itself excluded."""
    Xn = X.to(F64)
    Xn = Xn / Xn.norm(dim=1, keepdim=True).clamp_min(1e-300)
    n = Xn.shape[0]
    out = torch.empty((n, k), dtype=torch.long, device=X.device)
    step = max(1, min(n, (1 << 25) // max(n, 1)))
    for s in range(0, n, step):
        sim = Xn[s:s + step] @ Xn.T
        r = torch.arange(sim.shape[0], device=X.device)
        sim[r, r + s] = -math.inf
        out[s:s + step] = torch.topk(sim, k, dim=1).indices
    return out


def _knn_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    k = a.shape[1]
    hits = torch.zeros((), dtype=F64, device=a.device)
    for s in range(0, a.shape[0], 4096):
        hits += (a[s:s + 4096, :, None] == b[s:s + 4096, None, :]).any(-1).sum()
    return float(hits) / (a.shape[0] * k)


def mutual_knn(X: Any, Y: Any, k: int = 10) -> float:
    """Mutual k-NN alignment (Huh et al. 2024, platonic-rep `AlignmentMetrics.mutual_knn` on
    L2-normalised features): rows L2-normalised (not centred), cosine similarities with self
    excluded, k nearest per row in each space; score = mean over rows of |N_X(i) & N_Y(i)| / k.
    Builds n x n similarities in row blocks (O(n^2 d) time)."""
    X, Y = _pair(X, Y)
    n = X.shape[0]
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} neighbours needs k < n rows (each row's neighbours exclude itself); "
                         f"got n={n}")
    return _knn_overlap(_knn(X, k), _knn(Y, k))


# ============================================================================ matrices
def _centred(X: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.zeros(X.shape[1], dtype=F64, device=X.device)
    for s in range(0, X.shape[0], CHUNK_ROWS):
        mean += X[s:s + CHUNK_ROWS].to(F64).sum(0)
    mean /= X.shape[0]
    out = torch.empty(X.shape, dtype=dtype, device=X.device)
    for s in range(0, X.shape[0], CHUNK_ROWS):
        out[s:s + CHUNK_ROWS] = (X[s:s + CHUNK_ROWS].to(F64) - mean).to(dtype)
    return out, mean


def _matrix_inputs(reps_a: Sequence[Any], reps_b: Sequence[Any] | None) -> tuple[list, list, int]:
    """The representations as 2-D tensors (B is A when reps_b is None), checked to share their rows."""
    A = [as_tensor(r, name=f"reps_a[{i}]") for i, r in enumerate(reps_a)]
    B = A if reps_b is None else [as_tensor(r, name=f"reps_b[{j}]") for j, r in enumerate(reps_b)]
    if not A or not B:
        raise ValueError("similarity_matrix needs at least one representation on each side")
    n = A[0].shape[0]
    for name, reps in (("reps_a", A), ("reps_b", B)):
        for i, r in enumerate(reps):
            if r.shape[0] != n:
                raise ValueError(f"all representations must have the same rows: {name}[{i}] has shape "
                                 f"{tuple(r.shape)}, reps_a[0] has {tuple(A[0].shape)}")
    return A, B, n


def _gram_matrix(A: list, B: list, sym: bool, metric: str, M: torch.Tensor, tick: Callable[[], None],
                 dt: torch.dtype, dev: torch.device, threshold: float, k: int) -> torch.Tensor:
    """rbf_cka / mutual_knn: one n x n object per representation (normalised centred RBF Gram, or
    k-NN lists), then a cheap score per pair."""
    n = A[0].shape[0]
    if metric == "mutual_knn" and not (1 <= k < n):
        raise ValueError(f"k={k} neighbours needs 1 <= k < n rows; got n={n}")
    if metric == "mutual_knn" and n < 2:
        raise ValueError("mutual_knn needs at least 2 rows")

    def prep(X):
        X = X.to(dev)
        if metric == "mutual_knn":
            return _knn(X, k)
        Kc = _center_gram(_gram_rbf(X, threshold), False)
        return (Kc / torch.linalg.norm(Kc)).to(dt)     # n x n per representation: keep it small
    PA = [prep(x) for x in A]
    PB = PA if sym else [prep(x) for x in B]
    na, nb = len(A), len(B)
    for i in range(na):
        for j in range(i if sym else 0, nb):
            v = _knn_overlap(PA[i], PB[j]) if metric == "mutual_knn" else \
                float((PA[i].to(F64) * PB[j].to(F64)).sum())
            M[i, j] = v
            if sym:
                M[j, i] = v
            tick()
    return M


def _block(reps: list, n: int, dt: torch.dtype, dev: torch.device):
    """All centred representations side by side in one [n, sum d] matrix (views per hook), so
    that one GEMM per hook covers all its pairs without copying. Returns (Z, offsets, means)."""
    widths = [int(r.shape[1]) for r in reps]
    offs = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    Z = torch.empty((n, int(offs[-1])), dtype=dt, device=dev)
    means = []
    for j, r in enumerate(reps):
        c, mean = _centred(r.to(dev), dt)
        Z[:, offs[j]:offs[j + 1]] = c
        means.append(mean)
        del c
    return Z, offs, means


def _side(Z: torch.Tensor, off: int, w: int, mean: torch.Tensor, metric: str,
          keep: int | float, epsilon: float) -> dict[str, Any]:
    """What `metric` needs of one representation: its centred view, scatter matrix (summed over
    row chunks in float64) and per-metric extras (row norms, SVCCA directions, PWCCA whitening)."""
    n = Z.shape[0]
    Xc = Z[:, off:off + w]
    S = torch.zeros((w, w), dtype=F64, device=Z.device)
    for s in range(0, n, CHUNK_ROWS):
        c = Xc[s:s + CHUNK_ROWS]
        S += (c.T @ c).to(F64)
    info: dict[str, Any] = {"Xc": Xc, "S": S, "mean": mean}
    if metric == "debiased_cka":
        info["r"] = _row_sq_norms(Xc, torch.zeros_like(mean))
    elif metric == "svcca":
        info["sv"] = _SVSide(S / (n - 1), keep, "a representation", epsilon)
    elif metric == "pwcca":
        info["pw"] = _PWSide(S, mean, n, epsilon)
    return info


def _score(metric: str, a: dict[str, Any], b: dict[str, Any], Sab: torch.Tensor, n: int) -> float:
    """One pair's score from the two sides and their cross-product Sab (p x q)."""
    if metric == "linear_cka":
        return _linear_cka_from(a["S"], b["S"], Sab, n)
    if metric == "debiased_cka":
        return _linear_cka_from(a["S"], b["S"], Sab, n, a["r"], b["r"], True)
    if metric == "procrustes":
        return _procrustes_from(a["S"], b["S"], Sab)
    if metric == "svcca":
        return _svcca_pair(a["sv"], b["sv"], Sab / (n - 1))
    return _pwcca_pair(a["pw"], b["pw"], Sab,
                       data=lambda: (a["Xc"].to(F64) + a["mean"], b["Xc"].to(F64) + b["mean"]))


def _cross_matrix(A: list, B: list, sym: bool, metric: str, M: torch.Tensor, tick: Callable[[], None],
                  dt: torch.dtype, dev: torch.device, keep: int | float, epsilon: float) -> torch.Tensor:
    """Metrics from p x q cross-products: per side the centred data and its preparation, then per
    hook of side A one chunked GEMM against all of side B."""
    n = A[0].shape[0]
    if metric in ("svcca", "pwcca") and n < 2:
        raise ValueError("need at least 2 rows")
    if metric == "debiased_cka" and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 rows, got n={n}")
    if metric == "pwcca":
        for name, reps in (("reps_a", A), ("reps_b", B)):
            for i, r in enumerate(reps):
                if n <= r.shape[1]:
                    _check_cca_rows(n, r.shape[1], r.shape[1], f"pwcca ({name}[{i}])")
    na, nb = len(A), len(B)
    ZB, offs, mB = _block(B, n, dt, dev)
    SB = [_side(ZB, offs[j], offs[j + 1] - offs[j], mB[j], metric, keep, epsilon) for j in range(nb)]
    if sym:
        SA = SB
    else:
        ZA, offa, mA = _block(A, n, dt, dev)
        SA = [_side(ZA, offa[i], offa[i + 1] - offa[i], mA[i], metric, keep, epsilon) for i in range(na)]

    for i in range(na):
        j0 = i if sym else 0
        Zb = ZB[:, int(offs[j0]):]                 # a view: hooks j0.. of side B
        acc = torch.zeros((SA[i]["Xc"].shape[1], Zb.shape[1]), dtype=F64, device=dev)
        Xa = SA[i]["Xc"]
        for s in range(0, n, CHUNK_ROWS):
            acc += (Xa[s:s + CHUNK_ROWS].T @ Zb[s:s + CHUNK_ROWS]).to(F64)
        for j in range(j0, nb):
            Sab = acc[:, offs[j] - offs[j0]: offs[j + 1] - offs[j0]]
            if sym and j == i:
                Sab = SA[i]["S"]          # the exact same numbers as the diagonal blocks
            M[i, j] = _score(metric, SA[i], SB[j], Sab, n)
            if sym and j != i:
                M[j, i] = _score(metric, SB[j], SA[i], Sab.T, n) if metric == "pwcca" else M[i, j]
            tick()
    return M


def similarity_matrix(reps_a: Sequence[Any], reps_b: Sequence[Any] | None = None,
                      metric: str = "linear_cka", *, dtype: torch.dtype | str = "float32",
                      keep: int | float = 0.99, epsilon: float = 1e-10, threshold: float = 0.5,
                      k: int = 10, device: str | torch.device | None = None,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Matrix M[i, j] = metric(reps_a[i], reps_b[j]) (reps_b None: reps_a against itself).

    All representations share the rows (same n). Per representation, the centred data, its scatter
    matrix and whatever the metric needs of one side (CCA whitening, SVCCA directions, k-NN lists,
    a centred RBF Gram) are computed once; per pair only the p x q cross-product (or an n x n inner
    product for rbf_cka) is formed. Cross-products are computed in ``dtype`` ("float32": twice as
    fast on CPU; agrees with the single-pair float64 functions to ~1e-6) over row chunks summed in
    float64; use "float64" for full precision. Procrustes always uses float64 (the arccos near 0
    would turn float32 rounding into ~1e-4 rad). Returns a float64 CPU tensor [len(a), len(b)].
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    sym = reps_b is None
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if metric == "procrustes":
        dt = F64     # arccos(1 - delta) ~ sqrt(2 delta): float32 products would cost ~1e-4 rad near 0
    A, B, n = _matrix_inputs(reps_a, reps_b)
    dev = resolve_device(device, like=A[0])      # None: where the data is; "auto": GPU when there is one
    na, nb = len(A), len(B)
    M = torch.full((na, nb), float("nan"), dtype=F64)
    total = na * nb if not sym else na * (na + 1) // 2
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if metric in ("rbf_cka", "mutual_knn"):
        return _gram_matrix(A, B, sym, metric, M, tick, dt, dev, threshold, k)
    return _cross_matrix(A, B, sym, metric, M, tick, dt, dev, keep, epsilon)
