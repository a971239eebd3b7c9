"""Shared machinery of every SAE architecture: config, typed train-step input/output, the base module
(encode / decode / forward / save / load), sparse encode-gather and sparse decode.

Conventions (Gao et al. 2024, SAELens, EleutherAI sparsify):

* parameters ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in];
  encode ``f = act((x - b_dec) W_enc + b_enc)`` (``b_dec`` subtracted only when
  ``apply_b_dec_to_input``), decode ``x_hat = f W_dec + b_dec`` — exactly SAELens' forward, so a saved
  folder gives the same numbers in ``sae_lens.SAE.load_from_disk``.
* decoder rows unit-norm, re-normalised after every optimiser step, with the gradient component parallel
  to each row removed before the step; encoder initialised as the decoder transpose.
* training losses are written as *contributions to the loss of the global batch* (sums over the local rows
  divided by global normalisers carried in :class:`TrainStepInput`), so data-parallel ranks simply sum
  their gradients and get the single-process gradient.
* reconstruction loss = FVU of the batch: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sparsify style;
  scale-free, so the default coefficients do not depend on the activation scale).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._util import DTYPES  # the one dtype map (formats.py reads it from here)
from .registry import ARCHS, get_arch

# AuxK takes its dense path (GEMMs over the dead latents' columns) while n_dead <= AUX_DENSE_RATIO * k_aux:
# the GEMMs win up to 10-20x k_aux dead latents on CPU (benchmarks/bench_sae_aux.py, batch 4096, k_aux 288:
# d_sae 16,384: dense 712 ms vs sparse 1,084 at 3,000 dead, 826 vs 854 at 6,000; 9,216: 489 vs 804, 979 vs 811).
AUX_DENSE_RATIO = 16


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- config

@dataclass
class SAEConfig:
    """Everything that defines an SAE. Architecture-specific training options live here too (they are
    ignored by the architectures that do not use them) and are kept in cfg.json ``metadata`` on save."""

    arch: str
    d_in: int
    d_sae: int
    k: int | None = None                  # topk / batchtopk / matryoshka: active latents per token
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    # --- TopK family: AuxK loss for dead latents
    aux_k: int | None = None              # default d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None        # latent is dead after this many tokens without firing
    # --- BatchTopK / Matryoshka: EMA rate of the global inference threshold
    threshold_ema: float = 0.01
    matryoshka_widths: list[int] | None = None
    # --- ReLU + L1
    l1_coef: float = 3e-2
    l1_warmup_frac: float = 0.05
    # --- JumpReLU
    l0_coef: float = 1e-2
    bandwidth: float = 0.05
    init_threshold: float = 0.1
    l0_warmup_frac: float = 0.0
    threshold_lr_mult: float = 20.0
    # --- Feature / Mutual Choice (Ayonrinde 2024; feature_choice.py)
    fc_capacity: int | None = None        # feature_choice: tokens per latent per batch (default k * B / d_sae)
    zipf_alpha: float = 1.0               # aux_zipf_loss: exponent of the Zipf target frequencies
    zipf_ema: float = 0.01                # aux_zipf_loss: EMA rate of the tracked firing frequencies
    # --- top-AFA (Lee et al. 2025; topafa.py)
    afa_coef: float = 1 / 32              # weight of the AFA norm-matching loss
    # --- Matching pursuit (Costa et al. 2025; mp.py): k = max iterations, SAELens' stop rules
    mp_residual_threshold: float = 0.0    # stop a row when ||residual|| < this (0: off)
    mp_stop_on_duplicate: bool = True     # stop a row when its support did not change
    # --- Group Bias Adaptation (Chen et al. 2025; gba.py): k = target mean L0
    gba_groups: int = 10                  # latent groups, geometric target frequencies
    gba_high: float = 0.1                 # target firing frequency of the first group (before scaling to k)
    gba_low: float = 1e-3                 # ... of the last group
    gba_every: int = 50                   # optimiser steps between bias adaptations (the buffer)
    gba_gamma: float = 0.01               # bias step (gamma_+ = gamma_-)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def training_options(self) -> dict[str, Any]:
        """The architecture-specific options worth recording (the class's ``options``)."""
        from .registry import get_arch
        return {k: getattr(self, k) for k in get_arch(self.arch).options}


# ----------------------------------------------------------------------------------- collectives

class Collective:
    """What a train step needs from data parallelism; the default is the single-process identity.
    :mod:`analyses.sae.train` passes a torch.distributed-backed one when running under torchrun."""

    world_size: int = 1
    rank: int = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


SINGLE = Collective()


class DistCollective(Collective):
    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        # sizes may differ between ranks: pad to the largest
        n = torch.tensor([t.numel()], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        buf = torch.full((m,), float("-inf"), dtype=t.dtype, device=t.device)
        buf[: t.numel()] = t.flatten()
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.dist.all_gather(out, buf)
        return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


# ------------------------------------------------------------------------------ train step types

@dataclass
class TrainStepInput:
    """One step's input (SAELens style). ``x`` is this rank's slice of the global batch, already
    normalised; ``denom`` = sum over the *global* batch of ||x - mean(x)||^2; ``n_global`` = rows in the
    global batch; ``dead_mask`` [d_sae] bool or None; ``coefficients`` (e.g. l1, l0) after warm-up."""

    x: torch.Tensor
    denom: torch.Tensor
    n_global: int
    dead_mask: torch.Tensor | None = None
    coefficients: dict[str, float] = field(default_factory=dict)
    step: int = 0
    dist: Collective = SINGLE
    workspace: dict | None = None    # the trainer's reusable buffers (see preacts)


@dataclass
class TrainStepOutput:
    """``loss`` (this rank's contribution to the global loss, backward() on it), ``losses`` (named parts,
    detached), ``x_hat`` (detached), ``counts`` [d_sae] firing counts on the local rows, ``l0_sum`` (local
    total of active latents), ``sq_err`` (local sum ||x - x_hat||^2)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    counts: torch.Tensor
    l0_sum: torch.Tensor
    sq_err: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SparseActs:
    """Sparse latent codes of a batch: bag ``b`` holds ``values[offsets[b]:offsets[b+1]]`` at latent
    indices ``indices[...]`` (the layout of ``torch.nn.functional.embedding_bag``). ``rows`` repeats the
    bag index for every entry."""

    values: torch.Tensor
    indices: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    n_rows: int
    d_sae: int

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets): the entries sorted by latent (stable) and where each latent's run starts. Under
        this layout both weight gradients are ``embedding_bag`` forwards (see ``_latent_sum``); computed once
        per selection and shared by the encoder's and the decoder's backward."""
        if getattr(self, "_by_latent", None) is None:
            self._by_latent = _latent_order(self.indices, self.d_sae)
        return self._by_latent

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.n_rows, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        out[self.rows, self.indices] = self.values
        return out

    @staticmethod
    def from_topk(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> "SparseActs":
        b, k = indices.shape
        dev = indices.device
        return SparseActs(values.reshape(-1), indices.reshape(-1),
                          torch.arange(b, device=dev).repeat_interleave(k),
                          torch.arange(b, device=dev) * k, b, d_sae)

    @staticmethod
    def from_mask(pre: torch.Tensor, mask: torch.Tensor) -> "SparseActs":
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=pre.shape[0])
        offsets = torch.zeros_like(counts)
        offsets[1:] = counts.cumsum(0)[:-1]
        return SparseActs(pre[rows, cols], cols, rows, offsets, pre.shape[0], pre.shape[1])


# ------------------------------------------------------------------------- sparse autograd pieces

def _latent_order(cols: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) of entries at latents ``cols``: stable sort by latent, and where each latent's run starts."""
    c, order = cols.sort(stable=True)
    offsets = torch.zeros(d_sae, dtype=torch.long, device=c.device)
    offsets[1:] = torch.bincount(c, minlength=d_sae)[:-1].cumsum(0)
    return order, offsets


def _latent_sum(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
    """[d_sae, d] with row c = sum over the entries e of latent c of weights[e] * src[rows[e]]: a weight
    gradient of the sparse encoder / decoder, as one ``embedding_bag`` forward over the entries sorted by
    latent (bag c = latent c). Exact (fp32 sums) and about 3x faster on CPU than a sparse COO matmul or
    embedding_bag's own backward, and it writes each output row once (no zero-filled [d_sae, d] first)."""
    return F.embedding_bag(rows[order], src, offsets, mode="sum", per_sample_weights=weights[order].to(src.dtype))


class _GatherPreActs(torch.autograd.Function):
    """values = pre[rows, cols] where pre = (x - b_dec) W_enc + b_enc was computed without autograd.
    Backward touches only the selected entries: grad W_enc^T row c = sum of g_e x_in[row_e] over latent c's
    entries — O(nnz d_in) instead of the dense O(n d_in d_sae) (sparsify's fused-encoder idea).
    ``by_latent`` (optional): ``SparseActs.by_latent()`` of these entries, shared with the decoder's backward
    (tensors, not the SparseActs: its values lead back to this node, a reference cycle)."""

    @staticmethod
    def forward(ctx, pre, x_in, W_enc, b_enc, b_dec, rows, cols, use_b_dec, by_latent=None):
        ctx.save_for_backward(x_in, W_enc, rows, cols)
        ctx.use_b_dec, ctx.by_latent = use_b_dec, by_latent
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc, rows, cols = ctx.saved_tensors
        g = g.to(W_enc.dtype)
        d_sae = W_enc.shape[1]
        grad_W = grad_b = grad_bdec = None
        if ctx.needs_input_grad[2]:
            order = ctx.by_latent or _latent_order(cols, d_sae)
            grad_W = _latent_sum(x_in.to(W_enc.dtype), rows, g, *order).t()
        gb = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[3]:
            grad_b = gb
        if ctx.needs_input_grad[4] and ctx.use_b_dec:
            grad_bdec = -(W_enc @ gb)
        return None, None, grad_W, grad_b, grad_bdec, None, None, None, None


class _DecoderGrad(torch.autograd.Function):
    """The identity on x_hat (decoded with W_dec detached, so autograd gives only the values' gradient),
    adding W_dec's gradient through ``_latent_sum``: row c = sum of v_e g[row_e] over latent c's entries."""

    @staticmethod
    def forward(ctx, out, W_dec, rows, by_latent, values):
        ctx.rows, ctx.by_latent, ctx.values = rows, by_latent, values
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, _latent_sum(g.to(ctx.values.dtype), ctx.rows, ctx.values, *ctx.by_latent), None, None, None


TOPK_GROUP = 16     # topk_rows: columns per group on CPU (bench_sae_aux.py, k 32: 1.3x / 1.3x / 1.7x torch.topk
                    # at d_sae 4,608 / 9,216 / 16,384)


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest (values, column indices), unsorted — torch.topk's answer, faster on CPU: split
    the columns into groups (group g = columns g, g + G, g + 2G, ...), take the k groups with the largest
    maxima, and select among their k x TOPK_GROUP entries. Exact: an entry in a row's top k lies in a group
    whose maximum is at least that entry, and fewer than k groups can have a larger maximum (each holds a
    larger entry). Only ties may be broken differently. CUDA's radix select is left alone."""
    n, d = pre.shape
    g = TOPK_GROUP
    if pre.device.type != "cpu" or d % g or d // g < 4 * k or n == 0:
        return pre.topk(k, dim=-1, sorted=False)
    G = d // g
    _, gi = pre.view(n, g, G).amax(1).topk(k, dim=-1, sorted=False)
    cand = (gi.unsqueeze(-1) + G * torch.arange(g, device=pre.device)).view(n, k * g)
    v, j = pre.gather(1, cand).topk(k, dim=-1, sorted=False)
    return v, cand.gather(1, j)


def preacts(inp: TrainStepInput, b_enc: torch.Tensor, x_in: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """x_in W_enc + b_enc without autograd. On CPU into the trainer's buffer, reused every step: a fresh
    [n, d_sae] tensor is freshly mmapped pages each step, and the kernel zeroing them cost 25% of this GEMM
    (d_sae 16,384, batch 4096: 370 ms vs 279 ms). The result is overwritten by the next step (and by the
    next SAE of a one-pass grid): callers must not keep it past their step."""
    ws = inp.workspace
    if ws is None or x_in.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.is_grad_enabled():
        return torch.addmm(b_enc, x_in, W_enc)
    key = ("pre", x_in.shape[0], W_enc.shape[1], W_enc.dtype)
    buf = ws.get(key)
    if buf is None:
        buf = ws[key] = torch.empty(x_in.shape[0], W_enc.shape[1], dtype=W_enc.dtype)
    return torch.addmm(b_enc, x_in, W_enc, out=buf)


class _SubPreActs(torch.autograd.Function):
    """The identity on ``sub`` = pre[:, cols] (computed without autograd), with pre's gradient: dense in the
    selected columns — grad W_enc[:, cols] = x_in^T g, one GEMM — and zero elsewhere (AuxK's dense path)."""

    @staticmethod
    def forward(ctx, sub, x_in, W_enc, b_enc, b_dec, cols, use_b_dec):
        ctx.save_for_backward(x_in, W_enc, cols)
        ctx.use_b_dec = use_b_dec
        return sub.view_as(sub)

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc, cols = ctx.saved_tensors
        g = g.to(W_enc.dtype)
        grad_W = grad_b = grad_bdec = None
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_enc).index_copy_(1, cols, x_in.to(W_enc.dtype).t() @ g)
        gb = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_copy_(0, cols, gb)
        if ctx.needs_input_grad[4] and ctx.use_b_dec:
            grad_bdec = -(W_enc.index_select(1, cols) @ gb)
        return None, None, grad_W, grad_b, grad_bdec, None, None


def sparse_decode(acts: SparseActs, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = sum of the active decoder rows weighted by their activations (+ b_dec), without the
    dense [n, d_sae] @ [d_sae, d_in] matmul. ``values`` overrides ``acts.values`` (masked prefixes)."""
    v = acts.values if values is None else values
    grad_W = W_dec.requires_grad and torch.is_grad_enabled()
    out = F.embedding_bag(acts.indices, W_dec.detach() if grad_W else W_dec, acts.offsets, mode="sum",
                          per_sample_weights=v.to(W_dec.dtype))
    if grad_W:      # W_dec's gradient by _latent_sum, not embedding_bag's backward (zero-fill + scatter)
        out = _DecoderGrad.apply(out, W_dec, acts.rows, acts.by_latent(), v.detach().to(W_dec.dtype))
    return out if b_dec is None else out + b_dec


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = z H(z - theta). d f/d z = H(z - theta); d f/d theta = -(theta/eps) K((z - theta)/eps) with the
    rectangle kernel K (Rajamanoharan et al. 2024), summed over the batch."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(g.dtype) * g
        grad_theta = (-(theta / eps) * _rectangle((z - theta) / eps) * g).sum(0)
        return grad_z, grad_theta.to(theta.dtype), None


class StepFn(torch.autograd.Function):
    """H(z - theta) with d/d theta = -(1/eps) K((z - theta)/eps); no gradient to z."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((z - theta) / eps) * g).sum(0)
        return None, grad_theta.to(theta.dtype), None


# --------------------------------------------------------------------------------------- the SAE

class SAE(nn.Module):
    """Base class. Subclasses set ``arch`` / ``saelens_arch`` and implement ``encode`` and
    ``training_forward``. Inference is always the deterministic per-token rule (BatchTopK / Matryoshka
    use their learned global threshold), so a module behaves the same in train() and eval()."""

    arch: ClassVar[str] = "base"
    saelens_arch: ClassVar[str] = "standard"
    sparse_codes: ClassVar[bool] = False   # encode_sparse gives a fixed-k code (TopK)
    uses_k: ClassVar[bool] = False         # needs k (active latents per token)
    needs_calibration: ClassVar[bool] = False   # the trainer calls calibrate(batches) after training
    options: ClassVar[tuple[str, ...]] = ()   # SAEConfig fields that matter for this arch

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        dt = DTYPES.get(cfg.dtype, torch.float32)
        dev = torch.device(cfg.device) if cfg.device != "meta" else torch.device("cpu")
        # W_enc [d_in, d_sae] is stored column-major (the transpose of a contiguous [d_sae, d_in]): the sparse
        # encoder gradient comes out [d_sae, d_in] (_latent_sum), so it is the parameter's layout and is
        # taken without the transposing copy (8 ms of a 75 ms step at 4,608 latents on CPU); the encoder GEMM
        # is as fast and bit-identical either way, and dense autograd follows the parameter's layout.
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt, device=dev).t())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=dev))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt, device=dev))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt, device=dev))
        self.sparsity: torch.Tensor | None = None   # log10 firing rates, set after training
        if init:
            self.reset_parameters()

    # ----- init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        W = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ----- inference
    def _x_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self._x_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        """Sparse codes of a 2-D batch (the non-zeros of ``encode`` for dense architectures)."""
        f = self.encode(x.reshape(-1, self.cfg.d_in))
        return SparseActs.from_mask(f, f != 0)

    def decode_sparse(self, acts: SparseActs) -> torch.Tensor:
        return sparse_decode(acts, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse_codes:
            shape = x.shape
            return self.decode_sparse(self.encode_sparse(x.reshape(-1, shape[-1]))).reshape(shape)
        return self.decode(self.encode(x))

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Architecture-specific checks of ``cfg`` (raise ValueError saying what would be right)."""

    # ----- training hooks
    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:  # pragma: no cover
        raise NotImplementedError

    def coefficients(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.W_enc, self.b_enc, self.W_dec, self.b_dec], "lr_mult": 1.0}]

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) decoder row."""
        g = self.W_dec.grad
        if g is None:
            return
        W = self.W_dec
        g.addcmul_(torch.linalg.vecdot(g, W).unsqueeze(1), W, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        """Set inference-only parameters from (normalised) data after training (BatchTopK threshold);
        returns what to record in the metadata."""
        return {}

    def after_step(self, out: TrainStepOutput) -> None:
        """Called after each optimiser step (BatchTopK: threshold EMA lives in training_forward)."""

    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        """The SAE was trained on x * s; make it act on raw x. Pre-activations, codes and thresholds
        are divided by s (decoder rows stay unit-norm): b_dec /= s, b_enc /= s, thresholds /= s."""
        self.b_dec.div_(s)
        self.b_enc.div_(s)

    # ----- common loss pieces
    def _aux_loss(self, inp: TrainStepInput, pre: torch.Tensor, x_in: torch.Tensor,
                  residual: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al.): the top ``aux_k`` dead latents reconstruct the residual x - x_hat;
        normalised by the residual's variance over the global batch; scaled by min(n_dead/k_aux, 1)."""
        zero = residual.new_zeros(())
        if inp.dead_mask is None:
            return zero
        dead_idx = inp.dead_mask.nonzero().flatten()
        n_dead = int(dead_idx.numel())
        if n_dead == 0:
            return zero
        k_aux = self.cfg.aux_k or max(1, self.cfg.d_in // 2)
        coef = self.cfg.aux_coef * min(n_dead / k_aux, 1.0)
        kk = min(k_aux, n_dead)
        with torch.no_grad():
            sub = pre.index_select(1, dead_idx)
            _, ai = sub.topk(kk, dim=1, sorted=False)
        if n_dead <= AUX_DENSE_RATIO * kk:
            return self._aux_loss_dense(inp, sub, ai, dead_idx, x_in, residual, coef)
        acts = SparseActs.from_topk(torch.empty(0), dead_idx[ai], self.cfg.d_sae)
        return self._residual_loss(inp, acts, pre, x_in, residual, coef)

    def _aux_loss_dense(self, inp: TrainStepInput, sub: torch.Tensor, ai: torch.Tensor, dead_idx: torch.Tensor,
                        x_in: torch.Tensor, residual: torch.Tensor, coef: float) -> torch.Tensor:
        """The same AuxK loss on the dead latents' dense block: four GEMMs of [n, n_dead] x [n_dead, d_in]
        instead of gathers over n * k_aux (aux_k defaults to d_in / 2, 9x the main path's entries), which
        run ~10x slower per entry (see AUX_DENSE_RATIO)."""
        keep = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, ai, True)
        vals = _SubPreActs.apply(sub, x_in, self.W_enc, self.b_enc, self.b_dec, dead_idx,
                                 self.cfg.apply_b_dec_to_input)
        a = vals.masked_fill(~keep, 0.0).relu()
        e_hat = a.to(self.W_dec.dtype) @ self.W_dec.index_select(0, dead_idx)
        return self._residual_mse(inp, e_hat, residual, coef)

    def _residual_loss(self, inp: TrainStepInput, acts: SparseActs, pre: torch.Tensor, x_in: torch.Tensor,
                       residual: torch.Tensor, coef: float) -> torch.Tensor:
        """coef * ||e_hat - e||^2 / (variance of e over the global batch): the latents ``acts`` selects
        (values: their ReLU'd pre-activations) reconstruct the detached residual e = x - x_hat (AuxK's form;
        aux_zipf_loss reuses it with another selection)."""
        vals = _GatherPreActs.apply(pre, x_in, self.W_enc, self.b_enc, self.b_dec, acts.rows, acts.indices,
                                    self.cfg.apply_b_dec_to_input, acts.by_latent()).relu()
        e_hat = sparse_decode(acts, self.W_dec, None, values=vals)
        return self._residual_mse(inp, e_hat, residual, coef)

    @staticmethod
    def _residual_mse(inp: TrainStepInput, e_hat: torch.Tensor, residual: torch.Tensor, coef: float) -> torch.Tensor:
        e = residual.detach().to(e_hat.dtype)
        stats = inp.dist.all_reduce_sum(torch.cat([e.sum(0), e.pow(2).sum().reshape(1)]).double())
        res_var = (stats[-1] - stats[:-1].pow(2).sum() / inp.n_global).clamp_min(1e-12)
        return coef * (e_hat - e).pow(2).sum() / res_var.to(e.dtype)

    # ----- persistence
    def save(self, path: str | Path, *, sparsity: torch.Tensor | None = None) -> Path:
        """SAELens 6.x folder (cfg.json + sae_weights.safetensors [+ sparsity.safetensors])."""
        from .formats import save_saelens
        return save_saelens(self, path, sparsity=sparsity)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> "SAE":
        """Load any SAELens-format (or sparsify) folder as the matching workbench class."""
        from .formats import load_sae
        sae = load_sae(path, device=device, dtype=dtype)
        if cls is not SAE and not isinstance(sae, cls):
            raise ValueError(f"{path} holds a {sae.arch!r} SAE, not {cls.arch!r}")
        return sae

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, k={self.cfg.k}"


# ----------------------------------------------------------------------------------- validation

KNOWN_ARCHS = ARCHS.keys()   # live view of the registry (kept for importers of the old name)


def validate_config(cfg: SAEConfig) -> None:
    cls = get_arch(cfg.arch)
    for name in ("d_in", "d_sae"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cls.uses_k:
        if cfg.k is None:
            raise ValueError(f"arch {cfg.arch!r} needs k (active latents per token), e.g. k=32")
        if int(cfg.k) != cfg.k or cfg.k < 1:
            raise ValueError(f"k must be a positive integer, got {cfg.k!r}")
        if cfg.k > cfg.d_sae:
            raise ValueError(f"k={cfg.k} is larger than d_sae={cfg.d_sae}; choose k <= d_sae")
    cls.check_config(cfg)


def check_d_in(sae: SAE, x: torch.Tensor, what: str = "activations") -> None:
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"{what} have shape {tuple(x.shape)} (d={x.shape[-1]}) but the SAE expects "
                         f"d_in={sae.cfg.d_in} (W_enc {tuple(sae.W_enc.shape)})")
