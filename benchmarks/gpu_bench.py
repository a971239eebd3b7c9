"""One-GPU throughput table: collect, PCA, CKA matrix, TopK SAE training (called by gpu.sh).

    .venv/bin/python benchmarks/gpu_bench.py                 # GPU sizes, < 8 minutes on one H100/H200
    .venv/bin/python benchmarks/gpu_bench.py --cpu-smoke     # tiny sizes on the CPU: checks it runs

Stages (each timed alone, on the same store):
  collect  smollm2-135m, 4 residual hooks, --tokens rows, into a store on local disk;
  pca      streaming PCA(50) of one hook (one pass: mean + covariance in float64 accumulation);
  cka      linear-CKA matrix between the 4 hooks (workbench.steps.compare.compare_matrix);
  sae      TopK SAE (d_sae, k) trained on one hook's rows, bf16 autocast on CUDA.

SAE FLOPs per token (counted here, not measured): the encoder x W_enc is dense, 2 d n forward plus
2 d n for its weight gradient (autograd's x^T g with a dense g); the decoder touches only the k
active rows, 2 d k forward and 4 d k backward. Total 4 d n + 6 d k (d = d_in, n = d_sae); an
implementation that decodes densely does more work than this, which is not counted. "% of peak" is
that rate over the GPU's dense bf16 peak (table below, from the vendors' data sheets).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets, without sparsity)
# ("NVIDIA H100 80GB HBM3" is how torch names the SXM part; an unknown H100 gets the PCIe figure)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 HBM3": 989.0, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0}


def bf16_peak(name: str) -> float | None:
    """Peak for a torch.cuda.get_device_name() string; longest matching key wins."""
    up = name.upper()
    hits = [k for k in BF16_PEAK_TFLOPS if all(part in up for part in k.upper().split())]
    return BF16_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def topk_sae_flops_per_token(d_in: int, d_sae: int, k: int) -> int:
    return 4 * d_in * d_sae + 6 * d_in * k


def sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tiny-random model)")
    ap.add_argument("--tokens", type=int, default=None, help="rows to collect (GPU default 262144)")
    ap.add_argument("--d-sae", type=int, default=None, help="SAE width (GPU default 16384)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sae-steps", type=int, default=None, help="SAE steps (GPU default 400)")
    ap.add_argument("--batch-size", type=int, default=4096, help="SAE rows per step")
    ap.add_argument("--workdir", default=None, help="where the store goes (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the table as JSON to this file")
    a = ap.parse_args(argv)

    import torch
    from analyses.pca import PCA
    from analyses.sae.train import train_sae
    from workbench.collector import collect
    from workbench.models import load_model
    from workbench.steps.compare import compare_matrix

    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    device = "cpu" if smoke else "cuda"
    spec = "tiny-random" if smoke else "smollm2-135m"
    tokens = a.tokens or (2048 if smoke else 262_144)
    d_sae = a.d_sae or (256 if smoke else 16_384)
    steps = a.sae_steps or (6 if smoke else 400)
    batch = min(a.batch_size, 256) if smoke else a.batch_size
    coll_batch = 8 if smoke else 64

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = bf16_peak(gpu) if dev.type == "cuda" else None
    model = load_model(spec, device=device)
    hooks = model.resolve_hooks("blocks.{0,1}.hook_resid_post" if smoke
                                else "blocks.{3,6,9,15}.hook_resid_post")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    rows = []

    def add(stage, n, seconds, note=""):
        rows.append({"stage": stage, "tokens": int(n), "seconds": round(seconds, 3),
                     "tokens_per_s": round(n / seconds, 1) if seconds > 0 else None, "note": note})

    try:
        t = time.perf_counter()
        store = collect(model, hooks, corpus="builtin", out=work / "store", max_tokens=tokens, seq_len=128,
                        batch_size=coll_batch, progress=False, overwrite=True)
        sync(dev)
        add("collect", store.n_rows, time.perf_counter() - t,
            f"{spec}, {len(hooks)} hooks, attention {model.attention_for(hooks)}")
        hook = hooks[1]
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        t = time.perf_counter()
        PCA(min(50, store.d(hook) - 1)).fit(store.batches(hook, 65536, shuffle=False, device=device))
        sync(dev)
        add("pca", store.n_rows, time.perf_counter() - t, f"k=50, {hook}")

        t = time.perf_counter()
        res = compare_matrix(store, metric="linear_cka", device=device)
        sync(dev)
        add("cka", res["n_rows"] * len(hooks), time.perf_counter() - t,
            f"{len(hooks)}x{len(hooks)} linear CKA, {res['n_rows']} rows per hook")

        X = store.read(hook, device=device, dtype=torch.float32)
        n_train = steps * batch
        stamps: list[float] = []

        def source():
            g = torch.Generator(device="cpu").manual_seed(0)
            reps = (n_train + X.shape[0] - 1) // X.shape[0]
            for _ in range(reps):                    # repeat epochs of the store (say so below)
                perm = torch.randperm(X.shape[0], generator=g).to(X.device)
                for i in range(0, X.shape[0], batch):
                    yield X[perm[i:i + batch]]

        def tick(step, info):
            sync(dev)
            stamps.append(time.perf_counter())

        t = time.perf_counter()
        train_sae(source, arch="topk", d_sae=d_sae, k=a.k, n_tokens=n_train, batch_size=batch,
                  device=device, progress=False, callback=tick)
        sync(dev)
        total = time.perf_counter() - t
        warm = min(len(stamps) - 1, max(1, len(stamps) // 10))   # skip the first steps (compile, init)
        sec = stamps[-1] - stamps[warm] if len(stamps) > warm + 1 else total
        n_tok = (len(stamps) - 1 - warm) * batch if len(stamps) > warm + 1 else n_train
        flops = topk_sae_flops_per_token(store.d(hook), d_sae, a.k) * n_tok / sec
        note = (f"d_sae={d_sae} k={a.k} batch={batch}, {flops / 1e12:.2f} TFLOP/s"
                + (f" = {100 * flops / (peak * 1e12):.1f}% of bf16 peak" if peak else "")
                + (f"; {n_train / store.n_rows:.1f} epochs of the store" if n_train > store.n_rows else "")
                + f"; whole call {total:.1f}s")
        add("sae_topk", n_tok, sec, note)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ndevice: {gpu} (torch {torch.__version__}); bf16 peak "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")
    print(f"{'stage':10s} {'tokens':>10s} {'seconds':>9s} {'tokens/s':>12s}  note")
    for r in rows:
        print(f"{r['stage']:10s} {r['tokens']:>10d} {r['seconds']:>9.2f} {r['tokens_per_s']:>12,.0f}  {r['note']}")
    out = {"device": gpu, "bf16_peak_tflops": peak, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
