"""Step `pca`: PCA of one hook of an activation store, streamed in one pass.

    workbench pca STORE --hook H --k K [--method exact|randomized] [--whiten] --out PATH

Result folder (kind "pca"; read it with ``load_pca_result(path)``):

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
from pathlib import Path
from typing import Any

import torch

from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError


@dataclass
class PCAConfig:
    store: str = field(metadata=arg("activation store folder", positional=True))
    hook: str = field(default="", metadata=arg("hook to analyse (default: the store's only hook)"))
    k: int = field(default=50, metadata=arg("number of components"))
    method: str = field(default="exact", metadata=arg("exact (float64 covariance) or randomized (Halko)",
                                                      choices=["exact", "randomized"]))
    precision: str = field(default="float64", metadata=arg(
        "float64 (exact covariance) or mixed (float32 products per chunk, float64 accumulation: ~2x "
        "faster on CPU, ~1e-7 relative error)", choices=["float64", "mixed"]))
    whiten: bool = field(default=False, metadata=arg("scale projections to unit variance"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    batch_size: int = field(default=16384, metadata=arg("rows read per batch"))
    max_norm_ratio: float = field(default=0.0, metadata=arg(
        "drop rows whose norm is over R x the median row norm (attention sinks / massive "
        "activations; e.g. 10); 0 keeps every row. The result reports such rows either way"))
    sample: int = field(default=2000, metadata=arg("rows shown in the 2-D projection plot"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/pca-STORE-HOOK)"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _pick_hook(store, hook: str) -> str:
    if hook:
        store.d(hook)      # unknown hook -> WorkbenchError with the closest names
        return hook
    if len(store.hooks) == 1:
        return store.hooks[0]
    raise WorkbenchError(f"store {store.path} has {len(store.hooks)} hooks; choose one with --hook "
                         f"({', '.join(store.hooks[:8])}{' ...' if len(store.hooks) > 8 else ''})")


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


@register("pca", PCAConfig, help="PCA of one hook of an activation store (streamed, float64)")
def pca_step(cfg: PCAConfig) -> StepResult:
    from analyses.geometry import geometry_report
    from analyses.pca import PCA
    from ..results import prepare_out, write_result
    from ..store import ActivationStore
    from ._norms import REPORT_RATIO, check_ratio, massive, report, row_norms

    store = ActivationStore.open(cfg.store)
    hook = _pick_hook(store, cfg.hook)
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
    kept: list[torch.Tensor] = []

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
            yield b if n_keep == n else b[rows_kept]

    pca = PCA(cfg.k, method=cfg.method, whiten=cfg.whiten, device=cfg.device, precision=cfg.precision)
    try:
        pca.fit(stream())
    except ValueError as e:
        raise WorkbenchError(f"PCA of {hook} in {store.path}: {e}") from None
    outliers = report(norms, cfg.max_norm_ratio or REPORT_RATIO)
    sample = torch.cat(kept) if kept else torch.zeros((0, d))
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
        "method": cfg.method, "whiten": cfg.whiten, "n_samples": pca.n_samples_, "d": d,
        "explained_variance_ratio": evr.tolist(), "cumulative_variance_ratio": torch.cumsum(evr, 0).tolist(),
        "total_variance": pca.total_variance_, "geometry": geo, "n_sample_rows": int(sample_rows.numel()),
        "model_dir": "model", "max_norm_ratio": cfg.max_norm_ratio, "rows_dropped": n - n_keep,
        "massive_rows": outliers,
    }
    figs = _figures(pca, torch.as_tensor(proj), _token_labels(store, sample_rows), hook)
    write_result(out, "pca", data, tensors={k: v.detach().cpu() for k, v in tensors.items()}, figures=figs)
    metrics = {"explained_variance_ratio_k": float(evr.sum()), "n_samples": float(pca.n_samples_),
               "rows_dropped": float(n - n_keep), "massive_sq_norm_share": outliers["sq_norm_share"]}
    metrics.update({k: float(v) for k, v in geo.items() if isinstance(v, (int, float))})
    summary = {"out": str(out), "hook": hook, "k": cfg.k, "method": cfg.method, "n_samples": pca.n_samples_,
               "d": d, "explained_variance_ratio_k": float(evr.sum()), "rows_dropped": n - n_keep}
    if not cfg.max_norm_ratio and outliers["sq_norm_share"] > 0.5:
        summary["warning"] = (f"{outliers['rows']} rows ({100 * outliers['row_fraction']:.2f}%) with norms over "
                              f"{REPORT_RATIO:g}x the median carry {100 * outliers['sq_norm_share']:.0f}% of the "
                              f"squared norm (attention sinks); --max-norm-ratio {REPORT_RATIO:g} drops them")
    return StepResult(
        summary=summary,
        metrics=metrics,
        artifacts={"result": str(out), "scree": str(out / "scree.html"),
                   "projection": str(out / "projection.html"), "model": str(out / "model")})


def load_pca_result(path: str | Path) -> dict[str, Any]:
    """result.json + tensors + the re-loaded PCA of a `pca` result folder."""
    from analyses.pca import PCA
    from ..results import read_result, read_tensors
    meta = read_result(path, "pca")
    return {"meta": meta, "tensors": read_tensors(path), "pca": PCA.load(Path(path) / meta["model_dir"])}
