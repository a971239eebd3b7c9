"""Similarity benchmark, baselines timed in the same run:

1. linear CKA at n=100k, d=576: our feature-space form; the n x n Gram form (numpy port of the
   google-research colab code) at a size that fits (--gram-n), and ours at that same size.
2. layer x layer linear CKA: 30 synthetic hooks x 20k rows x 576 (analyses.similarity_matrix).
3. SVCCA and PWCCA against straightforward numpy ports of google/svcca (tests/ref_similarity.py).
4. (--real) the real thing: all 30 resid_post hooks of smollm2-135m collected on 20k tokens of the
   builtin corpus, then the `compare` step's layer x layer linear CKA on that store (collection is
   timed separately; --store reuses a store collected earlier).

    .venv/bin/python benchmarks/bench_similarity.py [--quick] [--real [--store PATH]]

Synthetic data (stated): hooks are a shared low-rank signal mixed differently per layer plus noise.
Ratios are baseline seconds / our seconds (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import ref_similarity as R  # noqa: E402
from analyses import similarity as S  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def layers(n, d, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    out = []
    x = z @ torch.randn(64, d, generator=g)
    for _ in range(h):
        x = 0.9 * x + 0.3 * torch.randn(n, 64, generator=g) @ torch.randn(64, d, generator=g) \
            + 0.2 * torch.randn(n, d, generator=g)
        out.append(x.clone())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--gram-n", type=int, default=6000)
    ap.add_argument("--hooks", type=int, default=30)
    ap.add_argument("--hook-rows", type=int, default=20_000)
    ap.add_argument("--cca-n", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--skip-matrix", action="store_true")
    ap.add_argument("--real", action="store_true", help="also time smollm2-135m, 30 layers x 20k tokens")
    ap.add_argument("--store", default="", help="with --real: a store to reuse (collected if missing)")
    ap.add_argument("--real-tokens", type=int, default=20_000)
    a = ap.parse_args()
    if a.quick:
        a.n, a.gram_n, a.hooks, a.hook_rows, a.cca_n = 20_000, 2000, 6, 5000, 5000
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
          f"load avg {os.getloadavg()[0]:.1f}")

    # ---- 1. linear CKA, feature space vs Gram
    X, Y = layers(a.n, a.d, 2)
    t_big, v_big = timed(lambda: S.linear_cka(X, Y))
    print(f"\n[1] linear CKA n={a.n} d={a.d}: feature-space {t_big:.2f} s (value {v_big:.6f}); "
          f"an n x n float64 Gram would need {a.n ** 2 * 8 / 2 ** 30:.0f} GiB per matrix")
    m = a.gram_n
    xs, ys = X[:m].double().numpy(), Y[:m].double().numpy()
    t_gram, v_gram = timed(lambda: R.cka_gram(R.gram_linear(xs), R.gram_linear(ys)))
    t_feat, v_feat = timed(lambda: S.linear_cka(X[:m], Y[:m]))
    print(f"    at n={m}: Gram form (numpy port) {t_gram:.2f} s, ours {t_feat:.3f} s -> ratio {t_gram / t_feat:.1f}x; "
          f"|diff| {abs(v_gram - v_feat):.1e}")

    # ---- 2. layer x layer
    if not a.skip_matrix:
        reps = layers(a.hook_rows, a.d, a.hooks, seed=1)
        t_mat, M = timed(lambda: S.similarity_matrix(reps, metric="linear_cka"))
        pairs = a.hooks * (a.hooks + 1) // 2
        print(f"\n[2] layer x layer linear CKA, {a.hooks} synthetic hooks x {a.hook_rows} rows x {a.d}: "
              f"{t_mat:.1f} s for {pairs} pairs (target < 60 s on CPU); "
              f"M[0,1]={float(M[0, 1]):.4f} M[0,-1]={float(M[0, -1]):.4f}")
        t_one, v_one = timed(lambda: S.linear_cka(reps[0], reps[-1]))
        print(f"    one pair with linear_cka: {t_one:.2f} s -> {pairs} pairs one by one ~ {t_one * pairs:.0f} s; "
              f"matrix vs pair |diff| {abs(float(M[0, -1]) - v_one):.1e}")
        del reps

    # ---- 3. SVCCA / PWCCA vs the numpy ports of google/svcca
    Xc, Yc = layers(a.cca_n, a.d, 2, seed=2)
    Xc, Yc = Xc - Xc.mean(0), Yc - Yc.mean(0)           # PWCCA's original is sign-free only when centred
    xn, yn = Xc.double().numpy(), Yc.double().numpy()
    print(f"\n[3] n={a.cca_n}, d={a.d} (float64 numpy ports of google/svcca as the baseline)")
    for name, ours, ref in (("SVCCA keep=0.99", lambda: S.svcca(Xc, Yc), lambda: R.svcca_ref(xn, yn, 0.99)),
                            ("PWCCA", lambda: S.pwcca(Xc, Yc), lambda: R.pwcca_ref(xn, yn))):
        t_ref, v_ref = timed(ref)
        t_ours, v_ours = timed(ours)
        print(f"    {name:16s} port {t_ref:7.2f} s, ours {t_ours:6.2f} s -> ratio {t_ref / t_ours:5.1f}x "
              f"(target >= 3); |diff| {abs(v_ref - v_ours):.1e}")

    if a.real:
        real_model(a)


def real_model(a) -> None:
    """[4] smollm2-135m: every layer's residual stream on real text, the compare step's matrix."""
    import tempfile

    from workbench.collector import collect
    from workbench.steps.compare import compare_matrix
    from workbench.store import MANIFEST, ActivationStore

    tmp = None
    path = Path(a.store) if a.store else Path(tmp := tempfile.mkdtemp(prefix="bench-cka-")) / "smollm2-30"
    if not (path / MANIFEST).exists():
        t_col, _ = timed(lambda: collect("smollm2-135m", "blocks.*.hook_resid_post", out=path,
                                         max_tokens=a.real_tokens, device="cpu", overwrite=True))
        print(f"\n[4] collected smollm2-135m resid_post, all layers, {a.real_tokens} tokens: {t_col:.1f} s")
    store = ActivationStore.open(path)
    hooks = list(store.hooks)
    t_cmp, res = timed(lambda: compare_matrix(store, hooks_a=hooks, metric="linear_cka", device="cpu"))
    M = res["matrix"]
    print(f"    layer x layer linear CKA, {len(hooks)} hooks x {res['n_rows']} tokens of smollm2-135m: "
          f"{t_cmp:.1f} s (target < 60 s on CPU); adjacent-layer mean "
          f"{float(torch.diagonal(M, 1).mean()):.3f}, first vs last {float(M[0, -1]):.3f}")
    t_cl, res = timed(lambda: compare_matrix(store, hooks_a=hooks, metric="linear_cka", device="cpu",
                                             max_norm_ratio=10))
    M = res["matrix"]
    print(f"    the same with max_norm_ratio=10 ({res['rows_dropped']} attention-sink rows dropped, norms of all "
          f"{len(hooks)} hooks read first): {t_cl:.1f} s; adjacent-layer mean "
          f"{float(torch.diagonal(M, 1).mean()):.3f}, first vs last {float(M[0, -1]):.3f}")
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
