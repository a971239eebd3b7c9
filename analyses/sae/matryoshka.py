"""Matryoshka SAE on BatchTopK (Bussmann et al. 2025 / Nabeshima): nested prefixes
m_1 < ... < m_n = d_sae; loss = sum over prefixes of the reconstruction loss using only latents
[0, m_i) (+ AuxK). Early latents learn general features, later ones refine. Saved as ``jumprelu``."""

from __future__ import annotations

import torch

from .base import SparseActs, TrainStepInput, sparse_decode
from .batchtopk import BatchTopKSAE
from .registry import register_arch


def default_widths(d_sae: int) -> list[int]:
    w = sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    return w


@register_arch
class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"
    options = ("aux_k", "aux_coef", "dead_tokens", "threshold_ema", "matryoshka_widths")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.matryoshka_widths is not None:
            w = list(cfg.matryoshka_widths)
            if not w or any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1 or w[-1] > cfg.d_sae:
                raise ValueError(f"matryoshka_widths must be strictly increasing in [1, d_sae={cfg.d_sae}], "
                                 f"got {w}")

    def widths(self) -> list[int]:
        w = list(self.cfg.matryoshka_widths or default_widths(self.cfg.d_sae))
        if w[-1] != self.cfg.d_sae:
            w.append(self.cfg.d_sae)
        return w

    def _extra_losses(self, inp: TrainStepInput, acts: SparseActs, x: torch.Tensor, losses) -> torch.Tensor:
        # the full-width reconstruction is the base "mse" loss; add each inner prefix
        total = x.new_zeros(())
        for m in self.widths()[:-1]:
            v = acts.values * (acts.indices < m).to(acts.values.dtype)
            xh = sparse_decode(acts, self.W_dec, self.b_dec, values=v)
            l_m = (x - xh).pow(2).sum() / inp.denom
            losses[f"mse_{m}"] = l_m
            total = total + l_m
        return total
