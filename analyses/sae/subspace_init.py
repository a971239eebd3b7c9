"""Active-subspace initialisation of SAE decoders (Wang et al. 2025, "Attention Layers Add Into
Low-Dimensional Residual Subspaces", arXiv 2508.16929).

Attention outputs fill only part of their space (about 60% of the directions carry 99% of the variance).
Decoder rows drawn uniformly on the sphere then point mostly where no data lies; their encoder columns
(the transpose) see little input, lose the TopK competition and die (87% dead latents on 1M-latent
attention-output SAEs in the paper). The remedy: draw the initial directions inside the active subspace
— the top principal directions of the activations — and optionally keep them there while training.

Ours: the basis is the top-m right singular vectors of the centred first training batch (or a basis the
caller gives), m = the smallest number of directions reaching ``fraction`` of the variance (0.99 by
default) unless an integer is given; rows are isotropic Gaussian combinations of the basis, normalised;
the encoder is the decoder transpose, as for the default init. ``keep`` projects the decoder rows back
onto the subspace after every optimiser step (then re-normalises them). The paper's exact choice of the
subspace dimension could not be read here (only its abstract); 0.99 of the variance follows its headline
measure, and ``subspace=`` takes any other dimension or basis.
"""

from __future__ import annotations

from typing import Any

import torch

INITS = ("random", "active-subspace")


@torch.no_grad()
def active_subspace(x: torch.Tensor, subspace: Any = None) -> torch.Tensor:
    """Orthonormal basis [m, d] of the active subspace of rows ``x`` [n, d].

    subspace: None -> 0.99 of the variance; a float in (0, 1] -> that variance fraction; an int ->
    that many directions; a tensor [m, d] -> used as given (orthonormalised)."""
    d = x.shape[1]
    if isinstance(subspace, torch.Tensor):
        B = subspace.to(torch.float64).cpu()
        if B.ndim != 2 or B.shape[1] != d or not 1 <= B.shape[0] <= d:
            raise ValueError(f"subspace basis must be [m, d_in={d}] with 1 <= m <= {d}, got {tuple(B.shape)}")
        Q, _ = torch.linalg.qr(B.T)
        return Q.T.contiguous()
    X = x.to(torch.float64).cpu()
    X = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    var = S ** 2
    if isinstance(subspace, bool) or (subspace is not None and not isinstance(subspace, (int, float))):
        raise ValueError(f"subspace must be None, a variance fraction, a number of directions or a basis "
                         f"tensor, got {subspace!r}")
    if isinstance(subspace, int):
        if not 1 <= subspace <= Vh.shape[0]:
            raise ValueError(f"subspace dimension must be between 1 and {Vh.shape[0]} (rank available from "
                             f"{X.shape[0]} rows), got {subspace}")
        m = subspace
    else:
        frac = 0.99 if subspace is None else float(subspace)
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"subspace variance fraction must be in (0, 1], got {frac}")
        cum = torch.cumsum(var, 0) / var.sum().clamp_min(1e-300)
        m = min(int((cum < frac - 1e-12).sum()) + 1, Vh.shape[0])
    return Vh[:m].contiguous()


@torch.no_grad()
def init_in_subspace(sae, basis: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Decoder rows = normalised Gaussian combinations of the basis rows; encoder = decoder^T."""
    B = basis.to(torch.float32).cpu()
    W = torch.randn(sae.cfg.d_sae, B.shape[0], generator=generator, dtype=torch.float32) @ B
    W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_dec.copy_(W.to(sae.W_dec.dtype))
    sae.W_enc.copy_(W.t().to(sae.W_enc.dtype))


@torch.no_grad()
def keep_in_subspace(W_dec: torch.Tensor, basis: torch.Tensor) -> None:
    """Project decoder rows onto span(basis) in place and re-normalise them."""
    B = basis.to(W_dec.device, W_dec.dtype)
    W_dec.copy_((W_dec @ B.T) @ B)
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def subspace_fraction(W_dec: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """||P_B w|| / ||w|| for every decoder row: 1 = inside the subspace."""
    W = W_dec.detach().to(torch.float64).cpu()
    B = basis.to(torch.float64).cpu()
    return (W @ B.T).norm(dim=1) / W.norm(dim=1).clamp_min(1e-300)
