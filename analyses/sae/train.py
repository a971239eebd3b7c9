"""SAE trainer: Adam (betas ADAM_BETAS = (0, 0.999)) with warm-up/decay, input normalisation folded into the
weights on return, decoder rows kept unit-norm, AuxK dead-latent tracking, tqdm progress, atomic checkpoints
with exact resume, NaN / explosion guard, bf16 autocast on GPU (on CPU when asked), and data parallelism across
processes (torchrun / torch.distributed).

``source`` may be

* a tensor / numpy array [n, d]: shuffled every epoch with a generator seeded by (seed, epoch);
* a callable ``source(epoch: int) -> Iterable[Tensor[b, d]]`` returning a *fresh* iterable for that epoch,
  e.g. ``lambda epoch: store.batches(hook, 4096, shuffle=True, seed=epoch)`` — it must give the same rows
  in the same order for the same epoch (that is what makes resume exact); batches of any size are
  re-chunked into global batches of exactly ``batch_size`` rows (an epoch's tail rolls into the next);
* a zero-argument callable ``source() -> Iterable`` (called once per epoch), or a list of batches.

``n_tokens`` defaults to one pass over the data (for a callable, epoch 0 is counted first).

What the returned SAE carries besides its weights:

* ``sae.sparsity`` [d_sae]: log10(firing rate + 1e-10) over the last ``density_tokens`` training tokens
  (the last DENSITY_FRAC of the run, or the lr-decay phase if longer), and in ``cfg.metadata["workbench"]``:
  ``density_tokens`` (tokens that density was counted on), ``dead_fraction`` (latents that never fired
  in those tokens), ``aux_dead_fraction`` / ``aux_dead_tokens`` (AuxK's notion: no firing for
  ``dead_tokens`` tokens), ``fvu`` / ``l0`` (last logged batch), ``lr``, ``steps``, ...
* BatchTopK / Matryoshka: the inference threshold is calibrated after training as the BatchTopK paper
  does (Bussmann et al. 2024, sec. 3: theta = E_X[min of the kept activations of batch X]): with the final
  weights, the (k * B)-th largest activation of each of several batches of B rows, averaged — held-out
  rows (``calibration=``) when given, else the last training batches (up to ``calibration_tokens``).
  The training-time running average (SAELens' ``topk_threshold``) lags the weights on short runs and makes
  the exported SAE fire far less than k. Recorded as ``threshold_calibration`` {data, tokens, batches,
  threshold} in the metadata.

Guards: ``lr`` must be finite and > 0. A batch whose loss is NaN/inf, or whose FVU exceeds EXPLODE_FVU
after warm-up or EXPLODE_FACTOR x the median of the last FVU_WINDOW batch FVUs at any time, stops the run
with :class:`SAETrainingError` before its update is applied; the last checkpoint written stays.

Data parallel: under ``torchrun --nproc_per_node N`` (or with a process group already initialised) every
rank reads the same global batch and trains on its contiguous slice; each rank's loss is its share of the
global-batch loss (global normalisers), gradients are summed with one all-reduce, BatchTopK's threshold is
taken over the global batch, and firing counts are summed — so N processes give the 1-process result up to
float rounding. Rank 0 writes checkpoints and shows progress.

Checkpoints (``checkpoint_dir/checkpoint.pt``, written to a temp file and renamed) hold the weights,
Adam state, step, data position (epoch, rows consumed), input scale, dead-latent counters, RNG states and
a fingerprint of the settings; calling ``train_sae`` again with the same arguments and directory resumes
and finishes with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._util import atomic_write, check_finite_rows, resolve_device
from ._source import SAETrainingError, _as_batch, _Source, _Stream
from .base import SINGLE, Collective, DistCollective, SAE, SAEConfig, TrainStepInput, validate_config
from .registry import get_arch

log = logging.getLogger(__name__)

__all__ = ["train_sae", "make_sae", "default_lr", "default_batch_size", "default_dead_tokens", "geometric_median",
           "SAETrainingError", "RunSettings"]

CHECKPOINT_FILE = "checkpoint.pt"
LR_REF, LR_REF_LATENTS, LR_CAP = 2e-4, 2 ** 14, 2e-2   # see default_lr
LR_PER_DIN = 1.28          # small-SAE lr is at most LR_PER_DIN / d_in (2e-2 at d_in 64; see default_lr)
MAX_BATCH, MIN_BATCH, TARGET_STEPS = 4096, 256, 1000   # see default_batch_size
EXPLODE_FVU = 100.0        # batch FVU above this after warm-up: diverged (see _Trainer._guard)
EXPLODE_FACTOR = 1e3       # ... or above this multiple of the recent median batch FVU
FVU_WINDOW = 50            # batch FVUs kept for that median
DENSITY_FRAC = 0.2         # firing counts (sae.sparsity) cover at least the last 20% of the run
CALIBRATION_TOKENS = 2 ** 16   # rows for the BatchTopK inference threshold
ADAM_BETAS = (0.0, 0.999)  # see _Trainer.start
FUSED_ADAM_DEVICES = ("cpu", "cuda")
DEAD_FRAC, DEAD_FIRINGS, DEAD_MAX = 0.02, 50, 10_000_000   # see default_dead_tokens


# ------------------------------------------------------------------------------------- helpers

@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 30, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld iterations, started from the mean."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < 1e-7 * (m.norm() + 1e-12):
            m = new
            break
        m = new
    return m


def default_lr(d_sae: int, d_in: int | None = None) -> float:
    """Adam lr for ``d_sae`` latents (on ``d_in``-dim inputs, normalised to E||x||^2 = d_in). From 2^14
    latents up: 2e-4 / sqrt(d_sae / 2^14), the sparsify / OpenAI rule (Gao et al. 2024, fitted on 16k+
    latents). Below 2^14 that rule is far too small for the short runs small SAEs get, so there it steepens
    to 2e-4 * (2^14 / d_sae)^1.5, capped at 2e-2 (both pieces give 2e-4 at 2^14), and, given d_in, is at
    most LR_PER_DIN / d_in: measured with benchmarks/bench_sae_recovery.py (synthetic superposition,
    d_sae = 2-4 d_in, ~1000 steps of 500 rows) the best lr falls with d_in: ~2e-2 at d_in 64, 5e-3-1e-2 at
    128, ~5e-3 at 256 (2e-2 there: MMCS 0.85-0.93 instead of 0.94-0.98). The d_in cap never binds from 2^14
    latents up unless d_in > 6400."""
    r = LR_REF_LATENTS / max(1, int(d_sae))
    lr = LR_REF * math.sqrt(r) if r <= 1 else min(LR_CAP, LR_REF * r ** 1.5)
    return min(lr, LR_PER_DIN / d_in) if d_in else lr


def default_batch_size(n_tokens: int) -> int:
    """Rows per optimiser step when the caller gives none: MAX_BATCH (4096, SAELens' default
    train_batch_size_tokens) once the run has >= TARGET_STEPS * 4096 tokens; for shorter runs, enough
    steps: n_tokens // TARGET_STEPS, at least MIN_BATCH. Measured (benchmarks/bench_sae_recovery.py): 500k
    tokens at 4096 rows is 122 steps and leaves synthetic features half-learnt (MMCS 0.57 at d 64, 16
    active); 1000 steps of 500 rows recover them (0.96)."""
    return int(min(MAX_BATCH, max(MIN_BATCH, int(n_tokens) // TARGET_STEPS)))


def default_dead_tokens(total_steps: int, batch_size: int, d_sae: int | None = None, k: int | None = None) -> int:
    """Tokens without firing after which AuxK treats a latent as dead: DEAD_FRAC (2%) of the run, but at
    least DEAD_FIRINGS (50) x d_sae / k tokens (50 firings of a latent at the average rate k / d_sae) and 4
    batches, at most 10M (Gao et al. 2024 / sparsify's fixed 10M). Measured (benchmarks/bench_sae_recovery.py,
    500k-token runs): 10% of the run (the old rule, 50k tokens) leaves latents that lost their feature to a
    twin firing rarely but never "dead", and their features unlearnt (d 256, 1024 true features, 16 active:
    MMCS 0.944); 2% (10k) hands them to AuxK (0.962; 0.97 with ADAM_BETAS). The firing floor is for wide
    SAEs on short runs: 16k latents, k 32, 110k tokens of smollm2 layer 6 at 2% (2.2k tokens, ~4 average
    firings) called most latents dead, AuxK shrank them, and 64% never fired on held-out rows (13% at 10%);
    with the floor (25.6k tokens) held-out FVU 0.1896 and 12.7% silent vs 0.1898 and 13.1% before."""
    floor = DEAD_FIRINGS * int(d_sae) / int(k) if d_sae and k else 0
    return int(min(DEAD_MAX, max(int(total_steps) * int(batch_size) * DEAD_FRAC, floor, 4 * int(batch_size))))


def _setup_dist(device: torch.device) -> tuple[Collective, bool]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return SINGLE, False
    if not dist.is_available():
        return SINGLE, False
    if dist.is_initialized():
        return (DistCollective(), False) if dist.get_world_size() > 1 else (SINGLE, False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return DistCollective(), True
    return SINGLE, False


def setup_dist(device: str | torch.device = "auto") -> tuple[Collective, bool, torch.device]:
    """(collective, whether this call created the process group, device): ``_setup_dist`` plus, on CUDA
    with several ranks, this rank's GPU (LOCAL_RANK) made current. Called by ``train_sae``, ``train_saes``
    and ``train-sae``'s grid / from-the-model step (which must hold the group before the model stream's
    first split forward); the caller that created the group destroys it (``dist.destroy_process_group``)."""
    dev = resolve_device(device)
    coll, own = _setup_dist(dev)
    if coll.world_size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", coll.rank % torch.cuda.device_count())))
        torch.cuda.set_device(dev)
    return coll, own, dev


def current_collective() -> Collective:
    """The collective of the process group initialised now (SINGLE without one, or with one rank)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return SINGLE
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistCollective()
    return SINGLE


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def make_sae(arch: str, d_in: int, d_sae: int, k: int | None = None, **cfg: Any) -> SAE:
    """A freshly initialised SAE of a registered architecture (``analyses.sae.ARCHS``)."""
    cls = get_arch(arch)
    valid = set(SAEConfig.__dataclass_fields__) - {"arch", "d_in", "d_sae", "k"}
    bad = sorted(set(cfg) - valid)
    if bad:
        raise TypeError(f"unknown SAE option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    c = SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, **cfg)
    validate_config(c)
    return cls(c)


# ------------------------------------------------------------------------------------- trainer

def init_seed(seed: int) -> int:
    """The generator seed for an SAE's initial weights, decorrelated from the user's seed."""
    return (int(seed) * 0x9E3779B1 + 0x5AE1) % (2 ** 63)


def train_sae(source: Any, arch: str = "topk", d_sae: int | None = None, k: int | None = None,
              n_tokens: int | None = None, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
              device: str = "auto", checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, progress: bool = True, *,
              warmup_steps: int | None = None, decay_frac: float = 0.2, b_dec_init: str = "median",
              normalize: bool = True, autocast: bool | None = None, metadata: dict | None = None,
              callback: Callable[[int, dict], None] | None = None, log_every: int = 10,
              calibration: Any = None, calibration_tokens: int = CALIBRATION_TOKENS,
              init: str = "random", subspace: Any = None, keep_subspace: bool = False,
              **arch_cfg: Any) -> SAE:
    """Train an SAE and return it acting on raw (unnormalised) activations.

    arch: any registered architecture (``analyses.sae.ARCHS``: relu | topk | batchtopk | jumprelu |
    matryoshka). d_sae defaults to 8 * d_in; k is needed by the TopK family. batch_size (rows per step)
    defaults to :func:`default_batch_size` (4096, fewer for short runs). lr must be > 0; it defaults to
    :func:`default_lr` (d_sae, d_in). Linear warm-up over ``warmup_steps`` (default 5% of steps, at most
    1000) and linear decay to 0 over the last ``decay_frac`` of steps. ``checkpoint_every`` (steps; default
    ~10 checkpoints per run) applies when ``checkpoint_dir`` is set. ``callback(step, info)`` is called after every step
    (info: loss, fvu, l0, dead_fraction, tokens). ``calibration``: held-out rows (same forms as ``source``)
    for the BatchTopK/Matryoshka inference threshold, at most ``calibration_tokens`` of them; without it
    the last training batches are used. ``init="active-subspace"`` draws the decoder rows inside the
    top-variance subspace of the first batch (``subspace``: variance fraction, default 0.99, a number of
    directions or a basis [m, d_in]) and ``keep_subspace`` keeps them there (see
    :mod:`analyses.sae.subspace_init`; Wang et al. 2025). Extra keyword arguments are architecture options of
    :class:`SAEConfig` (aux_k, aux_coef, dead_tokens (default :func:`default_dead_tokens`: 2% of the run),
    l1_coef, l0_coef, bandwidth, init_threshold, threshold_ema, matryoshka_widths, ...).
    """
    get_arch(arch)   # ValueError naming the known architectures
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r} (or None for the default "
                         f"{default_lr(d_sae):.3g} at d_sae={d_sae})" if d_sae else
                         f"lr must be a finite number > 0, got {lr!r} (or None for the default rule)")
    if calibration_tokens < 1:
        raise ValueError(f"calibration_tokens must be >= 1, got {calibration_tokens}")
    coll, own_pg, dev = setup_dist(device)
    try:
        src = _Source(source, batch_size or MAX_BATCH, seed)
        if batch_size is None:
            batch_size = default_batch_size(int(n_tokens) if n_tokens is not None else src.count_rows())
            src.chunk = batch_size
        first = _Stream(src, batch_size).next()
        run = RunSettings.build(arch=arch, d_in=int(first.shape[1]), d_sae=d_sae, k=k, n_tokens=n_tokens,
                                src=src, batch_size=batch_size, lr=lr, seed=seed, dev=dev,
                                checkpoint_every=checkpoint_every, warmup_steps=warmup_steps,
                                decay_frac=decay_frac, b_dec_init=b_dec_init, normalize=normalize,
                                autocast=autocast, calibration_tokens=calibration_tokens)
        torch.manual_seed(seed)
        sae = make_sae(arch, run.d_in, run.d_sae, k, device="cpu", metadata=dict(metadata or {}), **arch_cfg)
        # derived, not `seed` itself: data made with torch.randn under the same small seed (synthetic
        # ground truth in tests and benchmarks) would otherwise BE the initial decoder
        sae.reset_parameters(torch.Generator().manual_seed(init_seed(seed)))
        keep_basis = _subspace_init(sae, first, init, subspace, keep_subspace, seed)
        if "dead_tokens" in type(sae).options and sae.cfg.dead_tokens is None:
            sae.cfg.dead_tokens = default_dead_tokens(run.total, batch_size, sae.cfg.d_sae, sae.cfg.k)
        trainer = _Trainer(sae, run, src, coll, dev, checkpoint_dir, progress, callback, log_every)
        trainer.keep_basis = keep_basis.to(dev) if keep_basis is not None else None
        if init != "random":     # a checkpoint of another init must not be resumed into this run
            trainer.fingerprint["init"] = dict(sae.cfg.metadata["workbench"]["init"])
        trainer.start(first)
        del first
        trainer.loop()
        return trainer.finish(calibration)
    finally:
        if own_pg:
            import torch.distributed as dist
            dist.destroy_process_group()


@dataclass
class RunSettings:
    """Everything that fixes a run (and, through :meth:`fingerprint`, whether a checkpoint may resume it)."""

    arch: str
    d_in: int
    d_sae: int
    k: int | None
    n_tokens: int
    batch_size: int
    lr: float
    seed: int
    total: int               # optimiser steps
    warmup: int
    decay_frac: float
    decay_start: int         # first step of the linear decay (== total: no decay)
    density_start: int       # firing counts are kept from this step on (sae.sparsity)
    every: int               # checkpoint interval (steps)
    b_dec_init: str
    normalize: bool
    autocast: bool
    calibration_tokens: int

    @classmethod
    def build(cls, *, arch, d_in, d_sae, k, n_tokens, src, batch_size, lr, seed, dev, checkpoint_every,
              warmup_steps, decay_frac, b_dec_init, normalize, autocast, calibration_tokens) -> "RunSettings":
        if b_dec_init not in ("median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be median, mean or zeros, got {b_dec_init!r}")
        d_sae = int(d_sae) if d_sae is not None else 8 * d_in
        n_tokens = int(n_tokens) if n_tokens is not None else src.count_rows()
        total = max(1, n_tokens // batch_size)
        decay_start = int(total * (1 - decay_frac)) if decay_frac > 0 else total
        return cls(arch=arch, d_in=d_in, d_sae=d_sae, k=k, n_tokens=n_tokens, batch_size=batch_size,
                   lr=float(lr) if lr is not None else default_lr(d_sae, d_in), seed=seed, total=total,
                   warmup=warmup_steps if warmup_steps is not None else min(1000, max(1, total // 20)),
                   decay_frac=decay_frac, decay_start=decay_start,
                   density_start=min(decay_start, int(total * (1 - DENSITY_FRAC))),
                   every=checkpoint_every or max(1, total // 10), b_dec_init=b_dec_init, normalize=normalize,
                   autocast=resolve_autocast(autocast, dev),
                   calibration_tokens=int(calibration_tokens))

    def fingerprint(self, cfg: SAEConfig) -> dict[str, Any]:
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": cfg.d_sae, "k": cfg.k, "n_tokens": self.n_tokens,
                "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "warmup": self.warmup,
                "decay_frac": self.decay_frac, "b_dec_init": self.b_dec_init, "normalize": self.normalize,
                "adam_betas": list(ADAM_BETAS),
                "options": dict(cfg.training_options())}

    def lr_at(self, step: int) -> float:
        frac = 1.0 if step < self.decay_start else max(0.0, (self.total - step) / max(1, self.total - self.decay_start))
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup)) * frac

    def calibration_batches(self) -> int:
        return max(1, min(self.total, -(-self.calibration_tokens // self.batch_size)))


@dataclass
class _State:
    """What changes while training (and is checkpointed besides weights and optimiser)."""

    step: int = 0
    pos: tuple[int, int] = (0, 0)
    scale: float = 1.0
    since_fired: torch.Tensor | None = None     # tokens since each latent last fired (AuxK dead mask)
    counts: torch.Tensor | None = None          # firing counts since run.density_start
    count_tokens: int = 0
    cal_pos: tuple[int, int] | None = None      # stream position of the first calibration batch
    fvus: list[float] = field(default_factory=list)   # recent batch FVUs (explosion guard)


def _subspace_init(sae: SAE, first: torch.Tensor, init: str, subspace: Any, keep: bool, seed: int):
    """Active-subspace init (analyses.sae.subspace_init); returns the basis to keep rows in, or None."""
    from .subspace_init import INITS, active_subspace, init_in_subspace
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "random":
        if keep or subspace is not None:
            raise ValueError("subspace / keep_subspace need init='active-subspace'")
        return None
    basis = active_subspace(first, subspace)
    init_in_subspace(sae, basis, torch.Generator().manual_seed(init_seed(seed)))
    wb = dict(sae.cfg.metadata.get("workbench") or {})      # a copy: the caller's dict stays as it was
    wb["init"] = {"method": init, "subspace_dim": int(basis.shape[0]), "keep": bool(keep),
                  "subspace": subspace if isinstance(subspace, (int, float)) or subspace is None else "basis"}
    sae.cfg.metadata["workbench"] = wb
    return basis if keep else None


def resolve_autocast(autocast: bool | None, dev: torch.device) -> bool:
    """bf16 autocast of the train step: on by default on CUDA; on CPU only when asked (it changes the numbers,
    and it pays only with bf16 matrix units, AMX / AVX512-BF16: a whole TopK step 1.20-1.85x faster on a 2-core
    AMX CPU, benchmarks/bench_sae_grads.py); other devices: off."""
    if autocast is None:
        return dev.type == "cuda"
    if not autocast or dev.type not in ("cuda", "cpu"):
        return False
    if dev.type == "cpu" and not _cpu_has_bf16():
        log.warning("bf16 autocast on a CPU without bf16 matrix units (AMX / AVX512-BF16) is emulated: slower "
                    "than float32. Leave it off on this machine")
    return True


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def same_layout(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with ``p``'s strides (a copy only when they differ). Fused Adam walks parameter, gradient and
    state as flat memory: a gradient or state of another layout than its parameter (a hand-set gradient, a
    row-major state from an older checkpoint, against the column-major W_enc) would be silently misapplied."""
    return t if t.stride() == p.stride() else torch.empty_like(p).copy_(t)


class _Trainer:
    keep_basis: torch.Tensor | None = None    # active-subspace basis the decoder rows are kept in
    def __init__(self, sae: SAE, run: RunSettings, src: "_Source", coll: Collective, dev: torch.device,
                 checkpoint_dir, progress: bool, callback, log_every: int):
        self.sae, self.run, self.src, self.coll = sae, run, src, coll
        self.dev = dev
        self.ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        self.fingerprint = run.fingerprint(sae.cfg)
        self.progress, self.callback, self.log_every = progress, callback, log_every
        self.st = _State()
        self.workspace: dict = {}               # step buffers reused across steps (base.preacts)
        self.last = {"fvu": float("nan"), "l0": float("nan"), "dead_fraction": float("nan"),
                     "loss": float("nan")}

    # ----- setup: fresh init or resume
    def start(self, first: torch.Tensor) -> None:
        sae, run = self.sae, self.run
        state = self._read_checkpoint()
        dev = self.dev
        sae.to(dev)
        groups = sae.param_groups(run.lr)
        # fused Adam: one kernel over each parameter instead of ~10 passes (16k x 576 SAE on 2 CPU cores:
        # 0.14 s vs 0.74 s a step, same update up to float rounding).
        # beta1 = 0 (no momentum), as the JumpReLU / Gemma Scope SAEs were trained (Lieberum et al. 2024);
        # measured on synthetic superposition (benchmarks/bench_sae_recovery.py, d 64, 256 true features,
        # 16 active): MMCS 0.90 with (0.9, 0.999), 0.97 with (0, 0.999); BatchTopK 0.59 -> 0.95
        self.opt = torch.optim.Adam([{"params": g["params"], "lr": run.lr * g["lr_mult"]} for g in groups],
                                    betas=ADAM_BETAS, eps=1e-8, fused=dev.type in FUSED_ADAM_DEVICES)
        self.mults = [g["lr_mult"] for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        if state is None:
            self._fresh_init(first)
        else:
            self._restore(state)
        self.stream = _Stream(self.src, run.batch_size, *self.st.pos)

    def _fresh_init(self, first: torch.Tensor) -> None:
        sae, run, dev = self.sae, self.run, self.dev
        x0 = first.to(dev, torch.float32)
        check_finite_rows(x0, "activations (first batch)")
        scale = math.sqrt(run.d_in / float(x0.pow(2).sum(1).mean().clamp_min(1e-30))) if run.normalize else 1.0
        with torch.no_grad():
            xs = x0 * scale
            if run.b_dec_init == "median":
                sae.b_dec.copy_(geometric_median(xs).to(sae.dtype))
            elif run.b_dec_init == "mean":
                sae.b_dec.copy_(xs.mean(0))
        d = sae.cfg.d_sae
        self.st = _State(scale=scale, since_fired=torch.zeros(d, dtype=torch.float64, device=dev),
                         counts=torch.zeros(d, dtype=torch.float64, device=dev))

    # ----- checkpoint IO
    def _read_checkpoint(self) -> dict | None:
        if self.ckpt is None or not self.ckpt.exists():
            return None
        state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        old = state.get("fingerprint", {})
        if old != self.fingerprint:
            diff = sorted(kk for kk in set(self.fingerprint) | set(old) if self.fingerprint.get(kk) != old.get(kk))
            raise SAETrainingError(f"{self.ckpt} was written by a run with different settings "
                                   f"({', '.join(diff)}); remove it or use another checkpoint_dir")
        return state

    def _restore(self, state: dict) -> None:
        self.sae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        for p in self.params:            # a checkpoint from before W_enc was column-major holds row-major state
            st = self.opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    st[k] = same_layout(p, v)
        cal = state.get("cal_pos")
        self.st = _State(step=int(state["step"]), pos=tuple(state["pos"]), scale=float(state["scale"]),
                         since_fired=state["since_fired"].to(self.dev), counts=state["counts"].to(self.dev),
                         count_tokens=int(state["count_tokens"]), cal_pos=tuple(cal) if cal is not None else None,
                         fvus=list(state.get("fvus", [])))
        torch.set_rng_state(state["rng_cpu"])
        if self.dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.dev)

    def _write_checkpoint(self) -> None:
        if self.ckpt is None or self.coll.rank != 0:
            return
        st = self.st
        _atomic_save({"fingerprint": self.fingerprint, "step": st.step, "pos": list(self.stream.state()),
                      "scale": st.scale, "model": self.sae.state_dict(), "optim": self.opt.state_dict(),
                      "since_fired": st.since_fired.cpu(), "counts": st.counts.cpu(),
                      "count_tokens": st.count_tokens,
                      "cal_pos": list(st.cal_pos) if st.cal_pos is not None else None, "fvus": list(st.fvus),
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
                      "time": time.time()}, self.ckpt)

    # ----- the loop
    def loop(self) -> None:
        run, st = self.run, self.st
        self.bar = _progress_bar(self) if self.progress and self.coll.rank == 0 and st.step < run.total else None
        self.t_start = time.time()
        self.sae.train()
        cal_start = run.total - run.calibration_batches()
        try:
            while st.step < run.total:
                if st.step == cal_start:
                    st.cal_pos = self.stream.state()
                self._one_step()
                if self.bar is not None:
                    self.bar.update(run.batch_size)
                if self.ckpt is not None and (st.step % run.every == 0 or st.step == run.total):
                    self._write_checkpoint()
                if self.callback is not None:
                    self.callback(st.step, dict(self.last))
        finally:
            if self.bar is not None:
                self.bar.close()
        self.sae.eval()

    def _one_step(self) -> None:
        sae, run, st, coll = self.sae, self.run, self.st, self.coll
        step, B = st.step, run.batch_size
        xb = self.stream.next()
        if not torch.isfinite(xb).all():
            check_finite_rows(xb, f"activations (batch at step {step})")
        x = xb.to(self.dev, torch.float32, non_blocking=True) * st.scale
        local = torch.tensor_split(x, coll.world_size)[coll.rank] if coll.world_size > 1 else x
        denom = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        lr_now = run.lr_at(step)
        for g, m in zip(self.opt.param_groups, self.mults):
            g["lr"] = lr_now * m
        dead = (st.since_fired >= sae.cfg.dead_tokens) if sae.cfg.dead_tokens else None
        inp = TrainStepInput(x=local, denom=denom, n_global=B, dead_mask=dead,
                             coefficients=sae.coefficients(step, run.total), step=step, dist=coll,
                             workspace=self.workspace)
        with torch.autocast(self.dev.type if run.autocast else "cpu", dtype=torch.bfloat16, enabled=run.autocast):
            out = sae.training_forward(inp)
        red = coll.all_reduce_sum(torch.stack([out.loss.detach().float(), out.sq_err.detach().float(),
                                               out.l0_sum.detach().float()]).double())
        loss, fvu = float(red[0]), float(red[1] / denom)
        self._guard(loss, fvu)
        out.loss.backward()
        if coll.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = coll.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
            i = 0
            for p in self.params:
                n = p.numel()
                p.grad = flat[i:i + n].view_as(p)      # a view of the reduced copy; same_layout below
                i += n
        sae.remove_parallel_grad()
        for p in self.params:
            if p.grad is not None:
                p.grad = same_layout(p, p.grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        if self.keep_basis is not None:
            from .subspace_init import keep_in_subspace
            keep_in_subspace(sae.W_dec.data, self.keep_basis)
        sae.after_step(out)
        with torch.no_grad():
            c = coll.all_reduce_sum(out.counts.double())
            st.since_fired += B
            st.since_fired[c > 0] = 0
            if step == run.density_start:
                st.counts.zero_()
                st.count_tokens = 0
            st.counts += c
            st.count_tokens += B
        st.step += 1
        if st.step % self.log_every == 0 or st.step == run.total or self.callback is not None:
            self.last = {"loss": loss, "fvu": fvu, "l0": float(red[2]) / B,
                         "dead_fraction": float((st.since_fired >= (sae.cfg.dead_tokens or math.inf)).double().mean()),
                         "tokens": st.step * B, "step": st.step, "lr": lr_now}
            if self.bar is not None:
                self.bar.set_postfix(L0=f"{self.last['l0']:.1f}", FVU=f"{fvu:.3f}",
                                     dead=f"{100 * self.last['dead_fraction']:.1f}%", refresh=False)

    def _guard(self, loss: float, fvu: float) -> None:
        """Stop before applying the update of a batch whose loss is NaN/inf or whose FVU exploded: above
        EXPLODE_FVU once warm-up is over, or above EXPLODE_FACTOR x the median of the recent batch FVUs
        at any time (no working SAE reconstructs 100x worse than the batch mean; a diverging lr does)."""
        st, run = self.st, self.run
        why = None
        if not (math.isfinite(loss) and math.isfinite(fvu)):
            why = f"loss became {loss if not math.isfinite(loss) else fvu}"
        else:
            med = float(np.median(st.fvus)) if st.fvus else None
            if st.step >= run.warmup and fvu > EXPLODE_FVU:
                why = f"the loss exploded: batch FVU {fvu:.3g} > {EXPLODE_FVU:g} after warm-up"
            elif med is not None and fvu > EXPLODE_FACTOR * max(med, 1e-6):
                why = f"the loss exploded: batch FVU {fvu:.3g} > {EXPLODE_FACTOR:g} x the recent median {med:.3g}"
            st.fvus = (st.fvus + [fvu])[-FVU_WINDOW:]
        if why is None:
            return
        where = f"last good checkpoint kept at {self.ckpt}" if self.ckpt is not None and self.ckpt.exists() \
            else "no checkpoint was written (pass checkpoint_dir to keep one)"
        raise SAETrainingError(
            f"{why} at step {st.step} (token {st.step * run.batch_size}); training stopped before applying "
            f"that update; {where}. Try a lower lr (now {run.lr:g}), check the activations for huge values, "
            "or use a smaller batch")

    # ----- after the loop: calibrate, fold the input scale, record what happened
    def finish(self, calibration: Any) -> SAE:
        sae, run, st = self.sae, self.run, self.st
        wb = dict(sae.cfg.metadata.get("workbench") or {})
        if sae.needs_calibration:
            batches, info = self._calibration_batches(calibration)
            cal = sae.calibrate(batches)
            wb["threshold_calibration"] = {**info, **cal}
        sae.fold_scale(st.scale)
        dead_fraction = density_dead = float("nan")
        if st.count_tokens > 0:
            rate = st.counts.cpu().double() / st.count_tokens
            sae.sparsity = torch.log10(rate + 1e-10).float()
            density_dead = float((rate == 0).double().mean())
        if sae.cfg.dead_tokens:
            dead_fraction = float((st.since_fired >= sae.cfg.dead_tokens).double().mean())
        wb.update({"n_tokens": run.total * run.batch_size, "steps": run.total, "batch_size": run.batch_size,
                   "lr": run.lr, "seed": run.seed, "input_scale": st.scale, "b_dec_init": run.b_dec_init,
                   "fvu": self.last.get("fvu"), "l0": self.last.get("l0"),
                   "dead_fraction": density_dead, "density_tokens": st.count_tokens,
                   "aux_dead_fraction": dead_fraction, "aux_dead_tokens": sae.cfg.dead_tokens,
                   "train_seconds": round(time.time() - getattr(self, "t_start", time.time()), 3),
                   "world_size": self.coll.world_size, "autocast": "bf16" if run.autocast else None})
        sae.cfg.metadata["workbench"] = wb
        return sae

    def _calibration_batches(self, calibration: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Normalised batches for the threshold: held-out rows when given (up to calibration_tokens, in
        chunks of batch_size), else the last training batches (re-read from the deterministic source)."""
        run, st = self.run, self.st
        out: list[torch.Tensor] = []
        if calibration is not None:
            need = run.calibration_tokens
            for b in _Source(calibration, run.batch_size, run.seed).epoch(0):
                b = _as_batch(b)
                for part in b.split(run.batch_size):
                    part = part[:need]
                    if part.shape[0]:
                        out.append(part)
                        need -= part.shape[0]
                if need <= 0:
                    break
            data = "held_out"
        else:
            stream = _Stream(self.src, run.batch_size, *(st.cal_pos or (0, 0)))
            out = [stream.next() for _ in range(run.calibration_batches())]
            data = "last_training_batches"
        if not out:
            raise ValueError("calibration data has no rows")
        xs = [b.to(self.dev, torch.float32) * st.scale for b in out]
        if xs[0].shape[1] != run.d_in:
            raise ValueError(f"calibration rows have d={xs[0].shape[1]} but the SAE has d_in={run.d_in}")
        for i, b in enumerate(xs):
            check_finite_rows(b, f"calibration batch {i}")
        return xs, {"data": data, "tokens": int(sum(b.shape[0] for b in xs)), "batches": len(xs)}


def _progress_bar(tr: _Trainer):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=tr.run.total * tr.run.batch_size, initial=tr.st.step * tr.run.batch_size, unit="tok",
                unit_scale=True, desc=f"train {tr.run.arch} SAE", dynamic_ncols=True,
                # `progress` may be a stream (the caller's, e.g. a UI job's log): bars go there
                file=tr.progress if hasattr(tr.progress, "write") else sys.stderr)
