"""Readers of the "pca" and "compare" result folders for the pages (plain lookups of what the
steps wrote; the formats are documented in workbench/steps/pca.py and compare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.ui import common


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _first(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


# ------------------------------------------------------------------ pca
def pca_spectrum(path: Path, meta: dict | None = None) -> tuple[list[float], list[float]]:
    """(explained-variance ratio per component, cumulative ratio) of a pca result."""
    meta = meta if meta is not None else common.read_result_checked(path, "pca")
    t = common.tensors_of(path)
    r = _first(meta, "explained_variance_ratio", "explained_variance_ratio_")
    if r is None:
        r = _first(t, "explained_variance_ratio", "explained_variance_ratio_")
    if r is None:
        raise WorkbenchError(f"{path}: the pca result has no explained_variance_ratio")
    r = _np(r).astype(float).ravel()
    cum = _first(meta, "cumulative_variance_ratio", "cumulative")
    if cum is None:
        cum = _first(t, "cumulative_variance_ratio")
    cum = np.cumsum(r) if cum is None else _np(cum).astype(float).ravel()
    return r.tolist(), cum.tolist()


GEOMETRY_LABELS = {
    "participation_ratio": "participation ratio",
    "n_dirs_90": "directions for 90% var.",
    "n_dirs_99": "directions for 99% var.",
    "effective_rank": "effective rank",
    "anisotropy": "anisotropy",
    "top1_variance_ratio": "top-1 variance ratio",
    "d": "d",
}
_GEOM_ALIASES = {
    "participation_ratio": ("participation_ratio",),
    "n_dirs_90": ("n_dirs_90", "n_components_90"),
    "n_dirs_99": ("n_dirs_99", "n_components_99"),
    "effective_rank": ("effective_rank",),
    "anisotropy": ("anisotropy",),
    "top1_variance_ratio": ("top1_variance_ratio",),
    "d": ("d",),
}


def pca_geometry(meta: dict) -> dict[str, Any]:
    """The geometry numbers stored with a pca result (whatever of them it has)."""
    src = {k: v for k, v in meta.items() if k == "d"}
    for k in ("geometry", "metrics"):
        if isinstance(meta.get(k), dict):
            src.update(meta[k])
    out = {}
    for key, aliases in _GEOM_ALIASES.items():
        v = _first(src, *aliases)
        if v is not None:
            out[key] = v
    return out


def pca_projection(path: Path, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(coordinates [m, c] of the sampled rows as stored by the pca step, their store rows [m] or
    None = rows 0..m-1). The pca step stores the first two components."""
    meta = meta if meta is not None else common.read_result_checked(path, "pca")
    t = common.tensors_of(path)
    coords = _first(t, "projection", "projections", "scores")
    if coords is None:
        raise WorkbenchError(f"{path}: this pca result stores no projected rows to plot; rerun "
                             "the pca step (it saves a sample of projected rows)")
    rows = _first(t, "sample_rows", "rows")
    if rows is None and meta.get("sample_rows") is not None:
        rows = meta["sample_rows"]
    return _np(coords).astype(np.float32), (None if rows is None else _np(rows).astype(np.int64))


def pca_model(path: Path, meta: dict):
    """The fitted analyses.pca.PCA saved with the result (for components beyond the stored two)."""
    from analyses.pca import PCA
    sub = Path(path) / str(meta.get("model_dir") or "model")
    if not sub.exists():
        raise WorkbenchError(f"{path} has no saved PCA model ({sub.name}/); rerun the pca step to "
                             "plot components beyond PC1 and PC2")
    return PCA.load(sub)


def pca_source(meta: dict) -> tuple[str | None, str | None]:
    """(store path, hook) of a pca result."""
    return _first(meta, "store", "store_path"), _first(meta, "hook", "hook_name")


# ------------------------------------------------------------------ compare
def compare_matrices(path: Path) -> dict[str, dict[str, Any]]:
    """{metric name: {matrix [r, c], y_labels (rows), x_labels (cols), metric, store_a, store_b}}."""
    meta = common.read_result_checked(path, "compare")
    t = common.tensors_of(path)
    rows_l = _first(meta, "hooks_a", "labels_a")
    cols_l = _first(meta, "hooks_b", "labels_b", "hooks_a")
    store_a = _first(meta, "store_a", "store")
    store_b = _first(meta, "store_b", default=None) or store_a
    metrics = _first(meta, "metrics")
    metric = _first(meta, "metric")
    out: dict[str, dict[str, Any]] = {}
    names = []
    if isinstance(metrics, (list, tuple)):
        names = list(metrics)
    elif isinstance(metric, str):
        names = [metric]
    for name in names or ["matrix"]:
        m = _first(t, name, f"matrix_{name}", f"{name}_matrix")
        if m is None and len(names) <= 1:
            m = _first(t, "matrix", "values")
        if m is None and isinstance(meta.get("matrix"), list):
            m = meta["matrix"]
        if m is None and isinstance(meta.get("matrices"), dict):
            m = meta["matrices"].get(name)
        if m is None:
            continue
        m = _np(m).astype(float)
        yl = list(rows_l) if rows_l is not None else [str(i) for i in range(m.shape[0])]
        xl = list(cols_l) if cols_l is not None else [str(i) for i in range(m.shape[1])]
        out[str(name)] = {"matrix": m, "y_labels": yl, "x_labels": xl, "metric": str(name),
                          "store_a": store_a, "store_b": store_b}
    if not out:
        raise WorkbenchError(f"{path}: the compare result holds no matrix")
    return out
