"""Step `pca`: PCA of one hook of an activation store, streamed in one pass.

    workbench pca STORE --hook H --k K [--method exact|randomized] [--whiten] --out PATH

Result folder (kind "pca"; read it with ``read_pca_result(path) -> PCAResult``):

- ``result.json``: {"kind": "pca", "version": 1, "store", "hook", "model", "k", "method", "whiten",
  "n_samples", "d", "explained_variance_ratio" [k], "cumulative_variance_ratio" [k],
  "geometry" {participation_ratio, n_dirs_90, n_dirs_99, effective_rank, anisotropy, ...},
  "sample_rows" [m] (store rows in the projection plot), "model_dir": "model", "figures": {...}}
- ``tensors.safetensors``: components [k, d], mean [d], explained_variance [k],
  explained_variance_ratio [k], singular_values [k], eigenvalues [d] (whole spectrum, exact only),
  projection [m, 2] (first two PCs of the sampled rows), sample_rows [m]
- ``model/``: the fitted ``analyses.pca.PCA`` (``PCA.load(path / "model")``)
- ``scree.html``, ``projection.html``: plotly figures
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..hooks import pick_hook
from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError


@dataclass
class PCAConfig:
    store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
    hook: str = field(default="", metadata=arg("hook to analyse (default: the store's only hook)", role="hook"))
    k: int = field(default=50, metadata=arg("number of components"))
    method: str = field(default="exact", metadata=arg("exact (float64 covariance) or randomized (Halko)",
                                                      choices=["exact", "randomized"]))
    precision: str = field(default="auto", metadata=arg(
        "covariance products: auto (mixed for float32/half stores, i.e. always for stores: float32 "
        "products per chunk summed in float64, ~1e-7 relative error, ~2x faster on CPU than exact), "
        "mixed, or exact/float64 (float64 products, ~1e-15)", choices=["auto", "mixed", "exact", "float64"]))
    whiten: bool = field(default=False, metadata=arg("scale projections to unit variance"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    batch_size: int = field(default=16384, metadata=arg("rows read per batch"))
    max_norm_ratio: float = field(default=10.0, metadata=arg(
        "drop rows whose norm is over R x the median row norm (attention sinks / massive "
        "activations; default 10); 0 keeps every row. The result reports such rows either way"))
    sample: int = field(default=2000, metadata=arg("rows shown in the 2-D projection plot"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/pca-STORE-HOOK)",
                                                     role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _token_labels(store, rows: torch.Tensor) -> list[str]:
    """Hover text for sampled rows: the token (decoded when the tokenizer is at hand) + where it is."""
    try:
        r = store.rows()
        seq = store.sequences()
        si, po = r["seq_index"][rows], r["position"][rows]
        ids = seq["token_ids"][si, po]
    except Exception:  # noqa: BLE001 - hover text is a nicety
        return [f"row {int(i)}" for i in rows]
    toks: list[str] | None = None
    try:
        from ..models import load_tokenizer
        tok = load_tokenizer(store.model_name)
        toks = [tok.decode([int(t)]) for t in ids]
    except Exception:  # noqa: BLE001 - offline / unknown model: show ids
        toks = None
    out = []
    for j in range(len(rows)):
        t = repr(toks[j]) if toks is not None else f"id {int(ids[j])}"
        out.append(f"{t} (seq {int(si[j])}, pos {int(po[j])}, row {int(rows[j])})")
    return out


def _figures(pca, proj: torch.Tensor, labels: list[str], hook: str) -> dict[str, Any]:
    import plotly.graph_objects as go

    k = pca.n_components_
    evr = pca.explained_variance_ratio_.cpu().tolist()
    cum = torch.cumsum(pca.explained_variance_ratio_.cpu(), 0).tolist()
    scree = go.Figure()
    scree.add_bar(x=list(range(1, k + 1)), y=evr, name="explained variance ratio")
    scree.add_scatter(x=list(range(1, k + 1)), y=cum, name="cumulative", mode="lines+markers", yaxis="y2")
    scree.update_layout(title=f"PCA scree: {hook}", xaxis_title="component",
                        yaxis=dict(title="explained variance ratio"),
                        yaxis2=dict(title="cumulative", overlaying="y", side="right", range=[0, 1.02]),
                        template="plotly_white")
    p = proj.cpu()
    y = p[:, 1].tolist() if p.shape[1] > 1 else [0.0] * p.shape[0]
    scatter = go.Figure(go.Scattergl(x=p[:, 0].tolist(), y=y, mode="markers", text=labels,
                                     hoverinfo="text", marker=dict(size=4, opacity=0.6)))
    ev = evr + [0.0]
    scatter.update_layout(title=f"{hook}: {p.shape[0]} rows on the first two components",
                          xaxis_title=f"PC1 ({100 * ev[0]:.1f}%)", yaxis_title=f"PC2 ({100 * ev[1]:.1f}%)",
                          template="plotly_white")
    return {"scree": scree, "projection": scatter}


def _fit_streaming(store, hook: str, cfg: PCAConfig, keep: torch.Tensor, norms: torch.Tensor,
                   sample_rows: torch.Tensor):
    """One pass over the store: fit the PCA on the kept rows and, from the same stream, gather the
    sampled rows, fill `norms` (when no pass of their own made them) and the per-dimension variances
    (rogue dimensions). Returns (fitted PCA, variances [d] float64, sample [m, d])."""
    from analyses.pca import PCA

    d, n = store.d(hook), store.n_rows
    n_keep = int(keep.sum())
    kept: list[torch.Tensor] = []
    col = {"n": 0, "s": torch.zeros(d, dtype=torch.float64), "q": torch.zeros(d, dtype=torch.float64)}

    def stream():
        start = 0
        for b in store.batches(hook, cfg.batch_size, shuffle=False):
            stop = start + b.shape[0]
            lo = int(torch.searchsorted(sample_rows, start))
            hi = int(torch.searchsorted(sample_rows, stop))
            if hi > lo:
                kept.append(b[sample_rows[lo:hi] - start].to(torch.float32).clone())
            if not cfg.max_norm_ratio:
                norms[start:stop] = torch.linalg.vector_norm(b.to(torch.float32), dim=1)
            rows_kept = keep[start:stop]
            start = stop
            b = b if n_keep == n else b[rows_kept]
            b64 = b.to(torch.float64)                # per-dimension variances (rogue dimensions)
            if col["n"] == 0:
                col["shift"] = b64[:1024].mean(0)
            b64 -= col["shift"]
            col["n"] += b.shape[0]
            col["s"] += b64.sum(0)
            col["q"] += (b64 * b64).sum(0)
            yield b

    pca = PCA(cfg.k, method=cfg.method, whiten=cfg.whiten, device=cfg.device, precision=cfg.precision)
    try:
        pca.fit(stream())
    except ValueError as e:
        raise WorkbenchError(f"PCA of {hook} in {store.path}: {e}") from None
    var = (col["q"] - col["s"] ** 2 / col["n"]) / max(col["n"] - 1, 1)
    sample = torch.cat(kept) if kept else torch.zeros((0, d))
    return pca, var, sample


def _pca_report(cfg: PCAConfig, out: Path, hook: str, d: int, n_samples: int, evr_k: float, dropped: int,
                geo: dict[str, Any], outliers: dict[str, Any], rogue: dict[str, Any]) -> StepResult:
    """Summary, metrics and warnings (attention sinks, rogue dimensions) of a written PCA result."""
    from ._norms import REPORT_RATIO, ROGUE_TOP, is_rogue, rogue_text

    metrics = {"explained_variance_ratio_k": evr_k, "n_samples": float(n_samples),
               "rows_dropped": float(dropped), "massive_sq_norm_share": outliers["sq_norm_share"]}
    metrics.update({k: float(v) for k, v in geo.items() if isinstance(v, (int, float))})
    summary = {"out": str(out), "hook": hook, "k": cfg.k, "method": cfg.method, "n_samples": n_samples,
               "d": d, "explained_variance_ratio_k": evr_k, "rows_dropped": dropped}
    metrics["rogue_top_share"] = rogue[f"top{ROGUE_TOP}_share"]
    if dropped:
        summary["note"] = (f"{dropped} rows left out: norm over {cfg.max_norm_ratio:g}x the median (attention "
                           f"sinks); --max-norm-ratio 0 keeps them")
    warnings = []
    if not cfg.max_norm_ratio and outliers["sq_norm_share"] > 0.5:
        warnings.append(f"{outliers['rows']} rows ({100 * outliers['row_fraction']:.2f}%) with norms over "
                        f"{REPORT_RATIO:g}x the median carry {100 * outliers['sq_norm_share']:.0f}% of the "
                        f"squared norm (attention sinks); --max-norm-ratio {REPORT_RATIO:g} drops them")
    if is_rogue(rogue):
        warnings.append(rogue_text(rogue) + ", so the first components are mostly those coordinates "
                        "(Timkey & van Schijndel 2021)")
    if warnings:
        summary["warning"] = "; ".join(warnings)
    return StepResult(
        summary=summary,
        metrics=metrics,
        artifacts={"result": str(out), "scree": str(out / "scree.html"),
                   "projection": str(out / "projection.html"), "model": str(out / "model")})


@register("pca", PCAConfig, help="PCA of one hook of an activation store (one streamed pass; sums in float64)")
def pca_step(cfg: PCAConfig) -> StepResult:
    from analyses.geometry import geometry_report
    from ..results import prepare_out, write_result
    from ..store import ActivationStore
    from ._norms import REPORT_RATIO, check_ratio, massive, report, rogue_from_var, row_norms

    store = ActivationStore.open(cfg.store)
    hook = pick_hook(store, cfg.hook)
    d, n = store.d(hook), store.n_rows
    if cfg.k < 1 or cfg.k > min(n, d):
        raise WorkbenchError(f"--k {cfg.k} must be between 1 and min(n_rows, d) = min({n}, {d}) = {min(n, d)}")
    if cfg.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_ratio(cfg.max_norm_ratio)
    # row norms: a pass of their own only when rows are to be dropped (the median must be known
    # first); otherwise they are taken from the fit's own stream, for the report
    if cfg.max_norm_ratio:
        norms = row_norms(store, hook, cfg.batch_size)
        keep = ~massive(norms, cfg.max_norm_ratio)
    else:
        norms, keep = torch.empty(n, dtype=torch.float32), torch.ones(n, dtype=torch.bool)
    n_keep = int(keep.sum())
    if cfg.k > min(n_keep, d):
        raise WorkbenchError(f"--k {cfg.k} is more than the {n_keep} rows left after --max-norm-ratio "
                             f"{cfg.max_norm_ratio}")
    out = default_out(cfg.out, cfg.store, "results", f"pca-{_safe(Path(cfg.store).name)}-{_safe(hook)}")
    prepare_out(out, cfg.overwrite, "PCA result")

    # evenly spaced sample of the kept rows, gathered while streaming (projection plot, anisotropy)
    kept_idx = keep.nonzero()[:, 0]
    m = min(max(cfg.sample, 0), n_keep)
    sample_rows = kept_idx[torch.linspace(0, n_keep - 1, m).round().long().unique()] if m \
        else torch.zeros(0, dtype=torch.long)
    pca, var, sample = _fit_streaming(store, hook, cfg, keep, norms, sample_rows)
    outliers = report(norms, cfg.max_norm_ratio or REPORT_RATIO)
    rogue = rogue_from_var(var)
    proj = pca.transform(sample)[:, :2] if sample.shape[0] else torch.zeros((0, 2))
    spectrum = pca.eigenvalues_ if pca.eigenvalues_ is not None else pca.explained_variance_
    geo = geometry_report(spectrum.cpu(), sample if sample.shape[0] >= 2 else None)
    if pca.eigenvalues_ is None:
        geo["note"] = "randomized fit: geometry from the top-k spectrum only"
    pca.save(out / "model")
    tensors = {
        "components": pca.components_.float(), "mean": pca.mean_.float(),
        "explained_variance": pca.explained_variance_, "explained_variance_ratio": pca.explained_variance_ratio_,
        "singular_values": pca.singular_values_, "projection": torch.as_tensor(proj).float(),
        "sample_rows": sample_rows,
    }
    if pca.eigenvalues_ is not None:
        tensors["eigenvalues"] = pca.eigenvalues_
    evr = pca.explained_variance_ratio_.cpu()
    data = {
        "store": str(Path(cfg.store)), "hook": hook, "model": store.model_name, "k": cfg.k,
        "method": cfg.method, "precision": pca.precision_, "whiten": cfg.whiten, "n_samples": pca.n_samples_, "d": d,
        "explained_variance_ratio": evr.tolist(), "cumulative_variance_ratio": torch.cumsum(evr, 0).tolist(),
        "total_variance": pca.total_variance_, "geometry": geo, "n_sample_rows": int(sample_rows.numel()),
        "model_dir": "model", "max_norm_ratio": cfg.max_norm_ratio, "rows_dropped": n - n_keep,
        "massive_rows": outliers, "rogue_dims": rogue,
    }
    figs = _figures(pca, torch.as_tensor(proj), _token_labels(store, sample_rows), hook)
    write_result(out, "pca", data, tensors={k: v.detach().cpu() for k, v in tensors.items()}, figures=figs)
    return _pca_report(cfg, out, hook, d, pca.n_samples_, float(evr.sum()), n - n_keep, geo, outliers, rogue)


@dataclass(frozen=True)
class PCAResult:
    """A "pca" result folder as everything reads it (UI, interventions, tests): ``read_pca_result``.
    Keys added after the first version (rows_dropped, massive_rows, rogue_dims, ...) default to
    "none", so result folders made before them still read."""
    path: Path
    store: str
    hook: str
    model: str | None
    k: int
    method: str
    n_samples: int
    d: int
    explained_variance_ratio: list[float]
    cumulative_variance_ratio: list[float]
    geometry: dict[str, Any]
    rows_dropped: int = 0
    max_norm_ratio: float = 0.0
    massive_rows: dict[str, Any] = field(default_factory=dict)
    rogue_dims: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)   # the whole result.json

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        from ..results import read_tensors
        return read_tensors(self.path)

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first two PCs of the sampled rows [m, 2], their store rows [m])."""
        t = self.tensors
        if "projection" not in t or "sample_rows" not in t:
            raise WorkbenchError(f"{self.path}: this pca result stores no projected rows; rerun the pca step")
        return t["projection"], t["sample_rows"]

    def pca(self, device: str = "cpu"):
        """The fitted analyses.pca.PCA (all k components)."""
        from analyses.pca import PCA
        sub = self.path / str(self.meta.get("model_dir") or "model")
        if not (sub / "pca.json").exists():
            raise WorkbenchError(f"{self.path} has no saved PCA model ({sub.name}/); rerun the pca step")
        return PCA.load(sub, device)


def read_pca_result(path: str | Path) -> PCAResult:
    """The one reader of a "pca" result folder (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result
    m = read_result(path, "pca")
    try:
        return PCAResult(
            path=Path(path), store=m["store"], hook=m["hook"], model=m.get("model"), k=int(m["k"]),
            method=m["method"], n_samples=int(m["n_samples"]), d=int(m["d"]),
            explained_variance_ratio=[float(v) for v in m["explained_variance_ratio"]],
            cumulative_variance_ratio=[float(v) for v in m["cumulative_variance_ratio"]],
            geometry=dict(m["geometry"]), rows_dropped=int(m.get("rows_dropped") or 0),
            max_norm_ratio=float(m.get("max_norm_ratio") or 0.0), massive_rows=dict(m.get("massive_rows") or {}),
            rogue_dims=dict(m.get("rogue_dims") or {}), meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the pca result has no {e.args[0]!r}; rerun the pca step") from None
