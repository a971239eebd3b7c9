"""Step `compare`: layer x layer similarity matrices within one store or across two.

    workbench compare STORE_A [STORE_B] --metric linear_cka [--hooks-a H ...] [--hooks-b H ...]
                      [--align auto|position|document|token] [--max-rows N] --out PATH

Rows are aligned before comparing:

- ``position``: the same token in both stores — rows matched by (sequence, position). Needs the two
  stores to hold the same token sequences (``sequences()["token_ids"]`` equal); rows present in
  only one store (e.g. a BOS kept by one collector) are dropped.
- ``document``: different tokenisers — each document's rows are mean-pooled (doc ids from
  ``sequences()["doc_ids"]``) and documents present in both stores are compared. Needs both stores
  made from the same corpus (manifest "corpus" equal).
- ``token``: different tokenisers, token level — rows paired when they are the same document and
  their tokens end at the same character (``workbench.align``; stores collected with offsets).
- ``auto``: one store, or equal token ids -> position; otherwise same corpus -> document;
  otherwise the step refuses and says why.

Result folder (kind "compare"): ``result.json`` {"kind": "compare", "version": 1, "metric", "align",
"store_a", "store_b", "hooks_a", "hooks_b", "labels_a", "labels_b", "matrix" [[...]] (rows = hooks_a),
"n_rows" (rows or documents compared), "n_available", "symmetric", "higher_is_similar", ...},
``tensors.safetensors`` {"matrix"}, ``heatmap.html``; read it with ``read_compare_result(path) ->
CompareResult``. ``compare_matrix(...)`` is the same computation as a Python function returning that dict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError
from ..hooks import select_hooks
from ._norms import (DEFAULT_RATIO, REPORT_RATIO, ROGUE_EFFECT, ROGUE_SHARE, ROGUE_TOP, check_ratio,
                     drop_top_dims, is_rogue, keep_rows, report, rogue_report, rogue_text, standardize)

log = logging.getLogger(__name__)
METRIC_CHOICES = ["linear_cka", "debiased_cka", "rbf_cka", "svcca", "pwcca", "procrustes", "mutual_knn"]
GRAM_METRICS = ("rbf_cka", "mutual_knn")      # build n x n matrices: fewer rows by default
DEFAULT_ROWS = 20_000
DEFAULT_GRAM_ROWS = 4_096
# Fewest documents a document-level comparison accepts. Below it the scores are mostly the sample
# size: biased linear CKA of two INDEPENDENT isotropic representations (d = 576 and 384) is 0.98 on
# 9 documents, 0.90 on 50, 0.82 on 100, 0.70 on 200 (debiased CKA: ~0 at every n). So 50 is a
# floor, not a target: compare hundreds of documents, and prefer debiased_cka at document level.
MIN_DOCS = 50


@dataclass
class CompareConfig:
    store_a: str = field(metadata=arg("activation store", positional=True, role="store"))
    store_b: str = field(default="", metadata=arg("second store (default: compare store_a with itself)",
                                                  positional=True, role="store_b"))
    hooks_a: list[str] = field(default_factory=list, metadata=arg(
        "hooks of store_a (names or globs; default: all)", flag=["--hooks"], role="hooks"))
    hooks_b: list[str] = field(default_factory=list, metadata=arg("hooks of store_b (default: all)",
                                                                               role="hooks_b"))
    metric: str = field(default="linear_cka", metadata=arg("similarity measure", choices=METRIC_CHOICES))
    align: str = field(default="auto", metadata=arg("row alignment across stores",
                                                    choices=["auto", "position", "document", "token"]))
    max_rows: int = field(default=0, metadata=arg(
        f"rows (or documents) used, evenly spaced (0 = {DEFAULT_ROWS}; {DEFAULT_GRAM_ROWS} for rbf_cka "
        "and mutual_knn, which build n x n matrices; -1 = all)"))
    k: int = field(default=10, metadata=arg("neighbours for mutual_knn"))
    keep: float = field(default=0.99, metadata=arg("SVCCA: variance fraction (<= 1) or number of directions"))
    max_norm_ratio: float = field(default=DEFAULT_RATIO, metadata=arg(
        f"drop rows whose norm is over R x the median in any compared hook (attention sinks / massive "
        f"activations; default {DEFAULT_RATIO:g}); with --align document they leave the document means; "
        "0 keeps every row"))
    standardize: bool = field(default=False, metadata=arg(
        "z-score every dimension before the metric, so a few huge-variance 'rogue' dimensions do not "
        "decide the score (Timkey & van Schijndel 2021)"))
    drop_top_dims: int = field(default=0, metadata=arg(
        f"leave out each hook's N highest-variance dimensions before the metric (e.g. {ROGUE_TOP}; 0: none)"))
    precision: str = field(default="float32", metadata=arg(
        "dtype of the cross products (summed in float64)", choices=["float32", "float64"]))
    min_docs: int = field(default=MIN_DOCS, metadata=arg(
        "refuse a document-level comparison with fewer documents (biased CKA of unrelated "
        "representations is ~0.9 on 50 documents)"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/compare-...)",
                                                     role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


# --------------------------------------------------------------------------------------- helpers
def _open(store):
    from ..store import ActivationStore
    return store if isinstance(store, ActivationStore) else ActivationStore.open(store)


def _resolve_hooks(store, patterns: list[str] | None, which: str) -> list[str]:
    if not patterns:
        return list(store.hooks)
    return select_hooks(store.hooks, patterns, where=f"store {store.path} ({which})")


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
def _choose_align(sa, sb, one: bool, align: str) -> str:
    """The alignment mode to use ("position" | "token" | "document"); raises when `align` cannot work."""
    if one:
        return "position" if align in ("auto", "position", "token") else "document"
    same_tok, why_tok = _same_tokens(sa, sb)
    if align == "position" and not same_tok:
        raise WorkbenchError(f"cannot align {sa.path} and {sb.path} by position: {why_tok}. "
                             "Stores from different tokenisers can be compared with --align document")
    if align == "auto":
        if same_tok:
            return "position"
        ok, why_doc = _same_corpus(sa, sb)
        if not ok:
            raise WorkbenchError(f"cannot align {sa.path} and {sb.path}: not the same tokens "
                                 f"({why_tok}) and not the same documents ({why_doc}). Collect both "
                                 "stores from the same corpus")
        return "document"
    if align == "document":
        ok, why_doc = _same_corpus(sa, sb)
        if not ok:
            raise WorkbenchError(f"cannot align {sa.path} and {sb.path} by document: {why_doc}")
    return align


def _aligned_loaders(sa, sb, one: bool, mode: str, keep_a: torch.Tensor, keep_b: torch.Tensor, cap: int):
    """Pair rows (or documents) of the two stores, keeping at most `cap` (0: all).

    Returns (n compared, n available, rows dropped, load_a(hook), load_b(hook))."""
    if mode in ("position", "token"):
        if one:
            ia = ib = torch.arange(sa.n_rows)
        elif mode == "token":         # different tokenisers: same document and character end
            from ..align import align_tokens
            tok = align_tokens(sa, sb)
            ia, ib = tok["a"], tok["b"]
            if ia.numel() == 0:
                raise WorkbenchError(f"{sa.path} and {sb.path} share no token ends")
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
        return (int(ia.numel()), n_avail, dropped,
                lambda h: _gather(sa, h, ia), lambda h: _gather(sb, h, ib))
    da, db = _doc_of_rows(sa), _doc_of_rows(sb)
    docs = torch.unique(da)
    docs = docs[torch.isin(docs, torch.unique(db))]
    if docs.numel() == 0:
        raise WorkbenchError(f"{sa.path} and {sb.path} have no document in common")
    n_avail = int(docs.numel())
    docs = docs[_even(n_avail, cap)] if cap > 0 else docs
    dropped = int((~keep_a).sum()) + (0 if one else int((~keep_b).sum()))
    return (int(docs.numel()), n_avail, dropped,
            lambda h: _pool(sa, h, da, docs, keep_a), lambda h: _pool(sb, h, db, docs, keep_b))


def _check_enough(n: int, mode: str, min_docs: int, metric: str, k: int, widest: Callable[[], int]) -> None:
    """Refuse comparisons on too few rows for the metric (`widest()`: the widest hook compared)."""
    if n < 4:
        raise WorkbenchError(f"only {n} aligned {'rows' if mode != 'document' else 'documents'}; "
                             "need at least 4 to compare")
    if mode == "document" and n < min_docs:
        raise WorkbenchError(f"only {n} documents in common: a document-level comparison needs at least {min_docs} "
                             f"(on few documents the scores mostly reflect the sample size). Collect more documents "
                             f"(--windows-per-doc 1 keeps one window per document: ~max_tokens / seq_len "
                             f"documents) or lower --min-docs")
    if metric == "mutual_knn" and k >= n:
        raise WorkbenchError(f"--k {k} must be smaller than the number of rows compared ({n})")
    if metric in ("pwcca",):
        d = widest()
        if n <= d:
            raise WorkbenchError(f"{metric} needs more rows than neurons: {n} rows, hooks up to d={d}; "
                                 "raise --max-rows or use svcca")


def _scores(reps_a, reps_b, metric: str, precision: str, keep: float, k: int, device: str,
            progress, standardize_dims: bool, drop_top: int, rogue_any: bool, rogue_max: float):
    """The similarity matrix after the asked remedies, and the rogue-dimension check:
    without a remedy and with rogue dimensions present, the matrix again without each hook's top
    ROGUE_TOP dimensions, and how far the scores move."""
    from analyses.similarity import similarity_matrix

    keep_v: int | float = int(keep) if keep > 1 else float(keep)

    def matrix(ra, rb, prog):
        try:
            return similarity_matrix(ra, rb, metric, dtype=precision, keep=keep_v, k=k,
                                     device=device, progress=prog)
        except ValueError as e:
            raise WorkbenchError(f"compare ({metric}): {e}") from None

    def remedy(reps, fn):
        return None if reps is None else [fn(r) for r in reps]

    check: dict[str, Any] = {"done": False, "share_max": rogue_max, "threshold": ROGUE_SHARE, "top": ROGUE_TOP}
    if standardize_dims:
        reps_a, reps_b = remedy(reps_a, standardize), remedy(reps_b, standardize)
    if drop_top:
        reps_a = remedy(reps_a, lambda r: drop_top_dims(r, drop_top))
        reps_b = remedy(reps_b, lambda r: drop_top_dims(r, drop_top))
    M = matrix(reps_a, reps_b, progress)
    if not (standardize_dims or drop_top) and rogue_any:
        # does that handful of dimensions decide the scores? the same matrix without them
        M2 = matrix(remedy(reps_a, lambda r: drop_top_dims(r, ROGUE_TOP)),
                    remedy(reps_b, lambda r: drop_top_dims(r, ROGUE_TOP)), None)
        diff = (M - M2).abs()
        diff = diff[~torch.isnan(diff)]
        check.update(done=True, max_change=float(diff.max()) if diff.numel() else 0.0,
                     matrix_without_top=[[None if v != v else float(v) for v in row] for row in M2.tolist()])
    return M, check


def compare_matrix(store_a: Any, store_b: Any = None, hooks_a: list[str] | None = None,
                   hooks_b: list[str] | None = None, metric: str = "linear_cka", align: str = "auto",
                   max_rows: int = 0, k: int = 10, keep: float = 0.99, precision: str = "float32",
                   device: str = "auto", progress: Callable[[int, int], None] | None = None,
                   max_norm_ratio: float = DEFAULT_RATIO, standardize_dims: bool = False,
                   drop_top: int = 0, min_docs: int = MIN_DOCS) -> dict[str, Any]:
    """Similarity matrix between the hooks of one store (or of two stores).

    Returns {"matrix": Tensor[len(hooks_a), len(hooks_b)] (float64), "labels_a", "labels_b",
    "hooks_a", "hooks_b", "metric", "align" ("position" | "token" | "document"), "n_rows" (rows or documents
    compared), "n_available", "symmetric", "seconds", "rows_dropped" (+ "rows_dropped_by_hook"),
    "rogue_dims" {hook: share of variance in its top dimensions}, "rogue_check"}. Rows over
    `max_norm_ratio` x the median norm are left out (0 keeps them); `standardize_dims` z-scores
    every dimension and `drop_top` leaves out each hook's top-variance dimensions before the
    metric. Without either, when some hook has ROGUE_SHARE of its variance in ROGUE_TOP dimensions,
    the matrix is computed again without them and "rogue_check" says how much the scores move.
    Raises WorkbenchError when the stores cannot be aligned, naming why."""
    t0 = time.time()
    if metric not in METRIC_CHOICES:
        raise WorkbenchError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_CHOICES)}")
    if align not in ("auto", "position", "document", "token"):
        raise WorkbenchError(f"align must be auto, position, document or token, got {align!r}")
    sa = _open(store_a)
    sb = _open(store_b) if store_b not in (None, "") else None
    one = sb is None or sa.path.resolve() == sb.path.resolve()
    sb_eff = sa if sb is None else sb
    ha = _resolve_hooks(sa, hooks_a, "hooks_a")
    hb = _resolve_hooks(sb_eff, hooks_b, "hooks_b") if (hooks_b or not one) else list(ha)
    mode = _choose_align(sa, sb, one, align)

    cap = (DEFAULT_GRAM_ROWS if metric in GRAM_METRICS else DEFAULT_ROWS) if max_rows == 0 else max_rows
    check_ratio(max_norm_ratio)
    if drop_top < 0:
        raise WorkbenchError(f"--drop-top-dims must be >= 0 (0: keep every dimension), got {drop_top}")
    by_hook_a: dict[str, int] = {}
    by_hook_b: dict[str, int] = {}
    keep_a = keep_rows(sa, list(dict.fromkeys(ha + (hb if one else []))), max_norm_ratio, by_hook_a)
    keep_b = keep_a if one else keep_rows(sb_eff, hb, max_norm_ratio, by_hook_b)
    n, n_avail, dropped, load_a, load_b = _aligned_loaders(sa, sb_eff, one, mode, keep_a, keep_b, cap)
    _check_enough(n, mode, min_docs, metric, k,
                  lambda: max([sa.d(h) for h in ha] + [sb_eff.d(h) for h in hb]))

    reps_a = [load_a(h) for h in ha]
    sym = one and hb == ha
    reps_b = None if sym else [load_b(h) for h in hb]
    # how much of each compared representation sits in a few huge-norm rows (attention sinks)
    share = max(report(torch.linalg.vector_norm(r.float(), dim=1))["sq_norm_share"]
                for r in reps_a + (reps_b or []))
    # ... and in a few huge-variance dimensions (rogue dimensions)
    rogue = {f"A:{h}" if not sym else h: rogue_report(r) for h, r in zip(ha, reps_a)}
    if not sym:
        rogue.update({f"B:{h}": rogue_report(r) for h, r in zip(hb, reps_b)})
    rogue_max = max(v[f"top{ROGUE_TOP}_share"] for v in rogue.values())
    rogue_any = any(is_rogue(v) for v in rogue.values())
    M, check = _scores(reps_a, reps_b, metric, precision, keep, k, device, progress,
                       standardize_dims, drop_top, rogue_any, rogue_max)
    return {"matrix": M, "hooks_a": ha, "hooks_b": hb, "labels_a": list(ha), "labels_b": list(hb),
            "metric": metric, "align": mode, "n_rows": n, "n_available": n_avail, "symmetric": sym,
            "max_norm_ratio": float(max_norm_ratio), "rows_dropped": dropped,
            "rows_dropped_by_hook": {**{f"A:{h}" if not one else h: c for h, c in by_hook_a.items()},
                                     **{f"B:{h}": c for h, c in by_hook_b.items()}},
            "massive_sq_norm_share_max": share, "standardize": bool(standardize_dims), "drop_top_dims": int(drop_top),
            "rogue_dims": rogue, "rogue_check": check,
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
              f"{'rows' if res['align'] != 'document' else 'documents'})",
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
            log.info("%d/%d pairs", i, total)

    res = compare_matrix(cfg.store_a, cfg.store_b or None, cfg.hooks_a or None, cfg.hooks_b or None,
                         metric=cfg.metric, align=cfg.align, max_rows=cfg.max_rows, k=cfg.k, keep=cfg.keep,
                         precision=cfg.precision, device=cfg.device, progress=progress,
                         max_norm_ratio=cfg.max_norm_ratio, standardize_dims=cfg.standardize,
                         drop_top=cfg.drop_top_dims, min_docs=cfg.min_docs)
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
    if cfg.max_norm_ratio and res["rows_dropped"]:
        summary["note"] = (f"{res['rows_dropped']} rows left out: norm over {cfg.max_norm_ratio:g}x the median in some "
                           f"compared hook (attention sinks); --max-norm-ratio 0 keeps them")
    chk = res["rogue_check"]
    metrics["rogue_top_share_max"] = float(chk["share_max"])
    warnings = []
    if res["massive_sq_norm_share_max"] > 0.5:
        warnings.append(f"in some hook, rows with norms over {REPORT_RATIO:g}x the median carry "
                        f"{100 * res['massive_sq_norm_share_max']:.0f}% of the squared norm (attention sinks): "
                        f"the scores mostly compare those rows"
                        + ("" if cfg.max_norm_ratio else f"; --max-norm-ratio {REPORT_RATIO:g} drops them"))
    if chk["done"]:
        metrics["rogue_max_change"] = chk["max_change"]
        if chk["max_change"] > ROGUE_EFFECT:
            worst = max(res["rogue_dims"].items(), key=lambda kv: kv[1][f"top{ROGUE_TOP}_share"])
            warnings.append(
                rogue_text(worst[1], f"in {worst[0]}, ") + f"; without each hook's top "
                f"{ROGUE_TOP} dimensions the scores change by up to {chk['max_change']:.2f}, so those few "
                f"dimensions decide them. --standardize (z-score each dimension) or --drop-top-dims "
                f"{ROGUE_TOP} compares the rest")
    if warnings:
        summary["warning"] = "; ".join(warnings)
    return StepResult(
        summary=summary,
        metrics=metrics,
        artifacts={"result": str(out), "heatmap": str(out / "heatmap.html")})



@dataclass(frozen=True)
class CompareResult:
    """A "compare" result folder as everything reads it (UI, tests): ``read_compare_result``. Keys
    added after the first version (rows_dropped, rogue_check, ...) default to "none"."""
    path: Path
    metric: str
    align: str
    store_a: str
    store_b: str
    hooks_a: list[str]
    hooks_b: list[str]
    matrix: torch.Tensor                 # [len(hooks_a), len(hooks_b)], float64, NaN where undefined
    n_rows: int
    symmetric: bool
    higher_is_similar: bool
    rows_dropped: int = 0
    max_norm_ratio: float = 0.0
    standardize: bool = False
    rogue_dims: dict[str, Any] = field(default_factory=dict)
    rogue_check: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)   # the whole result.json


def read_compare_result(path: str | Path) -> CompareResult:
    """The one reader of a "compare" result folder (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result, read_tensors
    m = read_result(path, "compare")
    try:
        M = read_tensors(path).get("matrix")
        M = torch.tensor([[float("nan") if v is None else v for v in r] for r in m["matrix"]],
                         dtype=torch.float64) if M is None else M.to(torch.float64)
        return CompareResult(
            path=Path(path), metric=m["metric"], align=m["align"], store_a=m["store_a"], store_b=m["store_b"],
            hooks_a=list(m["hooks_a"]), hooks_b=list(m["hooks_b"]), matrix=M, n_rows=int(m["n_rows"]),
            symmetric=bool(m["symmetric"]), higher_is_similar=bool(m.get("higher_is_similar", True)),
            rows_dropped=int(m.get("rows_dropped") or 0), max_norm_ratio=float(m.get("max_norm_ratio") or 0.0),
            standardize=bool(m.get("standardize")), rogue_dims=dict(m.get("rogue_dims") or {}),
            rogue_check=dict(m.get("rogue_check") or {}), meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the compare result has no {e.args[0]!r}; rerun the compare step") from None


def sweep_check(opts: dict[str, Any], source_a: dict[str, Any], source_b: dict[str, Any],
                same_source: bool) -> str | None:
    """Plan-time check for sweeps (before anything runs): can this comparison have enough rows?
    `source_a/b` are the collect options of the two stores (max_tokens, seq_len, windows_per_doc;
    defaults filled in). Returns the reason to refuse, or None.

    A store holds ~max_tokens rows in windows of at most seq_len tokens, so at least
    max_tokens / seq_len windows, and with windows_per_doc = w at least max_tokens / (seq_len * w)
    documents. With windows_per_doc = 0 (every window of each document) the number of documents
    is unknown: 20,000 builtin tokens can be 9 documents."""
    metric, align = opts.get("metric", "linear_cka"), opts.get("align", "auto")
    k, min_docs = int(opts.get("k", 10)), int(opts.get("min_docs", MIN_DOCS))
    if align == "document" and not same_source:
        bounds = []
        for src in (source_a, source_b):
            w, L, T = int(src.get("windows_per_doc", 0)), int(src.get("seq_len", 128)), int(src.get("max_tokens", 0))
            if w <= 0:
                return ("align = \"document\" needs documents, but the collect options keep every window of each "
                        "document (windows_per_doc = 0), so the number of documents is unknown (20,000 builtin "
                        "tokens can be 9 documents); set windows_per_doc = 1 in [collect] (about max_tokens / "
                        "seq_len documents)")
            bounds.append(-(-T // (L * w)))
        n = min(bounds)
        if n < min_docs:
            return (f"align = \"document\" would compare at most ~{n} documents (max_tokens / (seq_len * "
                    f"windows_per_doc)); it needs at least {min_docs}: raise max_tokens or lower windows_per_doc")
    else:
        n = min(int(source_a.get("max_tokens", 0)), int(source_b.get("max_tokens", 0)))
        if n and n < 4:
            return f"max_tokens = {n} leaves fewer than 4 rows to compare"
    if metric == "mutual_knn" and n and k >= n:
        return f"mutual_knn with k = {k} needs more than k rows; at most ~{n} here"
    return None


CompareConfig.sweep_check = staticmethod(sweep_check)    # read by the sweep planner (workbench.sweep.dag)
