"""Rows with massive norms: attention sinks and "massive activations" (Sun et al. 2024), a few
tokens (often the first one, or a delimiter) whose residual-stream norm is ~100x the median. A
handful of them own nearly all the variance of a hook (SmolLM2-135M layer 15: 0.8% of the rows,
>99% of it), so PCA and CKA see little else. The pca and compare steps drop rows over
DEFAULT_RATIO x the median norm by default, report how many and why, and keep every row with
``max_norm_ratio = 0``.

Why 10 (measured on smollm2-135m, builtin corpus, 8,000 rows, BOS not stored): the sinks at layers
12/15 sit at 130-175x the median (two partial ones at 12.6x, all at position 1) while 99% of the
rows are under 1.3x; layer 3's heavy tail (a rogue dimension, see ``_rogue``) reaches 12.6x with
32 rows over 10x (0.4%). 10 catches every sink and costs well under 1% of the rows."""

from __future__ import annotations

import torch

REPORT_RATIO = 10.0      # what the result reports when no ratio is asked for
DEFAULT_RATIO = 10.0     # pca / compare drop rows over this x the median norm unless told 0


def row_norms(store, hook: str, batch: int = 65536) -> torch.Tensor:
    """L2 norm of every row of one hook, float32 [n_rows], streaming."""
    out = torch.empty(store.n_rows, dtype=torch.float32)
    start = 0
    for b in store.batches(hook, batch, shuffle=False):
        out[start:start + b.shape[0]] = torch.linalg.vector_norm(b.to(torch.float32), dim=1)
        start += b.shape[0]
    return out


def massive(norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where a row's norm exceeds `ratio` x the median row norm."""
    return norms > ratio * norms.median()


def report(norms: torch.Tensor, ratio: float = REPORT_RATIO) -> dict:
    big = massive(norms, ratio)
    sq = norms.to(torch.float64) ** 2
    total = float(sq.sum())
    return {"ratio": float(ratio), "rows": int(big.sum()), "row_fraction": float(big.float().mean()),
            "sq_norm_share": float(sq[big].sum()) / total if total > 0 else 0.0,
            "median_norm": float(norms.median()), "max_norm": float(norms.max())}


def keep_rows(store, hooks: list[str], ratio: float, per_hook: dict | None = None) -> torch.Tensor:
    """Bool [n_rows]: rows that are not massive in any of `hooks` (all True when ratio <= 0).
    `per_hook`, when given, receives {hook: rows over the ratio in that hook}."""
    keep = torch.ones(store.n_rows, dtype=torch.bool)
    if ratio and ratio > 0:
        for h in hooks:
            big = massive(row_norms(store, h), ratio)
            if per_hook is not None:
                per_hook[h] = int(big.sum())
            keep &= ~big
    return keep


def check_ratio(ratio: float) -> None:
    from ..errors import WorkbenchError
    if ratio != 0 and not ratio > 1:
        raise WorkbenchError(f"--max-norm-ratio must be 0 (keep every row) or > 1 (e.g. 10: drop rows "
                             f"whose norm is over 10x the median), got {ratio}")


# ---------------------------------------------------------------------------- rogue dimensions
# A few coordinates with a variance hundreds of times the median one ("rogue dimensions",
# Timkey & van Schijndel 2021, "All bark and no bite"). Linear CKA, Procrustes, SVCCA's kept
# directions and cosine k-NN all weight coordinates by their variance, so such a hook is compared
# through those few coordinates. SmolLM2-135M (builtin corpus, sinks dropped): dimension 507
# holds 56% of the variance at layer 3 and 45% at layer 6 (top 3: 62% / 50%) but 8-11% at layers
# 0/9/12; layers 3 and 6 then score CKA ~0.1 against 0, 12 and 15 and 0.99 against each other,
# and 0.6-0.8 with the top 3 dimensions of every hook left out.
ROGUE_TOP = 3            # how many top-variance dimensions the report (and the check) looks at
ROGUE_SHARE = 0.25       # their share of the variance above which the compare step checks the scores,
ROGUE_OVER_MEDIAN = 10.0  # when the top one also has over 10x the median dimension's variance
                          # (narrow isotropic data has a large top-3 share and is not rogue)
ROGUE_EFFECT = 0.1       # score change (without them) above which it warns


def rogue_report(X: torch.Tensor, top: int = ROGUE_TOP) -> dict:
    """Share of the total variance held by the top-variance dimensions of one representation."""
    return rogue_from_var(X.to(torch.float64).var(0), top)


def rogue_from_var(var: torch.Tensor, top: int = ROGUE_TOP) -> dict:
    """The same from per-dimension variances: top dims, their shares, top-1 over the median."""
    total = float(var.sum())
    vals, idx = var.sort(descending=True)
    m = min(top, var.numel())
    med = float(var.median())
    return {"dims": idx[:m].tolist(), "top1_share": float(vals[0]) / total if total > 0 else 0.0,
            f"top{top}_share": float(vals[:m].sum()) / total if total > 0 else 0.0,
            "top1_over_median": float(vals[0]) / med if med > 0 else None}


def is_rogue(rep: dict) -> bool:
    """Whether a `rogue_report` shows a few dimensions owning the variance."""
    over = rep["top1_over_median"]
    return rep[f"top{ROGUE_TOP}_share"] > ROGUE_SHARE and (over is None or over > ROGUE_OVER_MEDIAN)


def standardize(X: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-scores (mean 0, std 1 over the rows; constant dimensions become 0)."""
    X64 = X.to(torch.float64)
    mean, std = X64.mean(0), X64.std(0)
    return ((X64 - mean) / torch.where(std > 0, std, torch.ones_like(std))).to(X.dtype)


def drop_top_dims(X: torch.Tensor, m: int) -> torch.Tensor:
    """X without its m highest-variance dimensions (the others keep their order)."""
    if m <= 0:
        return X
    if m >= X.shape[1]:
        from ..errors import WorkbenchError
        raise WorkbenchError(f"--drop-top-dims {m} would leave nothing of a {X.shape[1]}-dimensional hook; "
                             f"use a number below {X.shape[1]} (e.g. {ROGUE_TOP})")
    order = X.to(torch.float64).var(0).argsort(descending=True)
    return X[:, order[m:].sort().values]


def rogue_text(rogue: dict, where: str = "") -> str:
    """The one wording of a rogue-dimension finding (pca and compare warnings)."""
    return (f"rogue dimensions: {where}dimension(s) {rogue['dims']} hold "
            f"{100 * rogue[f'top{ROGUE_TOP}_share']:.0f}% of the variance")
