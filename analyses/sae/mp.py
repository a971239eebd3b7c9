"""Matching-pursuit SAE (MP-SAE; Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse
Representations with Matching Pursuit"): a tied, residual-guided unrolled encoder. Starting from
r_0 = x - b_dec, each of at most k iterations picks the latent whose (unit) decoder row best matches the
residual, j = argmax_m relu(<r_t, W_dec[m]>), adds v = relu(<r_t, W_dec[j]>) to its code and subtracts
v W_dec[j] from the residual. The reconstruction is x_hat = f W_dec + b_dec (= x - r_T).

The forward is SAELens 6.x's ``MatchingPursuitSAE`` (sae_lens/saes/matching_pursuit_sae.py,
``_encode_matching_pursuit``): same relu'd argmax, same per-row stopping rules (support unchanged, or
||r|| < ``mp_residual_threshold``; ``k`` = its ``max_iterations``), b_dec added on decode only when it is
subtracted on encode; trained like SAELens does, on the reconstruction loss alone, with gradients through
the unrolled values (the selection carries none). Saved in its on-disk format (``architecture:
matching_pursuit``; tensors ``W_dec`` and ``b_dec`` only), so ``sae_lens.SAE.load_from_disk`` loads it.

One difference in how, not what: the correlations <r_t, W_dec> are kept up to date with the Gram matrix,
c_{t+1} = c_t - v_t G[j_t] (G = W_dec W_dec^T, the standard MP update), instead of a fresh [B, d_sae] x
d_in matmul per iteration — k times fewer flops. Values and residuals are computed from the explicit
residual exactly as SAELens does; in float64 the codes are identical, in float32 a near-tie can pick the
other latent (tests measure how often).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SAE, TrainStepInput, TrainStepOutput
from .registry import register_arch


@torch.no_grad()
def _gram(W_dec: torch.Tensor) -> torch.Tensor:
    W = W_dec.detach()
    return W @ W.t()


def matching_pursuit(x_in: torch.Tensor, W_dec: torch.Tensor, k: int, residual_threshold: float = 0.0,
                     stop_on_duplicate: bool = True, gram: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run at most ``k`` pursuit steps on rows of ``x_in`` [B, d_in] (already centred by b_dec).

    Returns ``(indices [B, T], values [B, T], residual [B, d_in])`` with T <= k the iterations run; values
    and residual carry autograd to ``x_in`` and ``W_dec``. A row that is done adds zeros from then on."""
    B = x_in.shape[0]
    dev = x_in.device
    g = _gram(W_dec) if gram is None else gram
    with torch.no_grad():
        corr = x_in.detach() @ W_dec.detach().t()                      # [B, d_sae]
    residual = x_in
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    support = torch.zeros(B, W_dec.shape[0], dtype=torch.bool, device=dev) if stop_on_duplicate else None
    rows = torch.arange(B, device=dev)
    idx_list: list[torch.Tensor] = []
    val_list: list[torch.Tensor] = []
    for _ in range(int(k)):
        with torch.no_grad():
            j = corr.relu().max(dim=1).indices                         # the same call as SAELens
        d = W_dec[j]                                                   # [B, d_in]
        v = (residual * d).sum(-1).relu() * (~done).to(residual.dtype)
        residual = residual - v[:, None] * d
        idx_list.append(j)
        val_list.append(v)
        with torch.no_grad():
            vd = v.detach()
            corr.sub_(vd[:, None].to(corr.dtype) * g[j])
            if support is not None:
                # the support changes only where a non-zero value lands on a latent not yet active
                hit = vd != 0
                new = hit & ~support[rows, j]
                support[rows, j] = support[rows, j] | hit
                done |= ~new
            if residual_threshold > 0:
                done |= residual.detach().norm(dim=-1) < residual_threshold
            if bool(done.all()):
                break
    if not idx_list:
        z = torch.zeros(B, 0, device=dev)
        return z.long(), z.to(x_in.dtype), residual
    return torch.stack(idx_list, 1), torch.stack(val_list, 1), residual


@register_arch
class MatchingPursuitSAE(SAE):
    arch = "mp"
    saelens_arch = "matching_pursuit"
    uses_k = True
    options = ("mp_residual_threshold", "mp_stop_on_duplicate")

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        del self.W_enc          # tied: the encoder is W_dec^T (the property below), as in SAELens
        self._gram_key: tuple | None = None
        self._gram_val: torch.Tensor | None = None

    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        return self.W_dec.t()

    def _cached_gram(self) -> torch.Tensor:
        """G = W_dec W_dec^T, recomputed only when W_dec changed (inference over many batches)."""
        W = self.W_dec
        key = (W.data_ptr(), W._version, W.dtype, W.device)
        if key != self._gram_key or self._gram_val is None:
            self._gram_val, self._gram_key = _gram(W), key
        return self._gram_val

    def _pursue(self, x: torch.Tensor, gram: torch.Tensor | None = None):
        x_in = self._x_in(x.reshape(-1, self.cfg.d_in))
        return x_in, *matching_pursuit(x_in, self.W_dec, self.cfg.k, self.cfg.mp_residual_threshold,
                                       self.cfg.mp_stop_on_duplicate, gram)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, idx, vals, _ = self._pursue(x, self._cached_gram())
        f = torch.zeros(idx.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        f = f.scatter_add(1, idx, vals)
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        out = f.to(self.dtype) @ self.W_dec
        return out + self.b_dec if self.cfg.apply_b_dec_to_input else out

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.W_dec, self.b_dec], "lr_mult": 1.0}]

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        x = inp.x.to(self.dtype)
        x_in, idx, vals, residual = self._pursue(x)
        # x_hat = f W_dec (+ b_dec) = x_in - r_T (+ b_dec): no dense decode needed
        x_hat = x_in - residual + (self.b_dec if self.cfg.apply_b_dec_to_input else 0)
        sq = (x - x_hat).pow(2).sum()
        mse = sq / inp.denom
        with torch.no_grad():
            f = torch.zeros(x.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=x.device)
            fired = f.scatter_add_(1, idx, vals.detach()) > 0
            counts = fired.float().sum(0)
        return TrainStepOutput(loss=mse, losses={"mse": mse.detach()}, x_hat=x_hat.detach(), counts=counts,
                               l0_sum=fired.sum(), sq_err=sq.detach(),
                               metrics={"iterations": int(idx.shape[1])})

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        super().fold_scale(s)
        # the residual threshold compares against input-unit norms (SAELens does the same on folding)
        self.cfg.mp_residual_threshold = float(self.cfg.mp_residual_threshold) / s

    # ----- SAELens format (formats.py calls these hooks)
    def saelens_state(self) -> dict[str, torch.Tensor]:
        return {"W_dec": self.W_dec, "b_dec": self.b_dec}

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return {"max_iterations": int(self.cfg.k), "residual_threshold": float(self.cfg.mp_residual_threshold),
                "stop_on_duplicate_support": bool(self.cfg.mp_stop_on_duplicate)}

    @classmethod
    def options_from_saelens(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """cfg.json of a SAELens matching_pursuit SAE -> our options (SAELens' defaults where absent;
        max_iterations None means d_in there, capped at d_sae here)."""
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        k = raw.get("max_iterations") or d_in
        return {"k": int(min(k, d_sae)), "mp_residual_threshold": float(raw.get("residual_threshold", 1e-2)),
                "mp_stop_on_duplicate": bool(raw.get("stop_on_duplicate_support", True))}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.W_dec.copy_(tensors["W_dec"].to(self.dtype))
        self.b_dec.copy_(tensors["b_dec"].to(self.dtype))
        self.b_enc.zero_()
