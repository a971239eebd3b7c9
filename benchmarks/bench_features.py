"""Benchmark: feature-dashboard data (step `features`) for a 16k-latent TopK SAE (d_in=576, k=32,
random weights) over 100k tokens of a synthetic store, against a naive per-feature loop.

    .venv/bin/python benchmarks/bench_features.py [--tokens 100000] [--d-sae 16384] [--device auto]

Ours: `compute_features` end to end — two streaming passes (stats + top-k, then buckets +
histograms, per-token windows riding along), decoder neighbours, neuron alignment and the logit
table over a 49152-token vocabulary (random W_U), and resolving the example windows.

Baselines, run in the same process and EXTRAPOLATED (a full run would take hours):
  (a) naive streaming, per latent: one scan over all activations (encode every chunk, keep that
      latent's column), then sort it for top-k / buckets / histogram. Timed on --naive-latents
      latents, times d_sae.
  (b) naive over a cached dense activation matrix (what you would do with n x d_sae memory; not
      possible at 100k x 16k = 6.6 GB float32 in bounded memory): encode --dense-tokens tokens once
      (not timed), then per latent: take its column, sort, stats, buckets, histogram. Timed on
      --dense-latents latents, scaled linearly to d_sae latents and --tokens tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.sae.base import SAEConfig  # noqa: E402
from analyses.sae.topk import TopKSAE  # noqa: E402
from workbench.steps.features import compute_features  # noqa: E402
from workbench.store import write_store  # noqa: E402

HOOK = "blocks.6.hook_resid_post"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores)")


def make_store(path: Path, n: int, d_in: int, seq_len: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_seq = (n + seq_len - 1) // seq_len
    tok = torch.randint(0, 49152, (n_seq, seq_len), generator=g)
    mask = torch.zeros(n_seq, seq_len, dtype=torch.bool)
    mask.view(-1)[:n] = True
    si, po = mask.nonzero(as_tuple=True)
    basis = torch.randn(64, d_in, generator=g)
    x = torch.empty(n, d_in, dtype=torch.float16)
    for s in range(0, n, 20000):   # low-rank structure + noise, like a residual stream
        m = min(20000, n - s)
        x[s:s + m] = (torch.randn(m, 64, generator=g) @ basis + 0.5 * torch.randn(m, d_in, generator=g)).half()
    return write_store(path, {HOOK: x}, tok, mask, torch.arange(n_seq), si, po, "synthetic", dtype="float16")


def naive_stats(col: torch.Tensor, n_top=20, n_buckets=10, per_bucket=5, hist_bins=40, gen=None):
    vals, order = col.sort(descending=True, stable=True)
    fire = vals > 0
    nf = int(fire.sum())
    top = order[:min(n_top, nf)]
    mx = float(vals[0]) if nf else 0.0
    v = vals[:nf]
    hist = torch.histc(v, bins=hist_bins, min=0, max=mx) if nf else None
    if nf:
        b = (v / mx * n_buckets).floor().clamp(max=n_buckets - 1).long()
        picks = [order[:nf][b == i][torch.randperm(int((b == i).sum()), generator=gen)[:per_bucket]]
                 for i in range(n_buckets)]
    else:
        picks = []
    return nf, mx, float(v.mean()) if nf else 0.0, top, hist, picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--naive-latents", type=int, default=2)
    ap.add_argument("--dense-tokens", type=int, default=10_000)
    ap.add_argument("--dense-latents", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    print(f"device: {device_name(dev)}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"SAE: topk (random weights) d_in={args.d_in} d_sae={args.d_sae} k={args.k}; "
          f"{args.tokens} tokens; vocab {args.vocab}")
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k,
                            metadata={"hook_name": HOOK})).to(dev)
    W_U = torch.randn(args.d_in, args.vocab) / args.d_in ** 0.5

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        store = make_store(Path(tmp) / "store", args.tokens, args.d_in)
        print(f"synthetic store written in {time.time() - t:.1f}s (not counted)")

        # ---- ours
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.time(), time.process_time()
        meta, tensors, _ = compute_features(sae, store, hook=HOOK, batch_size=args.batch_size, W_U=W_U,
                                            device=str(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ours, ours_cpu = time.time() - t, time.process_time() - c
        tm = meta["timing"]
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        print(f"ours: {ours:.1f}s wall ({ours_cpu:.1f}s process CPU) total for all {args.d_sae} latents "
              f"(2 passes {tm['stats_s']:.1f}s of which SAE encode {tm['encode_s']:.1f}s; "
              f"weight panels incl. logit table {tm['weights_s']:.1f}s); result tensors {size / 2**20:.0f} MiB; "
              f"dead {meta['dead_fraction']:.3f}, L0 {meta['mean_l0']:.1f}")

        # ---- (a) naive streaming per latent
        x_chunks = [(s, min(s + args.batch_size, args.tokens)) for s in range(0, args.tokens, args.batch_size)]
        gen = torch.Generator().manual_seed(0)
        t, c = time.time(), time.process_time()
        for f in range(args.naive_latents):
            col = torch.empty(args.tokens)
            with torch.no_grad():
                for s, e in x_chunks:
                    col[s:e] = sae.encode(store.read(HOOK, s, e, device=dev, dtype=torch.float32))[:, f].cpu()
            naive_stats(col, gen=gen)
        per_latent = (time.time() - t) / args.naive_latents
        per_latent_cpu = (time.process_time() - c) / args.naive_latents
        naive_a = per_latent * args.d_sae
        print(f"naive (a) streaming per latent: {per_latent:.2f}s/latent ({per_latent_cpu:.2f}s CPU) on "
              f"{args.naive_latents} latent(s) -> {naive_a:.0f}s = {naive_a / 3600:.1f} h extrapolated to "
              f"{args.d_sae} latents; ratio {naive_a / ours:.0f}x wall, "
              f"{per_latent_cpu * args.d_sae / ours_cpu:.0f}x CPU")

        # ---- (b) naive over a dense cached matrix (subset of tokens)
        nd = min(args.dense_tokens, args.tokens)
        with torch.no_grad():
            A = torch.cat([sae.encode(store.read(HOOK, s, min(s + 2048, nd), device=dev, dtype=torch.float32)).cpu()
                           for s in range(0, nd, 2048)])
        m = min(args.dense_latents, args.d_sae)
        t, c = time.time(), time.process_time()
        for f in range(m):
            naive_stats(A[:, f].clone(), gen=gen)
        per = (time.time() - t) / m
        per_cpu = (time.process_time() - c) / m
        naive_b = per * args.d_sae * (args.tokens / nd)
        del A
        print(f"naive (b) dense cached matrix ({nd} tokens x {args.d_sae} latents = "
              f"{nd * args.d_sae * 4 / 2**30:.2f} GiB, encode not timed): {per * 1e3:.2f} ms/latent on {m} latents "
              f"-> {naive_b:.0f}s extrapolated to {args.d_sae} latents x {args.tokens} tokens "
              f"(linear in tokens; needs {args.tokens * args.d_sae * 4 / 2**30:.1f} GiB); "
              f"ratio {naive_b / ours:.1f}x wall, "
              f"{per_cpu * args.d_sae * (args.tokens / nd) / ours_cpu:.1f}x CPU "
              f"(no logit table / neighbours in the baseline)")


if __name__ == "__main__":
    main()
