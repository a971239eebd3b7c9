"""Matching benchmark: the streaming sparse correlation pass (analyses.matching.CorrelationAccumulator)
against its baseline, encoding the same rows with both SAEs, timed in this run on the same batches.

    .venv/bin/python benchmarks/bench_match.py [--rows 500000] [--d-sae 16384] [--d-in 576] [--k 32]
                                               [--batch 4096] [--precision float64]

Data: SYNTHETIC rows (Gaussian, d_in = 576 like SmolLM2's residual stream) and two TopK SAEs with
random unit decoder rows (encoder = decoder transpose), so every latent fires on some rows. The
target: correlation pass <= 2x the encoding time (ratio printed as correlation / encoding). Also
prints the full-matrix finish (Pearson from the sums) and the Hungarian / mutual matching time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _args import parse  # noqa: E402


def main() -> None:
    a = parse(__doc__, rows=500_000, d_sae=16384, d_in=576, k=32, batch=4096,
              precision=("float64", ["float64", "float32"]),
              device="cuda" if torch.cuda.is_available() else "cpu")
    from analyses.matching import CorrelationAccumulator, match_one_to_one
    from analyses.sae import SAEConfig, TopKSAE

    dev = torch.device(a.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device: {name}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(f"rows {a.rows} (synthetic), d_in {a.d_in}, two TopK SAEs of {a.d_sae} latents, k {a.k}, "
          f"batch {a.batch}, cross products in {a.precision}")
    g = torch.Generator().manual_seed(0)
    saes = []
    for _ in range(2):
        W = torch.randn(a.d_sae, a.d_in, generator=g)
        W /= W.norm(dim=1, keepdim=True)
        s = TopKSAE(SAEConfig(arch="topk", d_in=a.d_in, d_sae=a.d_sae, k=a.k))
        with torch.no_grad():
            s.W_dec.copy_(W)
            s.W_enc.copy_(W.T)
            s.b_enc.zero_()
            s.b_dec.zero_()
        saes.append(s.to(dev).eval())
    t0 = time.perf_counter()
    acc = CorrelationAccumulator(a.d_sae, a.d_sae, dtype=a.precision, device=dev)
    t_alloc = time.perf_counter() - t0
    t_enc = t_acc = 0.0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for s0 in range(0, a.rows, a.batch):
            x = torch.randn(min(a.batch, a.rows - s0), a.d_in, generator=g).to(dev)
            sync()
            t1 = time.perf_counter()
            ca, cb = saes[0].encode_sparse(x), saes[1].encode_sparse(x)
            sync()
            t2 = time.perf_counter()
            acc.update(ca, cb)
            sync()
            t_enc += t2 - t1
            t_acc += time.perf_counter() - t2
    t1 = time.perf_counter()
    corr = acc.correlation()
    sync()
    t_corr = time.perf_counter() - t1
    t1 = time.perf_counter()
    m = match_one_to_one(corr, "mutual")
    t_mut = time.perf_counter() - t1
    print(f"encode both SAEs (baseline): {t_enc:8.2f} s  ({a.rows / t_enc:,.0f} rows/s)")
    print(f"correlation pass (ours):     {t_acc:8.2f} s  ({a.rows / t_acc:,.0f} rows/s)")
    print(f"ratio correlation / encoding: {t_acc / t_enc:.3f}  (target <= 2)")
    print(f"allocate {a.d_sae}x{a.d_sae} sums: {t_alloc:.2f} s; Pearson from the sums: {t_corr:.2f} s; "
          f"mutual-max matching: {t_mut:.2f} s ({int(m['a'].numel())} mutual pairs)")


if __name__ == "__main__":
    main()
