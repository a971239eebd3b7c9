"""top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by Approximating
Quasi-Orthogonality", arXiv 2503.24277; reference code github.com/SewoongLee/top-afa-sae, training/sae.py
``TopAFASAE``): top-k style activation without a fixed k.

Approximate feature activation (AFA): with a quasi-orthogonal dictionary, z = W_dec^T f gives
||f||_2 ~ ||z||_2 (z = x - b_dec, the dense vector the latents reconstruct). Per token the rule sorts the
ReLU'd pre-activations by their decoder-scaled size (a_i ||W_dec,i||)^2, takes the running norms
sqrt(cumsum) of that sorted list, and keeps the first k of them where k is the position whose running norm
is closest to ||z||_2 (argmin |sqrt(cumsum_j) - ||z||| + 1; the full-width sum is excluded, as the
reference sets it to a huge value). So L0 varies per token with the input norm; no k to tune.

Loss = reconstruction (FVU, as every architecture here) + ``afa_coef`` * L_AFA + AuxK (the reference
trains with AuxK too). L_AFA = (||f||_2 - ||z||_2)^2 per token (the reference's norm-matching ``afa_loss``,
with the target norm fixed, i.e. no gradient through it), summed over tokens and written as
afa_coef * d_in * sum (||f|| - ||z||)^2 / sum ||x - mean x||^2 — the ratio of this term to the
reconstruction term is the reference's (its reconstruction term is a mean over B * d_in elements, its AFA
term a mean over B tokens). Default afa_coef 1/32, the middle of the paper's sweep (1/128 .. 1/16).
Deviations: the reference's target norm in L_AFA is ||x|| (per-token standardised inputs); ours is
||x - b_dec||, the same vector the selection uses (our inputs are not centred per token, and the decoder
adds b_dec itself); we keep b_enc (the reference's top-AFA encoder has none; it starts at 0).

Inference is the same per-token rule (deterministic, no calibration). SAELens has no such activation, so
the folder is our native one: the SAELens layout with ``architecture: "topafa"``, which ``load_sae`` reads
and ``export_sae(..., "saelens")`` refuses with an explanation (see formats.py).
"""

from __future__ import annotations

import torch

from .base import SAE, SparseActs, TrainStepInput
from .topk import TopKSAE
from .registry import register_arch


@torch.no_grad()
def afa_mask(acts: torch.Tensor, dec_norms: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The top-AFA selection [n, d_sae] (bool) for ReLU'd pre-activations ``acts`` [n, d_sae], decoder row
    norms [d_sae] and per-row target norms [n] (||x - b_dec||)."""
    n, d = acts.shape
    scaled = (acts * dec_norms).pow(2)
    srt, order = scaled.sort(dim=-1, descending=True)
    run = srt.cumsum(-1).sqrt()
    if d > 1:
        run[:, -1] = float("inf")
    k = (run - target[:, None]).abs().argmin(-1) + 1
    keep_sorted = torch.arange(d, device=acts.device)[None, :] < k[:, None]
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted) & (acts > 0)


@register_arch
class TopAFASAE(TopKSAE):
    """TopK's training step (sparse backward, AuxK) with the AFA selection in place of a fixed k."""
    arch = "topafa"
    saelens_arch = "topafa"             # native: SAELens has no top-AFA activation
    sparse_codes = False
    uses_k = False
    options = ("afa_coef", "aux_k", "aux_coef", "dead_tokens")

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.afa_coef >= 0:
            raise ValueError(f"afa_coef must be >= 0, got {cfg.afa_coef!r}")

    def _mask(self, x_in: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return afa_mask(pre.relu(), self.W_dec.detach().norm(dim=1), x_in.detach().norm(dim=-1))

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        return SAE.encode_sparse(self, x)      # the non-zeros of encode (TopK's assumes a fixed k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_in = self._x_in(x.reshape(-1, self.cfg.d_in))
        pre = x_in @ self.W_enc + self.b_enc
        f = pre.relu() * self._mask(x_in, pre)
        return f.reshape(*shape[:-1], self.cfg.d_sae)

    def _select(self, pre: torch.Tensor, inp: TrainStepInput) -> SparseActs:
        acts = SparseActs.from_mask(pre, self._mask(self._x_in(inp.x), pre))
        acts.values = torch.empty(0, device=pre.device)
        return acts

    def _extra_losses(self, inp, acts, x, losses) -> torch.Tensor:
        """afa_coef * L_AFA: (||f|| - ||x - b_dec||)^2 per token, scaled like the reconstruction term."""
        vals = acts.values
        f_sq = torch.zeros(x.shape[0], dtype=vals.dtype, device=x.device).index_add(0, acts.rows, vals.pow(2))
        afa = (f_sq.clamp_min(1e-30).sqrt() - self._x_in(x).detach().norm(dim=-1)).pow(2).sum() \
            * self.cfg.d_in / inp.denom
        losses["afa"] = afa
        return self.cfg.afa_coef * afa
