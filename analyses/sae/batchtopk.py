"""BatchTopK SAE (Bussmann et al. 2024): keep the top B*k activations across the whole (global) batch;
a global JumpReLU threshold is used at inference: tracked as an EMA of the smallest kept activation while
training (as SAELens does), then calibrated on data with the final weights (``calibrate``, called by the
trainer). Saved in SAELens format as ``jumprelu`` with that threshold broadcast to every latent."""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseActs, TrainStepInput
from .registry import register_arch
from .topk import TopKSAE


@register_arch
class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_arch = "jumprelu"
    sparse_codes = False
    options = ("aux_k", "aux_coef", "dead_tokens", "threshold_ema")
    needs_calibration = True

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64, device=self.W_enc.device))

    def thresholds(self) -> torch.Tensor:
        """Per-latent JumpReLU threshold (the global one broadcast)."""
        return self.threshold.to(self.dtype).expand(self.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        f = self.encode(x.reshape(-1, self.cfg.d_in))
        return SparseActs.from_mask(f, f != 0)

    @torch.no_grad()
    def batch_threshold(self, pre: torch.Tensor, inp: TrainStepInput) -> torch.Tensor:
        """The (k * global batch)-th largest ReLU'd pre-activation over the global batch."""
        kk = int(self.cfg.k * inp.n_global)
        flat = pre.relu().flatten()
        local = flat.topk(min(kk, flat.numel()), sorted=False).values
        allv = inp.dist.all_gather_cat(local)
        return allv.topk(min(kk, allv.numel()), sorted=False).values.min()

    def _select(self, pre: torch.Tensor, inp: TrainStepInput) -> SparseActs:
        tau = self.batch_threshold(pre, inp)
        mask = (pre >= tau) & (pre > 0)
        self._tau = tau
        acts = SparseActs.from_mask(pre, mask)
        acts.values = torch.empty(0, device=pre.device)
        return acts

    @torch.no_grad()
    def _post_select(self, acts: SparseActs, inp: TrainStepInput) -> None:
        tau = self._tau.double()
        if tau > 0:
            r = self.cfg.threshold_ema
            if self.threshold > 0:
                self.threshold.mul_(1 - r).add_(r * tau)
            else:
                self.threshold.fill_(tau)

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        """Global inference threshold as in Bussmann et al. 2024 (sec. 3, "the average of the minimum
        positive activation values across a number of batches"): for each batch of B rows the (k*B)-th
        largest ReLU'd pre-activation — the smallest activation BatchTopK keeps — averaged over batches,
        with the final weights. Then JumpReLU(theta) fires ~k latents per token on average."""
        taus = []
        for x in batches:
            flat = self.pre_acts(x).relu().flatten()
            kk = min(int(self.cfg.k) * x.shape[0], flat.numel())
            tau = flat.topk(kk, sorted=False).values.min()
            if tau > 0:
                taus.append(float(tau))
        if taus:
            self.threshold.fill_(sum(taus) / len(taus))
        return {"threshold": float(self.threshold), "method": "mean over batches of the (k*B)-th largest "
                "activation (Bussmann et al. 2024)"}

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        super().fold_scale(s)
        self.threshold.div_(s)
