"""Group Bias Adaptation SAE (GBA; Chen et al. 2025, "Taming Polysemanticity in LLMs: Provable Feature
Recovery via Sparse Autoencoders", arXiv 2506.14002, sec. 4 / Algorithm 1).

Sparsity comes from the encoder biases, not from a penalty: the loss is reconstruction only, the biases get
no gradient, and every ``gba_every`` optimiser steps (the buffer) each latent's bias is moved toward its
group's target activation frequency (TAF):

* the paper's tied SAE f(x) = sum_m a_m w_m phi(w_m^T (x - b_pre) + b_m) + b_pre, with the JumpReLU phi of
  its LLM experiments (the output is w_m^T (x - b_pre) when y_m = w_m^T (x - b_pre) + b_m > 0, else 0:
  the bias sets who fires, not how much);
* latents split into ``gba_groups`` (K) groups with TAFs p_1 > ... > p_K spaced geometrically from
  ``gba_high`` to ``gba_low`` (paper: K = 10, p_1 = 0.1, p_10 = 1e-3 in its Qwen runs);
* over the buffer, p_m = fraction of rows with y_m > 0 and r_m = max(0, max y_m); then
  p_m > p_k:  b_m <- max(b_m - gamma r_m, -1)     (fires too often: less sensitive)
  p_m < eps:  b_m <- min(b_m + gamma s_k, 0)     (never fires: s_k = mean of the positive r in its group)
  with gamma_- = gamma_+ = ``gba_gamma`` (0.01).

Where this deviates from the paper (recorded in cfg.json metadata with the options):

* ``k`` is the target mean L0: the TAF ladder keeps the paper's geometric shape but is scaled so that the
  targets sum to k per token (the paper picks p_1, p_K directly; its L0s are in the hundreds).
* the bias floor -1 assumes unit-norm inputs; here it is -(RMS norm of the centred inputs in the buffer),
  the same bound in the trainer's units. eps = 1e-6 (never fired in a buffer of < 1M rows).
* the buffer is min(gba_every, total_steps // 50) steps, so a short run still adapts >= 50 times.
* decoder rows w_m are unit-norm (this codebase's convention) and a_m > 0 is a learned output scale
  (a_m = ||w||^2 reparametrises an unnormalised tied w); a group with no positive peak borrows the mean
  over all groups.

Inference is JumpReLU on SAELens' forward: W_enc = W_dec^T diag(a), b_enc = 0, threshold_m = -a_m b_m, so
it saves (and exports) as a SAELens ``jumprelu`` SAE that ``sae_lens.SAE.load_from_disk`` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SAE, SparseActs, TrainStepInput, TrainStepOutput, _GatherPreActs, sparse_decode
from .registry import register_arch

EPS = 1e-6     # "p_m < eps": the latent did not fire in the buffer
MIN_ADAPTATIONS = 50   # bias updates per run at least (gba_every shrinks for short runs)


def gba_targets(d_sae: int, groups: int, high: float, low: float, k: float | None = None) -> torch.Tensor:
    """Per-latent TAF [d_sae] (float64): contiguous groups, geometric from ``high`` to ``low``; with
    ``k``, scaled so the targets sum to k (capped at 1)."""
    K = max(1, min(int(groups), d_sae))
    ladder = [high * (low / high) ** (i / (K - 1)) if K > 1 else high for i in range(K)]
    sizes = [len(c) for c in torch.tensor_split(torch.arange(d_sae), K)]
    t = torch.cat([torch.full((n,), p, dtype=torch.float64) for n, p in zip(sizes, ladder)])
    if k is not None:
        t = t * (float(k) / float(t.sum()))
    return t.clamp_max(1.0)


def group_index(d_sae: int, groups: int) -> torch.Tensor:
    K = max(1, min(int(groups), d_sae))
    return torch.cat([torch.full((len(c),), g, dtype=torch.long)
                      for g, c in enumerate(torch.tensor_split(torch.arange(d_sae), K))])


@torch.no_grad()
def adapt_biases(bias: torch.Tensor, freq: torch.Tensor, peak: torch.Tensor, targets: torch.Tensor,
                 groups: torch.Tensor, gamma: float, floor: float) -> torch.Tensor:
    """One bias-adaptation step (Chen et al. 2025, Algorithm 1) -> new biases (float64).

    freq: p_m over the buffer; peak: max pre-activation y_m over the buffer (r_m = max(0, peak));
    floor: the lower clamp (the paper's -1)."""
    b = bias.double()
    r = peak.double().clamp_min(0)
    pos = r > 0
    K = int(groups.max()) + 1
    s = torch.zeros(K, dtype=torch.float64, device=b.device).index_add_(0, groups[pos], r[pos])
    n = torch.zeros(K, dtype=torch.float64, device=b.device).index_add_(0, groups[pos], torch.ones_like(r[pos]))
    glob = r[pos].mean() if bool(pos.any()) else r.new_zeros(())
    s_bar = torch.where(n > 0, s / n.clamp_min(1), glob)[groups]
    new = torch.where(freq > targets, torch.maximum(b - gamma * r, b.new_full((), floor)), b)
    return torch.where(freq < EPS, torch.minimum(b + gamma * s_bar, b.new_zeros(())), new)


@register_arch
class GroupBiasAdaptationSAE(SAE):
    arch = "gba"
    saelens_arch = "jumprelu"
    uses_k = True
    options = ("gba_groups", "gba_high", "gba_low", "gba_every", "gba_gamma")

    def __init__(self, cfg, *, init: bool = True):
        super().__init__(cfg, init=init)
        del self.W_enc           # tied: W_enc = W_dec^T diag(a) (the property below)
        d, dev, dt = cfg.d_sae, self.W_dec.device, self.W_dec.dtype
        self.scale = nn.Parameter(torch.ones(d, dtype=dt, device=dev))          # a_m
        self.register_buffer("bias", torch.zeros(d, dtype=dt, device=dev))      # b_m (no gradient)
        # the buffer's statistics (in the state dict: a resumed run continues the same buffer)
        self.register_buffer("buf_fired", torch.zeros(d, dtype=torch.float64, device=dev))
        self.register_buffer("buf_peak", torch.full((d,), float("-inf"), dtype=torch.float64, device=dev))
        self.register_buffer("buf_stats", torch.zeros(3, dtype=torch.float64, device=dev))  # rows, sum|x|^2, steps

    @classmethod
    def check_config(cls, cfg) -> None:
        if not (0 < cfg.gba_low <= cfg.gba_high <= 1):
            raise ValueError(f"need 0 < gba_low <= gba_high <= 1 (target firing frequencies), got "
                             f"gba_low={cfg.gba_low}, gba_high={cfg.gba_high}")
        for name in ("gba_groups", "gba_every"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not cfg.gba_gamma > 0:
            raise ValueError(f"gba_gamma must be > 0 (the paper uses 0.01), got {cfg.gba_gamma}")

    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        return self.W_dec.t() * self.scale

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if "scale" in self._parameters:
            self.scale.fill_(1.0)
            self.bias.zero_()

    def targets(self) -> torch.Tensor:
        c = self.cfg
        return gba_targets(c.d_sae, c.gba_groups, c.gba_high, c.gba_low, c.k).to(self.bias.device)

    def thresholds(self) -> torch.Tensor:
        """JumpReLU threshold on the SAELens pre-activation a_m z_m: fires iff z_m + b_m > 0."""
        return -self.bias * self.scale.detach().clamp_min(0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.thresholds().to(pre.dtype))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.W_dec, self.b_dec, self.scale], "lr_mult": 1.0}]

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        x = inp.x.to(self.dtype)
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        with torch.no_grad():
            z = x_in @ self.W_dec.t()                  # w_m^T (x - b_pre)
            y = z + self.bias                          # the paper's pre-activation
            mask = y > 0
            self._accumulate(y, mask, x_in.detach(), inp)
            acts = SparseActs.from_mask(z * self.scale, mask)
        vals = _GatherPreActs.apply(z * self.scale.detach(), x_in, self.W_enc, self.b_enc.detach(), self.b_dec,
                                    acts.rows, acts.indices, self.cfg.apply_b_dec_to_input, acts.by_latent())
        acts.values = vals
        x_hat = sparse_decode(acts, self.W_dec, self.b_dec)
        sq = (x - x_hat).pow(2).sum()
        mse = sq / inp.denom
        with torch.no_grad():
            counts = mask.float().sum(0)
        return TrainStepOutput(loss=mse, losses={"mse": mse.detach()}, x_hat=x_hat.detach(), counts=counts,
                               l0_sum=mask.sum(), sq_err=sq.detach())

    @torch.no_grad()
    def _accumulate(self, y: torch.Tensor, mask: torch.Tensor, x_in: torch.Tensor, inp: TrainStepInput) -> None:
        dist = inp.dist
        fired = dist.all_reduce_sum(mask.double().sum(0))
        peak = y.max(0).values.double() if y.shape[0] else torch.full_like(self.buf_peak, float("-inf"))
        if dist.world_size > 1:
            peak = dist.all_gather_cat(peak).reshape(dist.world_size, -1).amax(0)
        sq = dist.all_reduce_sum(x_in.double().pow(2).sum().reshape(1))
        self.buf_fired += fired
        torch.maximum(self.buf_peak, peak, out=self.buf_peak)
        self.buf_stats += torch.stack([torch.tensor(float(inp.n_global), dtype=torch.float64,
                                                    device=sq.device), sq[0], sq.new_ones(())])

    def coefficients(self, step: int, total_steps: int) -> dict[str, float]:
        # short runs: at least MIN_ADAPTATIONS bias updates per run (the paper's 50-step buffer assumes
        # runs of many thousand steps; a 100-step run would adapt twice and never reach its targets)
        self._every = max(1, min(int(self.cfg.gba_every), int(total_steps) // MIN_ADAPTATIONS))
        return {}

    def after_step(self, out: TrainStepOutput) -> None:
        if int(self.buf_stats[2]) >= getattr(self, "_every", int(self.cfg.gba_every)):
            self.adapt()

    @torch.no_grad()
    def adapt(self) -> dict[str, torch.Tensor]:
        """Apply the bias update to the buffered statistics and start a new buffer; returns them."""
        rows = float(self.buf_stats[0])
        if rows <= 0:
            return {}
        freq = self.buf_fired / rows
        floor = -float((self.buf_stats[1] / rows).sqrt())
        new = adapt_biases(self.bias, freq, self.buf_peak, self.targets(),
                           group_index(self.cfg.d_sae, self.cfg.gba_groups).to(self.bias.device),
                           float(self.cfg.gba_gamma), floor)
        self.bias.copy_(new.to(self.bias.dtype))
        stats = {"freq": freq.clone(), "peak": self.buf_peak.clone(), "floor": torch.tensor(floor)}
        self.buf_fired.zero_()
        self.buf_peak.fill_(float("-inf"))
        self.buf_stats.zero_()
        return stats

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        super().normalize_decoder()
        self.scale.clamp_min_(0)        # a_m >= 0 keeps the JumpReLU form (called after every step)

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        super().fold_scale(s)
        self.bias.div_(s)

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Back from the jumprelu form: a_m = <W_enc[:, m], W_dec[m]> (unit rows), b_m = -theta_m / a_m."""
        W_dec = tensors["W_dec"].to(self.dtype)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(tensors["b_dec"].to(self.dtype))
        self.b_enc.copy_(tensors["b_enc"].to(self.dtype))     # 0 when trained here
        a = (tensors["W_enc"].to(self.dtype) * W_dec.t()).sum(0)
        self.scale.copy_(a)
        theta = tensors["threshold"].to(self.dtype)
        self.bias.copy_(torch.where(a > 0, -theta / a.clamp_min(1e-30), torch.zeros_like(a)))
