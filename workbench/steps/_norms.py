"""Rows with massive norms: attention sinks and "massive activations" (Sun et al. 2024), a few
tokens (often the first one, or a delimiter) whose residual-stream norm is ~100x the median. A
handful of them own nearly all the variance of a hook (SmolLM2-135M layer 15: 0.8% of the rows,
>99% of it), so PCA and CKA see little else. The pca and compare steps report them and drop them
on request (``max_norm_ratio``)."""

from __future__ import annotations

import torch

REPORT_RATIO = 10.0      # what the result reports when no ratio is asked for


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


def keep_rows(store, hooks: list[str], ratio: float) -> torch.Tensor:
    """Bool [n_rows]: rows that are not massive in any of `hooks` (all True when ratio <= 0)."""
    keep = torch.ones(store.n_rows, dtype=torch.bool)
    if ratio and ratio > 0:
        for h in hooks:
            keep &= ~massive(row_norms(store, h), ratio)
    return keep


def check_ratio(ratio: float) -> None:
    from ..errors import WorkbenchError
    if ratio != 0 and not ratio > 1:
        raise WorkbenchError(f"--max-norm-ratio must be 0 (keep every row) or > 1 (e.g. 10: drop rows "
                             f"whose norm is over 10x the median), got {ratio}")
