"""Multi-dimensional (e.g. circular) features from an SAE: Engels et al. 2024, "Not All Language Model
Features Are Linear" (arXiv 2405.14860), following their code (github.com/JoshEngels/MultiDimensionalFeatures,
``sae_multid_feature_discovery/``).

1. Cluster the SAE's decoder rows (``cluster_latents``): ``spectral`` = scikit-learn
   ``SpectralClustering(affinity="precomputed")`` on the angular similarity 1 - arccos(cos)/pi (their GPT-2
   clusters, 1000 clusters for 24576 latents), or ``graph`` = link every latent to its nearest other latent
   when their cosine exceeds 0.5, take connected components, drop singletons and components of >= 1000
   latents (their Mistral clusters).
2. Per cluster, the activations restricted to its latents: x_c = sum_{i in c, f_i > threshold} f_i W_dec[i]
   (no b_dec) on the tokens where some cluster latent fires; PCA of those (``cluster_pca``: exact, through
   the QR of the cluster's decoder rows, so no [n, d_model] matrix is formed; components past the
   reconstructions' rank, which carry no variance, are dropped).
3. For each pair of consecutive principal components (0-1, 1-2, ... of the first ``n_components`` = 5),
   the two reducibility indices of their section 3:
   - epsilon-mixture index M_eps(f) = max_{v,c} P(|v.f + c| < eps sqrt(E[(v.f + c)^2])), eps = 0.1: high
     when the points are a mixture with a lower-dimensional part (``mixture_index``; their optimiser: a
     sigmoid relaxation with temperature annealed 1 -> 0 over gradient-ascent steps (theirs: 10000),
     lr 0.1, a ~ N(0, I), b = 0);
   - separability index S(f) = min over rotations of the mutual information (bits) between the two
     rotated coordinates, their histogram estimator: 10 x 10 bins over each coordinate's range
     (``np.histogram2d(bins=10)``), 100 angles ``linspace(0, 2 pi, 100)`` (``separability_index``).
   A cluster's irreducibility = mean over its PC pairs with M >= 0.01 of (1 - M) S (their ranking in
   ``analyze_reducibilities.py``); clusters are ranked by it.

Deviations (also listed in ``DEVIATIONS`` and written into results): the mixture optimiser runs on a
seeded sample of <= 2000 rows of the pair, centred and scaled to unit RMS (M is invariant to affine maps
of f; this only conditions the steps), 1000 steps by default (theirs 10000: near T = 0 the steps grow
like 1/T and wander, so we keep the best point visited), batched over pairs; beside it an exhaustive
search over 180 directions with the exact best offset for each, and the larger value wins (the ascent
alone found 0.09 where the maximum is 0.24 on a ring, 0.19 for 0.43 on two sparse rays); the reported
M is the exact fraction |z| < eps over all rows at the winning (v, c) (their number is the sigmoid at
the final temperature). PCA rows are a seeded uniform sample of at most
``max_rows`` (theirs: the first 20000); the irreducibility mean leaves out the constant 0 their ranking
script adds to every cluster's list.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ._util import as_tensor, torch_single_thread

__all__ = ["DEVIATIONS", "decoder_cosine", "cluster_latents", "cluster_pca", "mutual_information_bits",
           "separability_index", "mixture_fraction", "mixture_index", "score_pairs", "irreducibility"]

DEVIATIONS = [
    "mixture index: the paper's annealed sigmoid ascent on a seeded sample of <= mixture_rows rows of each PC "
    "pair, centred and scaled to unit RMS (M_eps is affine-invariant), mixture_steps steps (paper: 10000), "
    "keeping the best point visited, AND an exhaustive search (180 directions, exact best offset per "
    "direction); the larger wins (the ascent alone misses rings / sparse rays now and then); reported M = "
    "exact fraction |z| < eps over all rows at that (v, c)",
    "PCA rows: a seeded uniform sample of at most max_rows tokens (the paper's code: the first 20000)",
    "irreducibility: mean of (1 - M) S over PC pairs with M >= mixture_floor, without the extra constant 0 "
    "the paper's ranking script puts in every cluster's list",
    "decoder rows are L2-normalised before cosines (the paper's SAEs already had unit rows)",
]


# ------------------------------------------------------------------------------------- clustering
def decoder_cosine(W_dec: Any) -> torch.Tensor:
    """Cosine similarity [d_sae, d_sae] of the decoder rows (float32)."""
    W = as_tensor(W_dec, name="W_dec").to(torch.float32)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return W @ W.T


def _graph_clusters(sims: torch.Tensor, cutoff: float, max_size: int) -> list[list[int]]:
    """Nearest-other-latent graph above `cutoff`, made symmetric; connected components (union-find)."""
    n = sims.shape[0]
    s = sims.clone()
    s.fill_diagonal_(-math.inf)
    best, nn = s.max(dim=1)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in torch.nonzero(best > cutoff).flatten().tolist():
        a, b = find(i), find(int(nn[i]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)])
    comps: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        comps.setdefault(r, []).append(i)
    return [c for c in comps.values() if 1 < len(c) < max_size]


def _spectral_clusters(sims: torch.Tensor, n_clusters: int, seed: int) -> list[list[int]]:
    from sklearn.cluster import SpectralClustering
    aff = 1.0 - torch.arccos(sims.clamp(-1.0, 1.0)) / math.pi          # their affinity, in [0, 1]
    labels = SpectralClustering(n_clusters=n_clusters, affinity="precomputed",
                                random_state=seed).fit_predict(aff.double().numpy())
    out: list[list[int]] = [[] for _ in range(n_clusters)]
    for i, lab in enumerate(labels.tolist()):
        out[lab].append(i)
    return [c for c in out if c]


def cluster_latents(W_dec: Any, method: str = "spectral", n_clusters: int | None = None,
                    cutoff: float = 0.5, max_size: int = 1000, seed: int = 0) -> list[list[int]]:
    """Groups of latents whose decoder directions are close (lists of latent ids, ascending).
    ``n_clusters`` (spectral) defaults to d_sae // 25, the paper's ratio (1000 for 24576)."""
    sims = decoder_cosine(W_dec)
    n = sims.shape[0]
    if method == "graph":
        if not -1.0 <= cutoff < 1.0:
            raise ValueError(f"cutoff must be a cosine in [-1, 1), got {cutoff}")
        return _graph_clusters(sims, cutoff, max_size)
    if method != "spectral":
        raise ValueError(f"method must be 'spectral' or 'graph', got {method!r}")
    k = int(n_clusters) if n_clusters else max(2, n // 25)
    if not 2 <= k < n:
        raise ValueError(f"n_clusters must be between 2 and d_sae - 1 = {n - 1}, got {k}")
    return _spectral_clusters(sims, k, seed)


# ------------------------------------------------------------------------------------- PCA
def cluster_pca(codes: Any, W_rows: Any, n_components: int = 5) -> dict[str, torch.Tensor]:
    """PCA of the reconstructions codes @ W_rows ([n, m] @ [m, d]), exact, without forming [n, d]:
    W_rows^T = Q R (Q orthonormal), so codes @ W_rows = (codes @ R^T) Q^T and Q is an isometry.
    Returns {"scores" [n, k], "explained_variance_ratio" [k], "components" [k, d]} (float64)."""
    from .pca import PCA
    F = as_tensor(codes, name="codes").double()
    W = as_tensor(W_rows, name="W_rows").double()
    if F.shape[1] != W.shape[0]:
        raise ValueError(f"codes have {F.shape[1]} columns but W_rows has {W.shape[0]} rows; they must match")
    if F.shape[0] < 3:
        raise ValueError(f"need at least 3 rows (tokens where the cluster fires) for a PCA, got {F.shape[0]}")
    Q, R = torch.linalg.qr(W.T)                       # [d, m], [m, m]
    Y = F @ R.T
    k = max(1, min(int(n_components), Y.shape[1], Y.shape[0] - 1))
    pca = PCA(k, device="cpu").fit(Y)
    ratio = torch.as_tensor(pca.explained_variance_ratio_).double()
    keep = max(1, int((ratio > 1e-9).sum()))          # a rank-deficient cluster has no variance past its rank
    return {"scores": torch.as_tensor(pca.transform(Y)).double()[:, :keep],
            "explained_variance_ratio": ratio[:keep],
            "components": (torch.as_tensor(pca.components_).double() @ Q.T)[:keep]}


# ------------------------------------------------------------------------------------- separability
def _pair(x: Any, name: str = "xy", min_rows: int = 3) -> torch.Tensor:
    t = as_tensor(x, name=name).double()
    if t.shape[1] != 2:
        raise ValueError(f"{name} must have 2 columns (one pair of coordinates), got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {t.shape[0]}")
    return t


def mutual_information_bits(hist: Any, eps: float = 1e-10) -> torch.Tensor:
    """Mutual information (bits) of 2-D count tables [..., a, b], as the paper's code:
    sum over non-empty cells of p log((p + eps) / (p_x p_y + eps)), p = counts / (total + eps)."""
    h = torch.as_tensor(hist).double()
    joint = h / (h.sum(dim=(-2, -1), keepdim=True) + eps)
    prod = joint.sum(-1, keepdim=True) * joint.sum(-2, keepdim=True)
    terms = torch.where(joint > 0, joint * torch.log((joint + eps) / (prod + eps)), torch.zeros_like(joint))
    return terms.sum(dim=(-2, -1)) / math.log(2.0)


def _hist2d(u: torch.Tensor, bins: int) -> torch.Tensor:
    """np.histogram2d(u[a, :, 0], u[a, :, 1], bins) for every a: bins over each coordinate's [min, max]
    (a constant coordinate gets [v - 0.5, v + 0.5] as numpy does). -> counts [A, bins, bins]."""
    lo, hi = u.amin(dim=1), u.amax(dim=1)                                # [A, 2]
    flat = hi == lo
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    steps = torch.arange(bins + 1, dtype=u.dtype) / bins
    edges = lo[..., None] + (hi - lo)[..., None] * steps                # [A, 2, bins + 1]
    edges[..., -1] = hi
    idx = torch.stack([torch.searchsorted(edges[:, j].contiguous(), u[:, :, j].contiguous(), right=True) - 1
                       for j in range(2)], dim=-1).clamp_(0, bins - 1)   # the right edge joins the last bin
    cell = idx[..., 0] * bins + idx[..., 1]
    counts = torch.zeros(u.shape[0], bins * bins, dtype=torch.float64)
    counts.scatter_add_(1, cell, torch.ones_like(cell, dtype=torch.float64))
    return counts.view(-1, bins, bins)


def separability_index(xy: Any, bins: int = 10, n_angles: int = 100) -> tuple[float, torch.Tensor]:
    """S(f) in bits: the minimum over rotations (angles linspace(0, 2 pi, n_angles)) of the histogram
    mutual information between the two rotated coordinates. Returns (S, MI per angle [n_angles])."""
    x = _pair(xy)
    if bins < 2 or n_angles < 1:
        raise ValueError(f"bins must be >= 2 and n_angles >= 1, got {bins} and {n_angles}")
    th = torch.linspace(0.0, 2.0 * math.pi, n_angles, dtype=torch.float64)
    c, s = torch.cos(th), torch.sin(th)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)   # [A, 2, 2], their rotate()
    mi = mutual_information_bits(_hist2d(torch.einsum("nk,akl->anl", x, R), bins))
    return float(mi.min()), mi


# ------------------------------------------------------------------------------------- mixture index
def mixture_fraction(xy: Any, v: Any, c: float, epsilon: float = 0.1) -> float:
    """P(|v.f + c| < eps * sqrt(E[(v.f + c)^2])): the quantity M_eps maximises over (v, c)."""
    x = _pair(xy, min_rows=1)
    p = x @ torch.as_tensor(v, dtype=torch.float64) + float(c)
    rms = p.pow(2).mean().sqrt()
    return float((p.abs() < epsilon * rms).double().mean())


def _grid_mixture(x: torch.Tensor, epsilon: float, n_dir: int) -> tuple[torch.Tensor, float]:
    """Exhaustive search: for each of `n_dir` directions v in [0, pi), the best offset exactly (the window
    |p - t| < eps sqrt(var + (mean - t)^2) can slide until an edge meets a point p_j; both edge equations
    are quadratics in t). -> (v, c) of the best window (c = -t). One direction at a time in numpy: with
    the candidate offsets sorted, t +- h(t) are sorted too (|h'| <= eps < 1), which numpy's searchsorted
    exploits (2x faster than one batched torch.searchsorted here)."""
    th = np.arange(n_dir) * (math.pi / n_dir)
    V = np.stack([np.cos(th), np.sin(th)], 1)                                    # [A, 2]
    P = np.sort((x.double().cpu().numpy() @ V.T).T, axis=1)                     # [A, n]
    e2 = epsilon * epsilon
    best = (-1, 0, 0.0)
    for a, p in enumerate(P):
        mu, var = p.mean(), p.var()
        B, C = -2 * (p - e2 * mu), p * p - e2 * (var + mu * mu)
        disc = np.sqrt(np.clip(B * B - 4 * (1 - e2) * C, 0, None))
        ts = np.concatenate([-B + disc, -B - disc]) / (2 * (1 - e2))
        tiny = 1e-9 * (np.abs(p).max() + math.sqrt(var))
        ts = np.sort(np.concatenate([ts - tiny, ts + tiny]))
        h = epsilon * np.sqrt(var + (mu - ts) ** 2)
        cnt = np.searchsorted(p, ts + h, side="left") - np.searchsorted(p, ts - h, side="right")
        j = int(cnt.argmax())
        if cnt[j] > best[0]:
            best = (int(cnt[j]), a, -float(ts[j]))
    return torch.as_tensor(V[best[1]], dtype=torch.float64), best[2]


def _relaxed(X: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float,
             T: float) -> tuple[torch.Tensor, ...]:
    """Per padded problem (X [P, N, 2], mask [P, N]): the relaxed objective P = mean sigmoid((eps - |z|) / T),
    z = (x.a + b) / rms, its gradients in a and b written out, and the exact fraction |z| < eps.
    dP/ds_j = w_j / r - s_j (sum_i w_i s_i) / (n r^3), w_i = dP/dz_i (checked against autograd in the tests)."""
    n = mask.sum(1)
    s = torch.einsum("pnk,pk->pn", X, a) + b[:, None]
    r = ((mask * s * s).sum(1) / n).sqrt().clamp_min(1e-30)
    z = s / r[:, None]
    g = torch.sigmoid((epsilon - z.abs()) / T)
    w = mask * g * (1 - g) * (-torch.sign(z) / T) / n[:, None]
    w = torch.where(w.abs() < 1e-30, torch.zeros_like(w), w)           # no denormals (slow on CPU)
    ds = w / r[:, None] - s * ((w * s).sum(1) / (n * r ** 3))[:, None] * mask
    value = (mask * g).sum(1) / n
    frac = (mask * (z.abs() < epsilon)).sum(1) / n
    return value, torch.einsum("pn,pnk->pk", ds, X), ds.sum(1), frac


def _anneal(X: torch.Tensor, mask: torch.Tensor, epsilon: float, steps: int, lr: float,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's gradient ascent on the relaxed objective with T = 1 - i / steps, a ~ N(0, I), b = 0, for
    all problems at once; returns the (a, b) visited with the largest exact fraction (near T = 0 the steps
    grow like 1 / T and can jump away from a good point)."""
    P = X.shape[0]
    a = torch.randn(P, 2, generator=gen, dtype=X.dtype)
    b = torch.zeros(P, dtype=X.dtype)
    best = torch.full((P,), -1.0, dtype=X.dtype)
    best_a, best_b = a.clone(), b.clone()
    for i in range(steps):
        _, ga, gb, frac = _relaxed(X, mask, a, b, epsilon, 1.0 - i / steps)
        better = frac > best
        best = torch.where(better, frac, best)
        best_a[better], best_b[better] = a[better], b[better]
        a += lr * ga
        b += lr * gb
    return best_a, best_b


def mixture_index(pairs: Sequence[Any], epsilon: float = 0.1, steps: int = 1000, lr: float = 0.1,
                  seed: int = 0, max_rows: int = 2000, restarts: int = 1, n_dir: int = 180,
                  budget: int = 1 << 20) -> list[dict[str, Any]]:
    """M_eps for each [n_i, 2] pair: [{"M", "v", "c", "by"}] with v, c in the pair's own coordinates, M the
    exact fraction at (v, c) over all rows, and "by" = "anneal" (the paper's optimiser, `restarts` random
    starts) or "grid" (``_grid_mixture`` over `n_dir` directions; 0: off), whichever found the larger value:
    the annealing alone misses the optimum of a ring or of two sparse rays now and then (tests). Both see
    a seeded sample of at most `max_rows` rows of each pair (0: all); the annealing sees it standardised,
    pairs sorted by size and batched (<= `budget` padded rows), one torch thread (many small kernels)."""
    xs = [_pair(p, name=f"pairs[{i}]") for i, p in enumerate(pairs)]
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
    gen = torch.Generator().manual_seed(int(seed))
    fit = [x if not max_rows or x.shape[0] <= max_rows
           else x[torch.randperm(x.shape[0], generator=gen)[:max_rows]] for x in xs]
    out: list[dict[str, Any] | None] = [None] * len(xs)
    order = [i for i in sorted(range(len(fit)), key=lambda i: fit[i].shape[0]) for _ in range(restarts)]
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and fit[order[stop]].shape[0] * (stop + 1 - start) <= budget:
            stop += 1
        idx = order[start:stop]
        N = fit[idx[-1]].shape[0]
        X = torch.zeros(len(idx), N, 2, dtype=torch.float32)
        mask = torch.zeros(len(idx), N, dtype=torch.float32)
        mus, sds = [], []
        for j, i in enumerate(idx):
            x = fit[i]
            mu = x.mean(0)
            sd = (x - mu).pow(2).sum(1).mean().sqrt().clamp_min(1e-30)
            X[j, :x.shape[0]] = ((x - mu) / sd).float()
            mask[j, :x.shape[0]] = 1.0
            mus.append(mu)
            sds.append(sd)
        with torch_single_thread():
            a, b = _anneal(X, mask, epsilon, steps, lr, gen)
        for j, i in enumerate(idx):
            v = a[j].double() / sds[j]                   # v.x~ + c = (v/sd).x + (c - v.mu/sd)
            c = float(b[j]) - float(v @ mus[j])
            m = mixture_fraction(xs[i], v, c, epsilon)
            if out[i] is None or m > out[i]["M"]:      # type: ignore[index]
                out[i] = {"M": m, "v": v.tolist(), "c": c, "by": "anneal"}
        start = stop
    for i, x in enumerate(fit) if n_dir > 0 else ():
        v, c = _grid_mixture(x, epsilon, n_dir)
        m = mixture_fraction(xs[i], v, c, epsilon)
        if m > out[i]["M"]:                              # type: ignore[index]
            out[i] = {"M": m, "v": v.tolist(), "c": c, "by": "grid"}
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- scoring
def score_pairs(scores: Sequence[Any], *, radius: float = 0.0, epsilon: float = 0.1, bins: int = 10,
                n_angles: int = 100, steps: int = 1000, mixture_rows: int = 2000,
                seed: int = 0) -> list[list[dict[str, Any]]]:
    """For every cluster's PCA scores [n, k]: both indices on each consecutive pair (0-1, 1-2, ...),
    rows with norm <= `radius` in that plane left out (their --radius). -> per cluster a list of
    {"pcs": [i, i+1], "n": rows, "mixture_index", "separability_index"} (pairs with < 3 rows skipped)."""
    jobs, where = [], []
    for ci, sc in enumerate(scores):
        S = as_tensor(sc, name=f"scores[{ci}]").double()
        for i in range(S.shape[1] - 1):
            xy = S[:, i:i + 2]
            xy = xy[xy.norm(dim=1) > radius]
            if xy.shape[0] >= 3:
                jobs.append(xy)
                where.append((ci, i))
    mix = mixture_index(jobs, epsilon=epsilon, steps=steps, max_rows=mixture_rows, seed=seed) if jobs else []
    out: list[list[dict[str, Any]]] = [[] for _ in scores]
    for (ci, i), xy, m in zip(where, jobs, mix):
        sep, _ = separability_index(xy, bins=bins, n_angles=n_angles)
        out[ci].append({"pcs": [i, i + 1], "n": int(xy.shape[0]), "mixture_index": m["M"],
                        "mixture_by": m["by"], "separability_index": sep})
    return out


def irreducibility(pairs: Sequence[dict[str, Any]], mixture_floor: float = 0.01) -> float:
    """Mean of (1 - M) * S over the pairs with M >= mixture_floor (0 when none): the paper's ranking."""
    vals = [(1.0 - p["mixture_index"]) * p["separability_index"] for p in pairs
            if p["mixture_index"] >= mixture_floor]
    return float(sum(vals) / len(vals)) if vals else 0.0
