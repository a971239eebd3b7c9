"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token (after ReLU), AuxK loss for
dead latents, sparse encoder backward and sparse decode (only the k active decoder rows are touched)."""

from __future__ import annotations

import torch

from .base import (SAE, SparseActs, TrainStepInput, TrainStepOutput, _GatherPreActs, preacts, sparse_decode,
                   topk_rows)
from .registry import register_arch


@register_arch
class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"
    sparse_codes = True
    uses_k = True
    options = ("aux_k", "aux_coef", "dead_tokens")

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        pre = self.pre_acts(x.reshape(-1, self.cfg.d_in))
        v, i = topk_rows(pre, self.cfg.k)
        return SparseActs.from_topk(v.relu(), i, self.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        flat = pre.reshape(-1, self.cfg.d_sae)
        v, i = topk_rows(flat, self.cfg.k)
        return torch.zeros_like(flat).scatter_(-1, i, v.relu()).view_as(pre)

    def _select(self, pre: torch.Tensor, inp: TrainStepInput) -> SparseActs:
        _, i = topk_rows(pre, self.cfg.k)
        return SparseActs.from_topk(torch.empty(0, device=pre.device), i, self.cfg.d_sae)

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        x = inp.x.to(self.dtype)
        with torch.no_grad():
            x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
            pre = preacts(inp, self.b_enc, x_in, self.W_enc)    # one pass over [n, d_sae], not two
            acts = self._select(pre, inp)
        vals = _GatherPreActs.apply(pre, x_in, self.W_enc, self.b_enc, self.b_dec, acts.rows, acts.indices,
                                    self.cfg.apply_b_dec_to_input, acts.by_latent()).relu()
        acts.values = vals
        x_hat = sparse_decode(acts, self.W_dec, self.b_dec)
        residual = x - x_hat
        sq = residual.pow(2).sum()
        mse = sq / inp.denom
        losses = {"mse": mse}
        loss = mse + self._extra_losses(inp, acts, x, losses)
        aux = self._aux_loss(inp, pre, x_in, residual)
        losses["aux"] = aux
        loss = loss + aux
        self._post_select(acts, inp)
        with torch.no_grad():
            live = vals.detach() > 0
            counts = torch.zeros(self.cfg.d_sae, device=x.device, dtype=torch.float32).index_add_(
                0, acts.indices, live.float())
        return TrainStepOutput(loss=loss, losses={k: v.detach() for k, v in losses.items()},
                               x_hat=x_hat.detach(), counts=counts, l0_sum=live.sum(), sq_err=sq.detach())

    def _extra_losses(self, inp, acts, x, losses) -> torch.Tensor:
        return x.new_zeros(())

    def _post_select(self, acts: SparseActs, inp: TrainStepInput) -> None:
        pass
