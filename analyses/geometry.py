"""Geometry of a representation from its covariance spectrum (cheap once a PCA is fitted) and,
for anisotropy, a sample of its raw rows.

- participation ratio: (sum lambda)^2 / sum lambda^2 (Gao et al.; "effective dimensionality")
- directions for a variance fraction: smallest k whose top-k eigenvalues reach 90% / 99% of the
  total ("Attention Layers Add Into Low-Dimensional Residual Subspaces")
- effective rank (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular
  values, sigma_k proportional to sqrt(lambda_k) here (singular values of the centred data)
- anisotropy: mean cosine similarity between random pairs of distinct raw (uncentred) rows (Ethayarajh
  2019), seeded. NOT a reliable measure of spread (Marbut et al. 2023: it follows where the mean sits);
  kept for comparison. The recommended spread measures and TwoNN are in ``analyses.spread``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._util import as_tensor

__all__ = ["participation_ratio", "n_directions", "effective_rank", "anisotropy", "geometry_report"]


def _eig(eigvals: Any) -> torch.Tensor:
    if isinstance(eigvals, np.ndarray):
        eigvals = torch.from_numpy(eigvals)
    ev = torch.as_tensor(eigvals).detach().to(torch.float64).reshape(-1).cpu()
    if ev.numel() == 0:
        raise ValueError("eigvals is empty")
    if not bool(torch.isfinite(ev).all()):
        raise ValueError("eigvals has NaN or inf values")
    return torch.sort(ev.clamp_min(0.0), descending=True).values


def participation_ratio(eigvals: Any) -> float:
    ev = _eig(eigvals)
    s2 = float((ev ** 2).sum())
    return float(ev.sum()) ** 2 / s2 if s2 > 0 else 0.0


def n_directions(eigvals: Any, fraction: float) -> int:
    """Smallest k with sum(top-k eigenvalues) >= fraction * total."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ev = _eig(eigvals)
    cum = torch.cumsum(ev, 0)
    if float(cum[-1]) <= 0:
        return 0
    return min(int((cum / cum[-1] < fraction).sum()) + 1, ev.numel())


def effective_rank(eigvals: Any, eps: float = 1e-7) -> float:
    """RankMe: exp(-sum p_k log p_k), p_k = sigma_k / sum(sigma) + eps, sigma_k = sqrt(lambda_k)."""
    ev = _eig(eigvals)
    sig = torch.sqrt(ev)
    tot = float(sig.sum())
    if tot <= 0:
        return 0.0
    p = sig / tot + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def anisotropy(X: Any, n_pairs: int = 10_000, seed: int = 0) -> float:
    """Mean cosine similarity between ``n_pairs`` random pairs of distinct rows (seeded)."""
    Xt = as_tensor(X, name="X")
    n = Xt.shape[0]
    if n < 2:
        raise ValueError(f"anisotropy needs at least 2 rows, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    i = torch.randint(0, n, (n_pairs,), generator=g)
    j = (i + torch.randint(1, n, (n_pairs,), generator=g)) % n          # j != i
    a = Xt[i.to(Xt.device)].to(torch.float64)
    b = Xt[j.to(Xt.device)].to(torch.float64)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(cos.mean())


def geometry_report(eigvals: Any, X: Any = None, n_pairs: int = 10_000, seed: int = 0) -> dict[str, float]:
    """All the numbers at once, from covariance eigenvalues (e.g. ``PCA.eigenvalues_``) and
    optionally a sample of raw rows ``X`` for anisotropy."""
    ev = _eig(eigvals)
    d = ev.numel()
    pr = participation_ratio(ev)
    k90, k99 = n_directions(ev, 0.90), n_directions(ev, 0.99)
    out = {
        "d": d,
        "total_variance": float(ev.sum()),
        "participation_ratio": pr,
        "participation_ratio_frac": pr / d,
        "n_dirs_90": k90,
        "n_dirs_99": k99,
        "frac_dirs_90": k90 / d,
        "frac_dirs_99": k99 / d,
        "effective_rank": effective_rank(ev),
        "top1_variance_ratio": float(ev[0] / ev.sum()) if float(ev.sum()) > 0 else math.nan,
    }
    if X is not None:
        out["anisotropy"] = anisotropy(X, n_pairs=n_pairs, seed=seed)
    return out
