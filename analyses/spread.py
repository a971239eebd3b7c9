"""How fully a representation uses its space: spread measures and intrinsic dimension.

Recommended (Marbut, McKinney-Bock & Wheeler 2023, "Reliable measures of spread in high dimensional
latent spaces", ICML): one principal-component-based and one entropy-based measure, both from the
covariance spectrum, both in [0, 1] whatever the dimension, so models of different widths compare:

- ``eigenvalue_early_enrichment`` (EEE): how early the cumulative explained-variance curve rises when
  plotted against the FRACTION of components, i.e. the area between that curve and the diagonal
  (perfect spread), scaled so one component holding everything gives 1. ``pc_spread = 1 - EEE``.
- ``eigen_entropy``: Shannon entropy of the normalised eigenvalues over log(d) (1: every direction
  carries the same variance; 0: one direction carries it all).

Reconstructed from the paper's abstract and introduction (the method section could not be read here):
the exact normalisations are ours, documented above; each is 0/1 at the two extremes and invariant to
scaling, rotation, translation and to d for isotropic data, which is what the paper asks of a measure.

Kept for comparison and labelled NOT reliable by that paper: average cosine similarity between random
rows (``analyses.geometry.anisotropy``; depends on where the mean sits, not on spread) and the
partition ratio I(V) of Mu & Viswanath 2018 (``partition_ratio``; depends on the scale of the data).

Intrinsic dimension: TwoNN (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140). For every point,
mu = r2 / r1 (distances to its 2nd and 1st nearest neighbours) is Pareto(d): F(mu) = 1 - mu^-d. Sort
mu, take the empirical F(mu_i) = i / N, discard the largest 10% of mu, and fit a line through the origin
of -log(1 - F) against log(mu); the slope is d. Points with a duplicate (r1 = 0) are left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._util import as_tensor
from .geometry import _eig, anisotropy

__all__ = ["eigenvalue_early_enrichment", "pc_spread", "eigen_entropy", "partition_ratio",
           "two_nn_distances", "twonn", "twonn_fit", "spread_report"]


def eigenvalue_early_enrichment(eigvals: Any) -> float:
    """EEE in [0, 1]: 0 = variance spread evenly over all d directions, 1 = all in one direction.
    With C_k the cumulative explained-variance ratio of the top k components,
    EEE = sum_k (C_k - k/d) / sum_k (1 - k/d)."""
    ev = _eig(eigvals)
    d = ev.numel()
    tot = float(ev.sum())
    if d < 2 or tot <= 0:
        return 0.0 if d < 2 else math.nan
    cum = torch.cumsum(ev, 0) / tot
    k = torch.arange(1, d + 1, dtype=torch.float64) / d
    return float((cum - k).sum() / (1 - k).sum())


def pc_spread(eigvals: Any) -> float:
    """1 - EEE: 1 = spread evenly over every direction (higher = more spread)."""
    return 1.0 - eigenvalue_early_enrichment(eigvals)


def eigen_entropy(eigvals: Any) -> float:
    """Normalised entropy of the covariance spectrum, -sum p log p / log d with p = lambda / sum lambda,
    in [0, 1] (higher = more spread)."""
    ev = _eig(eigvals)
    d = ev.numel()
    tot = float(ev.sum())
    if d < 2 or tot <= 0:
        return 0.0 if d < 2 else math.nan
    p = ev / tot
    p = p[p > 0]
    return float(-(p * torch.log(p)).sum() / math.log(d))


def partition_ratio(X: Any) -> float:
    """NOT a reliable measure of spread (Marbut et al. 2023; it changes with the scale of the data).
    I(V) = min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . v_i), over c in the eigenvectors of V^T V
    (Mu & Viswanath 2018, "All-but-the-top"; raw, uncentred rows), computed in log space. Both signs of
    each eigenvector are used: eigh's sign is arbitrary and Z(c) != Z(-c), so one sign alone would make
    the number depend on the solver."""
    V = as_tensor(X, name="X").to(torch.float64).cpu()
    if V.shape[0] < 2:
        raise ValueError(f"partition_ratio needs at least 2 rows, got {V.shape[0]}")
    _, U = torch.linalg.eigh(V.T @ V)
    P = V @ U
    logz = torch.cat([torch.logsumexp(P, dim=0), torch.logsumexp(-P, dim=0)])
    return float(torch.exp(logz.min() - logz.max()))


def two_nn_distances(X: Any, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2) [n]: Euclidean distances of every row to its nearest and second-nearest other row
    (float64, in row chunks so memory stays n * chunk; the two neighbours are found from the Gram
    expansion, then their distances recomputed directly so duplicates give exactly 0)."""
    Xt = as_tensor(X, name="X").to(torch.float64)
    n = Xt.shape[0]
    if n < 3:
        raise ValueError(f"TwoNN needs at least 3 rows, got {n}")
    sq = (Xt * Xt).sum(1)
    r1 = torch.empty(n, dtype=torch.float64, device=Xt.device)
    r2 = torch.empty_like(r1)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d2 = (sq[s:e, None] + sq[None, :] - 2.0 * (Xt[s:e] @ Xt.T)).clamp_min_(0.0)
        d2[torch.arange(e - s), torch.arange(s, e)] = math.inf          # not itself
        idx = torch.topk(d2, 2, dim=1, largest=False).indices
        r = torch.linalg.vector_norm(Xt[s:e, None, :] - Xt[idx], dim=2)    # exact (duplicates: 0)
        r = torch.sort(r, dim=1).values
        r1[s:e], r2[s:e] = r[:, 0], r[:, 1]
    return r1.cpu(), r2.cpu()


def twonn_fit(X: Any, discard: float = 0.1, max_rows: int | None = None, seed: int = 0) -> dict[str, Any]:
    """TwoNN with the pieces of the fit: {"dimension", "mle" (the maximum-likelihood estimate
    (N - 1) / sum log mu, for comparison), "n_used", "n_duplicates", "log_mu" [m], "neg_log_1mF" [m]}.
    ``max_rows``: a seeded random subsample first (TwoNN is O(n^2))."""
    if not 0.0 <= discard < 1.0:
        raise ValueError(f"discard must be in [0, 1), got {discard}")
    Xt = as_tensor(X, name="X")
    if max_rows is not None and Xt.shape[0] > max_rows:
        g = torch.Generator().manual_seed(int(seed))
        Xt = Xt[torch.randperm(Xt.shape[0], generator=g)[:max_rows].to(Xt.device)]
    r1, r2 = two_nn_distances(Xt)
    ok = r1 > 0
    mu = torch.sort(r2[ok] / r1[ok]).values
    n = mu.numel()
    if n < 3:
        raise ValueError("TwoNN: fewer than 3 rows left after removing duplicates")
    F = torch.arange(1, n + 1, dtype=torch.float64) / n
    m = int(math.floor(n * (1.0 - discard)))
    m = min(max(m, 2), n - 1)                      # F = 1 at the last point: -log(0) is excluded
    x, y = torch.log(mu[:m]), -torch.log1p(-F[:m])
    sxx = float((x * x).sum())
    dim = float((x * y).sum()) / sxx if sxx > 0 else math.inf
    s = float(torch.log(mu).sum())
    return {"dimension": dim, "mle": (n - 1) / s if s > 0 else math.inf, "n_used": n,
            "n_duplicates": int((~ok).sum()), "log_mu": x, "neg_log_1mF": y}


def twonn(X: Any, discard: float = 0.1, max_rows: int | None = None, seed: int = 0) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): see the module docstring."""
    return twonn_fit(X, discard=discard, max_rows=max_rows, seed=seed)["dimension"]


def spread_report(eigvals: Any, X: Any = None, twonn_rows: int = 2000, seed: int = 0,
                  n_pairs: int = 10_000) -> dict[str, float]:
    """Spread and intrinsic dimension at once. From the covariance spectrum: ``eee``, ``pc_spread``,
    ``eigen_entropy``. From a sample of raw rows X (when given): ``twonn_id`` (on at most ``twonn_rows``
    of them), and the two measures Marbut et al. show to be unreliable, under names that say so:
    ``unreliable_avg_cosine``, ``unreliable_partition_ratio``."""
    out = {"eee": eigenvalue_early_enrichment(eigvals), "eigen_entropy": eigen_entropy(eigvals)}
    out["pc_spread"] = 1.0 - out["eee"]
    if X is not None:
        Xt = as_tensor(X, name="X")
        if Xt.shape[0] >= 3:
            out["twonn_id"] = twonn(Xt, max_rows=twonn_rows, seed=seed)
        if Xt.shape[0] >= 2:
            out["unreliable_avg_cosine"] = anisotropy(Xt, n_pairs=n_pairs, seed=seed)
            out["unreliable_partition_ratio"] = partition_ratio(Xt)
    return out
