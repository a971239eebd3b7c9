"""Benchmark: TopK SAE training throughput and quality — workbench trainer vs SAELens' trainer vs a plain
dense PyTorch TopK reference, on the same activations, same d_sae / k / batch size / steps / lr.

    .venv/bin/python benchmarks/bench_sae.py                      # synthetic d_in=576, d_sae=8x, k=32, CPU
    .venv/bin/python benchmarks/bench_sae.py --store ws/stores/smol --hook blocks.6.hook_resid_post
    .venv/bin/python benchmarks/bench_sae.py --d-sae-mult 32 --steps 200 --device cuda    # GPU

Each method runs in its own subprocess (so peak memory is its own: ru_maxrss on CPU, max_memory_allocated
on GPU). Prints tokens/s, FVU and L0 on a held-out set, peak memory, the ratios against SAELens, and the
device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(args):
    import torch
    n = args.steps * args.batch_size + args.eval_rows
    if args.store:
        from workbench.store import ActivationStore
        s = ActivationStore.open(args.store)
        hook = args.hook or s.hooks[0]
        X = s.read(hook, 0, min(n, s.n_rows)).float()
        if X.shape[0] < n:   # reuse rows to reach the requested number of steps
            X = X.repeat((n + X.shape[0] - 1) // X.shape[0], 1)[:n]
        g = torch.Generator().manual_seed(0)
        X = X[torch.randperm(X.shape[0], generator=g)]
        return X[: n - args.eval_rows], X[n - args.eval_rows:]
    # synthetic: unit-norm features in superposition (4 x d_sae of them), ~k/2 active, plus an offset.
    # The data seed must differ from the init seeds: workbench's reset_parameters and the dense reference
    # both draw W_dec = randn(d_sae, d_in) from Generator().manual_seed(0), which with a data seed of 0 is
    # exactly F[:d_sae] — they would start from the true features and SAELens (kaiming_uniform) would not.
    d = args.d_in
    g = torch.Generator().manual_seed(args.data_seed)
    nf = 4 * d * args.d_sae_mult
    F = torch.randn(nf, d, generator=g)
    F /= F.norm(dim=1, keepdim=True)
    act = max(1, args.k // 2)
    probs = torch.rand(nf, generator=g) ** 4 + 1e-3          # feature frequencies vary
    X = torch.empty(n, d)
    for i in range(0, n, 8192):
        m = min(8192, n - i)
        idx = torch.multinomial(probs, act * m, replacement=True, generator=g).view(m, act)
        mag = torch.rand(m, act, generator=g) * 2 + 0.2
        X[i:i + m] = torch.einsum("ma,mad->md", mag, F[idx]) + 0.5
    X += 0.05 * torch.randn(n, d, generator=g)
    return X[: n - args.eval_rows], X[n - args.eval_rows:]


def _peak(dev):
    import resource
    import torch
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _eval(encode, decode, Xe, dev):
    import torch
    from analyses.sae import SAEMetrics
    m = None
    with torch.no_grad():
        for b in Xe.split(2048):
            b = b.to(dev)
            f = encode(b)
            if m is None:
                m = SAEMetrics(b.shape[1], f.shape[1])
            m.update(b, decode(f), f)
    r = m.compute()
    return {"fvu": r["fvu"], "l0": r["l0"], "dead_fraction": r["dead_fraction"]}


def run_ours(args, X, Xe, dev):
    from analyses.sae import train_sae
    t0 = time.perf_counter()
    sae = train_sae(X, arch="topk", d_sae=args.d_in * args.d_sae_mult, k=args.k, batch_size=args.batch_size,
                    n_tokens=X.shape[0], lr=args.lr, device=str(dev), progress=False, warmup_steps=1,
                    decay_frac=0.0)
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dt, _eval(sae.encode, sae.decode, Xe, dev)


def run_saelens(args, X, Xe, dev):
    import itertools
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    d_sae = args.d_in * args.d_sae_mult
    cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, k=args.k, device=str(dev),
                                normalize_activations="expected_average_only_in",
                                decoder_init_norm=1.0)   # unit-norm rows like ours (0.1 is tuned for long runs)
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=X.shape[0], train_batch_size_samples=args.batch_size,
                            lr=args.lr, lr_end=args.lr, device=str(dev), autocast=dev.type == "cuda",
                            # dead_feature_window default 1000: no AuxK either in 30 steps
                            n_batches_for_norm_estimate=4, dead_feature_window=10 ** 9,
                            feature_sampling_window=10 ** 9)
    provider = itertools.cycle([b.to(dev) for b in X.split(args.batch_size)])
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
    import contextlib
    import io
    t0 = time.perf_counter()
    # SAELens 6 has no data-dependent b_dec init (b_dec starts at 0). Over a 30-step run b_dec moves only
    # ~steps*lr per coordinate, so it never absorbs the activations' mean offset: the same few latents win
    # the top-k on every token (77-99% dead) and FVU stays ~1. Workbench (geometric median) and the dense
    # reference (mean) both start b_dec at the data centre, so do the same here: estimate SAELens' own
    # norm scaling factor first (fit() then reuses it instead of re-estimating) and set b_dec to the mean
    # of the first scaled batch. fit() still folds the scale into the weights, so encode/decode at the end
    # act on raw activations (checked: FVU in scaled units before folding == FVU on raw after).
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.activation_scaler.estimate_scaling_factor(args.d_in, provider, tcfg.n_batches_for_norm_estimate)
    with torch.no_grad():
        sae.b_dec.copy_(trainer.activation_scaler.scale(X[:args.batch_size].to(dev)).mean(0))
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    sae.eval()
    return dt, _eval(sae.encode, sae.decode, Xe, dev)


def run_dense(args, X, Xe, dev):
    """Plain dense PyTorch TopK SAE (autograd through the dense [B, d_sae] code and matmuls)."""
    import torch
    d, n = args.d_in, args.d_in * args.d_sae_mult
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = W_dec.to(dev).requires_grad_()
    W_enc = W_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(n, device=dev, requires_grad=True)
    b_dec = X[:4096].mean(0).to(dev).requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=args.lr)

    def encode(x):
        pre = (x - b_dec) @ W_enc + b_enc
        v, i = pre.topk(args.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu())

    def decode(f):
        return f @ W_dec + b_dec
    t0 = time.perf_counter()
    for b in X.split(args.batch_size):
        x = b.to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = (decode(encode(x)) - x).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dt, _eval(encode, decode, Xe, dev)


METHODS = {"workbench": run_ours, "saelens": run_saelens, "dense": run_dense}


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from analyses._util import resolve_device
    dev = resolve_device(args.device)
    X, Xe = make_data(args)
    args.d_in = X.shape[1]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dt, q = METHODS[args.worker](args, X, Xe, dev)
    out = {"method": args.worker, "seconds": dt, "tokens_per_s": X.shape[0] / dt, **q,
           "peak_mib": _peak(dev), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else f"cpu ({args.threads} threads)"}
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="")
    p.add_argument("--hook", default="")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae-mult", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--data-seed", type=int, default=12345,
                   help="seed of the synthetic data (keep it != 0, the SAEs' init seed)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    p.add_argument("--methods", default="workbench,saelens,dense")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lr is None:
        args.lr = 2e-4 / ((args.d_in * args.d_sae_mult) / 2 ** 14) ** 0.5 * 4   # short runs: 4x default lr
    if args.worker:
        return worker(args)
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", m] + [a for a in sys.argv[1:]]
        if "--lr" not in sys.argv:
            cmd += ["--lr", str(args.lr)]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(f"{m}: FAILED\n{r.stderr[-3000:]}")
            continue
        results.append(json.loads(line[-1][7:]))
    if not results:
        return 1
    print(f"device: {results[0]['device']}; data: {'store ' + args.store if args.store else 'synthetic'} "
          f"d_in={args.d_in} d_sae={args.d_in * args.d_sae_mult} k={args.k} batch={args.batch_size} "
          f"steps={args.steps} lr={args.lr:.2e}")
    base = next((r for r in results if r["method"] == "saelens"), None)
    print(f"{'method':<10} {'tok/s':>10} {'x SAELens':>9} {'FVU':>7} {'L0':>6} {'dead':>6} {'peak MiB':>9}")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['method']:<10} {r['tokens_per_s']:>10.0f} {ratio:>9.2f} {r['fvu']:>7.4f} {r['l0']:>6.1f} "
              f"{r['dead_fraction']:>6.3f} {r['peak_mib']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
