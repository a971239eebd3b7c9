"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z H(z - theta) with a learned per-latent threshold,
stored as log theta while training; loss = reconstruction + lambda * L0 with gradients to theta through a
rectangle-kernel straight-through estimator of bandwidth epsilon. Saved as SAELens ``jumprelu`` with
``threshold`` = theta."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import SAE, JumpReLUFn, StepFn, TrainStepInput, TrainStepOutput
from .registry import register_arch


@register_arch
class JumpReLUSAE(SAE):
    arch = "jumprelu"
    saelens_arch = "jumprelu"
    options = ("l0_coef", "bandwidth", "init_threshold", "l0_warmup_frac", "threshold_lr_mult")

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold),
                                                     dtype=self.W_enc.dtype, device=self.W_enc.device))

    def thresholds(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_thresholds(self, theta: torch.Tensor) -> None:
        self.log_threshold.copy_(theta.to(self.log_threshold).clamp_min(1e-30).log())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        # relu first, as SAELens does: identical for theta >= 0
        return pre.relu() * (pre > self.thresholds().to(pre.dtype))

    def coefficients(self, step: int, total_steps: int) -> dict[str, float]:
        warm = int(self.cfg.l0_warmup_frac * total_steps)
        return {"l0": self.cfg.l0_coef * (1.0 if warm <= 0 else min(1.0, (step + 1) / warm))}

    def param_groups(self, lr: float):
        return [{"params": [self.W_enc, self.b_enc, self.W_dec, self.b_dec], "lr_mult": 1.0},
                {"params": [self.log_threshold], "lr_mult": self.cfg.threshold_lr_mult}]

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        x = inp.x.to(self.dtype)
        pre = self.pre_acts(x)
        theta = self.thresholds()
        eps = self.cfg.bandwidth
        f = JumpReLUFn.apply(pre, theta, eps)
        x_hat = f @ self.W_dec + self.b_dec
        sq = (x - x_hat).pow(2).sum()
        mse = sq / inp.denom
        l0 = StepFn.apply(pre, theta, eps).sum() / inp.n_global
        loss = mse + inp.coefficients.get("l0", self.cfg.l0_coef) * l0
        with torch.no_grad():
            fired = f > 0
            counts = fired.float().sum(0)
        return TrainStepOutput(loss=loss, losses={"mse": mse.detach(), "l0": l0.detach()},
                               x_hat=x_hat.detach(), counts=counts, l0_sum=fired.sum(), sq_err=sq.detach())

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        super().fold_scale(s)
        self.log_threshold.sub_(math.log(s))
