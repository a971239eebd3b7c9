"""SAE trainer: Adam with warm-up/decay, input normalisation folded into the weights on return, decoder
rows kept unit-norm, AuxK dead-latent tracking, tqdm progress, atomic checkpoints with exact resume,
NaN guard, bf16 autocast on GPU, and data parallelism across processes (torchrun / torch.distributed).

``source`` may be

* a tensor / numpy array [n, d]: shuffled every epoch with a generator seeded by (seed, epoch);
* a callable ``source(epoch: int) -> Iterable[Tensor[b, d]]`` returning a *fresh* iterable for that epoch,
  e.g. ``lambda epoch: store.batches(hook, 4096, shuffle=True, seed=epoch)`` — it must give the same rows
  in the same order for the same epoch (that is what makes resume exact); batches of any size are
  re-chunked into global batches of exactly ``batch_size`` rows (an epoch's tail rolls into the next);
* a zero-argument callable ``source() -> Iterable`` (called once per epoch), or a list of batches.

``n_tokens`` defaults to one pass over the data (for a callable, epoch 0 is counted first).

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

import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .._util import as_tensor, atomic_write, check_finite_rows, resolve_device
from .base import SINGLE, Collective, DistCollective, SAE, SAEConfig, TrainStepInput, validate_config

CHECKPOINT_FILE = "checkpoint.pt"


class SAETrainingError(RuntimeError):
    """Training cannot go on (NaN/inf loss, bad data, mismatched checkpoint)."""


# ------------------------------------------------------------------------------------- data

class _Source:
    """Uniform view of the accepted sources: ``epoch(e)`` -> iterable of 2-D tensors."""

    def __init__(self, source: Any, batch_size: int, seed: int):
        self.rows_per_epoch: int | None = None
        self.seed = seed
        self.chunk = batch_size
        if isinstance(source, (torch.Tensor, np.ndarray)):
            X = as_tensor(source, name="activations")
            if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                X = X.float()
            self.X = X
            self.rows_per_epoch = X.shape[0]
            self.fn = self._tensor_epoch
        elif isinstance(source, (list, tuple)):
            batches = list(source)
            self.fn = lambda e: batches
        elif callable(source):
            try:
                sig = inspect.signature(source)
                takes = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                            for p in sig.parameters.values())
            except (TypeError, ValueError):
                takes = True
            self.fn = (lambda e: source(e)) if takes else (lambda e: source())
        else:
            raise TypeError("source must be a tensor/array [n, d], a callable epoch -> iterable of [b, d] "
                            f"batches, or a list of batches; got {type(source).__name__} (a one-shot "
                            "iterator cannot be re-read for later epochs or resume: wrap it in a callable)")

    def _tensor_epoch(self, e: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(self.X.shape[0], generator=g)
        for i in range(0, len(perm), self.chunk):
            yield self.X[perm[i:i + self.chunk]]

    def epoch(self, e: int) -> Iterable:
        return self.fn(e)

    def count_rows(self) -> int:
        if self.rows_per_epoch is None:
            self.rows_per_epoch = sum(int(_as_batch(b).shape[0]) for b in self.epoch(0))
        return self.rows_per_epoch


def _as_batch(b: Any) -> torch.Tensor:
    if isinstance(b, torch.Tensor) and b.ndim == 2:
        return b
    return as_tensor(b, name="batch", check_finite=False)


class _Stream:
    """Global batches of exactly ``batch_size`` rows; position = (epoch, rows of that epoch consumed)."""

    def __init__(self, src: _Source, batch_size: int, epoch: int = 0, offset: int = 0):
        self.src, self.B = src, batch_size
        self.epoch, self.offset = epoch, offset
        self._it: Iterator | None = None
        self._pending: torch.Tensor | None = None
        self.rows_seen = 0

    def _open(self) -> None:
        it = iter(self.src.epoch(self.epoch))
        skip = self.offset
        self._pending = None
        while skip > 0:
            try:
                b = _as_batch(next(it))
            except StopIteration:
                raise SAETrainingError(f"cannot resume: epoch {self.epoch} of the source has fewer than "
                                       f"{self.offset} rows now; the data changed since the checkpoint") from None
            if b.shape[0] <= skip:
                skip -= b.shape[0]
            else:
                self._pending = b[skip:]
                skip = 0
        self._it = it

    def state(self) -> tuple[int, int]:
        return self.epoch, self.offset

    def next(self) -> torch.Tensor:
        parts, need, empty_epochs = [], self.B, 0
        while need > 0:
            if self._it is None:
                self._open()
            if self._pending is not None:
                b, self._pending = self._pending, None
            else:
                try:
                    b = _as_batch(next(self._it))
                except StopIteration:
                    empty_epochs = empty_epochs + 1 if self.offset == 0 else 0
                    if empty_epochs >= 2:
                        raise SAETrainingError("the source yielded no rows") from None
                    self.epoch += 1
                    self.offset = 0
                    self._it = None
                    continue
            if b.shape[0] == 0:
                continue
            if b.shape[0] > need:
                self._pending = b[need:]
                b = b[:need]
            parts.append(b)
            need -= b.shape[0]
            self.offset += b.shape[0]
        self.rows_seen += self.B
        return torch.cat(parts) if len(parts) > 1 else parts[0]


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


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2 ** 14)


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


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def make_sae(arch: str, d_in: int, d_sae: int, k: int | None = None, **cfg: Any) -> SAE:
    """A freshly initialised SAE of the given architecture (see ``analyses.sae.ARCHS``)."""
    from . import ARCHS
    valid = set(SAEConfig.__dataclass_fields__) - {"arch", "d_in", "d_sae", "k"}
    bad = sorted(set(cfg) - valid)
    if bad:
        raise TypeError(f"unknown SAE option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    c = SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, **cfg)
    validate_config(c)
    return ARCHS[arch](c)


# ------------------------------------------------------------------------------------- trainer

def init_seed(seed: int) -> int:
    """The generator seed for an SAE's initial weights, decorrelated from the user's seed."""
    return (int(seed) * 0x9E3779B1 + 0x5AE1) % (2 ** 63)


def train_sae(source: Any, arch: str = "topk", d_sae: int | None = None, k: int | None = None,
              n_tokens: int | None = None, batch_size: int = 4096, lr: float | None = None, seed: int = 0,
              device: str = "auto", checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, progress: bool = True, *,
              warmup_steps: int | None = None, decay_frac: float = 0.2, b_dec_init: str = "median",
              normalize: bool = True, autocast: bool | None = None, metadata: dict | None = None,
              callback: Callable[[int, dict], None] | None = None, log_every: int = 10,
              **arch_cfg: Any) -> SAE:
    """Train an SAE and return it acting on raw (unnormalised) activations.

    arch: relu | topk | batchtopk | jumprelu | matryoshka. d_sae defaults to 8 * d_in; k is needed by the
    TopK family. lr defaults to 2e-4 / sqrt(d_sae / 2^14). Linear warm-up over ``warmup_steps`` (default
    5% of steps, at most 1000) and linear decay to 0 over the last ``decay_frac`` of steps.
    ``checkpoint_every`` (steps; default ~10 checkpoints per run) applies when ``checkpoint_dir`` is set.
    ``callback(step, info)`` is called after every step (info: loss, fvu, l0, dead_fraction, tokens).
    Extra keyword arguments are architecture options of :class:`SAEConfig` (aux_k, aux_coef, dead_tokens,
    l1_coef, l0_coef, bandwidth, init_threshold, threshold_ema, matryoshka_widths, ...).
    """
    from . import ARCHS
    from .base import KNOWN_ARCHS
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {', '.join(KNOWN_ARCHS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    coll, own_pg = _setup_dist(dev)
    if coll.world_size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", coll.rank % torch.cuda.device_count())))
        torch.cuda.set_device(dev)
    try:
        return _train(source, arch, d_sae, k, n_tokens, batch_size, lr, seed, dev, checkpoint_dir,
                      checkpoint_every, progress, warmup_steps, decay_frac, b_dec_init, normalize, autocast,
                      metadata, callback, log_every, arch_cfg, coll)
    finally:
        if own_pg:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(source, arch, d_sae, k, n_tokens, batch_size, lr, seed, dev, checkpoint_dir, checkpoint_every,
           progress, warmup_steps, decay_frac, b_dec_init, normalize, autocast, metadata, callback,
           log_every, arch_cfg, coll: Collective) -> SAE:
    src = _Source(source, batch_size, seed)
    first = _Stream(src, batch_size).next()
    d_in = int(first.shape[1])
    if d_sae is None:
        d_sae = 8 * d_in
    if n_tokens is None:
        n_tokens = src.count_rows()
    total = max(1, int(n_tokens) // batch_size)
    torch.manual_seed(seed)
    sae = make_sae(arch, d_in, int(d_sae), k, device="cpu", metadata=dict(metadata or {}), **arch_cfg)
    # derived, not `seed` itself: data made with torch.randn under the same small seed (synthetic
    # ground truth in tests and benchmarks) would otherwise BE the initial decoder
    sae.reset_parameters(torch.Generator().manual_seed(init_seed(seed)))
    cfg = sae.cfg
    if cfg.arch in ("topk", "batchtopk", "matryoshka") and cfg.dead_tokens is None:
        cfg.dead_tokens = int(min(10_000_000, max(total * batch_size // 10, 4 * batch_size)))
    lr = float(lr) if lr is not None else default_lr(cfg.d_sae)
    warm = warmup_steps if warmup_steps is not None else min(1000, max(1, total // 20))
    decay_start = int(total * (1 - decay_frac)) if decay_frac > 0 else total
    every = checkpoint_every or max(1, total // 10)
    use_autocast = (dev.type == "cuda") if autocast is None else bool(autocast and dev.type == "cuda")
    fingerprint = {"arch": arch, "d_in": d_in, "d_sae": cfg.d_sae, "k": cfg.k, "n_tokens": int(n_tokens),
                   "batch_size": batch_size, "lr": lr, "seed": seed, "warmup": warm, "decay_frac": decay_frac,
                   "b_dec_init": b_dec_init, "normalize": normalize,
                   "options": {kk: v for kk, v in cfg.training_options().items()}}

    # ---- fresh init (b_dec from the data, input scale) or resume
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            diff = sorted(kk for kk in set(fingerprint) | set(state.get("fingerprint", {}))
                          if fingerprint.get(kk) != state.get("fingerprint", {}).get(kk))
            raise SAETrainingError(f"{ckpt_path} was written by a run with different settings "
                                   f"({', '.join(diff)}); remove it or use another checkpoint_dir")
    sae.to(dev)
    if state is None:
        x0 = first.to(dev, torch.float32)
        check_finite_rows(x0, "activations (first batch)")
        scale = math.sqrt(d_in / float(x0.pow(2).sum(1).mean().clamp_min(1e-30))) if normalize else 1.0
        with torch.no_grad():
            xs = x0 * scale
            if b_dec_init == "median":
                sae.b_dec.copy_(geometric_median(xs).to(sae.dtype))
            elif b_dec_init == "mean":
                sae.b_dec.copy_(xs.mean(0))
            elif b_dec_init != "zeros":
                raise ValueError(f"b_dec_init must be median, mean or zeros, got {b_dec_init!r}")
        step, pos = 0, (0, 0)
        since_fired = torch.zeros(cfg.d_sae, dtype=torch.float64, device=dev)
        counts = torch.zeros(cfg.d_sae, dtype=torch.float64, device=dev)
        count_tokens = 0
    del first
    groups = sae.param_groups(lr)
    opt = torch.optim.Adam([{"params": g["params"], "lr": lr * g["lr_mult"]} for g in groups],
                           betas=(0.9, 0.999), eps=1e-8)
    mults = [g["lr_mult"] for g in groups]
    if state is not None:
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, pos, scale = int(state["step"]), tuple(state["pos"]), float(state["scale"])
        since_fired = state["since_fired"].to(dev)
        counts = state["counts"].to(dev)
        count_tokens = int(state["count_tokens"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], dev)
    stream = _Stream(src, batch_size, *pos)
    params = [p for g in groups for p in g["params"]]

    def save_ckpt(at_step: int) -> None:
        if ckpt_path is None or coll.rank != 0:
            return
        _atomic_save({"fingerprint": fingerprint, "step": at_step, "pos": list(stream.state()),
                      "scale": scale, "model": sae.state_dict(), "optim": opt.state_dict(),
                      "since_fired": since_fired.cpu(), "counts": counts.cpu(), "count_tokens": count_tokens,
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                      "time": time.time()}, ckpt_path)

    bar = None
    if progress and coll.rank == 0 and step < total:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total * batch_size, initial=step * batch_size, unit="tok", unit_scale=True,
                       desc=f"train {arch} SAE", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    last = {"fvu": float("nan"), "l0": float("nan"), "dead_fraction": float("nan"), "loss": float("nan")}
    t_start = time.time()
    sae.train()
    while step < total:
        xb = stream.next()
        if not torch.isfinite(xb).all():
            check_finite_rows(xb, f"activations (batch at step {step})")
        x = xb.to(dev, torch.float32, non_blocking=True) * scale
        local = torch.tensor_split(x, coll.world_size)[coll.rank] if coll.world_size > 1 else x
        denom = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        frac = 1.0 if step < decay_start else max(0.0, (total - step) / max(1, total - decay_start))
        lr_now = lr * min(1.0, (step + 1) / max(1, warm)) * frac
        for g, m in zip(opt.param_groups, mults):
            g["lr"] = lr_now * m
        dead = (since_fired >= cfg.dead_tokens) if cfg.dead_tokens else None
        inp = TrainStepInput(x=local, denom=denom, n_global=batch_size, dead_mask=dead,
                             coefficients=sae.coefficients(step, total), step=step, dist=coll)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            out = sae.training_forward(inp)
        loss_g = coll.all_reduce_sum(out.loss.detach().reshape(1).float())
        if not bool(torch.isfinite(loss_g).all()):
            where = f"last good checkpoint kept at {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() \
                else "no checkpoint was written (pass checkpoint_dir to keep one)"
            if bar is not None:
                bar.close()
            raise SAETrainingError(
                f"loss became {float(loss_g[0])} at step {step} (token {step * batch_size}); training "
                f"stopped before applying that update; {where}. Try a lower lr (now {lr:g}), check the "
                "activations for huge values, or use a smaller batch")
        out.loss.backward()
        if coll.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = coll.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
            i = 0
            for p in params:
                n = p.numel()
                p.grad = flat[i:i + n].view_as(p).clone()
                i += n
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        sae.after_step(out)
        with torch.no_grad():
            c = coll.all_reduce_sum(out.counts.double())
            since_fired += batch_size
            since_fired[c > 0] = 0
            if step == decay_start:
                counts.zero_()
                count_tokens = 0
            counts += c
            count_tokens += batch_size
        step += 1
        if step % log_every == 0 or step == total or callback is not None:
            red = coll.all_reduce_sum(torch.stack([out.sq_err.double(), out.l0_sum.double()]))
            last = {"loss": float(loss_g[0]), "fvu": float(red[0] / denom), "l0": float(red[1]) / batch_size,
                    "dead_fraction": float((since_fired >= (cfg.dead_tokens or float("inf"))).double().mean()),
                    "tokens": step * batch_size, "step": step, "lr": lr_now}
            if bar is not None:
                bar.set_postfix(L0=f"{last['l0']:.1f}", FVU=f"{last['fvu']:.3f}",
                                dead=f"{100 * last['dead_fraction']:.1f}%", refresh=False)
        if bar is not None:
            bar.update(batch_size)
        if ckpt_path is not None and (step % every == 0 or step == total):
            save_ckpt(step)
        if callback is not None:
            callback(step, dict(last))
    if bar is not None:
        bar.close()
    sae.eval()
    # ---- fold the input scale and record what happened
    sae.fold_scale(scale)
    if count_tokens > 0:
        sae.sparsity = torch.log10(counts.cpu().float() / count_tokens + 1e-10)
    wb = dict(cfg.metadata.get("workbench") or {})
    wb.update({"n_tokens": total * batch_size, "steps": total, "batch_size": batch_size, "lr": lr,
               "seed": seed, "input_scale": scale, "b_dec_init": b_dec_init,
               "fvu": last.get("fvu"), "l0": last.get("l0"), "dead_fraction": last.get("dead_fraction"),
               "train_seconds": round(time.time() - t_start, 3), "world_size": coll.world_size})
    cfg.metadata["workbench"] = wb
    return sae
