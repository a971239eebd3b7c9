"""Matching latents across two SAEs (seeds, widths, layers, models) and scoring the matched dictionaries.

The recipe of the universality papers, as functions on tensors:

1. **Activation correlation, streamed and sparse** (``CorrelationAccumulator``). Both SAEs encode
   the SAME rows; we add up, per latent, sum f and sum f^2, and per latent pair the cross product
   sum f_a f_b. Only non-zero codes are touched: a row with k_a and k_b active latents adds k_a * k_b
   products (a scatter-add into the d_a x d_b matrix), so no dense n x d_sae matrix ever exists and
   the cost is n * k_a * k_b, not n * d_a * d_b. Pearson r from the sums (over ALL rows, zeros
   included): r_ij = (S_ij - n m_i m_j) / sqrt((Q_i - n m_i^2)(Q_j - n m_j^2)). Lan et al. 2024
   ("Sparse autoencoders reveal universal feature spaces across large language models", arXiv
   2410.06981, Sec. 3) pair latents by this correlation on the same tokens; Li et al. 2016
   ("Convergent learning: do different neural networks learn the same representations?") do the
   same for neurons.
2. **One-to-one matching**: the Hungarian assignment maximising the summed correlation
   (scipy ``linear_sum_assignment`` on -r; Li et al. Sec. 3 "bipartite matching"), and the
   mutual-max filter (i's best partner is j AND j's best partner is i; Li et al.'s "max"
   matching, and Lan et al.'s removal of many-to-1 pairs).
3. **One-to-many groups** for a narrow and a wide SAE: every latent of the wide SAE joins the narrow
   latent it correlates with most (when r >= min_corr); a narrow latent with >= 2 children "splits"
   (feature splitting, Bricken et al. 2023 "Towards monosemanticity"; Li et al. Sec. 4 one-to-many).
4. **Scores of the matched decoder rows against shuffled pairings** (``paired_scores``): SVCCA and
   linear CKA from ``analyses.similarity`` (rows = matched latents, columns = model dimensions), and
   RSA = Spearman correlation between the two representational dissimilarity matrices (1 - Pearson
   between decoder rows, the "correlation" inner / "spearman" outer of the resi library Lan et al.
   use). Baseline: the same score with the rows of Y randomly permuted (Lan et al.'s
   ``shuffle_rand``), mean and std over ``n_shuffles``; empirical p = (1 + #{baseline >= score}) /
   (1 + n_shuffles) (Phipson & Smyth 2010).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["CorrelationAccumulator", "sparse_codes", "dense_correlation", "match_one_to_one",
           "mutual_max", "split_groups", "rsa", "paired_scores", "fraction_matched"]

PAIRS_PER_CHUNK = 1 << 22      # products scattered per index_add_ call (bounds the temporaries)
HUNGARIAN_MAX = 8192           # "auto" matching: Hungarian up to this many latents on the larger side


# ============================================================================ sparse codes
def sparse_codes(codes: Any, d: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(rows, cols, values, n_rows) of a batch of latent codes, rows sorted ascending.

    Accepts a dense [n, d] tensor / array (its non-zeros), an object with ``rows``, ``indices``,
    ``values``, ``n_rows`` (``analyses.sae.SparseActs``), a (values [n, k], indices [n, k]) pair
    (TopK output), or a (rows, cols, values, n_rows) tuple."""
    if hasattr(codes, "indices") and hasattr(codes, "rows") and hasattr(codes, "n_rows"):
        rows, cols, vals, n = codes.rows, codes.indices, codes.values, int(codes.n_rows)
    elif isinstance(codes, (tuple, list)) and len(codes) == 2:
        vals, idx = (torch.as_tensor(c) for c in codes)
        if vals.shape != idx.shape or vals.ndim != 2:
            raise ValueError(f"a (values, indices) pair needs two [n, k] arrays, got shapes "
                             f"{tuple(vals.shape)} and {tuple(idx.shape)}")
        n, k = vals.shape
        rows = torch.arange(n, device=vals.device).repeat_interleave(k)
        cols, vals = idx.reshape(-1), vals.reshape(-1)
    elif isinstance(codes, (tuple, list)) and len(codes) == 4:
        rows, cols, vals, n = codes
        rows, cols, vals, n = torch.as_tensor(rows), torch.as_tensor(cols), torch.as_tensor(vals), int(n)
    else:
        x = torch.as_tensor(np.asarray(codes)) if not isinstance(codes, torch.Tensor) else codes
        if x.ndim != 2:
            raise ValueError(f"dense codes must be [n, d_sae], got shape {tuple(x.shape)}")
        if d is not None and x.shape[1] != d:
            raise ValueError(f"codes have {x.shape[1]} latents, expected {d}")
        rows, cols = (x != 0).nonzero(as_tuple=True)
        return rows, cols, x[rows, cols], int(x.shape[0])
    rows, cols = rows.long().reshape(-1), cols.long().reshape(-1)
    vals = vals.reshape(-1)
    nz = vals != 0                      # TopK after ReLU can keep zeros: they add nothing
    rows, cols, vals = rows[nz], cols[nz], vals[nz]
    if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):
        order = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[order], cols[order], vals[order]
    if d is not None and cols.numel() and int(cols.max()) >= d:
        raise ValueError(f"latent index {int(cols.max())} out of range for {d} latents")
    return rows, cols, vals, n


# ============================================================================ streaming correlation
class CorrelationAccumulator:
    """Pearson correlation between every latent of SAE A and every latent of SAE B, streamed.

    ``update(codes_a, codes_b)`` with the two SAEs' codes of the same rows (any form
    ``sparse_codes`` accepts). Memory: the d_a x d_b cross-product matrix in ``dtype`` (float64:
    8 bytes per pair, 2 GiB at 16k x 16k; float32 halves it, at ~1e-7 relative rounding per
    addition) plus four d-vectors in float64."""

    def __init__(self, d_a: int, d_b: int, dtype: torch.dtype | str = torch.float64,
                 device: str | torch.device = "cpu"):
        dtype = {"float64": torch.float64, "float32": torch.float32}.get(dtype, dtype) \
            if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if d_a < 1 or d_b < 1:
            raise ValueError(f"need at least one latent on each side, got d_a={d_a}, d_b={d_b}")
        self.d_a, self.d_b, self.dtype, self.device = int(d_a), int(d_b), dtype, torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.sum_a, self.sum_b = torch.zeros(d_a, **f64), torch.zeros(d_b, **f64)
        self.sq_a, self.sq_b = torch.zeros(d_a, **f64), torch.zeros(d_b, **f64)
        self.count_a = torch.zeros(d_a, dtype=torch.long, device=self.device)
        self.count_b = torch.zeros(d_b, dtype=torch.long, device=self.device)
        self.cross = torch.zeros(d_a, d_b, dtype=dtype, device=self.device)

    def update(self, codes_a: Any, codes_b: Any) -> "CorrelationAccumulator":
        ra, ia, va, na = sparse_codes(codes_a, self.d_a)
        rb, ib, vb, nb = sparse_codes(codes_b, self.d_b)
        if na != nb:
            raise ValueError(f"codes of A have {na} rows, codes of B {nb}: both SAEs must encode the same rows")
        dev = self.device
        ra, ia, va, rb, ib, vb = (t.to(dev) for t in (ra, ia, va, rb, ib, vb))
        va64, vb64 = va.to(torch.float64), vb.to(torch.float64)
        self.n += na
        self.sum_a.index_add_(0, ia, va64)
        self.sq_a.index_add_(0, ia, va64 * va64)
        self.sum_b.index_add_(0, ib, vb64)
        self.sq_b.index_add_(0, ib, vb64 * vb64)
        self.count_a += torch.bincount(ia, minlength=self.d_a)
        self.count_b += torch.bincount(ib, minlength=self.d_b)
        self._cross(ra, ia, va.to(self.dtype), rb, ib, vb.to(self.dtype), na)
        return self

    def _cross(self, ra, ia, va, rb, ib, vb, n) -> None:
        """cross[i, j] += sum over rows r of a_ri b_rj, non-zeros only, in chunks of rows."""
        flat = self.cross.view(-1)
        ca = torch.bincount(ra, minlength=n)
        cb = torch.bincount(rb, minlength=n)
        if ca.numel() and bool((ca == ca[0]).all()) and bool((cb == cb[0]).all()):
            ka, kb = int(ca[0]), int(cb[0])           # fixed nnz per row (TopK): outer products
            if ka == 0 or kb == 0:
                return
            step = max(1, PAIRS_PER_CHUNK // (ka * kb))
            IA, VA, IB, VB = ia.view(n, ka), va.view(n, ka), ib.view(n, kb), vb.view(n, kb)
            for s in range(0, n, step):
                idx = IA[s:s + step, :, None] * self.d_b + IB[s:s + step, None, :]
                val = VA[s:s + step, :, None] * VB[s:s + step, None, :]
                flat.index_add_(0, idx.reshape(-1), val.reshape(-1))
            return
        # variable nnz per row: pair every A entry with every B entry of its row
        off_b = torch.zeros(n + 1, dtype=torch.long, device=ra.device)
        off_b[1:] = cb.cumsum(0)
        rep = cb[ra]                                   # partners of each A entry
        ends = rep.cumsum(0)
        e0 = 0
        while e0 < ra.numel():
            base = int(ends[e0 - 1]) if e0 else 0
            e1 = int(torch.searchsorted(ends, base + PAIRS_PER_CHUNK, right=True))
            e1 = max(e1, e0 + 1)
            r = rep[e0:e1]
            tot = int(r.sum())
            if tot:
                a_ent = torch.arange(e0, e1, device=ra.device).repeat_interleave(r)
                start = (ends[e0:e1] - r).repeat_interleave(r)
                b_ent = off_b[ra[a_ent]] + (torch.arange(tot, device=ra.device) + base - start)
                flat.index_add_(0, ia[a_ent] * self.d_b + ib[b_ent], va[a_ent] * vb[b_ent])
            e0 = e1

    # ------------------------------------------------------------------ results
    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n, 1)
        return self.sum_a / n, self.sum_b / n

    def stds(self) -> tuple[torch.Tensor, torch.Tensor]:
        ma, mb = self.means()
        n = max(self.n, 1)
        return ((self.sq_a / n - ma * ma).clamp_min(0).sqrt(), (self.sq_b / n - mb * mb).clamp_min(0).sqrt())

    def correlation(self, out_dtype: torch.dtype = torch.float32, block: int = 1024) -> torch.Tensor:
        """[d_a, d_b] Pearson r (population moments; the n vs n-1 choice cancels). Pairs where a
        latent never varies (dead, or constant) get 0."""
        if self.n < 2:
            raise ValueError(f"need at least 2 rows for a correlation, got {self.n}")
        ma, mb = self.means()
        sa, sb = self.stds()
        inv_a = torch.where(sa > 0, 1.0 / sa.clamp_min(1e-300), torch.zeros_like(sa))
        inv_b = torch.where(sb > 0, 1.0 / sb.clamp_min(1e-300), torch.zeros_like(sb))
        out = torch.empty(self.d_a, self.d_b, dtype=out_dtype, device=self.device)
        for s in range(0, self.d_a, block):
            c = self.cross[s:s + block].to(torch.float64) / self.n - ma[s:s + block, None] * mb[None, :]
            r = c * inv_a[s:s + block, None] * inv_b[None, :]
            out[s:s + block] = r.clamp_(-1.0, 1.0).to(out_dtype)
        return out

    def alive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of latents that fired at least once on the rows seen."""
        return self.count_a > 0, self.count_b > 0


def dense_correlation(A: Any, B: Any) -> np.ndarray:
    """Reference: Pearson r between the columns of dense A [n, d_a] and B [n, d_b] with numpy
    (float64); constant columns give 0. For tests and small cases."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    Ac, Bc = A - A.mean(0), B - B.mean(0)
    na, nb = np.linalg.norm(Ac, axis=0), np.linalg.norm(Bc, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (Ac.T @ Bc) / np.outer(na, nb)
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


# ============================================================================ matching
def mutual_max(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i, j) where j is i's most correlated partner AND i is j's (Li et al. 2016)."""
    best_b = corr.argmax(1)
    best_a = corr.argmax(0)
    i = torch.arange(corr.shape[0], device=corr.device)
    keep = best_a[best_b] == i
    return i[keep], best_b[keep]


def match_one_to_one(corr: torch.Tensor, method: str = "auto") -> dict[str, torch.Tensor | str]:
    """One-to-one matching of the rows (latents of A) to the columns (latents of B) of ``corr``.

    method: ``hungarian`` (maximum total correlation; every latent of the smaller side gets a
    partner), ``mutual`` (only mutual best partners), ``auto`` (hungarian up to HUNGARIAN_MAX
    latents on the larger side, else mutual: the assignment is cubic in d). Returns {"a", "b",
    "corr", "mutual" (bool per pair: also a mutual best pair), "method"}."""
    if method not in ("auto", "hungarian", "mutual"):
        raise ValueError(f"method must be auto, hungarian or mutual, got {method!r}")
    if method == "auto":
        method = "hungarian" if max(corr.shape) <= HUNGARIAN_MAX else "mutual"
    ma, mb = mutual_max(corr)
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment
        a, b = linear_sum_assignment(-corr.detach().cpu().to(torch.float64).numpy())
        a, b = torch.as_tensor(a, dtype=torch.long), torch.as_tensor(b, dtype=torch.long)
    else:
        a, b = ma.cpu(), mb.cpu()
    partner = torch.full((corr.shape[0],), -1, dtype=torch.long)
    partner[ma.cpu()] = mb.cpu()
    c = corr.detach().cpu()[a, b].to(torch.float64)
    return {"a": a, "b": b, "corr": c, "mutual": partner[a] == b, "method": method}


def split_groups(corr: torch.Tensor, min_corr: float = 0.3) -> list[dict[str, Any]]:
    """One-to-many groups: rows = latents of the NARROW SAE, columns = the wide one. Each wide latent
    joins the narrow latent it correlates with most, when r >= min_corr; narrow latents with >= 2
    children are returned as {"parent", "children" (by r, descending), "corr"} (largest groups
    first)."""
    best, parent = corr.max(0)
    ok = best >= min_corr
    groups: dict[int, list[tuple[int, float]]] = {}
    for j in ok.nonzero().flatten().tolist():
        groups.setdefault(int(parent[j]), []).append((j, float(best[j])))
    out = []
    for p, ch in groups.items():
        if len(ch) >= 2:
            ch.sort(key=lambda t: -t[1])
            out.append({"parent": p, "children": [c for c, _ in ch], "corr": [r for _, r in ch]})
    out.sort(key=lambda g: (-len(g["children"]), g["parent"]))
    return out


def fraction_matched(corr_of_pairs: torch.Tensor, mutual: torch.Tensor, n_latents: int,
                     thresholds: Sequence[float] = (0.5, 0.7, 0.9)) -> dict[str, float]:
    """Share of `n_latents` with a MUTUAL partner at r >= each threshold."""
    c = corr_of_pairs[mutual.bool()]
    return {f"{t:g}": float((c >= t).sum()) / max(n_latents, 1) for t in thresholds}


# ============================================================================ scores vs baseline
def _ranks_condensed(X: np.ndarray) -> np.ndarray:
    """Square matrix of the ranks of the condensed correlation-distance RDM of X's rows (diagonal 0)."""
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import rankdata
    d = pdist(X, "correlation")
    d = np.nan_to_num(d, nan=1.0)             # a constant row: unrelated to everything
    return squareform(rankdata(d))


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    u = u - u.mean()
    v = v - v.mean()
    den = np.sqrt((u * u).sum() * (v * v).sum())
    return float((u * v).sum() / den) if den > 0 else 0.0


def rsa(X: Any, Y: Any) -> float:
    """Representational similarity analysis of two sets of paired rows (X [m, p], Y [m, q]):
    Spearman correlation between the upper triangles of the two RDMs (RDM = 1 - Pearson
    correlation between rows; resi's ``representational_similarity_analysis`` defaults, which Lan
    et al. use). O(m^2) memory: pass at most a few thousand rows."""
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if X.shape[0] != Y.shape[0] or X.shape[0] < 3:
        raise ValueError(f"rsa needs the same number (>= 3) of rows on both sides, got {X.shape[0]} and {Y.shape[0]}")
    iu = np.triu_indices(X.shape[0], 1)
    return _pearson(_ranks_condensed(X)[iu], _ranks_condensed(Y)[iu])


def paired_scores(X: Any, Y: Any, metrics: Sequence[str] = ("svcca", "rsa", "linear_cka"),
                  n_shuffles: int = 20, seed: int = 0, keep: float | int = 0.99,
                  rsa_rows: int = 2000) -> dict[str, dict[str, Any]]:
    """Similarity of matched rows X[i] <-> Y[i] (decoder rows of matched latents) vs random pairings.

    For each metric: {"score", "baseline_mean", "baseline_std", "p_value", "baseline" [n_shuffles],
    "n"}. The baseline permutes the rows of Y (the pairing), keeping both sets of rows; p is the
    empirical one-sided p-value (1 + #{baseline >= score}) / (1 + n_shuffles). RSA uses at most
    ``rsa_rows`` pairs (a fixed random subset, the same for the score and its baseline)."""
    from .similarity import linear_cka, svcca
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    Yt = torch.as_tensor(np.asarray(Y, dtype=np.float64))
    m = Xt.shape[0]
    if Yt.shape[0] != m:
        raise ValueError(f"X has {m} rows, Y {Yt.shape[0]}: pass the matched pairs (same number of rows)")
    if m < 3:
        raise ValueError(f"need at least 3 matched pairs to score, got {m}")
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(m, generator=gen) for _ in range(n_shuffles)]
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        if metric == "rsa":
            sub = torch.randperm(m, generator=gen)[:rsa_rows].sort().values if m > rsa_rows else torch.arange(m)
            mm = sub.numel()
            RX = _ranks_condensed(Xt[sub].numpy())
            RY = _ranks_condensed(Yt[sub].numpy())
            iu = np.triu_indices(mm, 1)
            rx = RX[iu]
            score = _pearson(rx, RY[iu])
            base = []
            for _ in range(n_shuffles):
                p = torch.randperm(mm, generator=gen).numpy()
                base.append(_pearson(rx, RY[np.ix_(p, p)][iu]))
            n_used = mm
        elif metric in ("svcca", "linear_cka"):
            def fn(a, b, metric=metric):
                return svcca(a, b, keep=keep) if metric == "svcca" else linear_cka(a, b)
            score = float(fn(Xt, Yt))
            base = [float(fn(Xt, Yt[p])) for p in perms]
            n_used = m
        else:
            raise ValueError(f"unknown metric {metric!r}; choose from svcca, rsa, linear_cka")
        b = np.asarray(base)
        out[metric] = {"score": float(score), "baseline_mean": float(b.mean()),
                       "baseline_std": float(b.std(ddof=1)) if b.size > 1 else 0.0,
                       "p_value": float((1 + (b >= score).sum()) / (1 + b.size)),
                       "baseline": b.tolist(), "n": int(n_used)}
    return out
