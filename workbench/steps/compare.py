"""Step `compare`: layer x layer similarity matrices within one store or across two.

    workbench compare STORE_A [STORE_B] --metric linear_cka [--hooks-a H ...] [--hooks-b H ...]
                      [--align auto|position|document] [--max-rows N] --out PATH

Rows are aligned before comparing:

- ``position``: the same token in both stores — rows matched by (sequence, position). Needs the two
  stores to hold the same token sequences (``sequences()["token_ids"]`` equal); rows present in
  only one store (e.g. a BOS kept by one collector) are dropped.
- ``document``: different tokenisers — each document's rows are mean-pooled (doc ids from
  ``sequences()["doc_ids"]``) and documents present in both stores are compared. Needs both stores
  made from the same corpus (manifest "corpus" equal).
- ``auto``: one store, or equal token ids -> position; otherwise same corpus -> document;
  otherwise the step refuses and says why.

Result folder (kind "compare"): ``result.json`` {"kind": "compare", "version": 1, "metric", "align",
"store_a", "store_b", "hooks_a", "hooks_b", "labels_a", "labels_b", "matrix" [[...]] (rows = hooks_a),
"n_rows" (rows or documents compared), "n_available", "symmetric", "higher_is_similar", ...},
``tensors.safetensors`` {"matrix"}, ``heatmap.html``. ``compare_matrix(...)`` is the same computation
as a Python function returning that dict.
"""

from __future__ import annotations

import fnmatch
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError, closest
from ._norms import REPORT_RATIO, check_ratio, keep_rows, report

METRIC_CHOICES = ["linear_cka", "debiased_cka", "rbf_cka", "svcca", "pwcca", "procrustes", "mutual_knn"]
GRAM_METRICS = ("rbf_cka", "mutual_knn")      # build n x n matrices: fewer rows by default
DEFAULT_ROWS = 20_000
DEFAULT_GRAM_ROWS = 4_096


@dataclass
class CompareConfig:
    store_a: str = field(metadata=arg("activation store", positional=True))
    store_b: str = field(default="", metadata=arg("second store (default: compare store_a with itself)",
                                                  positional=True))
    hooks_a: list[str] = field(default_factory=list, metadata=arg(
        "hooks of store_a (names or globs; default: all)", flag=["--hooks"]))
    hooks_b: list[str] = field(default_factory=list, metadata=arg("hooks of store_b (default: all)"))
    metric: str = field(default="linear_cka", metadata=arg("similarity measure", choices=METRIC_CHOICES))
    align: str = field(default="auto", metadata=arg("row alignment across stores",
                                                    choices=["auto", "position", "document"]))
    max_rows: int = field(default=0, metadata=arg(
        f"rows (or documents) used, evenly spaced (0 = {DEFAULT_ROWS}; {DEFAULT_GRAM_ROWS} for rbf_cka "
        "and mutual_knn, which build n x n matrices; -1 = all)"))
    k: int = field(default=10, metadata=arg("neighbours for mutual_knn"))
    keep: float = field(default=0.99, metadata=arg("SVCCA: variance fraction (<= 1) or number of directions"))
    max_norm_ratio: float = field(default=0.0, metadata=arg(
        "drop rows whose norm is over R x the median in any compared hook (attention sinks / massive "
        "activations; e.g. 10); with --align document they leave the document means; 0 keeps every row"))
    precision: str = field(default="float32", metadata=arg(
        "dtype of the cross products (summed in float64)", choices=["float32", "float64"]))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/compare-...)"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


# --------------------------------------------------------------------------------------- helpers
def _open(store):
    from ..store import ActivationStore
    return store if isinstance(store, ActivationStore) else ActivationStore.open(store)


def _resolve_hooks(store, patterns: list[str] | None, which: str) -> list[str]:
    if not patterns:
        return list(store.hooks)
    out: list[str] = []
    for p in patterns:
        for part in ([p] if any(c in p for c in "*?[") else [x for x in re.split(r"[,\s]+", p) if x]):
            hits = [h for h in store.hooks if fnmatch.fnmatchcase(h, part)] if any(c in part for c in "*?[") \
                else ([part] if part in store.hooks else [])
            if not hits:
                raise WorkbenchError(f"{which}: no hook {part!r} in store {store.path}; it has: "
                                     f"{closest(part, store.hooks)}")
            out.extend(h for h in hits if h not in out)
    return out


def _even(n: int, m: int) -> torch.Tensor:
    """m evenly spaced indices of range(n) (all when m >= n)."""
    if m >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, m).round().long().unique()


def _gather(store, hook: str, rows: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """store rows `rows` (any order) of one hook as float32 [len(rows), d], streaming."""
    order = torch.argsort(rows)
    srt = rows[order]
    out = torch.empty((rows.numel(), store.d(hook)), dtype=torch.float32)
    start = 0
    for b in store.batches(hook, batch, shuffle=False):
        stop = start + b.shape[0]
        lo, hi = int(torch.searchsorted(srt, start)), int(torch.searchsorted(srt, stop))
        if hi > lo:
            out[order[lo:hi]] = b[srt[lo:hi] - start].to(torch.float32)
        start = stop
        if lo == rows.numel():
            break
    return out


def _pool(store, hook: str, doc_of_row: torch.Tensor, docs: torch.Tensor, keep: torch.Tensor | None = None,
          batch: int = 65536) -> torch.Tensor:
    """Mean over each document's rows (those in `keep`), for the documents `docs` (in that order):
    [len(docs), d]."""
    slot = torch.full((int(doc_of_row.max()) + 1 if doc_of_row.numel() else 1,), -1, dtype=torch.long)
    slot[docs] = torch.arange(docs.numel())
    d = store.d(hook)
    sums = torch.zeros((docs.numel(), d), dtype=torch.float64)
    counts = torch.zeros(docs.numel(), dtype=torch.float64)
    start = 0
    for b in store.batches(hook, batch, shuffle=False):
        stop = start + b.shape[0]
        s = slot[doc_of_row[start:stop]]
        ok = s >= 0
        if keep is not None:
            ok &= keep[start:stop]
        sums.index_add_(0, s[ok], b[ok].to(torch.float64))
        counts.index_add_(0, s[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        start = stop
    return sums / counts.clamp_min(1)[:, None]          # float64 (documents are few)


def _same_tokens(sa, sb) -> tuple[bool, str]:
    if sa.path.resolve() == sb.path.resolve():
        return True, ""
    ta, tb = sa.sequences()["token_ids"], sb.sequences()["token_ids"]
    if ta.shape != tb.shape:
        return False, (f"token_ids have different shapes ({tuple(ta.shape)} in {sa.path}, "
                       f"{tuple(tb.shape)} in {sb.path})")
    if not torch.equal(ta, tb):
        bad = int((ta != tb).any(1).nonzero()[0, 0])
        return False, f"token_ids differ (first at sequence {bad})"
    return True, ""


def _same_corpus(sa, sb) -> tuple[bool, str]:
    ca, cb = sa.manifest.get("corpus"), sb.manifest.get("corpus")
    if ca is None or cb is None:
        return False, f"a store does not record its corpus (corpus: {ca!r} vs {cb!r})"
    if ca != cb:
        return False, f"the stores come from different corpora ({ca!r} vs {cb!r})"
    return True, ""


def _align_position(sa, sb) -> tuple[torch.Tensor, torch.Tensor]:
    ra, rb = sa.rows(), sb.rows()
    L = max(sa.seq_len, 1)
    ka = ra["seq_index"] * L + ra["position"]
    kb = rb["seq_index"] * L + rb["position"]
    common, ia, ib = _intersect(ka, kb)
    return ia, ib


def _intersect(ka: torch.Tensor, kb: torch.Tensor):
    """Common keys (sorted) and the index of each in ka and kb (first occurrence)."""
    ua, inv_a = torch.unique(ka, return_inverse=True)
    ub, inv_b = torch.unique(kb, return_inverse=True)
    first_a = torch.full((ua.numel(),), ka.numel(), dtype=torch.long).scatter_reduce(
        0, inv_a, torch.arange(ka.numel()), "amin")
    first_b = torch.full((ub.numel(),), kb.numel(), dtype=torch.long).scatter_reduce(
        0, inv_b, torch.arange(kb.numel()), "amin")
    in_b = torch.isin(ua, ub)
    common = ua[in_b]
    ia = first_a[in_b]
    ib = first_b[torch.searchsorted(ub, common)]
    return common, ia, ib


def _doc_of_rows(store) -> torch.Tensor:
    return store.sequences()["doc_ids"][store.rows()["seq_index"]]


# --------------------------------------------------------------------------------------- API
def compare_matrix(store_a: Any, store_b: Any = None, hooks_a: list[str] | None = None,
                   hooks_b: list[str] | None = None, metric: str = "linear_cka", align: str = "auto",
                   max_rows: int = 0, k: int = 10, keep: float = 0.99, precision: str = "float32",
                   device: str = "auto", progress: Callable[[int, int], None] | None = None,
                   max_norm_ratio: float = 0.0) -> dict[str, Any]:
    """Similarity matrix between the hooks of one store (or of two stores).

    Returns {"matrix": Tensor[len(hooks_a), len(hooks_b)] (float64), "labels_a", "labels_b",
    "hooks_a", "hooks_b", "metric", "align" ("position" | "document"), "n_rows" (rows or documents
    compared), "n_available", "symmetric", "seconds"}. Raises WorkbenchError when the stores cannot
    be aligned, naming why."""
    from analyses.similarity import similarity_matrix

    t0 = time.time()
    if metric not in METRIC_CHOICES:
        raise WorkbenchError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_CHOICES)}")
    if align not in ("auto", "position", "document"):
        raise WorkbenchError(f"align must be auto, position or document, got {align!r}")
    sa = _open(store_a)
    sb = _open(store_b) if store_b not in (None, "") else None
    one = sb is None or sa.path.resolve() == sb.path.resolve()
    sb_eff = sa if sb is None else sb
    ha = _resolve_hooks(sa, hooks_a, "hooks_a")
    hb = _resolve_hooks(sb_eff, hooks_b, "hooks_b") if (hooks_b or not one) else list(ha)

    # ---- alignment
    if one:
        mode = "position" if align in ("auto", "position") else "document"
    else:
        same_tok, why_tok = _same_tokens(sa, sb)
        if align == "position" and not same_tok:
            raise WorkbenchError(f"cannot align {sa.path} and {sb.path} by position: {why_tok}. "
                                 "Stores from different tokenisers can be compared with --align document")
        if align == "auto":
            if same_tok:
                mode = "position"
            else:
                ok, why_doc = _same_corpus(sa, sb)
                if not ok:
                    raise WorkbenchError(f"cannot align {sa.path} and {sb.path}: not the same tokens "
                                         f"({why_tok}) and not the same documents ({why_doc}). Collect both "
                                         "stores from the same corpus")
                mode = "document"
        else:
            mode = align
        if mode == "document" and align == "document":
            ok, why_doc = _same_corpus(sa, sb)
            if not ok:
                raise WorkbenchError(f"cannot align {sa.path} and {sb.path} by document: {why_doc}")

    gram = metric in GRAM_METRICS
    cap = (DEFAULT_GRAM_ROWS if gram else DEFAULT_ROWS) if max_rows == 0 else max_rows
    check_ratio(max_norm_ratio)
    keep_a = keep_rows(sa, list(dict.fromkeys(ha + (hb if one else []))), max_norm_ratio)
    keep_b = keep_a if one else keep_rows(sb_eff, hb, max_norm_ratio)
    dropped = 0
    if mode == "position":
        if one:
            ia = ib = torch.arange(sa.n_rows)
        else:
            ia, ib = _align_position(sa, sb)
            if ia.numel() == 0:
                raise WorkbenchError(f"{sa.path} and {sb.path} share no (sequence, position) rows")
        ok = keep_a[ia] & keep_b[ib]
        dropped = int((~ok).sum())
        ia, ib = ia[ok], ib[ok]
        n_avail = int(ia.numel())
        sel = _even(n_avail, cap) if cap > 0 else torch.arange(n_avail)
        ia, ib = ia[sel], ib[sel]

        def load_a(h):
            return _gather(sa, h, ia)

        def load_b(h):
            return _gather(sb_eff, h, ib)
    else:
        da, db = _doc_of_rows(sa), _doc_of_rows(sb_eff)
        docs = torch.unique(da)
        docs = docs[torch.isin(docs, torch.unique(db))]
        if docs.numel() == 0:
            raise WorkbenchError(f"{sa.path} and {sb_eff.path} have no document in common")
        n_avail = int(docs.numel())
        docs = docs[_even(n_avail, cap)] if cap > 0 else docs

        dropped = int((~keep_a).sum()) + (0 if one else int((~keep_b).sum()))

        def load_a(h):
            return _pool(sa, h, da, docs, keep_a)

        def load_b(h):
            return _pool(sb_eff, h, db, docs, keep_b)
    n = int(ia.numel()) if mode == "position" else int(docs.numel())
    if n < 4:
        raise WorkbenchError(f"only {n} aligned {'rows' if mode == 'position' else 'documents'}; "
                             "need at least 4 to compare")
    if metric == "mutual_knn" and k >= n:
        raise WorkbenchError(f"--k {k} must be smaller than the number of rows compared ({n})")
    if metric in ("pwcca",):
        widest = max([sa.d(h) for h in ha] + [sb_eff.d(h) for h in hb])
        if n <= widest:
            raise WorkbenchError(f"{metric} needs more rows than neurons: {n} rows, hooks up to d={widest}; "
                                 "raise --max-rows or use svcca")

    reps_a = [load_a(h) for h in ha]
    sym = one and hb == ha
    reps_b = None if sym else [load_b(h) for h in hb]
    # how much of each compared representation sits in a few huge-norm rows (attention sinks)
    share = max(report(torch.linalg.vector_norm(r.float(), dim=1))["sq_norm_share"]
                for r in reps_a + (reps_b or []))
    keep_v: int | float = int(keep) if keep > 1 else float(keep)
    try:
        M = similarity_matrix(reps_a, reps_b, metric, dtype=precision, keep=keep_v, k=k,
                              device=device, progress=progress)
    except ValueError as e:
        raise WorkbenchError(f"compare ({metric}): {e}") from None
    return {"matrix": M, "hooks_a": ha, "hooks_b": hb, "labels_a": list(ha), "labels_b": list(hb),
            "metric": metric, "align": mode, "n_rows": n, "n_available": n_avail, "symmetric": sym,
            "max_norm_ratio": float(max_norm_ratio), "rows_dropped": dropped,
            "massive_sq_norm_share_max": share,
            "store_a": str(sa.path), "store_b": str(sb_eff.path), "seconds": time.time() - t0}


def _heatmap(res: dict[str, Any]):
    import plotly.graph_objects as go

    M = res["matrix"]
    dist = res["metric"] == "procrustes"
    z = [[None if v != v else float(v) for v in row] for row in M.tolist()]
    fig = go.Figure(go.Heatmap(
        z=z, x=res["labels_b"], y=res["labels_a"], colorscale="Viridis", reversescale=dist,
        zmin=0.0, zmax=(3.141592653589793 / 2 if dist else 1.0),
        colorbar=dict(title="radians" if dist else res["metric"]),
        hovertemplate="A: %{y}<br>B: %{x}<br>value: %{z:.4f}<extra></extra>"))
    same = res["store_a"] == res["store_b"]
    fig.update_layout(
        title=f"{res['metric']} ({res['align']} alignment, {res['n_rows']} "
              f"{'rows' if res['align'] == 'position' else 'documents'})",
        xaxis_title=("hooks" if same else f"B: {Path(res['store_b']).name}"),
        yaxis_title=("hooks" if same else f"A: {Path(res['store_a']).name}"),
        yaxis=dict(autorange="reversed"), template="plotly_white")
    return fig


@register("compare", CompareConfig, help="layer x layer similarity (CKA, SVCCA, PWCCA, Procrustes, k-NN)")
def compare_step(cfg: CompareConfig) -> StepResult:
    from ..results import prepare_out, write_result

    name = Path(cfg.store_a).name + (f"-vs-{Path(cfg.store_b).name}" if cfg.store_b else "")
    out = default_out(cfg.out, cfg.store_a, "results", f"compare-{name}-{cfg.metric}")
    if out.exists() and (out / "result.json").exists() and not cfg.overwrite:
        prepare_out(out, False, "compare result")     # raises the standard message

    def progress(i, total):
        if total >= 20 and (i == total or i % max(1, total // 10) == 0):
            print(f"compare: {i}/{total} pairs", file=sys.stderr, flush=True)

    res = compare_matrix(cfg.store_a, cfg.store_b or None, cfg.hooks_a or None, cfg.hooks_b or None,
                         metric=cfg.metric, align=cfg.align, max_rows=cfg.max_rows, k=cfg.k, keep=cfg.keep,
                         precision=cfg.precision, device=cfg.device, progress=progress,
                         max_norm_ratio=cfg.max_norm_ratio)
    prepare_out(out, cfg.overwrite, "compare result")
    M = res["matrix"]
    data = {k: v for k, v in res.items() if k != "matrix"}
    data["matrix"] = [[None if v != v else float(v) for v in row] for row in M.tolist()]
    data["higher_is_similar"] = cfg.metric != "procrustes"
    data["precision"] = cfg.precision
    if cfg.metric == "svcca":
        data["keep"] = cfg.keep
    if cfg.metric == "mutual_knn":
        data["k"] = cfg.k
    write_result(out, "compare", data, tensors={"matrix": M}, figures={"heatmap": _heatmap(res)})
    off = M.clone()
    if res["symmetric"] and M.shape[0] > 1:
        off.fill_diagonal_(float("nan"))
    vals = off[~torch.isnan(off)]
    metrics = {"n_rows": float(res["n_rows"]), "pairs": float(M.numel()), "rows_dropped": float(res["rows_dropped"])}
    if vals.numel():
        metrics.update({"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())})
    summary = {"out": str(out), "metric": cfg.metric, "align": res["align"], "n_rows": res["n_rows"],
               "shape": list(M.shape), "rows_dropped": res["rows_dropped"]}
    if res["massive_sq_norm_share_max"] > 0.5:
        summary["warning"] = (f"in some hook, rows with norms over {REPORT_RATIO:g}x the median carry "
                              f"{100 * res['massive_sq_norm_share_max']:.0f}% of the squared norm (attention sinks): "
                              f"the scores mostly compare those rows"
                              + ("" if cfg.max_norm_ratio else f"; --max-norm-ratio {REPORT_RATIO:g} drops them"))
    return StepResult(
        summary=summary,
        metrics=metrics,
        artifacts={"result": str(out), "heatmap": str(out / "heatmap.html")})


def load_compare_result(path: str | Path) -> dict[str, Any]:
    from ..results import read_result, read_tensors
    meta = read_result(path, "compare")
    return {"meta": meta, "matrix": read_tensors(path).get("matrix")}
