"""Step `subspace`: how many directions each hook of a store really uses, layer by layer.

    workbench subspace STORE [--hooks 'blocks.*.hook_attn_out' ...] [--max-norm-ratio 10] --out PATH

Per hook (attention outputs, MLP outputs, the residual stream; whatever the store holds), from one
streamed float64 covariance: the number of principal directions for 90% / 99% of the variance (Wang
et al. 2025, "Attention Layers Add Into Low-Dimensional Residual Subspaces": attention outputs need
about 60% of the directions for 99%, residual and MLP outputs ~90%), effective rank (RankMe),
participation ratio, the spread measures recommended by Marbut et al. 2023 (``pc_spread`` = 1 - EEE,
``eigen_entropy``) and, on a seeded subsample of rows, TwoNN intrinsic dimension (Facco et al. 2017)
plus the two measures Marbut et al. found unreliable (average cosine, I(V)), named ``unreliable_*``.

Massive-norm rows (attention sinks; see ``_norms``) own most of the variance of some hooks, so every
number is computed twice: ``dropped`` (rows over ``max_norm_ratio`` x the median norm of that hook left
out; the headline) and ``all`` rows.

Result folder (kind "subspace"; read it with ``read_subspace_result(path) -> SubspaceResult``):
``result.json`` {"store", "model", "max_norm_ratio", "twonn_rows", "seed", "hooks": [{"hook",
"component", "layer", "d", "n_rows", "massive_rows", "dropped": {metrics}, "all": {metrics}}]};
``tensors.safetensors``: ``eig_dropped.<i>`` / ``eig_all.<i>`` covariance spectra (descending) of hook i;
one plotly figure per component kind (curves over layers: ``<component>.html``) and ``overview.html``
(fraction of directions for 99% variance, every component on one plot).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError
from ..hooks import select_hooks
from . import StepResult, arg, default_out, register
from ._norms import DEFAULT_RATIO, REPORT_RATIO, check_ratio, massive, report, row_norms

VARIANTS = ("dropped", "all")
# curves drawn per component (all in [0, 1]; the ones counted in directions are divided by d)
CURVES = {"frac_dirs_90": "directions for 90% / d", "frac_dirs_99": "directions for 99% / d",
          "effective_rank_frac": "effective rank / d", "pc_spread": "PC spread (1 - EEE)",
          "eigen_entropy": "eigenvalue entropy / log d", "twonn_frac": "TwoNN dimension / d"}


@dataclass
class SubspaceConfig:
    store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
    hooks: list[str] = field(default_factory=list, metadata=arg(
        "hooks or patterns to analyse (default: every hook of the store)", role="hooks"))
    max_norm_ratio: float = field(default=DEFAULT_RATIO, metadata=arg(
        "rows over R x the median row norm count as massive (attention sinks; default 10); every measure "
        "is reported with them dropped and with all rows. 0: no row is massive"))
    twonn_rows: int = field(default=2000, metadata=arg(
        "rows sampled (seeded) for TwoNN, average cosine and I(V) (TwoNN is O(n^2))"))
    seed: int = field(default=0, metadata=arg("seed of the row sample"))
    batch_size: int = field(default=16384, metadata=arg("rows read per batch"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/subspace-STORE)",
                                              role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def component_of(hook: str) -> str:
    """The kind of activation a hook holds: attn_out, mlp_out, resid_post, ... (for grouping curves)."""
    h = hook.lower()
    rest = re.sub(r"^blocks\.\d+\.", "", h)
    if "attn" in rest and ("out" in rest or "result" in rest):
        return "attn_out"                      # hook_attn_out, attn.hook_out, attn.o.hook_out (BERT)
    if "mlp" in rest and "out" in rest:
        return "mlp_out"
    return rest.replace("hook_", "").replace("..", ".").strip(".") or rest


def layer_of(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else -1


def _measures(eig: torch.Tensor, sample: torch.Tensor, d: int, twonn_rows: int, seed: int) -> dict[str, float]:
    from analyses.geometry import geometry_report
    from analyses.spread import spread_report
    geo = geometry_report(eig)
    sp = spread_report(eig, sample if sample.shape[0] >= 3 else None, twonn_rows=twonn_rows, seed=seed)
    out = {k: float(v) for k, v in {**geo, **sp}.items()}
    out["effective_rank_frac"] = out["effective_rank"] / d
    if "twonn_id" in out:
        out["twonn_frac"] = out["twonn_id"] / d
    out["n_rows"] = float(sample.shape[0])            # overwritten by the caller with the covariance rows
    return out


def _one_hook(store, hook: str, cfg: SubspaceConfig, dev: torch.device, sample_idx: torch.Tensor) -> tuple[dict, dict]:
    from analyses.moments import MomentAccumulator, small_linalg
    d, n = store.d(hook), store.n_rows
    norms = row_norms(store, hook, cfg.batch_size)
    big = massive(norms, cfg.max_norm_ratio) if cfg.max_norm_ratio else torch.zeros(n, dtype=torch.bool)
    keep = ~big
    acc = {"all": MomentAccumulator(d, dev, name=hook, precision="auto"),
           "dropped": MomentAccumulator(d, dev, name=hook, precision="auto")}
    picked: list[torch.Tensor] = []
    start = 0
    for b in store.batches(hook, cfg.batch_size, shuffle=False):
        stop = start + b.shape[0]
        acc["all"].update(b)
        k = keep[start:stop]
        acc["dropped"].update(b if bool(k.all()) else b[k])
        lo, hi = int(torch.searchsorted(sample_idx, start)), int(torch.searchsorted(sample_idx, stop))
        if hi > lo:
            picked.append(b[sample_idx[lo:hi] - start].to(torch.float32).clone())
        start = stop
    sample = torch.cat(picked) if picked else torch.zeros((0, d))
    sample_keep = sample[keep[sample_idx]] if sample.shape[0] else sample
    rec: dict[str, Any] = {"hook": hook, "component": component_of(hook), "layer": layer_of(hook), "d": d,
                           "n_rows": n, "massive_rows": report(norms, cfg.max_norm_ratio or REPORT_RATIO),
                           "rows_dropped": int(big.sum())}
    eigs = {}
    for v, rows in (("dropped", sample_keep), ("all", sample)):
        a = acc[v]
        if a.n < 2:
            raise WorkbenchError(f"{hook}: fewer than 2 rows left after --max-norm-ratio {cfg.max_norm_ratio}")
        cov = a.covariance()
        with small_linalg(cov):
            eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0).cpu()
        eigs[v] = eig
        m = _measures(eig, rows, d, cfg.twonn_rows, cfg.seed)
        m["n_rows"] = float(a.n)
        rec[v] = m
    return rec, eigs


def _figures(records: list[dict]) -> dict[str, Any]:
    import plotly.graph_objects as go
    figs: dict[str, Any] = {}
    comps = list(dict.fromkeys(r["component"] for r in records))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for comp in comps:
        rs = sorted((r for r in records if r["component"] == comp), key=lambda r: r["layer"])
        fig = go.Figure()
        for i, (key, label) in enumerate(CURVES.items()):
            for v, dash in (("dropped", "solid"), ("all", "dot")):
                ys = [r[v].get(key) for r in rs]
                if all(y is None for y in ys):
                    continue
                fig.add_scatter(x=[r["layer"] for r in rs], y=ys, mode="lines+markers",
                                name=f"{label} ({'sinks dropped' if v == 'dropped' else 'all rows'})",
                                line=dict(color=palette[i % len(palette)], dash=dash),
                                legendgroup=key, hovertext=[r["hook"] for r in rs])
        fig.update_layout(title=f"{comp}: directions used and spread over layers (solid: massive-norm rows "
                                f"dropped; dotted: all rows)", xaxis_title="layer",
                          yaxis=dict(title="fraction", range=[0, 1.02]), template="plotly_white")
        figs[_safe(comp)] = fig
    ov = go.Figure()
    for i, comp in enumerate(comps):
        rs = sorted((r for r in records if r["component"] == comp), key=lambda r: r["layer"])
        for key, dash in (("frac_dirs_99", "solid"), ("frac_dirs_90", "dash")):
            ov.add_scatter(x=[r["layer"] for r in rs], y=[r["dropped"][key] for r in rs], mode="lines+markers",
                           name=f"{comp}: {key[-2:]}%", line=dict(color=palette[i % len(palette)], dash=dash),
                           hovertext=[r["hook"] for r in rs])
    ov.update_layout(title="Fraction of principal directions for 99% (solid) / 90% (dashed) of the variance "
                           "(massive-norm rows dropped)", xaxis_title="layer",
                     yaxis=dict(title="directions / d", range=[0, 1.02]), template="plotly_white")
    figs["overview"] = ov
    return figs


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@register("subspace", SubspaceConfig, help="directions for 90/99% variance, effective rank, spread and TwoNN "
                                           "intrinsic dimension of every hook, over layers", produces="result")
def subspace_step(cfg: SubspaceConfig) -> StepResult:
    from analyses._util import resolve_device
    from ..results import prepare_out, write_result
    from ..store import ActivationStore

    store = ActivationStore.open(cfg.store)
    hooks = select_hooks(store.hooks, cfg.hooks, keep_order=True, where=f"store {store.path}") if cfg.hooks \
        else list(store.hooks)
    check_ratio(cfg.max_norm_ratio)
    if cfg.twonn_rows < 3:
        raise WorkbenchError(f"--twonn-rows must be >= 3 (TwoNN needs two neighbours per row), got {cfg.twonn_rows}")
    if cfg.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if store.n_rows < 3:
        raise WorkbenchError(f"store {store.path} has {store.n_rows} rows; the subspace step needs at least 3")
    out = default_out(cfg.out, cfg.store, "results", f"subspace-{_safe(Path(cfg.store).name)}")
    prepare_out(out, cfg.overwrite, "subspace result")
    dev = resolve_device(cfg.device)
    g = torch.Generator().manual_seed(int(cfg.seed))
    m = min(cfg.twonn_rows, store.n_rows)
    sample_idx = torch.randperm(store.n_rows, generator=g)[:m].sort().values     # same rows for every hook
    records, tensors = [], {}
    for i, hook in enumerate(hooks):
        rec, eigs = _one_hook(store, hook, cfg, dev, sample_idx)
        records.append(rec)
        for v in VARIANTS:
            tensors[f"eig_{v}.{i}"] = eigs[v].float()
    data = {"store": str(Path(cfg.store)), "model": store.model_name, "max_norm_ratio": cfg.max_norm_ratio,
            "twonn_rows": m, "seed": cfg.seed, "hooks": records}
    write_result(out, "subspace", data, tensors=tensors, figures=_figures(records))
    metrics: dict[str, float] = {"hooks": float(len(records))}
    for comp in dict.fromkeys(r["component"] for r in records):
        rs = [r for r in records if r["component"] == comp]
        for key in ("frac_dirs_90", "frac_dirs_99", "pc_spread", "twonn_id"):
            vals = [r["dropped"].get(key) for r in rs if r["dropped"].get(key) is not None]
            if vals:
                metrics[f"{_safe(comp)}.{key}_mean"] = float(sum(vals) / len(vals))
    table = [{"hook": r["hook"], "n_dirs_90": int(r["dropped"]["n_dirs_90"]),
              "n_dirs_99": int(r["dropped"]["n_dirs_99"]), "d": r["d"],
              "twonn_id": round(r["dropped"].get("twonn_id", math.nan), 2),
              "rows_dropped": r["rows_dropped"]} for r in records]
    return StepResult(summary={"out": str(out), "hooks": len(records), "table": table},
                      metrics=metrics,
                      artifacts={"result": str(out), **{k: str(out / f"{k}.html") for k in _figures_names(records)}})


def _figures_names(records: list[dict]) -> list[str]:
    return [_safe(c) for c in dict.fromkeys(r["component"] for r in records)] + ["overview"]


@dataclass(frozen=True)
class SubspaceResult:
    """A "subspace" result folder as everything reads it: ``read_subspace_result``."""
    path: Path
    store: str
    model: str | None
    max_norm_ratio: float
    twonn_rows: int
    hooks: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        from ..results import read_tensors
        return read_tensors(self.path)

    @property
    def hook_names(self) -> list[str]:
        return [r["hook"] for r in self.hooks]

    def record(self, hook: str) -> dict[str, Any]:
        for r in self.hooks:
            if r["hook"] == hook:
                return r
        from ..errors import closest
        raise WorkbenchError(f"{self.path}: no hook {hook!r}; closest: {closest(hook, self.hook_names)}")

    def eigenvalues(self, hook: str, variant: str = "dropped") -> torch.Tensor:
        """Covariance spectrum (descending) of one hook."""
        if variant not in VARIANTS:
            raise WorkbenchError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.record(hook)
        return self.tensors[f"{'eig_' + variant}.{self.hook_names.index(hook)}"]

    def curve(self, component: str, metric: str, variant: str = "dropped") -> tuple[list[int], list[float]]:
        """(layers, values) of one metric for one component kind, sorted by layer."""
        rs = sorted((r for r in self.hooks if r["component"] == component), key=lambda r: r["layer"])
        if not rs:
            comps = sorted({r["component"] for r in self.hooks})
            raise WorkbenchError(f"{self.path}: no component {component!r}; components: {', '.join(comps)}")
        return [r["layer"] for r in rs], [r[variant].get(metric, math.nan) for r in rs]


def read_subspace_result(path: str | Path) -> SubspaceResult:
    """The one reader of a "subspace" result folder (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result
    m = read_result(path, "subspace")
    try:
        return SubspaceResult(path=Path(path), store=m["store"], model=m.get("model"),
                              max_norm_ratio=float(m.get("max_norm_ratio") or 0.0),
                              twonn_rows=int(m.get("twonn_rows") or 0), hooks=list(m["hooks"]), meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the subspace result has no {e.args[0]!r}; rerun the subspace step") from None
