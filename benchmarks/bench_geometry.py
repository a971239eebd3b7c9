"""Geometry benchmark: the `subspace` and `multid` steps' maths against plain baselines, timed in this run.

    .venv/bin/python benchmarks/bench_geometry.py [--n 200000] [--d 576] [--threads 1]
                                                  [--store PATH [--hook H] [--store-rows N]] [--skip-full]
                                                  [--only subspace|twonn|multid]

(a) Subspace measures (directions for 90 / 99% of the variance, effective rank): ours = the step's path
    (rows streamed from a store through analyses.moments.MomentAccumulator, precision "auto" = float32
    products per chunk summed in float64, then eigvalsh of the d x d covariance) against scikit-learn
    PCA ("full" SVD, "covariance_eigh" and "randomized" with --rand-k components) on the same rows held
    in memory; the counts come from the eigenvalue formulas written out here in numpy. Data: SYNTHETIC
    low-rank (64) + noise rows (benchmarks/bench_pca.py's make_data), and with --store a real store's hook.
(b) TwoNN (Facco et al. 2017) on a seeded sample of --twonn-rows rows: ours (analyses.spread.twonn_fit)
    against scikit-learn NearestNeighbors distances + the same fit written out in numpy.
(c) multid (Engels et al. 2024): the whole `multid` step on a SYNTHETIC SAE + store (planted rings,
    pairs of correlated latents, 5-latent bundles, lone latents; graph clustering) against a naive
    per-cluster loop: explicit [tokens, d] reconstruction matrix, scikit-learn PCA, separability by
    np.histogram2d at 100 angles, mixture index by brute force (180 directions, exact best offset each;
    the step runs with --mixture-rows 0 so both see every row). Ours >= the brute-force mixture index by
    construction (we also run the paper's annealing and keep the larger), so "same" means equal there
    unless the annealing found a better window (counted).

Ratios are baseline seconds / our seconds (> 1: we are faster). BLAS and torch run --threads threads.

Measured (CPU, 1 thread, shared 2-core machine under load avg ~6; defaults; 1 min 46 s in all):
    (a) 200000 x 576 synthetic      seconds  ratio  dirs90 dirs99 eff.rank  max|ratio diff| vs ours
        ours (streamed from store)     2.45   1.00     28    384  228.446   -
        sklearn covariance_eigh        1.36   0.56     28    384  228.423   1.7e-05 (float32 maths)
        sklearn randomized (k=128)    21.15   8.64     28   >128  n/a       3.8e-06
        sklearn full                  22.64   9.24     28    384  228.446   7.6e-08
    (b) TwoNN, 4000 x 576: ours 1.13 s, NearestNeighbors (brute) + numpy 0.63 s (ratio 0.55); dimension
        26.379791 both (|diff| 5e-14), neighbour distances equal to 3e-13.
    (c) multid, 10000 tokens x 256, 154 latents, 18 clusters (36 PC pairs), after the numpy grid search: whole
        step 15.97 s (887 ms per cluster), annealing off 7.10 s (394 ms), naive loop 9.16 s (509 ms;
        ratio 0.57; `--only multid`, load avg 7.8). Same clusters,
        same ranking; explained-variance ratios within 4e-8 (our codes are float32), S within 1.3e-5 bits,
        M equal on 36/36 pairs (the annealing never beat the grid here), irreducibility within 1.4e-6.
        Before the grid search moved to numpy (cProfile, annealing off): _grid_mixture 9.9 of 14.5 s (batched
        torch.searchsorted 7.2 s; the numpy per-direction loop is ~3x faster on the same pair), loading a
        tokenizer for the model name 3.2 s.
    --store (a demo store of smollm2-135m) --hook blocks.6.hook_mlp_out --rand-k 64: 24576 x 576, all rows
    kept: ours 0.32 s, covariance_eigh 0.25 s, randomized (k=64) 1.16 s, full 2.36 s; 305 / 500 directions
    for 90 / 99%, effective rank 481.774 from ours, covariance_eigh and full alike.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _args import parse  # noqa: E402
from bench_pca import make_data, write  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------- (a) subspace
def ours_spectrum(store, hook: str, rows: int, batch: int = 16384) -> np.ndarray:
    """The subspace step's covariance spectrum (workbench/steps/subspace.py _one_hook), first `rows` rows."""
    from analyses.moments import MomentAccumulator, small_linalg
    acc = MomentAccumulator(store.d(hook), "cpu", name=hook, precision="auto")
    seen = 0
    for b in store.batches(hook, batch, shuffle=False):
        b = b[: rows - seen]
        acc.update(b)
        seen += b.shape[0]
        if seen >= rows:
            break
    cov = acc.covariance()
    with small_linalg(cov):
        return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0).numpy()


def counts_by_hand(ratio: np.ndarray, full: bool) -> dict[str, float]:
    """Directions for 90 / 99% from explained-variance ratios (numpy); RankMe effective rank when the
    spectrum is complete: exp(-sum p log p), p = sigma / sum sigma + 1e-7, sigma = sqrt(lambda)."""
    cum = np.cumsum(ratio)
    out: dict[str, float] = {}
    for f in (0.90, 0.99):
        k = int(np.searchsorted(cum, f - 1e-12)) + 1
        out[f"n{round(f * 100)}"] = k if k <= len(ratio) else math.nan
    if full:
        sig = np.sqrt(np.clip(ratio, 0, None))
        p = sig / sig.sum() + 1e-7
        out["erank"] = float(np.exp(-(p * np.log(p)).sum()))
    return out


def bench_subspace(label: str, store, hook: str, rows: int, a) -> dict[str, float]:
    from sklearn.decomposition import PCA as SKPCA
    from analyses.geometry import geometry_report
    t_ours, eig = timed(lambda: ours_spectrum(store, hook, rows))
    geo = geometry_report(eig)
    ours = {"n90": geo["n_dirs_90"], "n99": geo["n_dirs_99"], "erank": geo["effective_rank"]}
    hand = counts_by_hand(eig / eig.sum(), True)
    X = np.concatenate([b.float().numpy() for b in store.batches(hook, 16384, shuffle=False)])[:rows]
    print(f"\n(a) subspace measures, {label}: {X.shape[0]} x {X.shape[1]}")
    print(f"{'method':34s} {'seconds':>8s} {'ratio':>7s} {'dirs90':>7s} {'dirs99':>7s} {'eff.rank':>9s} "
          f"{'max|ratio diff|':>16s}")
    ref = eig / eig.sum()
    print(f"{'ours (streamed from the store)':34s} {t_ours:8.2f} {1:7.2f} {ours['n90']:7d} {ours['n99']:7d} "
          f"{ours['erank']:9.3f} {'-':>16s}")
    solvers = [("covariance_eigh", None), ("randomized", a.rand_k)] + ([] if a.skip_full else [("full", None)])
    out = {"ours": t_ours}
    for solver, k in solvers:
        t, sk = timed(lambda k=k, solver=solver: SKPCA(k, svd_solver=solver, random_state=0).fit(X))
        r = np.asarray(sk.explained_variance_ratio_, dtype=np.float64)
        c = counts_by_hand(r, k is None)
        diff = np.abs(r - ref[: r.size]).max()
        er = f"{c['erank']:9.3f}" if "erank" in c else f"{'n/a':>9s}"
        n90 = f"{c['n90']:7d}" if c["n90"] == c["n90"] else f"{'>' + str(k):>7s}"
        n99 = f"{c['n99']:7d}" if c["n99"] == c["n99"] else f"{'>' + str(k):>7s}"
        name = f"sklearn {solver}" + (f" (k={k})" if k else "")
        print(f"{name:34s} {t:8.2f} {t / t_ours:7.2f} {n90} {n99} {er} {diff:16.2e}")
        out[solver] = t
    assert (hand["n90"], hand["n99"]) == (ours["n90"], ours["n99"]), (hand, ours)
    return out


# ------------------------------------------------------------------------------------- (b) TwoNN
def twonn_baseline(S: np.ndarray, discard: float = 0.1) -> tuple[float, np.ndarray, np.ndarray, str]:
    """Facco et al.: mu = r2 / r1 from scikit-learn's 2 nearest neighbours; drop the largest 10% of mu;
    slope through the origin of -log(1 - i/N) against log(mu_i)."""
    from sklearn.neighbors import NearestNeighbors
    nn = NearestNeighbors(n_neighbors=3).fit(S)
    dist, _ = nn.kneighbors(S)                  # column 0: the point itself
    r1, r2 = dist[:, 1], dist[:, 2]
    mu = np.sort(r2[r1 > 0] / r1[r1 > 0])
    n = mu.size
    F = np.arange(1, n + 1) / n
    m = min(max(int(np.floor(n * (1 - discard))), 2), n - 1)
    x, y = np.log(mu[:m]), -np.log(1 - F[:m])
    return float((x * y).sum() / (x * x).sum()), r1, r2, nn._fit_method


def bench_twonn(X: np.ndarray, rows: int, seed: int = 0) -> None:
    from analyses.spread import two_nn_distances, twonn_fit
    S = X[np.random.default_rng(seed).choice(X.shape[0], rows, replace=False)].astype(np.float64)
    t_ours, fit = timed(lambda: twonn_fit(torch.from_numpy(S)))
    t_base, (dim, r1, r2, method) = timed(lambda: twonn_baseline(S))
    o1, o2 = two_nn_distances(torch.from_numpy(S))
    dr = max(np.abs(o1.numpy() - r1).max(), np.abs(o2.numpy() - r2).max())
    print(f"\n(b) TwoNN on {rows} rows x {S.shape[1]} (float64)")
    print(f"ours twonn_fit                       {t_ours:8.2f} s  dimension {fit['dimension']:.6f}")
    print(f"sklearn NearestNeighbors ({method}) + numpy {t_base:8.2f} s  dimension {dim:.6f}  "
          f"ratio {t_base / t_ours:.2f}")
    print(f"|dimension diff| {abs(dim - fit['dimension']):.1e}; max |neighbour distance diff| {dr:.1e}")


# ------------------------------------------------------------------------------------- (c) multid
def multid_data(n: int, d: int, groups: int, lone: int, p: float, seed: int = 0):
    """Decoder rows on mutually orthogonal directions: `groups` rings (8 latents tiling a circle whose
    angle is a hidden variable), pairs (cosine 0.6, independent codes) and bundles (a hub + 4 latents at
    cosine sqrt(0.6) to it), plus `lone` latents; activations = their sum + 0.01 noise. -> (W_dec, X, b_enc)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, 2 * groups + 2 * groups + 5 * groups + lone, generator=g))[0].T
    col, W, b, X = 0, [], [], 0.01 * torch.randn(n, d, generator=g)
    phi = torch.deg2rad(torch.tensor([0.0, 52, 102, 150, 196, 240, 282, 322]))
    for _ in range(groups):                                            # rings
        P = Q[col:col + 2]
        col += 2
        W.append(torch.stack([phi.cos(), phi.sin()], 1) @ P)
        b += [-3.0 * math.cos(math.radians(50))] * 8
        on = (torch.rand(n, generator=g) < p).float()[:, None]
        th = torch.rand(n, generator=g)[:, None] * 2 * math.pi
        X += on * 3.0 * torch.cat([th.cos(), th.sin()], 1) @ P
    for size in [2] * groups + [5] * groups:                           # pairs, bundles
        E = Q[col:col + size]
        col += size
        c = 0.6 if size == 2 else 0.6 ** 0.5
        rows = torch.cat([E[:1], c * E[:1] + (1 - c * c) ** 0.5 * E[1:]])
        W.append(rows)
        b += [-0.5] * size
        X += ((1 + torch.rand(n, size, generator=g)) * (torch.rand(n, size, generator=g) < p)) @ rows
    E = Q[col:col + lone]
    W.append(E)
    b += [-0.5] * lone
    X += ((1 + torch.rand(n, lone, generator=g)) * (torch.rand(n, lone, generator=g) < p)) @ E
    return torch.cat(W), X, torch.tensor(b)


def naive_separability(xy: np.ndarray, bins: int = 10, n_angles: int = 100, eps: float = 1e-10) -> float:
    """Paper's S: min over rotations of the histogram mutual information (bits), np.histogram2d per angle."""
    best = math.inf
    for th in np.linspace(0, 2 * np.pi, n_angles):
        u = xy @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        h = np.histogram2d(u[:, 0], u[:, 1], bins=bins)[0]
        j = h / (h.sum() + eps)
        prod = j.sum(1, keepdims=True) * j.sum(0, keepdims=True)
        nz = j > 0
        best = min(best, float((j[nz] * np.log((j[nz] + eps) / (prod[nz] + eps))).sum() / np.log(2)))
    return best


def naive_mixture(x: np.ndarray, eps: float = 0.1, n_dir: int = 180) -> float:
    """max over n_dir directions in [0, pi) and, per direction, every offset where an edge of the window
    |p - t| < eps sqrt(var + (mean - t)^2) meets a point (a quadratic in t), of the fraction inside."""
    best = 0.0
    for th in np.arange(n_dir) * (np.pi / n_dir):
        p = np.sort(x @ np.array([np.cos(th), np.sin(th)]))
        mu, var, e2 = p.mean(), p.var(), eps * eps
        A, B, C = 1 - e2, -2 * (p - e2 * mu), p * p - e2 * (var + mu * mu)
        disc = np.sqrt(np.maximum(B * B - 4 * A * C, 0))
        ts = np.concatenate([(-B + disc) / (2 * A), (-B - disc) / (2 * A)])
        tiny = 1e-9 * (np.abs(p).max() + np.sqrt(var))
        for t in (ts - tiny, ts + tiny):
            h = eps * np.sqrt(var + (mu - t) ** 2)
            cnt = np.searchsorted(p, t + h, side="left") - np.searchsorted(p, t - h, side="right")
            best = max(best, cnt.max() / p.size)
    return best


def naive_cluster(codes: np.ndarray, W: np.ndarray, members: list[int], n_components: int = 5) -> dict:
    """One cluster the plain way: explicit reconstructions, scikit-learn PCA, both indices per PC pair."""
    from sklearn.decomposition import PCA as SKPCA
    F = codes[:, members]
    F = F[(F > 0).any(1)]
    R = F @ W[members]                                           # [tokens, d], formed explicitly
    k = max(1, min(n_components, len(members), R.shape[0] - 1))
    pca = SKPCA(k, svd_solver="full").fit(R)
    keep = max(1, int((pca.explained_variance_ratio_ > 1e-9).sum()))
    sc = pca.transform(R)[:, :keep]
    pairs = []
    for i in range(keep - 1):
        xy = sc[:, i:i + 2]
        xy = xy[np.linalg.norm(xy, axis=1) > 0]
        pairs.append({"M": naive_mixture(xy), "S": naive_separability(xy)})
    vals = [(1 - p["M"]) * p["S"] for p in pairs if p["M"] >= 0.01]
    return {"evr": pca.explained_variance_ratio_[:keep], "pairs": pairs,
            "irr": float(np.mean(vals)) if vals else 0.0}


def bench_multid(a, tmp: Path) -> None:
    from analyses.multid import cluster_latents
    from analyses.sae import SAEConfig
    from analyses.sae.relu import ReLUSAE
    from workbench.steps import run_step
    from workbench.steps.multid import read_multid_result
    W, X, b = multid_data(a.md_rows, a.md_d, a.md_groups, a.md_lone, a.md_p)
    sae = ReLUSAE(SAEConfig(arch="relu", d_in=a.md_d, d_sae=W.shape[0], metadata={"hook_name": HOOK}))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.copy_(b)
        sae.b_dec.zero_()
    sae.save(tmp / "sae")
    write(tmp / "md-store", X.numpy())
    cfg = {"sae": str(tmp / "sae"), "store": str(tmp / "md-store"), "method": "graph", "mixture_rows": 0,
           "n_plots": 0, "device": "cpu", "out": str(tmp / "md")}
    t_ours, _ = timed(lambda: run_step("multid", cfg))
    t_grid, _ = timed(lambda: run_step("multid", {**cfg, "mixture_steps": 1, "out": str(tmp / "md1")}))
    res = read_multid_result(tmp / "md")
    Wn, Xn = W.double().numpy(), X.double().numpy()

    def baseline():
        clusters = cluster_latents(W, "graph")                       # the same clustering call
        codes = np.maximum(Xn @ Wn.T + b.double().numpy(), 0)         # dense ReLU codes, all latents
        return {tuple(sorted(c)): naive_cluster(codes, Wn, sorted(c)) for c in clusters if 1 < len(c) < 1000}
    t_base, naive = timed(baseline)
    ours = res.clusters
    assert {tuple(c["latents"]) for c in ours} == set(naive), "different clusters"
    d_evr = d_s = d_irr = 0.0
    below, above, n_pairs = 0.0, 0, 0
    for c in ours:
        nv = naive[tuple(c["latents"])]
        d_evr = max(d_evr, float(np.abs(np.asarray(c["explained_variance_ratio"]) - nv["evr"]).max()))
        assert len(c["pairs"]) == len(nv["pairs"])
        for p, q in zip(c["pairs"], nv["pairs"]):
            n_pairs += 1
            d_s = max(d_s, abs(p["separability_index"] - q["S"]))
            below = max(below, q["M"] - p["mixture_index"])
            above += p["mixture_index"] > q["M"] + 1e-9
        d_irr = max(d_irr, abs(c["irreducibility"] - nv["irr"]))
    k = len(ours)
    order_same = [tuple(c["latents"]) for c in ours] == [t for t, _ in sorted(
        naive.items(), key=lambda kv: (-kv[1]["irr"], kv[0][0]))]
    print(f"\n(c) multid: {a.md_rows} tokens x d {a.md_d}, SAE of {W.shape[0]} latents, {k} clusters scored "
          f"({n_pairs} PC pairs), top cluster {ours[0]['latents'][:3]}... irreducibility "
          f"{ours[0]['irreducibility']:.3f}; mixture annealing {res.meta['params']['mixture_steps']} steps")
    print(f"ours: the whole multid step     {t_ours:8.2f} s  ({t_ours / k * 1e3:7.1f} ms per cluster)")
    print(f"ours, annealing off (steps 1)   {t_grid:8.2f} s  ({t_grid / k * 1e3:7.1f} ms per cluster)")
    print(f"naive per-cluster loop          {t_base:8.2f} s  ({t_base / k * 1e3:7.1f} ms per cluster)  "
          f"ratio {t_base / t_ours:.2f}")
    print(f"agreement: max |explained-variance-ratio diff| {d_evr:.1e}; max |S diff| {d_s:.1e} bits; "
          f"mixture index: naive - ours at most {below:.1e} (<= 0: ours never lower), ours higher on "
          f"{above}/{n_pairs} pairs (the annealing beat the grid); max |irreducibility diff| {d_irr:.1e}; "
          f"same ranking: {order_same}")


# ------------------------------------------------------------------------------------- main
def main() -> None:
    a = parse(__doc__, n=200_000, d=576, rand_k=128, skip_full=False, twonn_rows=4000, store="", hook="",
              store_rows=200_000, md_rows=10_000, md_d=256, md_groups=6, md_lone=64, md_p=0.04, threads=1,
              only=("", ["", "subspace", "twonn", "multid"]))
    import sklearn.decomposition  # noqa: F401  (loads scipy's BLAS before the limit below)
    import sklearn.neighbors  # noqa: F401
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(a.threads)
    torch.set_num_threads(a.threads)
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    blas = sorted({(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()})
    print(f"device: {dev} (everything here runs on the CPU); torch threads {torch.get_num_threads()}; "
          f"BLAS/OpenMP (api, threads) {blas}; cpus {os.cpu_count()}; load avg {os.getloadavg()[0]:.1f}")
    run = {a.only} if a.only else {"subspace", "twonn", "multid"}
    with tempfile.TemporaryDirectory() as tmp:
        X = make_data(a.n, a.d) if run & {"subspace", "twonn"} else None
        if "subspace" in run:
            bench_subspace("synthetic rank 64 + noise", write(Path(tmp) / "store", X), HOOK, a.n, a)
            if a.store:
                from workbench.store import ActivationStore
                real = ActivationStore.open(a.store)
                hook = a.hook or real.hooks[0]
                bench_subspace(f"{a.store} {hook}", real, hook, min(a.store_rows, real.n_rows), a)
        if "twonn" in run:
            bench_twonn(X, a.twonn_rows)
        del X
        if "multid" in run:
            bench_multid(a, Path(tmp))

if __name__ == "__main__":
    main()
