"""Mutual Choice and Feature Choice SAEs with aux_zipf_loss (Ayonrinde 2024, "Adaptive Sparse Allocation
with Mutual Choice & Feature Choice Sparse Autoencoders", arXiv 2411.02124).

The paper frames the sparsifying activation as a token-feature matching on the batch x latent matrix of
pre-activations, under a total budget of k*B matches for a batch of B tokens:

* **mutual choice** (``mutual_choice``): the k*B largest pre-activations of the whole matrix (no per-token
  or per-latent limit; the same selection as BatchTopK, Bussmann et al. 2024);
* **feature choice** (``feature_choice``): every latent picks its top m tokens of the batch,
  m = ``fc_capacity`` (default round(k*B / d_sae), so the mean L0 is ~k); a latent never gets more than m
  tokens per batch, and a token gets as many latents as chose it.

Selected entries keep their ReLU'd pre-activation. ``aux_zipf_loss`` (replaces AuxK here): every latent
has a target number of tokens per batch — the Zipf law the paper fits to feature densities, applied to
the latents ranked by their tracked firing frequency (EMA, rate ``zipf_ema``): target(rank r) =
k*B * r^-alpha / sum_j j^-alpha, alpha = ``zipf_alpha``, capped by a latent's capacity (m for feature
choice). A latent firing on fewer tokens than its target (dead = firing on none) picks its top
(target - observed) tokens among those the main selection left it, and those activations reconstruct the
residual x - x_hat, weighted ``aux_coef`` and normalised as AuxK (Gao et al. 2024) — the paper's
generalisation of aux_k_loss from dead to under-used latents. The paper's full text was not reachable
from here (only its abstract and reviews): this reading of aux_zipf_loss is ours and recorded as such.

Inference is per token (selection over a batch would make a token's code depend on its batch-mates): a
JumpReLU threshold calibrated after training with the final weights, as BatchTopK does — mutual choice:
one global threshold, the mean over batches of the (k*B)-th largest activation; feature choice: one per
latent, the mean over batches of its m-th largest activation (it then fires on ~m/B of tokens, as in
training). Both save as SAELens ``jumprelu`` (threshold per latent) and reload as themselves.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseActs, TrainStepInput
from .batchtopk import BatchTopKSAE
from .registry import register_arch

INFERENCE = {
    "mutual_choice": "JumpReLU with one global threshold: mean over calibration batches of the (k*B)-th "
                     "largest ReLU'd pre-activation (as BatchTopK, Bussmann et al. 2024)",
    "feature_choice": "JumpReLU with a threshold per latent: mean over calibration batches of its m-th "
                      "largest ReLU'd pre-activation (m = capacity for that batch size)",
}


def zipf_targets(freq: torch.Tensor, total: float, alpha: float) -> torch.Tensor:
    """Target firing count of each latent: latents ranked by ``freq`` (descending, ties by index), the
    latent of rank r gets total * r^-alpha / sum_j j^-alpha (a Zipf law over the d_sae ranks)."""
    d = freq.numel()
    order = torch.sort(freq.double(), descending=True, stable=True).indices
    w = torch.arange(1, d + 1, dtype=torch.float64, device=freq.device).pow(-float(alpha))
    out = torch.empty(d, dtype=torch.float64, device=freq.device)
    out[order] = total * w / w.sum()
    return out


@register_arch
class MutualChoiceSAE(BatchTopKSAE):
    arch = "mutual_choice"
    options = ("aux_coef", "zipf_alpha", "zipf_ema", "dead_tokens", "threshold_ema")

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        dev = self.W_enc.device
        self.register_buffer("freq", torch.zeros(cfg.d_sae, dtype=torch.float64, device=dev))
        self.register_buffer("freq_steps", torch.zeros((), dtype=torch.long, device=dev))

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.zipf_alpha > 0:
            raise ValueError(f"zipf_alpha must be > 0, got {cfg.zipf_alpha!r}")
        if not 0 < cfg.zipf_ema <= 1:
            raise ValueError(f"zipf_ema must be in (0, 1], got {cfg.zipf_ema!r}")

    def capacity(self, n_rows: int) -> int:
        """Most tokens one latent may take from a batch of ``n_rows`` rows (mutual choice: all of them)."""
        return n_rows

    # ----- selection
    def _select(self, pre: torch.Tensor, inp: TrainStepInput) -> SparseActs:
        if inp.dist.world_size > 1:        # threshold over the global batch (ties may add entries)
            tau = self.batch_threshold(pre, inp)
            mask = (pre >= tau) & (pre > 0)
        else:                              # exactly the k*B largest entries (positive ones kept)
            kk = min(int(self.cfg.k * inp.n_global), pre.numel())
            top = pre.flatten().topk(kk, sorted=False)
            tau = top.values.min().relu()
            mask = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device)
            mask[top.indices] = True
            mask = mask.view_as(pre) & (pre > 0)
        return self._from_mask(pre, mask, tau)

    def _from_mask(self, pre: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor) -> SparseActs:
        self._tau, self._main_mask = tau, mask
        acts = SparseActs.from_mask(pre, mask)
        acts.values = torch.empty(0, device=pre.device)
        return acts

    @torch.no_grad()
    def _post_select(self, acts: SparseActs, inp: TrainStepInput) -> None:
        super()._post_select(acts, inp)          # the global threshold's EMA
        self._update_freq(acts, inp)

    @torch.no_grad()
    def _update_freq(self, acts: SparseActs, inp: TrainStepInput) -> None:
        """EMA of each latent's firing rate (fraction of the global batch it fired on)."""
        live = (acts.values.detach() > 0).double()
        counts = torch.zeros(self.cfg.d_sae, dtype=torch.float64, device=live.device).index_add_(
            0, acts.indices, live)
        rate = inp.dist.all_reduce_sum(counts) / inp.n_global
        if int(self.freq_steps) == 0:
            self.freq.copy_(rate)
        else:
            self.freq.mul_(1 - self.cfg.zipf_ema).add_(self.cfg.zipf_ema * rate)
        self.freq_steps += 1

    # ----- aux_zipf_loss
    @torch.no_grad()
    def zipf_selection(self, pre: torch.Tensor, main_mask: torch.Tensor) -> torch.Tensor:
        """Mask [n, d_sae] of the entries aux_zipf_loss uses: each latent below its Zipf target (capped by
        its capacity) takes its top round(target - observed) positive pre-activations among the tokens
        the main selection did not give it. Counts are per local rows (exact in one process)."""
        n, d = pre.shape
        out = torch.zeros_like(main_mask)
        if int(self.freq_steps) == 0:
            return out                            # no frequencies tracked yet
        target = zipf_targets(self.freq, float(self.cfg.k) * n, self.cfg.zipf_alpha).clamp(max=self.capacity(n))
        q = (target - self.freq * n).round().clamp(0, n).long()
        under = q.nonzero().flatten()
        if under.numel() == 0:
            return out
        qu = q[under]
        free = pre[:, under].masked_fill(main_mask[:, under], float("-inf"))
        vals, rows = free.topk(int(qu.max()), dim=0)                       # [Q, n_under]
        keep = (torch.arange(vals.shape[0], device=pre.device)[:, None] < qu[None, :]) & (vals > 0)
        cols = under[None, :].expand_as(rows)
        out[rows[keep], cols[keep]] = True
        return out

    def _aux_loss(self, inp: TrainStepInput, pre: torch.Tensor, x_in: torch.Tensor,
                  residual: torch.Tensor) -> torch.Tensor:
        zero = residual.new_zeros(())
        if self.cfg.aux_coef == 0:
            return zero
        mask = self.zipf_selection(pre, self._main_mask)
        if not bool(mask.any()):
            return zero
        acts = SparseActs.from_mask(pre, mask)
        return self._residual_loss(inp, acts, pre, x_in, residual, self.cfg.aux_coef)

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        info = super().calibrate(batches)
        return {**info, "inference": INFERENCE[self.arch]}


@register_arch
class FeatureChoiceSAE(MutualChoiceSAE):
    arch = "feature_choice"
    options = ("fc_capacity", "aux_coef", "zipf_alpha", "zipf_ema", "dead_tokens", "threshold_ema")

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        self.threshold = torch.zeros(cfg.d_sae, dtype=torch.float64, device=self.W_enc.device)  # per latent

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.fc_capacity is not None and (int(cfg.fc_capacity) != cfg.fc_capacity or cfg.fc_capacity < 1):
            raise ValueError(f"fc_capacity (tokens per latent per batch) must be a positive integer or None "
                             f"(k * batch / d_sae), got {cfg.fc_capacity!r}")

    def capacity(self, n_rows: int) -> int:
        """m: tokens per latent per batch; default round(k * n_rows / d_sae) (mean L0 ~ k), in [1, n_rows]."""
        m = self.cfg.fc_capacity or round(float(self.cfg.k) * n_rows / self.cfg.d_sae)
        return int(min(max(1, m), n_rows))

    def _select(self, pre: torch.Tensor, inp: TrainStepInput) -> SparseActs:
        with torch.no_grad():
            m = self.capacity(inp.n_global)
            if inp.dist.world_size > 1:       # per-latent m-th largest over the global batch
                local = pre.topk(min(m, pre.shape[0]), dim=0).values
                allv = inp.dist.all_gather_cat(local.t().flatten()).view(-1, pre.shape[1], local.shape[0])
                tau = allv.permute(1, 0, 2).flatten(1).topk(m, dim=1).values.min(1).values
                mask = (pre >= tau) & (pre > 0)
            else:                             # exactly each latent's top m tokens (positive ones kept)
                top = pre.topk(m, dim=0)
                tau = top.values.min(0).values
                mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(0, top.indices, True) & (pre > 0)
        return self._from_mask(pre, mask, tau.relu())

    @torch.no_grad()
    def _post_select(self, acts: SparseActs, inp: TrainStepInput) -> None:
        tau = self._tau.double()
        r = self.cfg.threshold_ema
        fresh = self.threshold <= 0
        self.threshold.copy_(torch.where(fresh, tau, (1 - r) * self.threshold + r * tau))
        self._update_freq(acts, inp)

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        """Per-latent threshold: mean over batches of each latent's m-th largest ReLU'd pre-activation."""
        taus = []
        for x in batches:
            pre = self.pre_acts(x).relu()
            taus.append(pre.topk(self.capacity(x.shape[0]), dim=0).values.min(0).values.double())
        if taus:
            self.threshold.copy_(torch.stack(taus).mean(0))
        th = self.threshold
        return {"threshold_mean": float(th.mean()), "threshold_min": float(th.min()),
                "threshold_max": float(th.max()), "method": "per latent: mean over batches of its m-th "
                "largest activation", "inference": INFERENCE[self.arch]}
