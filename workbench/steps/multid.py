"""Step `multid`: multi-dimensional (e.g. circular) features of an SAE over a store, Engels et al. 2024
"Not All Language Model Features Are Linear" (the method and its deviations: ``analyses/multid.py``).

    workbench multid SAE STORE [--hook H] [--method spectral|graph] [--n-clusters N] --out PATH

Clusters the SAE's decoder rows, reconstructs each cluster's part of the activations on the tokens where
one of its latents fires, runs PCA on that, scores each consecutive pair of PCs with the epsilon-mixture
index M and the separability index S (bits), and ranks clusters by irreducibility = mean (1 - M) S.
Weekday / month circles (the paper's GPT-2 finding) show up as top clusters whose PC1-PC2 scatter is a
ring ordered by the token; ``workbench collect --corpus calendar`` makes a probe corpus for them.

Result folder (kind "multid"; read it with ``read_multid_result(path) -> MultidResult``):
``result.json`` {"sae", "store", "hook", "model", "d_sae", "n_tokens", "params" {...}, "deviations" [...],
"n_clusters", "unscored" {reason: count}, "clusters": [{"rank", "latents", "size", "n_rows", "n_used",
"explained_variance_ratio", "pairs": [{"pcs", "n", "mixture_index", "separability_index"}],
"irreducibility", "top_tokens": [[token, count], ...], "plotted"}] (ranked, scored clusters only)};
``tensors.safetensors``: ``labels`` i64[d_sae] (cluster id of each latent in the clustering, -1: none),
per plotted rank r ``c{r}.scores`` f32[m, <=3] PCA scores, ``c{r}.rows`` i64[m] store rows,
``c{r}.window`` i32[m, 2*context+1] token ids around each row (-1: outside the sequence);
``tokens.json`` {token id: decoded string}; ``cluster{r}.html`` per plotted cluster (PC1-PC3 scatter
coloured by token, hover = context) and ``ranking.html`` (M against S for every scored cluster).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError
from . import StepResult, arg, default_out, register

log = logging.getLogger(__name__)
KIND = "multid"
TOKENS_FILE = "tokens.json"
N_COLOURS = 12            # tokens with their own colour in a scatter; the rest are "other"


@dataclass
class MultidConfig:
    sae: str = field(metadata=arg("SAE folder (SAELens format)", positional=True, role="sae"))
    store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
    hook: str = field(default="", metadata=arg("hook to read (default: the SAE's metadata hook_name)", role="hook"))
    method: str = field(default="spectral", metadata=arg(
        "clustering of decoder rows: spectral (the paper's GPT-2 run) or graph (nearest neighbour with cosine "
        "> --sim-cutoff, connected components; its Mistral run)", choices=["spectral", "graph"]))
    n_clusters: int = field(default=0, metadata=arg("spectral clusters (0: d_sae // 25, the paper's ratio)"))
    sim_cutoff: float = field(default=0.5, metadata=arg("graph: cosine a nearest neighbour must exceed"))
    max_cluster_size: int = field(default=1000, metadata=arg("clusters with more latents are not scored"))
    threshold: float = field(default=0.0, metadata=arg("a latent counts as firing above this activation"))
    radius: float = field(default=0.0, metadata=arg("leave out points within this radius of the origin of a PC plane"))
    max_tokens: int = field(default=0, metadata=arg("use the first N rows of the store (0 = all)"))
    max_rows: int = field(default=20000, metadata=arg("tokens per cluster for the PCA (seeded sample)"))
    min_rows: int = field(default=20, metadata=arg("clusters firing on fewer tokens are not scored"))
    n_components: int = field(default=5, metadata=arg("principal components per cluster (pairs 0-1, 1-2, ...)"))
    epsilon: float = field(default=0.1, metadata=arg("epsilon of the mixture index"))
    bins: int = field(default=10, metadata=arg("histogram bins per coordinate of the separability index"))
    n_angles: int = field(default=100, metadata=arg("rotations tried by the separability index"))
    mixture_steps: int = field(default=1000, metadata=arg("annealing steps of the mixture index (paper 10000)"))
    mixture_rows: int = field(default=2000, metadata=arg("rows per PC pair the mixture optimiser sees"))
    mixture_floor: float = field(default=0.01, metadata=arg("pairs with a smaller mixture index are left out "
                                                            "of the irreducibility (the paper's floor)"))
    n_plots: int = field(default=10, metadata=arg("top clusters kept with points and a plot"))
    plot_rows: int = field(default=3000, metadata=arg("points per plotted cluster"))
    context: int = field(default=5, metadata=arg("tokens either side shown on hover"))
    seed: int = field(default=0, metadata=arg("seed of clustering and samples"))
    batch_size: int = field(default=4096, metadata=arg("rows encoded at once"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto (the SAE encoding)"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/multid-SAE)", role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def _check(cfg: MultidConfig) -> None:
    for name, lo in (("max_rows", 3), ("min_rows", 3), ("n_components", 2), ("bins", 2), ("n_angles", 1),
                     ("mixture_steps", 1), ("batch_size", 1), ("plot_rows", 1), ("max_cluster_size", 3)):
        if getattr(cfg, name) < lo:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}")
    if not 0 < cfg.epsilon < 1:
        raise WorkbenchError(f"--epsilon must be in (0, 1), got {cfg.epsilon}")
    if cfg.max_tokens < 0 or cfg.n_plots < 0 or cfg.context < 0 or cfg.n_clusters < 0:
        raise WorkbenchError("--max-tokens, --n-plots, --context and --n-clusters must be >= 0")


def _codes(sae, store, hook: str, labels: torch.Tensor, n: int, cfg: MultidConfig, dev) -> tuple[torch.Tensor, ...]:
    """(row, latent, value) of every firing > threshold of a clustered latent in the first n rows."""
    rows, lats, vals = [], [], []
    lab = labels.to(dev)
    dtype = sae.W_dec.dtype
    start = 0
    for b in store.batches(hook, cfg.batch_size, shuffle=False):
        if start >= n:
            break
        b = b[: n - start]
        with torch.no_grad():
            sp = sae.encode_sparse(b.to(dev, dtype))
        keep = (lab[sp.indices] >= 0) & (sp.values > cfg.threshold)
        rows.append(sp.rows[keep].cpu() + start)
        lats.append(sp.indices[keep].cpu())
        vals.append(sp.values[keep].float().cpu())
        start += b.shape[0]
    return torch.cat(rows), torch.cat(lats), torch.cat(vals)


def _cluster_inputs(members: list[int], rows, lats, vals, W_dec, cfg, gen) -> dict[str, Any] | None:
    """Dense codes [tokens, |cluster|] (a seeded sample of <= max_rows tokens) and the cluster's PCA."""
    from analyses.multid import cluster_pca
    urows, inv = torch.unique(rows, return_inverse=True)
    local = torch.full((W_dec.shape[0],), -1, dtype=torch.long)
    local[torch.tensor(members)] = torch.arange(len(members))
    F = torch.zeros(urows.numel(), len(members), dtype=torch.float64)
    F.index_put_((inv, local[lats]), vals.double(), accumulate=True)
    n_rows = urows.numel()
    if n_rows > cfg.max_rows:
        pick = torch.randperm(urows.numel(), generator=gen)[: cfg.max_rows].sort().values
        F, urows = F[pick], urows[pick]
    pca = cluster_pca(F, W_dec[members].double(), cfg.n_components)
    return {"rows": urows, "n_rows": n_rows, **pca}


def _windows(store, rows: torch.Tensor, context: int) -> torch.Tensor:
    """Token ids [m, 2*context+1] around each row (-1 outside the sequence or on padding)."""
    r, s = store.rows(), store.sequences()
    si, po = r["seq_index"][rows], r["position"][rows]
    L = store.seq_len
    p = po[:, None] + torch.arange(-context, context + 1)
    ok = (p >= 0) & (p < L)
    pc = p.clamp(0, L - 1)
    ids = s["token_ids"][si[:, None], pc]
    ok &= s["attention_mask"][si[:, None], pc]
    return torch.where(ok, ids, torch.full_like(ids, -1)).to(torch.int32)


def _tokenizer(store):
    spec = store.manifest.get("model") or getattr(store, "model_name", None)
    try:
        from ..models import load_tokenizer
        return load_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - plots still work with token ids
        log.info("tokenizer for %r unavailable (%s: %s); showing token ids", spec, type(e).__name__, e)
        return None


def _run(cfg: MultidConfig, store, sae, hook: str) -> tuple[dict, dict, dict]:
    from analyses._util import resolve_device
    from analyses.multid import DEVIATIONS, cluster_latents, irreducibility, score_pairs
    dev = resolve_device(cfg.device)
    W_dec = sae.W_dec.detach().float().cpu()
    d_sae = W_dec.shape[0]
    n = min(store.n_rows, cfg.max_tokens) if cfg.max_tokens else store.n_rows
    if n < max(3, cfg.min_rows):
        raise WorkbenchError(f"store {store.path} has {n} usable rows; multid needs at least {max(3, cfg.min_rows)}")
    try:
        clusters = cluster_latents(W_dec, cfg.method, cfg.n_clusters or None, cfg.sim_cutoff,
                                   cfg.max_cluster_size, cfg.seed)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    unscored = {"single latent": 0, "too large": 0, "too few tokens": 0}
    labels = torch.full((d_sae,), -1, dtype=torch.long)
    keep = []
    for c in clusters:
        if len(c) < 2 or len(c) >= cfg.max_cluster_size:
            unscored["single latent" if len(c) < 2 else "too large"] += 1
            continue
        labels[torch.tensor(c)] = len(keep)
        keep.append(sorted(c))
    log.info("%d clusters of decoder rows (%s), %d to score", len(clusters), cfg.method, len(keep))
    rows, lats, vals = _codes(sae, store, hook, labels, n, cfg, dev)
    order = torch.argsort(labels[lats], stable=True)
    rows, lats, vals = rows[order], lats[order], vals[order]
    counts = torch.bincount(labels[lats], minlength=len(keep)).tolist()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    recs, start = [], 0
    for ci, members in enumerate(keep):
        sl = slice(start, start + counts[ci])
        start += counts[ci]
        if counts[ci] == 0 or torch.unique(rows[sl]).numel() < cfg.min_rows:
            unscored["too few tokens"] += 1
            continue
        recs.append({"latents": members, **_cluster_inputs(members, rows[sl], lats[sl], vals[sl], W_dec, cfg, gen)})
    pairs = score_pairs([r["scores"] for r in recs], radius=cfg.radius, epsilon=cfg.epsilon, bins=cfg.bins,
                        n_angles=cfg.n_angles, steps=cfg.mixture_steps, mixture_rows=cfg.mixture_rows,
                        seed=cfg.seed)
    for r, p in zip(recs, pairs):
        r["pairs"], r["irreducibility"] = p, irreducibility(p, cfg.mixture_floor)
    recs.sort(key=lambda r: (-r["irreducibility"], r["latents"][0]))
    clusters_out, tensors, strings, decoded = _outputs(recs, store, cfg, gen)
    tensors["labels"] = labels
    params = {k: getattr(cfg, k) for k in ("method", "n_clusters", "sim_cutoff", "max_cluster_size", "threshold",
                                           "radius", "max_rows", "min_rows", "n_components", "epsilon", "bins",
                                           "n_angles", "mixture_steps", "mixture_rows", "mixture_floor",
                                           "context", "seed")}
    data = {"sae": str(cfg.sae), "store": str(cfg.store), "hook": hook, "model": store.model_name,
            "d_sae": d_sae, "n_tokens": n, "params": params, "deviations": DEVIATIONS,
            "n_clusters": len(clusters), "unscored": unscored, "clusters": clusters_out,
            "tokens_decoded": decoded}
    return data, tensors, strings


def _outputs(recs: list[dict], store, cfg: MultidConfig, gen) -> tuple[list[dict], dict, dict, bool]:
    """Per ranked cluster its JSON record (top tokens decoded) and, for the top n_plots, its points."""
    from .features import _decode_tokens
    tok = _tokenizer(store)
    centre = store.sequences()["token_ids"][store.rows()["seq_index"], store.rows()["position"]]
    clusters_out, tensors, ids_used = [], {}, set()
    for rank, r in enumerate(recs):
        ids, cnt = torch.unique(centre[r["rows"]], return_counts=True)
        top = [(int(ids[j]), int(cnt[j])) for j in torch.argsort(cnt, descending=True, stable=True)[:8].tolist()]
        ids_used.update(i for i, _ in top)
        plotted = rank < cfg.n_plots
        if plotted:
            m = r["rows"].numel()
            pick = torch.randperm(m, generator=gen)[: cfg.plot_rows].sort().values if m > cfg.plot_rows \
                else torch.arange(m)
            win = _windows(store, r["rows"][pick], cfg.context)
            tensors[f"c{rank}.scores"] = r["scores"][pick, :3].float()
            tensors[f"c{rank}.rows"] = r["rows"][pick]
            tensors[f"c{rank}.window"] = win
            ids_used.update(int(i) for i in win.unique().tolist() if i >= 0)
        clusters_out.append({
            "rank": rank, "latents": r["latents"], "size": len(r["latents"]), "n_rows": r["n_rows"],
            "n_used": int(r["rows"].numel()), "explained_variance_ratio": r["explained_variance_ratio"].tolist(),
            "pairs": r["pairs"], "irreducibility": r["irreducibility"], "top_tokens": top, "plotted": plotted})
    id_list = sorted(ids_used)
    strings = dict(zip((str(i) for i in id_list), _decode_tokens(tok, id_list)))
    for c in clusters_out:
        c["top_tokens"] = [[strings[str(i)], k] for i, k in c["top_tokens"]]
    return clusters_out, tensors, strings, tok is not None


@register("multid", MultidConfig, help="multi-dimensional (circular) features: cluster SAE decoder rows, PCA each "
                                       "cluster's reconstructions, rank by irreducibility (Engels et al. 2024)",
          produces="result")
def multid_step(cfg: MultidConfig) -> StepResult:
    from ..results import atomic_write_json, prepare_out, write_result
    from ..store import ActivationStore
    from .features import _check_inputs, _load_sae
    _check(cfg)
    store = ActivationStore.open(cfg.store)
    sae = _load_sae(cfg.sae)
    hook = _check_inputs(sae, store, cfg.hook)
    out = default_out(cfg.out, cfg.store, "results", f"multid-{Path(cfg.sae).name}")
    prepare_out(out, cfg.overwrite, "multid result")
    data, tensors, strings = _run(cfg, store, sae, hook)
    atomic_write_json(out / TOKENS_FILE, strings)
    res = MultidResult(path=out, meta=data, _tensors=tensors, _strings=strings)
    figs = {f"cluster{c['rank']}": cluster_figure(res, c["rank"]) for c in data["clusters"] if c["plotted"]}
    figs["ranking"] = ranking_figure(res)
    write_result(out, KIND, data, tensors=tensors, figures=figs)
    top = data["clusters"][:5]
    table = [{"rank": c["rank"], "size": c["size"], "tokens": c["n_rows"],
              "irreducibility": round(c["irreducibility"], 4),
              "top_tokens": " ".join(t for t, _ in c["top_tokens"][:5])} for c in top]
    metrics = {"clusters": float(data["n_clusters"]), "scored": float(len(data["clusters"])),
               "top_irreducibility": float(top[0]["irreducibility"]) if top else 0.0}
    return StepResult(summary={"out": str(out), "hook": hook, "table": table}, metrics=metrics,
                      artifacts={"result": str(out), **{k: str(out / f"{k}.html") for k in figs}})


# ----------------------------------------------------------------------------------------- reader + figures
@dataclass
class MultidResult:
    """A "multid" result folder as everything reads it: ``read_multid_result``."""
    path: Path
    meta: dict[str, Any]
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _strings: dict[str, str] | None = field(default=None, repr=False)

    @property
    def clusters(self) -> list[dict[str, Any]]:
        return self.meta["clusters"]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from ..results import read_tensors
            self._tensors = read_tensors(self.path)
        return self._tensors

    def tok(self, i: int) -> str:
        if self._strings is None:
            f = self.path / TOKENS_FILE
            self._strings = json.loads(f.read_text()) if f.exists() else {}
        return self._strings.get(str(int(i)), f"[{int(i)}]")

    def cluster(self, rank: int) -> dict[str, Any]:
        if not 0 <= rank < len(self.clusters):
            raise WorkbenchError(f"{self.path}: no cluster of rank {rank}; ranks 0..{len(self.clusters) - 1}")
        return self.clusters[rank]

    def points(self, rank: int):
        """DataFrame of the plotted points of one cluster: pc1, pc2[, pc3], token, context, row."""
        import pandas as pd
        c = self.cluster(rank)
        if not c.get("plotted"):
            raise WorkbenchError(f"{self.path}: cluster {rank} has no stored points (only the top "
                                 f"{sum(1 for x in self.clusters if x.get('plotted'))} are kept; see --n-plots)")
        sc, win = self.tensors[f"c{rank}.scores"], self.tensors[f"c{rank}.window"]
        ctx = win.shape[1] // 2
        df = pd.DataFrame({f"pc{j + 1}": sc[:, j].numpy() for j in range(sc.shape[1])})
        df["token"] = [self.tok(i) for i in win[:, ctx].tolist()]
        df["context"] = ["".join((f"[{self.tok(t)}]" if j == ctx else self.tok(t)) for j, t in enumerate(w) if t >= 0)
                         for w in win.tolist()]
        df["row"] = self.tensors[f"c{rank}.rows"].numpy()
        return df


def read_multid_result(path: str | Path) -> MultidResult:
    """The one reader of a "multid" result folder (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result
    m = read_result(path, KIND)
    for k in ("clusters", "sae", "store", "hook"):
        if k not in m:
            raise WorkbenchError(f"{path}: the multid result has no {k!r}; rerun the multid step")
    return MultidResult(path=Path(path), meta=m)


def cluster_figure(res: MultidResult, rank: int, dims: int = 3):
    """PC scatter (2-D or 3-D) of one cluster, one colour per frequent token, hover = context."""
    import plotly.graph_objects as go
    df = res.points(rank)
    dims = min(dims, sum(1 for c in df.columns if c.startswith("pc")))
    c = res.cluster(rank)
    common = df["token"].value_counts().index[:N_COLOURS].tolist()
    fig = go.Figure()
    for name in common + ["other"]:
        sub = df[~df["token"].isin(common)] if name == "other" else df[df["token"] == name]
        if sub.empty:
            continue
        kw = dict(name=repr(name) if name != "other" else "other", mode="markers", text=sub["context"],
                  hovertemplate="%{text}<extra>" + (repr(name) if name != "other" else "other") + "</extra>")
        if dims == 3:
            fig.add_trace(go.Scatter3d(x=sub["pc1"], y=sub["pc2"], z=sub["pc3"], marker=dict(size=3), **kw))
        else:
            fig.add_trace(go.Scatter(x=sub["pc1"], y=sub["pc2"], marker=dict(size=5), **kw))
    best = max(c["pairs"], key=lambda p: (1 - p["mixture_index"]) * p["separability_index"], default=None)
    note = (f"; best pair PC{best['pcs'][0] + 1}-PC{best['pcs'][1] + 1}: M={best['mixture_index']:.3f}, "
            f"S={best['separability_index']:.3f} bits") if best else ""
    fig.update_layout(title=f"cluster rank {rank}: {c['size']} latents, {c['n_rows']} tokens, irreducibility "
                            f"{c['irreducibility']:.3f}{note}", template="plotly_white", legend_title="token")
    if dims == 2:
        fig.update_layout(xaxis_title="PC1", yaxis_title="PC2", yaxis=dict(scaleanchor="x"))
    return fig


def ranking_figure(res: MultidResult):
    """Mixture index (x, reversed) against separability index of every scored cluster's mean pair, as the
    paper's Fig. 2; irreducible clusters sit top right."""
    import plotly.graph_objects as go
    xs, ys, text = [], [], []
    for c in res.clusters:
        ps = [p for p in c["pairs"] if p["mixture_index"] >= res.meta["params"]["mixture_floor"]]
        if ps:
            xs.append(sum(p["mixture_index"] for p in ps) / len(ps))
            ys.append(sum(p["separability_index"] for p in ps) / len(ps))
            text.append(f"rank {c['rank']} ({c['size']} latents): " + " ".join(t for t, _ in c["top_tokens"][:5]))
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=text, hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(title="clusters: mean mixture index vs separability index (irreducible: top right)",
                      xaxis=dict(title="mixture index M (eps)", autorange="reversed"),
                      yaxis_title="separability index S (bits)", template="plotly_white")
    return fig
