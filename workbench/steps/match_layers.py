"""Step `match_layers`: the layer x layer matrix of several `match_saes` results (Lan et al.'s
"how many latents of layer i have a partner in layer j").

    workbench match-layers RESULT [RESULT ...] [--threshold R] --out PATH

Each input is a match of two SAEs on hooks of one model; cell (i, j) is the fraction of latents
(of the smaller SAE) with a MUTUAL one-to-one match at correlation >= r, recomputed from the
result's matched pairs (``pair_corr``, ``pair_mutual``) exactly as ``match_saes`` computes its own
``fraction_mutual_above_threshold``; also the matched-decoder SVCCA and its shuffled baseline where
the match scored them. The matrix is symmetric; the diagonal and pairs not given are null. Sweeps
add this step by themselves for ``[match_saes] pairs = "layer"`` (``workbench.sweep.pairs``).

Result (kind "match_layers"): result.json {hooks, threshold, fraction, svcca, svcca_baseline,
matches: [{hook_a, hook_b, result}]}, fraction.html; read with ``read_match_layers_result``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError

KIND = "match_layers"


@dataclass
class MatchLayersConfig:
    results: list[str] = field(metadata=arg("match_saes result folders (SAEs on hooks of one model)",
                                            positional=True, role="result"))
    threshold: float = field(default=0.0, metadata=arg(
        "a match counts at correlation >= this (0: the threshold each match_saes result used)"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/match-layers-...)",
                                              role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def _layer_key(hook: str) -> tuple[int, str]:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return (int(m.group(1)) if m else -1, hook)


def layer_matrix(paths: list[str], threshold: float = 0.0) -> dict[str, Any]:
    """The JSON-able matrices of the module docstring from match_saes result folders."""
    from .match import read_match_result
    if not paths:
        raise WorkbenchError("match-layers needs at least one match_saes result folder")
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    model, thr, matches = None, None, []
    for p in paths:
        r = read_match_result(p)
        ha, hb = r.meta.get("hook_a"), r.meta.get("hook_b")
        ma, mb = r.meta.get("model_a"), r.meta.get("model_b")
        if ma != mb or ha == hb:
            raise WorkbenchError(f"{p}: match-layers takes matches of two hooks of one model; this one is "
                                 f"{ma} {ha} vs {mb} {hb}")
        if model is not None and ma != model:
            raise WorkbenchError(f"{p}: model {ma!r}, but the other results are of {model!r}")
        model = ma
        if (ha, hb) in cells or (hb, ha) in cells:
            raise WorkbenchError(f"{p}: a second result for hooks {ha} and {hb}; give one per pair")
        r_thr = threshold or r.threshold
        if thr is not None and r_thr != thr:
            raise WorkbenchError(f"{p}: matched at threshold {r_thr}, the others at {thr}; pass --threshold")
        thr = r_thr
        n_small = min(r.d_sae_a, r.d_sae_b)
        frac = float(((r.pair_corr >= r_thr) & r.pair_mutual).sum()) / max(n_small, 1)
        sv = r.scores.get("svcca") or {}
        cells[(ha, hb)] = {"fraction": frac, "svcca": sv.get("score"), "svcca_baseline": sv.get("baseline_mean")}
        matches.append({"hook_a": ha, "hook_b": hb, "result": str(p), "fraction": frac})
    hooks = sorted({h for pair in cells for h in pair}, key=_layer_key)
    idx = {h: i for i, h in enumerate(hooks)}
    mats = {k: [[None] * len(hooks) for _ in hooks] for k in ("fraction", "svcca", "svcca_baseline")}
    for (ha, hb), c in cells.items():
        for k, M in mats.items():
            M[idx[ha]][idx[hb]] = M[idx[hb]][idx[ha]] = c[k]
    return {"model": model, "hooks": hooks, "threshold": float(thr), **mats, "matches": matches}


def _figure(d: dict[str, Any]):
    import plotly.graph_objects as go
    labels = [h.replace("blocks.", "L").replace(".hook_", " ") for h in d["hooks"]]
    fig = go.Figure(go.Heatmap(z=d["fraction"], x=labels, y=labels, zmin=0, zmax=1, colorscale="Viridis",
                               colorbar=dict(title="fraction"), texttemplate="%{z:.2f}"))
    fig.update_layout(template="plotly_white", title=f"{d['model']}: fraction of latents with a mutual "
                      f"match at r >= {d['threshold']:g}", yaxis_autorange="reversed")
    return fig


@register(KIND, MatchLayersConfig, help="layer x layer matrix of match_saes results (fraction matched)")
def match_layers_step(cfg: MatchLayersConfig) -> StepResult:
    from ..results import prepare_out, write_result
    if not cfg.results:
        raise WorkbenchError("match-layers needs at least one match_saes result folder")
    out = default_out(cfg.out, cfg.results[0], "results", f"match-layers-{Path(cfg.results[0]).name}")
    if (out / "result.json").exists() and not cfg.overwrite:
        prepare_out(out, False, "match-layers result")      # raises the standard message
    d = layer_matrix(cfg.results, cfg.threshold)
    prepare_out(out, cfg.overwrite, "match-layers result")
    write_result(out, KIND, d, figures={"fraction": _figure(d)})
    off = [x for i, row in enumerate(d["fraction"]) for j, x in enumerate(row) if i != j and x is not None]
    metrics = {"n_hooks": float(len(d["hooks"])), "fraction_mean": sum(off) / len(off) if off else 0.0}
    summary = {"out": str(out), "hooks": d["hooks"], "threshold": d["threshold"],
               "fraction": [[None if x is None else round(x, 4) for x in row] for row in d["fraction"]]}
    return StepResult(summary=summary, metrics=metrics,
                      artifacts={"result": str(out), "figure": str(out / "fraction.html")})


@dataclass(frozen=True)
class MatchLayersResult:
    """A "match_layers" result folder (``read_match_layers_result``); matrices are hooks x hooks,
    None on the diagonal and where no match was given."""
    path: Path
    model: str
    hooks: list[str]
    threshold: float
    fraction: list[list[float | None]]
    svcca: list[list[float | None]]
    svcca_baseline: list[list[float | None]]
    matches: list[dict[str, Any]]


def read_match_layers_result(path: str | Path) -> MatchLayersResult:
    """The one reader of a "match_layers" result (WorkbenchError for another kind or a missing key)."""
    from ..results import read_result
    m = read_result(path, KIND)
    try:
        return MatchLayersResult(Path(path), m["model"], list(m["hooks"]), float(m["threshold"]), m["fraction"],
                                 m["svcca"], m["svcca_baseline"], list(m["matches"]))
    except KeyError as e:
        raise WorkbenchError(f"{path}: the match_layers result has no {e.args[0]!r}; rerun match-layers") from None
