"""Step `match_saes`: is latent i of one SAE the same feature as latent j of another?

    workbench match-saes SAE_A SAE_B [--store S] [--store-b S2] [--align auto|same|position|token]
                         [--max-rows N] [--match auto|hungarian|mutual] --out PATH

Both SAEs encode the same rows: by default those of the store each SAE was trained on (cfg.json
metadata ``store`` / ``hook_name``), or the stores given. Rows are paired (``align``): one store ->
the same row (two hooks of one store: layers); stores with equal token ids -> same (sequence,
position); different tokenisers -> same document and character end (``workbench.align``, needs
stores collected with offsets). The maths is ``analyses.matching`` (streaming sparse correlation,
Hungarian / mutual-max matching, split groups, SVCCA / RSA / CKA of matched decoder rows vs shuffled
pairings; Lan et al. 2024, Li et al. 2016).

Result (kind "match_saes"): result.json (summary numbers, scores vs baseline, split groups),
tensors.safetensors (pair_a, pair_b, pair_corr, pair_mutual, pair_cos, best_b_of_a, best_corr_a,
best_a_of_b, best_corr_b), histogram.html, scores.html; read with ``read_match_result``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import StepResult, arg, default_out, register
from ..errors import WorkbenchError

log = logging.getLogger(__name__)
KIND = "match_saes"
MAX_GROUPS_JSON = 200


@dataclass
class MatchSAEsConfig:
    sae_a: str = field(metadata=arg("first SAE folder", positional=True, role="sae"))
    sae_b: str = field(metadata=arg("second SAE folder", positional=True, role="sae_b"))
    store: str = field(default="", metadata=arg(
        "store to encode (default: the store SAE_A was trained on); also SAE_B's unless --store-b",
        role="store"))
    store_b: str = field(default="", metadata=arg("store for SAE_B (default: --store, else SAE_B's own)",
                                                  role="store_b"))
    align: str = field(default="auto", metadata=arg(
        "row pairing: same (one store), position (equal token ids), token (character offsets, "
        "different tokenisers), auto", choices=["auto", "same", "position", "token"]))
    max_rows: int = field(default=200_000, metadata=arg("rows encoded, evenly spaced (0: all)"))
    batch_size: int = field(default=4096, metadata=arg("rows per encoding batch"))
    match: str = field(default="auto", metadata=arg(
        "one-to-one matching: hungarian (max total r), mutual (mutual best partners), auto "
        "(hungarian up to 8192 latents)", choices=["auto", "hungarian", "mutual"]))
    threshold: float = field(default=0.7, metadata=arg("report the share of latents with a mutual match at r >= this"))
    split_corr: float = field(default=0.3, metadata=arg("width pairs: a wide latent joins a narrow one at r >= this"))
    score_min_corr: float = field(default=0.0, metadata=arg(
        "matched pairs scored (SVCCA / RSA / CKA) need r >= this (and both latents alive)"))
    n_shuffles: int = field(default=20, metadata=arg("random pairings for the baseline"))
    seed: int = field(default=0, metadata=arg("seed of the shuffles"))
    precision: str = field(default="float64", metadata=arg(
        "dtype of the d_a x d_b cross-product sums (float32 halves the memory)", choices=["float64", "float32"]))
    device: str = field(default="cpu", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/match-A-vs-B)", role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


# --------------------------------------------------------------------------------------- rows
def _sae(path: str, device):
    from .sae import _load_sae
    return _load_sae(path, device=str(device))


def _store_of(sae, path: str, given: str):
    from ..store import ActivationStore
    p = given or (sae.cfg.metadata or {}).get("store")
    if not p:
        raise WorkbenchError(f"SAE {path} does not record the store it was trained on; pass --store")
    if not Path(p).exists():
        raise WorkbenchError(f"SAE {path} was trained on store {p}, which does not exist any more; pass --store")
    return ActivationStore.open(p)


def _hook_of(sae, path: str, store) -> str:
    from ..hooks import pick_hook
    hook = (sae.cfg.metadata or {}).get("hook_name") or ""
    if hook and hook not in store.hooks:
        raise WorkbenchError(f"SAE {path} reads hook {hook!r}, which store {store.path} lacks "
                             f"(it has {', '.join(store.hooks[:8])})")
    h = pick_hook(store, hook)
    if store.d(h) != sae.cfg.d_in:
        raise WorkbenchError(f"SAE {path} has d_in={sae.cfg.d_in} but hook {h} of {store.path} has d={store.d(h)}")
    return h


def align_rows(sa, sb, align: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]:
    """(rows of A, rows of B, mode, report): the row pairs both SAEs encode."""
    from .compare import _align_position, _same_tokens
    same = sa.path.resolve() == sb.path.resolve()
    if align in ("auto", "same") and same:
        n = torch.arange(sa.n_rows)
        return n, n, "same", {"paired": sa.n_rows}
    if align == "same":
        raise WorkbenchError(f"--align same needs one store; got {sa.path} and {sb.path}")
    ok, why = _same_tokens(sa, sb)
    if align == "position" or (align == "auto" and ok):
        if not ok:
            raise WorkbenchError(f"cannot pair rows of {sa.path} and {sb.path} by position: {why}; "
                                 "stores from different tokenisers need --align token")
        ia, ib = _align_position(sa, sb)
        return ia, ib, "position", {"paired": int(ia.numel())}
    from ..align import align_tokens
    res = align_tokens(sa, sb)
    return res["a"], res["b"], "token", res["report"]


def _read_rows(store, hook: str, rows: torch.Tensor, bs: int):
    """Rows `rows` (ascending, unique) of a hook, streamed in batches of bs."""
    return store.batches(hook, bs, shuffle=False, rows=rows)


def _gather(store, hook: str, rows: torch.Tensor) -> torch.Tensor:
    u, inv = torch.unique(rows, return_inverse=True)
    data = torch.cat(list(store.batches(hook, max(1, u.numel()), shuffle=False, rows=u)))
    return data[inv]


def _pair_batches(sa, ha, ia, sb, hb, ib, bs: int):
    """(x_a, x_b) batches of paired rows: two sequential streams when both sides ascend."""
    order = torch.argsort(ia)
    ia, ib = ia[order], ib[order]
    if ib.numel() < 2 or bool((ib[1:] > ib[:-1]).all()):
        yield from zip(_read_rows(sa, ha, ia, bs), _read_rows(sb, hb, ib, bs))
        return
    for s in range(0, ia.numel(), bs):
        yield _gather(sa, ha, ia[s:s + bs]), _gather(sb, hb, ib[s:s + bs])


# --------------------------------------------------------------------------------------- API
def match_saes(sae_a: str, sae_b: str, store: str = "", store_b: str = "", align: str = "auto",
               max_rows: int = 200_000, batch_size: int = 4096, match: str = "auto", threshold: float = 0.7,
               split_corr: float = 0.3, score_min_corr: float = 0.0, n_shuffles: int = 20, seed: int = 0,
               precision: str = "float64", device: str = "cpu") -> dict[str, Any]:
    """The whole computation (no files): see the module docstring. Returns a dict with "data"
    (JSON-able), "tensors" and "matched_corr"/"random_corr" for the figures."""
    from analyses._util import resolve_device
    from analyses.matching import (CorrelationAccumulator, fraction_matched, match_one_to_one,
                                   paired_scores, split_groups)
    t0 = time.time()
    dev = resolve_device(device)
    A, B = _sae(sae_a, "cpu"), _sae(sae_b, "cpu")
    sa = _store_of(A, sae_a, store)
    sb = _store_of(B, sae_b, store_b or store)
    ha, hb = _hook_of(A, sae_a, sa), _hook_of(B, sae_b, sb)
    ia, ib, mode, report = align_rows(sa, sb, align)
    if ia.numel() < 2:
        raise WorkbenchError(f"only {ia.numel()} paired rows between {sa.path} and {sb.path}; need at least 2")
    n_avail = int(ia.numel())
    if max_rows and n_avail > max_rows:
        sel = torch.linspace(0, n_avail - 1, max_rows).round().long().unique()
        ia, ib = ia[sel], ib[sel]
    A, B = A.to(dev).eval(), B.to(dev).eval()
    acc = CorrelationAccumulator(A.cfg.d_sae, B.cfg.d_sae, dtype=precision, device=dev)
    t_enc = t_acc = 0.0
    with torch.inference_mode():
        for xa, xb in _pair_batches(sa, ha, ia, sb, hb, ib, batch_size):
            t1 = time.perf_counter()
            ca, cb = A.encode_sparse(xa.to(dev)), B.encode_sparse(xb.to(dev))
            t2 = time.perf_counter()
            acc.update(ca, cb)
            t_enc, t_acc = t_enc + t2 - t1, t_acc + time.perf_counter() - t2
    corr = acc.correlation()
    alive_a, alive_b = (m.cpu() for m in acc.alive())
    del acc
    corr = corr.cpu()
    m = match_one_to_one(corr, match)
    a, b, pc, mutual = m["a"], m["b"], m["corr"], m["mutual"] & (m["corr"] > 0)
    best_corr_a, best_b_of_a = corr.max(1)
    best_corr_b, best_a_of_b = corr.max(0)
    Wa, Wb = A.W_dec.detach().cpu().double(), B.W_dec.detach().cpu().double()
    cos = None
    if Wa.shape[1] == Wb.shape[1]:
        na, nb = Wa / Wa.norm(dim=1, keepdim=True).clamp_min(1e-12), Wb / Wb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (na[a] * nb[b]).sum(1)
    # split groups for width pairs: rows = the narrow SAE
    narrow = "a" if A.cfg.d_sae < B.cfg.d_sae else "b" if B.cfg.d_sae < A.cfg.d_sae else None
    groups: list[dict[str, Any]] = []
    if narrow is not None:
        groups = split_groups(corr if narrow == "a" else corr.T, split_corr)
    n_small = min(A.cfg.d_sae, B.cfg.d_sae)
    gen = torch.Generator().manual_seed(seed)
    rnd_b = torch.randint(0, B.cfg.d_sae, (a.numel(),), generator=gen)
    random_corr = corr[a, rnd_b].double()
    keep = (pc >= score_min_corr) & alive_a[a] & alive_b[b]
    scores: dict[str, Any] = {}
    note = None
    if int(keep.sum()) >= 3:
        scores = paired_scores(Wa[a[keep]], Wb[b[keep]], n_shuffles=n_shuffles, seed=seed)
    else:
        note = f"only {int(keep.sum())} matched pairs at r >= {score_min_corr}: too few to score"
    data = {
        "sae_a": str(sae_a), "sae_b": str(sae_b), "store_a": str(sa.path), "store_b": str(sb.path),
        "hook_a": ha, "hook_b": hb, "model_a": sa.model_name, "model_b": sb.model_name,
        "d_sae_a": A.cfg.d_sae, "d_sae_b": B.cfg.d_sae, "align": mode, "alignment": report,
        "n_rows": int(ia.numel()), "n_available": n_avail, "method": m["method"],
        "n_pairs": int(a.numel()), "n_mutual": int(mutual.sum()), "threshold": float(threshold),
        "fraction_mutual_at": fraction_matched(pc, mutual, n_small, (0.5, threshold, 0.9)),
        "fraction_mutual_above_threshold": float(((pc >= threshold) & mutual).sum()) / max(n_small, 1),
        "matched_corr": _summary(pc), "random_corr": _summary(random_corr),
        "decoder_cos": None if cos is None else _summary(cos),
        "dead_a": int((~alive_a).sum()), "dead_b": int((~alive_b).sum()),
        "scores": scores, "n_scored": int(keep.sum()), "score_min_corr": float(score_min_corr),
        "narrow": narrow, "split_corr": float(split_corr), "n_splits": len(groups),
        "split_sizes": _sizes(groups), "splits": groups[:MAX_GROUPS_JSON],
        "seconds_encode": round(t_enc, 3), "seconds_correlation": round(t_acc, 3),
        "seconds": round(time.time() - t0, 3),
    }
    if note:
        data["note"] = note
    d_max = max(Wa.shape[1], Wb.shape[1])
    if scores and int(keep.sum()) < 2 * d_max:
        data["warning"] = (f"few pairs for SVCCA: {int(keep.sum())} scored pairs in up to {d_max} dimensions "
                           f"(CCA needs many more pairs than dimensions; even shuffled pairings score "
                           f"{scores['svcca']['baseline_mean']:.2f}); compare with the baseline, not with 0")
    tensors = {"pair_a": a, "pair_b": b, "pair_corr": pc.float(), "pair_mutual": mutual.to(torch.uint8),
               "best_b_of_a": best_b_of_a, "best_corr_a": best_corr_a, "best_a_of_b": best_a_of_b,
               "best_corr_b": best_corr_b}
    if cos is not None:
        tensors["pair_cos"] = cos.float()
    return {"data": data, "tensors": tensors, "matched_corr": pc, "random_corr": random_corr}


def _summary(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    if x.numel() == 0:
        return {"n": 0}
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": int(x.numel()), "mean": float(x.mean()), "p10": q[0], "median": q[1], "p90": q[2]}


def _sizes(groups: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in groups:
        k = str(len(g["children"]))
        out[k] = out.get(k, 0) + 1
    return out


# --------------------------------------------------------------------------------------- figures
def _figures(res: dict[str, Any]) -> dict[str, Any]:
    import plotly.graph_objects as go
    d = res["data"]
    h = go.Figure()
    h.add_histogram(x=res["matched_corr"].tolist(), name=f"matched ({d['method']})", opacity=0.7,
                    xbins=dict(start=-0.2, end=1.0, size=0.02))
    h.add_histogram(x=res["random_corr"].tolist(), name="random pairs", opacity=0.5,
                    xbins=dict(start=-0.2, end=1.0, size=0.02))
    h.update_layout(barmode="overlay", template="plotly_white", xaxis_title="activation correlation r",
                    yaxis_title="latent pairs", title=f"{d['n_pairs']} matched pairs, {d['n_rows']} rows")
    s = go.Figure()
    names = list(d["scores"])
    s.add_bar(x=names, y=[d["scores"][k]["score"] for k in names], name="matched decoder rows")
    s.add_bar(x=names, y=[d["scores"][k]["baseline_mean"] for k in names], name="random pairings",
              error_y=dict(type="data", array=[d["scores"][k]["baseline_std"] for k in names]))
    s.update_layout(barmode="group", template="plotly_white", yaxis_title="similarity",
                    title=f"{d['n_scored']} matched decoder rows vs shuffled pairings")
    return {"histogram": h, "scores": s}


@register("match_saes", MatchSAEsConfig, help="match latents of two SAEs (seeds, widths, layers, models)")
def match_step(cfg: MatchSAEsConfig) -> StepResult:
    from ..results import prepare_out, write_result
    name = f"match-{Path(cfg.sae_a).name}-vs-{Path(cfg.sae_b).name}"
    out = default_out(cfg.out, cfg.sae_a, "results", name)
    if (out / "result.json").exists() and not cfg.overwrite:
        prepare_out(out, False, "match result")      # raises the standard message
    res = match_saes(cfg.sae_a, cfg.sae_b, cfg.store, cfg.store_b, cfg.align, cfg.max_rows, cfg.batch_size,
                     cfg.match, cfg.threshold, cfg.split_corr, cfg.score_min_corr, cfg.n_shuffles, cfg.seed,
                     cfg.precision, cfg.device)
    prepare_out(out, cfg.overwrite, "match result")
    write_result(out, KIND, res["data"], tensors=res["tensors"], figures=_figures(res))
    d = res["data"]
    metrics = {"n_rows": float(d["n_rows"]), "n_pairs": float(d["n_pairs"]),
               "fraction_mutual_above_threshold": d["fraction_mutual_above_threshold"],
               "matched_corr_mean": d["matched_corr"]["mean"], "n_splits": float(d["n_splits"])}
    for k, v in d["scores"].items():
        metrics[f"{k}"] = v["score"]
        metrics[f"{k}_baseline"] = v["baseline_mean"]
        metrics[f"{k}_p"] = v["p_value"]
    summary = {"out": str(out), "align": d["align"], "n_rows": d["n_rows"], "method": d["method"],
               "n_pairs": d["n_pairs"], "n_mutual": d["n_mutual"],
               f"fraction_mutual_r>={d['threshold']:g}": round(d["fraction_mutual_above_threshold"], 4),
               "scores": {k: {"score": round(v["score"], 4), "baseline": round(v["baseline_mean"], 4),
                              "p": round(v["p_value"], 4)} for k, v in d["scores"].items()},
               "n_splits": d["n_splits"]}
    for k in ("note", "warning"):
        if d.get(k):
            summary[k] = d[k]
    return StepResult(summary=summary, metrics=metrics,
                      artifacts={"result": str(out), "histogram": str(out / "histogram.html"),
                                 "scores": str(out / "scores.html")})


# --------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class MatchResult:
    """A "match_saes" result folder as the UI and tests read it (``read_match_result``)."""
    path: Path
    sae_a: str
    sae_b: str
    d_sae_a: int
    d_sae_b: int
    align: str
    n_rows: int
    method: str
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    pair_corr: torch.Tensor
    pair_mutual: torch.Tensor          # bool
    pair_cos: torch.Tensor | None      # None when the SAEs read spaces of different d
    scores: dict[str, Any]
    fraction_mutual_above_threshold: float
    threshold: float
    splits: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def read_match_result(path: str | Path) -> MatchResult:
    """The one reader of a "match_saes" result (WorkbenchError for another kind or a missing key)."""
    from ..results import read_result, read_tensors
    m = read_result(path, KIND)
    t = read_tensors(path)
    try:
        return MatchResult(
            path=Path(path), sae_a=m["sae_a"], sae_b=m["sae_b"], d_sae_a=int(m["d_sae_a"]), d_sae_b=int(m["d_sae_b"]),
            align=m["align"], n_rows=int(m["n_rows"]), method=m["method"], pair_a=t["pair_a"].long(),
            pair_b=t["pair_b"].long(), pair_corr=t["pair_corr"].float(), pair_mutual=t["pair_mutual"].bool(),
            pair_cos=t.get("pair_cos"), scores=dict(m.get("scores") or {}),
            fraction_mutual_above_threshold=float(m["fraction_mutual_above_threshold"]),
            threshold=float(m["threshold"]), splits=list(m.get("splits") or []), meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the match_saes result has no {e.args[0]!r}; rerun match-saes") from None
