"""What `train-sae` and `eval-sae` evaluate on, and how each number is labelled.

* Split: `train-sae --holdout F` holds out a fraction F of the store's DOCUMENTS
  (:mod:`workbench.store_split`), trains on the rest and evaluates on them; the split (fraction,
  seed, rule, store fingerprint) goes into cfg.json ``metadata.workbench.split``. `eval-sae`
  (``--split auto``) evaluates the held-out rows when STORE is the SAE's own training store
  (recognised by fingerprint, so a moved workspace still matches), and all rows of any other store
  (held out by construction: the SAE never saw that store; the same text collected twice would not
  be). ``--split train`` evaluates the training rows (in-sample), ``--split all`` every row.
* Every metric block carries ``"split": "held_out" | "in_sample"``.
* Density / dead fraction: several estimates exist (the trainer's firing counts over many training
  tokens, an eval pass over fewer held-out rows); the one measured on more tokens is kept as the
  SAE's ``sparsity`` (what the Neuronpedia export and its log10 density < -6 filter read), and each
  is reported with ``n_tokens`` and ``split``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError
from ..store_split import RowRanges

SPLIT_CHOICES = ["auto", "held_out", "train", "all"]
EV_CONVENTION = ("around the per-dimension mean (SAELens >= 2026 / SAEBench corrected); "
                 "explained_variance_around_zero: around zero, as SAELens 2025 - early 2026")


def store_fingerprint(store) -> str:
    """Identifies a store's content across moves: manifest creation time, sizes, model, shard hashes."""
    m = store.manifest
    key = json.dumps([m.get("created"), m.get("n_rows"), m.get("n_seq"), m.get("model"),
                      [s.get("sha256") for s in m.get("shards", [])]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def split_meta(store, sp) -> dict[str, Any]:
    return {**sp.meta(), "store": str(store.path), "store_fingerprint": store_fingerprint(store)}


@dataclass
class EvalRows:
    rows: RowRanges | None        # store rows to evaluate (None: all); ranges, so no tensor per row
    seqs: torch.Tensor | None     # store sequences for the CE loss (None: all)
    split: str                    # "held_out" | "in_sample"
    note: str
    info: dict[str, Any]


def _is_training_store(sae, store) -> bool:
    wb = sae.cfg.metadata.get("workbench") or {}
    fp = (wb.get("split") or {}).get("store_fingerprint")
    if fp:
        return fp == store_fingerprint(store)
    trained = sae.cfg.metadata.get("store")
    try:
        return bool(trained) and Path(trained).resolve() == Path(store.path).resolve()
    except OSError:
        return False


def eval_rows(sae, store, split: str = "auto") -> EvalRows:
    """Which rows / sequences `eval-sae` evaluates, and the label they carry."""
    if split not in SPLIT_CHOICES:
        raise WorkbenchError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    own = _is_training_store(sae, store)
    recorded = ((sae.cfg.metadata.get("workbench") or {}).get("split") or {}) if own else {}
    if not own:
        if split == "train":
            raise WorkbenchError(f"--split train needs the SAE's own training store; {store.path} is another "
                                 "store (the SAE never trained on it): use --split auto")
        return EvalRows(None, None, "held_out", "another store than the SAE was trained on: all its rows, "
                        "held out by construction (unless the same text was collected into both)", {})
    if split == "all":
        return EvalRows(None, None, "in_sample", "every row of the SAE's training store (training and "
                        "held-out rows together)", recorded)
    if not recorded or not recorded.get("n_heldout_rows"):
        if split == "held_out":
            raise WorkbenchError(f"the SAE at hand records no held-out split of {store.path} (trained with "
                                 "--holdout 0 or before splits existed): use --split train / all, or evaluate "
                                 "on another store")
        return EvalRows(None, None, "in_sample", "the SAE records no held-out split of its training store "
                        "(trained with --holdout 0 or before splits existed): all rows, in-sample", recorded)
    sp = store.split(recorded["holdout"], recorded["seed"])
    if int(sp.heldout_rows.numel()) != int(recorded["n_heldout_rows"]):
        raise WorkbenchError(f"recomputing the recorded split of {store.path} gives {sp.heldout_rows.numel()} "
                             f"held-out rows, the SAE recorded {recorded['n_heldout_rows']}: the store changed")
    if split == "train":
        return EvalRows(sp.train_rows, sp.train_seqs, "in_sample", "the rows the SAE trained on", recorded)
    return EvalRows(sp.heldout_rows, sp.heldout_seqs, "held_out",
                    f"held-out {sp.unit}s of the SAE's training store ({recorded['holdout']:.0%}, "
                    f"seed {recorded['seed']})", recorded)


# --------------------------------------------------------------------------------------------- density

def _dead(log10_density: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Never fired in n_tokens: density below half of one firing (log10(0 + 1e-10) = -10)."""
    return log10_density < math.log10(0.5 / max(n_tokens, 1) + 1e-10)


def density_block(log10_density: torch.Tensor, n_tokens: int, split: str, source: str) -> dict[str, Any]:
    d = 10 ** log10_density.double()
    return {"dead_fraction": float(_dead(log10_density, n_tokens).double().mean()),
            "dense_1pct_fraction": float((d > 0.01).double().mean()),
            "dense_10pct_fraction": float((d > 0.10).double().mean()),
            "below_1e-6_fraction": float((log10_density < -6).double().mean()),
            "n_tokens": int(n_tokens), "split": split, "source": source}


def best_density(sae, ev: dict[str, Any], split: str) -> dict[str, Any]:
    """Keep the estimate measured on more tokens as ``sae.sparsity``; -> {"best", "estimates"}."""
    wb = sae.cfg.metadata.setdefault("workbench", {})
    cands = []
    trained = getattr(sae, "sparsity", None)
    t_tokens = int(wb.get("density_tokens") or sae.cfg.metadata.get("density_tokens") or 0)
    if trained is not None and t_tokens > 0:
        cands.append((t_tokens, trained.detach().float().cpu(),
                      density_block(trained, t_tokens, "in_sample", "training firing counts")))
    if ev is not None:
        cands.append((int(ev["n_tokens"]), ev["log10_density"].float().cpu(),
                      density_block(ev["log10_density"], int(ev["n_tokens"]), split, "evaluation pass")))
    if not cands:
        return {}
    n, sparsity, best = max(cands, key=lambda c: c[0])
    sae.sparsity = sparsity
    wb["density"] = best
    return {"best": best, "estimates": [c[2] for c in cands]}


# --------------------------------------------------------------------------------------------- CE loss

def ce_metrics(sae, store, hook: str, n_seq: int, device, seqs: torch.Tensor | None = None
               ) -> tuple[dict | None, str, dict[str, torch.Tensor]]:
    """CE loss recovered (ours and SAELens') on the first ``n_seq`` of ``seqs`` (default: all
    sequences of the store). -> (metrics, reason it was skipped, per-sequence tensors)."""
    if n_seq <= 0:
        return None, "ce_sequences=0", {}
    from ..splice import splice_eval
    spec = store.manifest.get("model")
    try:
        from ..models import load_model
        model = load_model(spec, device=str(device))
    except Exception as e:  # noqa: BLE001 - any failure to get the model just skips CE
        return None, f"model {spec!r} not loadable here: {e}", {}
    if getattr(model, "kind", "causal") != "causal":
        return None, f"model {spec!r} is not causal", {}
    pick = (torch.arange(store.n_seq) if seqs is None else torch.as_tensor(seqs).long())[:n_seq]
    if pick.numel() == 0:
        return None, "no sequences to score", {}
    got = store.sequences_at(pick)          # only the scored sequences, not the store's token ids
    ids, mask = got["token_ids"], got["attention_mask"]
    sae = sae.to(model.device)

    def reconstruct(act):
        return sae(act.to(sae.dtype)).to(act.dtype)

    # ours splices where the store has rows (what the SAE was trained on): special tokens the collector
    # excluded (e.g. the prepended BOS, an attention sink) keep their own activations
    excluded = (store.manifest.get("special_tokens") or {}).get("excluded_ids") or []
    where = mask & ~torch.isin(ids, torch.tensor(excluded, dtype=ids.dtype)) if excluded else None
    # SAELens' special set is its tokenizer's bos/eos/pad/sep ids; the BOS our collector prepends can be
    # another token (SmolLM2: <|endoftext|> = 0, while bos_token_id = 1), special for the same reason
    from ..splice import saelens_special_ids
    sp = (store.manifest.get("special_tokens") or {}).get("special_ids") or {}
    special = sorted(set(saelens_special_ids(model.tokenizer))
                     | {int(v) for v in sp.values() if isinstance(v, int)})
    with torch.no_grad():
        res = splice_eval(model, hook, reconstruct, ids, mask, splice_mask=where, special_ids=special)
    per_seq = {f"ce_{k}": v.float() for k, v in res.pop("per_sequence").items()}
    per_seq["ce_sequence_index"] = pick
    out = {kk: float(v) for kk, v in res.items() if isinstance(v, (int, float))}
    out["n_spliced"] = float(int(where.sum()) if where is not None else int(mask.sum()))
    out["se_method"] = res["se_method"]
    out["saelens_special_ids"] = res.get("saelens_special_ids")
    return out, "", per_seq


def write_eval(out: Path, ev: dict[str, Any], *, sae_path: str, store: str, hook: str, split: str,
               split_note: str, split_info: dict | None, density: dict | None,
               ce: dict[str, Any] | None, ce_reason: str = "",
               ce_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    from ..results import write_result
    figures = {}
    try:
        import plotly.graph_objects as go
        h = ev["density_histogram"]
        centres = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        fig = go.Figure(go.Bar(x=centres, y=h["counts"], width=(h["edges"][1] - h["edges"][0])))
        fig.update_layout(title=f"latent density (log10 firing rate) over {ev['n_tokens']:,} {split} tokens, "
                                f"L0={ev['l0']:.1f}, dead={100 * ev['dead_fraction']:.1f}%",
                          xaxis_title="log10 density", yaxis_title="latents")
        figures["density_histogram"] = fig
    except ImportError:  # pragma: no cover
        pass
    metrics = {kk: v for kk, v in ev.items() if isinstance(v, (int, float))}
    metrics["dead_fraction_tokens"] = metrics["n_tokens"]
    if ce is not None:
        ce = {**ce, "split": split}
    data = {"sae": sae_path, "store": store, "hook": hook, "split": split, "split_note": split_note,
            "split_info": split_info or {}, "metrics": {**metrics, "split": split},
            "explained_variance_convention": EV_CONVENTION, "density": density or {},
            "density_histogram": ev["density_histogram"], "ce": ce, "ce_reason": ce_reason}
    out.mkdir(parents=True, exist_ok=True)
    return write_result(out, "sae_eval", data, tensors={"log10_density": ev["log10_density"], **(ce_tensors or {})},
                        figures=figures)


@dataclass(frozen=True)
class SAEEvalResult:
    """An "sae_eval" result folder (written by ``write_eval``), as the UI and tests read it:
    ``read_sae_eval_result``. Results made before the train/held-out split read as in-sample."""
    path: Path
    sae: str
    store: str
    hook: str
    split: str
    metrics: dict[str, Any]              # explained_variance, l0, dead_fraction, n_tokens, ... (+ "split")
    ce: dict[str, Any] | None            # CE loss recovered block, None when not computed (see ce_reason)
    ce_reason: str = ""
    split_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)   # the whole result.json


def read_sae_eval_result(path: str | Path) -> SAEEvalResult:
    """The one reader of an "sae_eval" result folder (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result
    m = read_result(path, "sae_eval")
    try:
        return SAEEvalResult(path=Path(path), sae=m["sae"], store=m["store"], hook=m["hook"],
                             split=m.get("split") or "in_sample (pre-split result)", metrics=dict(m["metrics"]),
                             ce=m.get("ce"), ce_reason=m.get("ce_reason") or "",
                             split_note=m.get("split_note") or "", meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the sae_eval result has no {e.args[0]!r}; rerun eval-sae") from None
