"""SAE evaluation metrics, streamed over batches with float64 accumulators (SAELens / SAEBench
definitions, with the corrected mean-centred variance).

* L0 = mean number of non-zero latents per token
* MSE = E||x - x_hat||^2 / d_in (per element); ``mse_per_token`` = E||x - x_hat||^2
* explained variance = 1 - E||x - x_hat||^2 / sum_d Var(x_d), Var around the per-dimension mean
  (NOT around zero); FVU = 1 - explained variance. This is SAELens' ``explained_variance`` since
  the 2026 fix (decoderesearch/SAELens #665 / #710) and SAEBench's corrected one; SAELens between
  #443 (2025) and that fix took the variance around zero, reported here, labelled, as
  ``explained_variance_around_zero`` = 1 - E||x - x_hat||^2 / E||x||^2 (higher on residual
  streams with a large mean).
* cosine = mean over tokens of cos(x, x_hat); shrinkage = E||x_hat||^2 / E[x . x_hat]
* dead fraction = latents that never fired; dense fractions = latents firing on > 1% / > 10% of tokens
* ``log10_density`` [d_sae] = log10(firing rate + 1e-10) (the SAELens ``sparsity`` tensor); histogram.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .._util import as_tensor, iter_batches


EV_CONVENTION = ("around the per-dimension mean: 1 - E||x - x_hat||^2 / sum_d Var(x_d) (SAELens >= 2026 "
                 "/ SAEBench corrected); explained_variance_around_zero: 1 - E||x - x_hat||^2 / E||x||^2 "
                 "(SAELens 2025 - early 2026)")


class SAEMetrics:
    """Streaming accumulator: ``update(x, x_hat, f)`` per batch, ``compute()`` at the end."""

    def __init__(self, d_in: int, d_sae: int):
        self.d_in, self.d_sae = d_in, d_sae
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = torch.zeros(d_in, dtype=torch.float64)
        self.sq_err = 0.0
        self.sum_xhat2 = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.l0 = 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor | None = None, *,
               counts: torch.Tensor | None = None, l0_sum: float | None = None) -> None:
        """``f`` dense codes [n, d_sae]; or give ``counts`` [d_sae] and ``l0_sum`` directly."""
        x = x.detach().to(torch.float64).cpu()
        xh = x_hat.detach().to(torch.float64).cpu()
        if self.shift is None:
            self.shift = x.mean(0)
        xs = x - self.shift
        self.n += x.shape[0]
        self.sum_x += xs.sum(0)
        self.sum_x2 += xs.pow(2).sum(0)
        self.sq_err += float((x - xh).pow(2).sum())
        self.sum_xhat2 += float(xh.pow(2).sum())
        self.sum_dot += float((x * xh).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, xh, dim=-1, eps=1e-12).sum())
        if f is not None:
            nz = f.detach() != 0
            self.counts += nz.sum(0).to(torch.float64).cpu()
            self.l0 += float(nz.sum())
        else:
            if counts is not None:
                self.counts += counts.detach().to(torch.float64).cpu()
            if l0_sum is not None:
                self.l0 += float(l0_sum)

    def total_variance(self) -> float:
        """sum_d Var(x_d) around the per-dimension mean (population variance)."""
        n = max(self.n, 1)
        return float((self.sum_x2 - self.sum_x.pow(2) / n).sum() / n)

    def mean_sq_norm(self) -> float:
        """E||x||^2 (from the shifted sums: x = xs + shift)."""
        if self.shift is None:
            return 0.0
        n = max(self.n, 1)
        sh = self.shift
        return float((self.sum_x2 + 2 * sh * self.sum_x + self.n * sh.pow(2)).sum() / n)

    def density(self) -> torch.Tensor:
        return self.counts / max(self.n, 1)

    def log10_density(self) -> torch.Tensor:
        return torch.log10(self.density() + 1e-10).float()

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        mse_tok = self.sq_err / n
        tv = self.total_variance()
        ev = 1.0 - mse_tok / tv if tv > 0 else float("nan")
        dens = self.density()
        msn = self.mean_sq_norm()
        return {
            "n_tokens": int(self.n),
            "l0": self.l0 / n,
            "mse": mse_tok / self.d_in,
            "mse_per_token": mse_tok,
            "explained_variance": ev,
            "fvu": 1.0 - ev if not math.isnan(ev) else float("nan"),
            "explained_variance_around_zero": 1.0 - mse_tok / msn if msn > 0 else float("nan"),
            "cosine": self.sum_cos / n,
            "shrinkage": self.sum_xhat2 / self.sum_dot if self.sum_dot != 0 else float("nan"),
            "dead_fraction": float((self.counts == 0).double().mean()),
            "dense_1pct_fraction": float((dens > 0.01).double().mean()),
            "dense_10pct_fraction": float((dens > 0.10).double().mean()),
            "total_variance": tv,
        }


def density_histogram(log10_density: torch.Tensor, bins: int = 50, lo: float = -10.0,
                      hi: float = 0.0) -> dict[str, list]:
    """Histogram of log10 firing densities (dead latents sit at -10)."""
    d = log10_density.detach().float().cpu().clamp(lo, hi)
    counts = torch.histc(d, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


@torch.no_grad()
def evaluate_sae(sae, source: Any, *, max_tokens: int | None = None, batch_size: int = 2048,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """Stream ``source`` (tensor / array / iterable of [b, d] batches / zero-arg callable) through the
    SAE. Returns the metrics of :meth:`SAEMetrics.compute` plus ``log10_density`` (tensor) and
    ``density_histogram``."""
    from .base import check_d_in
    dev = torch.device(device) if device is not None else sae.device
    m = SAEMetrics(sae.cfg.d_in, sae.cfg.d_sae)
    if isinstance(source, torch.Tensor) or hasattr(source, "__array__"):
        X = as_tensor(source, name="activations")
        check_d_in(sae, X)
        if max_tokens is not None:
            X = X[:max_tokens]
        batches: Iterable = X.split(batch_size)
    else:
        batches = iter_batches(source)
    seen = 0
    for b in batches:
        if max_tokens is not None and seen >= max_tokens:
            break
        if max_tokens is not None:
            b = b[: max_tokens - seen]
        check_d_in(sae, b)
        xb = b.to(dev, sae.dtype)
        f = sae.encode(xb)
        xh = sae.decode(f)
        m.update(xb, xh, f)
        seen += b.shape[0]
    out: dict[str, Any] = m.compute()
    out["log10_density"] = m.log10_density()
    out["density_histogram"] = density_histogram(out["log10_density"])
    return out
