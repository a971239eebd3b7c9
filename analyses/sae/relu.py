"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update), with a
linear warm-up of the L1 coefficient. Saved as SAELens ``standard``."""

from __future__ import annotations

import torch

from .base import SAE, TrainStepInput, TrainStepOutput
from .registry import register_arch


@register_arch
class ReLUSAE(SAE):
    arch = "relu"
    saelens_arch = "standard"
    options = ("l1_coef", "l1_warmup_frac")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x).relu()

    def coefficients(self, step: int, total_steps: int) -> dict[str, float]:
        warm = max(1, int(self.cfg.l1_warmup_frac * total_steps))
        return {"l1": self.cfg.l1_coef * min(1.0, (step + 1) / warm)}

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        x = inp.x.to(self.dtype)
        f = self.pre_acts(x).relu()
        x_hat = f @ self.W_dec + self.b_dec
        sq = (x - x_hat).pow(2).sum()
        mse = sq / inp.denom
        # L1 in units of the typical input norm so the coefficient does not depend on the scale
        scale = (inp.denom / inp.n_global).sqrt()
        l1 = (f * self.W_dec.norm(dim=1)).sum() / inp.n_global / scale
        loss = mse + inp.coefficients.get("l1", self.cfg.l1_coef) * l1
        with torch.no_grad():
            fired = f > 0
            counts = fired.float().sum(0)
        return TrainStepOutput(loss=loss, losses={"mse": mse.detach(), "l1": l1.detach()},
                               x_hat=x_hat.detach(), counts=counts, l0_sum=fired.sum(), sq_err=sq.detach())
