"""Step `features`: feature-dashboard data for every latent of an SAE over an activation store.

    workbench features SAE STORE --out PATH [--hook H] [--max-tokens N] [--n-top 20] [--context 5]

The UI (and scripts) read the result ONLY through ``load_features(path) -> FeatureData``::

    fd = load_features("ws/results/feat")
    fd.d_sae, fd.n_tokens, fd.meta           # meta = result.json (see "result.json" below)
    fd.has_logits                            # False for encoder models / no unembedding
    df = fd.table()                          # pandas DataFrame, one row per latent, columns:
        # latent, count, density, log10_density (-inf -> -10 for dead latents), max, mean,
        # top_tokens (str: distinct centre tokens of the top examples, e.g. "' the' | ' a'"),
        # top_logits (str, "" when no logit table)
    d = fd.latent(i)                         # everything one dashboard needs (JSON-able dict);
                                             # i out of range -> LatentOutOfRange (a WorkbenchError
                                             # and IndexError) naming the valid range 0..d_sae-1

``fd.latent(i)`` returns::

    {
      "latent": i, "count": int, "density": float, "log10_density": float,
      "max": float, "mean": float,                # mean over the tokens where the latent fires (> 0)
      "top_examples": [Example, ...],             # <= n_top, value descending (ties: lower row first)
      "buckets": [                                # n_buckets equal-width bins over (0, max];
        {"lo": float, "hi": float, "count": int,  #   count = firings in that bin (all tokens)
         "examples": [Example, ...]}, ...         #   <= per_bucket uniform random samples, value desc
      ],                                          #   (lowest bin first; empty list when dead)
      "histogram": {"edges": [H+1 floats], "counts": [H ints]},   # linear bins 0..max, firing only;
                                                  #   sum(counts) == count
      "logits": None | {                          # W_dec[i] @ W_U_folded (final norm's gain folded in)
          "top": [{"token": str, "id": int, "value": float}, ...],      # largest first
          "bottom": [{"token": str, "id": int, "value": float}, ...],   # most negative first
          "histogram": {"edges": [...], "counts": [...]}},              # over the whole vocab
      "neighbours": [{"latent": int, "cosine": float}, ...],   # decoder cosine, self excluded
      "neurons": [{"neuron": int, "weight": float, "fraction": float}, ...],
                                                  # largest |W_dec[i, n]|; fraction = |w| / ||W_dec[i]||_1
    }
    Example = {
      "value": float, "row": int,                 # activation at the centre token; store row id
      "seq": int, "pos": int, "doc": int,         # sequence index, position in it, document id
      "tokens": [str, ...],                       # each token decoded on its own (for highlighting)
      "token_ids": [int, ...],
      "acts": [float | None, ...],                # this latent's activation on each token of the
                                                  #   window (None: token is not a store row, e.g. BOS)
      "center": int,                              # index of the example's token in "tokens"
    }

Text-box exploration (the UI's "type a text, see which latents fire")::

    tokens, acts = latent_activations_for_text(fd.meta["sae"], "some text", model=None, hook=None)
    # tokens: list[str] (decoded one by one; the tokenizer's own special tokens included, as in
    # the collected corpus), acts: Tensor[n_tokens, d_sae] (float32, cpu). sae_path may also be an
    # SAE object. model: a spec string or a loaded workbench Model; default = the SAE's cfg.json
    # metadata.model_name (fd.meta["model"] is the store's). hook default = metadata.hook_name
    # (pass hook=fd.meta["hook"]). The last SAE and model loaded are cached in the module.

A dead latent (count 0) has top_examples == [], buckets == [] and an all-zero histogram. Scripts can
also call ``compute_features(sae_object, open_store, ...) -> (meta, tensors, token_strings)`` and
``write_features(out, meta, tensors, token_strings)`` directly.

On disk (a result folder, kind "features"; only the reader above should parse it):

- ``result.json``: {"kind": "features", "version": 1, "sae", "store", "hook", "model",
  "architecture", "d_sae", "d_in", "n_tokens", "n_top", "n_buckets", "per_bucket", "hist_bins",
  "context", "window" (= 2*context+1), "n_neighbours", "n_neurons", "n_logits", "logit_bins",
  "has_logits", "logits_reason" (why absent, "" when present), "logit_unembedding" (which W_U),
  "dead_fraction", "mean_l0",
  "passes": 2, "codes_cached" (pass 2 reused pass 1's codes), "n_referenced_rows", "tokens_decoded",
  "timing": {...}, "seconds",
  "tensors": [...], "figures": {"density": "density.html"}}
- ``tensors.safetensors`` (per latent f; -1 = empty slot, value 0):
  ``count`` i64[d_sae], ``max`` f32[d_sae], ``mean`` f32[d_sae]; ``top_values`` f32[d_sae, n_top],
  ``top_rows`` i64[d_sae, n_top], ``top_window_acts`` f16[d_sae, n_top, W] (NaN = no row);
  ``bucket_values`` f32[d_sae, n_buckets, per_bucket], ``bucket_rows`` i64[same],
  ``bucket_window_acts`` f16[d_sae, n_buckets, per_bucket, W], ``bucket_counts`` i64[d_sae, n_buckets];
  ``hist_counts`` i64[d_sae, hist_bins];
  ``neighbour_ids`` i64[d_sae, n_neighbours], ``neighbour_cos`` f32; ``neuron_ids`` i64[d_sae, n],
  ``neuron_values`` f32, ``neuron_fraction`` f32; when has_logits: ``logit_top_ids`` i64[d_sae, k],
  ``logit_top_values`` f32, ``logit_bottom_ids``, ``logit_bottom_values``,
  ``logit_hist_counts`` i64[d_sae, logit_bins], ``logit_hist_range`` f32[d_sae, 2] (min, max);
  windows of the referenced centre rows only: ``ref_rows`` i64[n_ref] (sorted),
  ``ref_seq``, ``ref_pos``, ``ref_doc`` i64[n_ref], ``window_token_ids`` i32[n_ref, W]
  (token at position pos - context + j; -1 outside the sequence or padding).
- ``tokens.json``: {"<token id>": "<decoded string>"} for every token id referenced by a window
  or a logit table (decoded one id at a time).
- ``density.html``: plotly histogram of log10 density over latents.

How it is computed (``analyses.features``): two streaming passes over the store. Pass 1: firing
count, sum and max per latent, and a running top-k merge (per-latent candidates above the current
k-th value, sorted by value desc then row asc). Pass 2 (max now known): linear histograms 0..max and
activation-range buckets, each bucket a bottom-k sketch over a deterministic hash of (row, latent)
= a uniform random sample, independent of batch order. Window activations ride along with the
candidates (each chunk is encoded with a halo of `context` rows on both sides). State is
O(d_sae * (n_top + n_buckets * per_bucket) * W), never n_tokens x d_sae. Pass 2 reuses the sparse
codes of pass 1 (6 bytes per non-zero — int16 latent, float32 value — and 4 per row) while they fit in
``cache_mb`` (default 2 GiB: n_tokens x L0 up to ~350M), else it encodes again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analyses._util import resolve_device, trim_heap
from analyses.features import FeatureStatsAccumulator, decoder_neighbours, logit_table, neuron_alignment

from ..errors import WorkbenchError
from ..results import atomic_write_json, prepare_out, read_result, read_tensors, write_result
from . import StepResult, arg, default_out, register

log = logging.getLogger(__name__)

KIND = "features"
TRIM_EVERY = 16          # batches between heap trims (see analyses._util.trim_heap)
VERSION = 1
LOGIT_UNEMBEDDING = ("W_U_folded = diag(final-norm gain) @ W_U (LayerNorm: also centred over d_model), "
                     "as sae_vis / Neuronpedia; the norm's bias and 1/rms scale leave the token order unchanged")
TOKENS_FILE = "tokens.json"


class LatentOutOfRange(WorkbenchError, IndexError):
    """A latent index outside 0..d_sae-1."""


# ----------------------------------------------------------------------------------------- config
@dataclass
class FeaturesConfig:
    sae: str = field(metadata=arg("SAE folder (SAELens format)", positional=True, role="sae"))
    store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
    hook: str = field(default="", metadata=arg("hook to read (default: the SAE's metadata hook_name)",
                                                                 role="hook"))
    max_tokens: int = field(default=0, metadata=arg("use the first N rows of the store (0 = all)"))
    batch_size: int = field(default=1024, metadata=arg("rows encoded at once"))
    context: int = field(default=5, metadata=arg("tokens shown either side of an example"))
    n_top: int = field(default=20, metadata=arg("top-activating examples per latent"))
    n_buckets: int = field(default=10, metadata=arg("activation-range buckets per latent (0 = none)"))
    per_bucket: int = field(default=5, metadata=arg("examples per activation-range bucket"))
    hist_bins: int = field(default=40, metadata=arg("activation histogram bins"))
    n_neighbours: int = field(default=10, metadata=arg("nearest latents by decoder cosine"))
    n_logits: int = field(default=10, metadata=arg("tokens in the logit table (top and bottom)"))
    logits: bool = field(default=True, metadata=arg("compute the logit table (causal models; loads the model)"))
    device: str = field(default="auto", metadata=arg("cpu | cuda | auto"))
    cache_mb: int = field(default=2048, metadata=arg(
        "memory (MiB) for keeping the sparse codes of pass 1 for pass 2; over it, pass 2 re-encodes (0 = always)"))
    out: str = field(default="", metadata=arg("output folder (default: WORKSPACE/results/features-SAE)",
                                                     role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


# ----------------------------------------------------------------------------------------- helpers
def _load_sae(path: str | Path, device: str | torch.device = "cpu"):
    p = Path(path)
    if not (p / "cfg.json").exists():
        raise WorkbenchError(f"{p} is not an SAE folder (no cfg.json); give a folder written by train-sae "
                             "or export-sae (SAELens format)")
    from analyses.sae import load_sae
    return load_sae(p, device=device)


def _sae_meta(sae: Any, key: str, default: Any = None) -> Any:
    """A field of the SAE's cfg (dataclass or dict), looked up at top level then in `metadata`."""
    cfg = getattr(sae, "cfg", None)
    if cfg is None:
        return default
    get = (lambda o, k: o.get(k)) if isinstance(cfg, dict) else (lambda o, k: getattr(o, k, None))
    v = get(cfg, key)
    if v is None:
        md = get(cfg, "metadata") or {}
        v = md.get(key) if isinstance(md, dict) else getattr(md, key, None)
    return default if v is None else v


def _sae_param(sae: Any, name: str) -> torch.Tensor:
    t = getattr(sae, name)
    return t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)


def _resolve_device(device: str) -> torch.device:
    return resolve_device(device or "auto")


def _log(msg: str) -> None:
    log.info(msg)


def _decode_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    try:
        return list(tokenizer.batch_decode([[i] for i in ids]))
    except Exception:  # noqa: BLE001 - tokenizers without batch_decode
        return [tokenizer.decode([i]) for i in ids]


def _window_rows_fn(store: Any, context: int, halo: int):
    """(s, e) -> [e - s, 2*context+1] global row ids of the windows of rows s..e-1 (-1: no row there, or none
    within ``halo`` rows of the range: a store whose sequences are not contiguous gives partial windows).
    Reads only the range's row index (``store.row_index``): memory in the batch, not the store (a
    whole-store map cost ~40 bytes a row)."""
    L, n = store.seq_len, store.n_rows
    offs = torch.arange(-context, context + 1)

    def window_rows(s: int, e: int) -> torch.Tensor:
        lo, hi = max(0, s - halo), min(n, e + halo)
        si, po = store.row_index(torch.arange(lo, hi))
        key = si * L + po                                     # (sequence, position) -> one sortable key
        order = key.argsort()
        sk = key[order]
        p = po[s - lo:e - lo, None] + offs
        q = si[s - lo:e - lo, None] * L + p
        j = torch.searchsorted(sk, q).clamp(max=sk.numel() - 1)
        hit = (p >= 0) & (p < L) & (sk[j] == q)
        return torch.where(hit, lo + order[j], torch.full_like(q, -1))

    return window_rows


def _check_inputs(sae: Any, store: Any, hook: str) -> str:
    """The hook to read (given, or the SAE's metadata hook_name), checked against the store and d_in."""
    hook = hook or _sae_meta(sae, "hook_name", "")
    if not hook:
        raise WorkbenchError(f"no hook given and the SAE's metadata has no hook_name; pass --hook (store hooks: "
                             f"{', '.join(store.hooks)})")
    d_store = store.d(hook)
    d_in = _sae_param(sae, "W_dec").shape[1]
    if d_store != d_in:
        raise WorkbenchError(f"SAE expects d_in={d_in} but hook {hook!r} of the store has d={d_store}: "
                             "pick the hook the SAE was trained on")
    return hook


# ----------------------------------------------------------------------------------------- compute
def _stats_passes(sae: Any, store: Any, hook: str, acc: Any, n: int, batch_size: int, window_rows: Any,
                  dev: torch.device, sae_dtype: torch.dtype, cache_mb: float, d_sae: int):
    """Stream the store through the SAE for every pass of `acc`, each batch with the rows its windows
    reach (``window_rows``). Returns (encode seconds, codes cached).

    Sparse codes of pass 1 are kept for the later pass while they fit in cache_mb (per row its count of
    non-zeros; per non-zero its latent, int16 below 32,768 latents, and its float32 value, bit-exact), so
    pass 2 usually needs no second encode; past the budget it re-encodes instead."""
    t_enc = 0.0
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] | None = [] if cache_mb > 0 else None
    cache_bytes = 0
    col_dtype, col_bytes = (torch.int16, 2) if d_sae <= 32767 else (torch.int32, 4)
    from ..logs import bar
    for p in range(acc.n_passes):
        tp = time.time()
        pb = bar(total=n, unit="tok", unit_scale=True, desc=f"features pass {p + 1}/{acc.n_passes}", leave=False)
        for ci, s in enumerate(range(0, n, batch_size)):
            e = min(s + batch_size, n)
            wr = window_rows(s, e)
            valid = wr[wr >= 0]
            lo = min(s, int(valid.min())) if valid.numel() else s
            hi = max(e, int(valid.max()) + 1) if valid.numel() else e
            if p > 0 and cache is not None:
                n_, c_, v_, m_ = cache[ci]
                acts = torch.zeros((m_, d_sae), device=dev)
                r_ = torch.repeat_interleave(torch.arange(m_), n_.long())
                acts[r_.to(dev), c_.to(dev).long()] = v_.to(dev)
            else:
                x = store.read(hook, lo, hi, device=dev, dtype=sae_dtype)
                te = time.time()
                acts = sae.encode(x)
                t_enc += time.time() - te
                if p == 0 and acc.n_passes > 1 and cache is not None:
                    nz = (acts > 0).nonzero()          # row-major: a row's entries are contiguous
                    item = (torch.bincount(nz[:, 0], minlength=acts.shape[0]).int().cpu(),
                            nz[:, 1].to(col_dtype).cpu(), acts[nz[:, 0], nz[:, 1]].float().cpu(), acts.shape[0])
                    cache_bytes += (col_bytes + 4) * nz.shape[0] + 4 * acts.shape[0]
                    if cache_bytes > cache_mb * 2**20:
                        cache = None                 # over budget: pass 2 re-encodes
                    else:
                        cache.append(item)
            wi = torch.where(wr >= 0, wr - lo, torch.full_like(wr, -1))
            acc.update(acts, torch.arange(s, e), core=torch.arange(s - lo, e - lo), window_index=wi)
            if ci % TRIM_EVERY == TRIM_EVERY - 1:
                trim_heap()          # resident memory stays flat over millions of rows
            pb.update(e - s)
        pb.close()
        acc.end_pass()
        _log(f"pass {p + 1}/{acc.n_passes}: {n} rows in {time.time() - tp:.1f}s"
             + (" (codes cached from pass 1)" if p > 0 and cache is not None else ""))
    return t_enc, cache is not None and acc.n_passes > 1


def _weight_panels(W_dec: torch.Tensor, dev: torch.device, n_neighbours: int, n_neurons: int,
                   W_U: torch.Tensor | None, n_logits: int, logit_bins: int) -> tuple[dict[str, torch.Tensor], str]:
    """Panels from the weights alone: decoder neighbours, neuron alignment, logit table.
    Returns (tensors, why there is no logit table: "" when there is one)."""
    d_sae, d_in = W_dec.shape
    tensors: dict[str, torch.Tensor] = {}
    Wd = W_dec.to(dev).float()
    if d_sae > 1 and n_neighbours > 0:
        ids, cos = decoder_neighbours(Wd, n=n_neighbours)
        tensors["neighbour_ids"], tensors["neighbour_cos"] = ids.cpu(), cos.cpu()
    else:
        tensors["neighbour_ids"] = torch.zeros((d_sae, 0), dtype=torch.long)
        tensors["neighbour_cos"] = torch.zeros((d_sae, 0))
    nid, nval, nfrac = neuron_alignment(Wd, n=n_neurons)
    tensors["neuron_ids"], tensors["neuron_values"], tensors["neuron_fraction"] = nid.cpu(), nval.cpu(), nfrac.cpu()
    logits_reason = "no unembedding given"
    if W_U is not None:
        if W_U.shape[0] != d_in:
            logits_reason = (f"hook dimension d_in={d_in} differs from the model's d_model={W_U.shape[0]}; "
                             "the logit table needs a residual-stream hook")
        else:
            lt = logit_table(Wd, W_U.to(dev), k=n_logits, bins=logit_bins)
            for k_, v_ in lt.items():
                tensors["logit_" + k_] = v_.cpu()
            logits_reason = ""
    return tensors, logits_reason


WINDOW_SEQ_CHUNK = 2048   # sequences read at once for the example windows


def _example_windows(st: Any, store: Any, context: int, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Token windows (-1: outside the sequence or padding) of the rows the examples refer to, only. Their
    sequences are read ``chunk`` at a time (``store.sequences_at``): a wide SAE's examples reach nearly every
    sequence of the store, and reading them all at once held every token of the store (~20 bytes a row)."""
    chunk = chunk or WINDOW_SEQ_CHUNK
    refs = torch.cat([st.top_rows.reshape(-1), st.bucket_rows.reshape(-1)])
    ref_rows = torch.unique(refs[refs >= 0])
    rs, rp = store.row_index(ref_rows)
    useq, inv = torch.unique(rs, return_inverse=True)
    L, W = store.seq_len, 2 * context + 1
    window_tokens = torch.full((ref_rows.numel(), W), -1, dtype=torch.int32)
    docs = torch.empty(ref_rows.numel(), dtype=torch.long)
    order = torch.argsort(inv)                    # refs grouped by sequence, so a chunk's refs are one slice
    cuts = torch.searchsorted(inv[order], torch.arange(0, useq.numel() + chunk, chunk)).tolist()
    for c, a in enumerate(range(0, useq.numel(), chunk)):
        j = order[cuts[c]:cuts[c + 1]]            # the refs whose sequence is in useq[a:a + chunk]
        seqs = store.sequences_at(useq[a:a + chunk])
        tok, mask, k = seqs["token_ids"], seqs["attention_mask"], inv[j] - a
        pp = rp[j, None] + torch.arange(-context, context + 1)
        ppc = pp.clamp(0, L - 1)
        ok = (pp >= 0) & (pp < L) & mask[k[:, None], ppc]
        window_tokens[j] = torch.where(ok, tok[k[:, None], ppc], torch.full_like(pp, -1)).to(torch.int32)
        docs[j] = seqs["doc_ids"][k]
    return {"ref_rows": ref_rows, "ref_seq": rs, "ref_pos": rp, "ref_doc": docs, "window_token_ids": window_tokens}


@torch.no_grad()
def compute_features(sae: Any, store: Any, *, hook: str = "", max_tokens: int = 0, batch_size: int = 1024,
                     context: int = 5, n_top: int = 20, n_buckets: int = 10, per_bucket: int = 5,
                     hist_bins: int = 40, n_neighbours: int = 10, n_neurons: int = 8, n_logits: int = 10,
                     logit_bins: int = 40, W_U: torch.Tensor | None = None, tokenizer: Any = None,
                     device: str = "auto", seed: int = 0, cache_mb: float = 2048,
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The whole computation, without writing: (result.json fields, tensors, token strings).
    `sae`: an SAE object (encode, W_dec, cfg); `store`: an open ActivationStore."""
    t0 = time.time()
    dev = _resolve_device(device)
    hook = _check_inputs(sae, store, hook)
    W_dec = _sae_param(sae, "W_dec")
    d_sae, d_in = W_dec.shape
    if batch_size < 1 or context < 0 or n_top < 0:
        raise WorkbenchError("batch_size must be >= 1, context and n_top >= 0")
    n = store.n_rows if not max_tokens or max_tokens <= 0 else min(int(max_tokens), store.n_rows)
    if n == 0:
        raise WorkbenchError(f"store {store.path if hasattr(store, 'path') else ''} has no rows")
    W = 2 * context + 1
    window_rows = _window_rows_fn(store, context, 2 * W + 32)
    try:
        sae_dtype = _sae_param(sae, "W_enc").dtype
    except AttributeError:
        sae_dtype = torch.float32
    if hasattr(sae, "to"):
        try:
            sae = sae.to(dev)
        except Exception:  # noqa: BLE001 - plain stand-ins
            pass

    acc = FeatureStatsAccumulator(d_sae, n_top=n_top, n_buckets=n_buckets, per_bucket=per_bucket,
                                  hist_bins=hist_bins, window=W, seed=seed, device=dev)
    t_enc, codes_cached = _stats_passes(sae, store, hook, acc, n, batch_size, window_rows,
                                        dev, sae_dtype, cache_mb, d_sae)
    st = acc.result().to("cpu")
    t_stats = time.time() - t0

    tensors: dict[str, torch.Tensor] = {
        "count": st.count, "max": st.max.float(), "mean": st.mean.float(),
        "top_values": st.top_values.float(), "top_rows": st.top_rows,
        "top_window_acts": st.top_window_acts.clamp(-65504, 65504).half(),
        "bucket_values": st.bucket_values.float(), "bucket_rows": st.bucket_rows,
        "bucket_window_acts": st.bucket_window_acts.clamp(-65504, 65504).half(),
        "bucket_counts": st.bucket_counts, "hist_counts": st.hist_counts,
    }
    tw = time.time()
    panels, logits_reason = _weight_panels(W_dec, dev, n_neighbours, n_neurons, W_U, n_logits, logit_bins)
    tensors.update(panels)
    has_logits = not logits_reason
    t_weights = time.time() - tw
    tensors.update(_example_windows(st, store, context))

    window_tokens = tensors["window_token_ids"]
    ids_used = [window_tokens[window_tokens >= 0].long()]
    if has_logits:
        ids_used += [tensors["logit_top_ids"].reshape(-1), tensors["logit_bottom_ids"].reshape(-1)]
    uniq = torch.unique(torch.cat(ids_used)).tolist()
    token_strings = dict(zip((str(i) for i in uniq), _decode_tokens(tokenizer, uniq)))

    dead = float((st.count == 0).float().mean())
    meta = {
        "hook": hook, "architecture": str(_sae_meta(sae, "architecture", _sae_meta(sae, "arch", ""))),
        "d_sae": int(d_sae), "d_in": int(d_in), "n_tokens": int(st.n_tokens), "n_top": n_top,
        "n_buckets": acc.n_buckets, "per_bucket": acc.per_bucket, "hist_bins": hist_bins,
        "context": context, "window": W, "n_neighbours": int(tensors["neighbour_ids"].shape[1]),
        "n_neurons": int(tensors["neuron_ids"].shape[1]),
        "n_logits": int(tensors["logit_top_ids"].shape[1]) if has_logits else 0,
        "logit_bins": logit_bins if has_logits else 0, "has_logits": has_logits, "logits_reason": logits_reason,
        "dead_fraction": dead, "mean_l0": float(st.count.sum()) / max(st.n_tokens, 1),
        "passes": acc.n_passes, "codes_cached": codes_cached, "n_referenced_rows": int(tensors["ref_rows"].numel()),
        "tokens_decoded": tokenizer is not None, "device": str(dev),
        "timing": {"stats_s": round(t_stats, 3), "encode_s": round(t_enc, 3), "weights_s": round(t_weights, 3),
                   "total_s": round(time.time() - t0, 3)},
    }
    return meta, tensors, token_strings


def write_features(out: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   token_strings: dict[str, str], figures: bool = True) -> Path:
    out = Path(out)
    atomic_write_json(out / TOKENS_FILE, token_strings)
    figs = {}
    if figures:
        try:
            import plotly.graph_objects as go
            c = tensors["count"].double()
            ld = torch.log10((c / max(meta["n_tokens"], 1)).clamp(min=1e-10))
            fig = go.Figure(go.Histogram(x=ld.tolist(), nbinsx=60))
            fig.update_layout(title=f"latent density (log10; dead latents at -10), d_sae={meta['d_sae']}",
                              xaxis_title="log10 density", yaxis_title="latents")
            figs["density"] = fig
        except ImportError:  # pragma: no cover
            pass
    return write_result(out, KIND, meta, version=VERSION, tensors=tensors, figures=figs)


# ----------------------------------------------------------------------------------------- step
@register("features", FeaturesConfig, help="feature-dashboard data for every latent of an SAE over a store")
def features(cfg: FeaturesConfig) -> StepResult:
    from ..store import ActivationStore
    t0 = time.time()
    out = default_out(cfg.out, cfg.store, "results", f"features-{Path(cfg.sae).name}")
    store = ActivationStore.open(cfg.store)
    dev = _resolve_device(cfg.device)
    sae = _load_sae(cfg.sae, device=dev)
    _check_inputs(sae, store, cfg.hook)               # fail before touching `out`
    prepare_out(out, cfg.overwrite, what="features result")
    model_spec = store.manifest.get("model") or getattr(store, "model_name", None)
    tokenizer, tok_reason = None, ""
    try:
        from ..models import load_tokenizer
        tokenizer = load_tokenizer(model_spec)
    except Exception as e:  # noqa: BLE001 - dashboards still work with token ids
        tok_reason = f"{type(e).__name__}: {e}"
        _log(f"tokenizer for {model_spec!r} unavailable ({tok_reason}); showing token ids")
    W_U, logits_reason = None, "disabled (--no-logits)"
    if cfg.logits:
        try:
            from ..models import load_model
            m = load_model(model_spec, device="cpu")
            if getattr(m, "kind", "causal") != "causal" or getattr(m, "W_U", None) is None:
                logits_reason = f"{model_spec} is not a causal LM (no unembedding)"
            else:
                W_U = m.W_U_folded.detach().float().cpu()    # final norm's gain folded in
            del m
        except Exception as e:  # noqa: BLE001 - the logit table is optional
            logits_reason = f"model {model_spec!r} could not be loaded: {type(e).__name__}: {e}"
            _log(f"no logit table: {logits_reason}")
    meta, tensors, strings = compute_features(
        sae, store, hook=cfg.hook, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, context=cfg.context,
        n_top=cfg.n_top, n_buckets=cfg.n_buckets, per_bucket=cfg.per_bucket, hist_bins=cfg.hist_bins,
        n_neighbours=cfg.n_neighbours, n_logits=cfg.n_logits, W_U=W_U, tokenizer=tokenizer, device=cfg.device,
        cache_mb=cfg.cache_mb)
    if not meta["has_logits"] and W_U is None:
        meta["logits_reason"] = logits_reason
    if meta["has_logits"]:
        meta["logit_unembedding"] = LOGIT_UNEMBEDDING
    meta.update(sae=str(cfg.sae), store=str(cfg.store), model=model_spec, tokenizer_error=tok_reason,
                seconds=round(time.time() - t0, 3))
    write_features(out, meta, tensors, strings)
    summary = {"out": str(out), "d_sae": meta["d_sae"], "n_tokens": meta["n_tokens"], "hook": meta["hook"],
               "has_logits": meta["has_logits"]}
    metrics = {"dead_fraction": meta["dead_fraction"], "mean_l0": meta["mean_l0"], "n_tokens": meta["n_tokens"]}
    return StepResult(summary=summary, metrics=metrics, artifacts={"features": str(out)})


# ----------------------------------------------------------------------------------------- reader
def _fin(x: float) -> float | None:
    return None if x != x else float(x)


class FeatureData:
    """A features result, read for dashboards (see the module docstring for what each call returns)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_result(self.path, KIND)
        self.t = read_tensors(self.path)
        tf = self.path / TOKENS_FILE
        self.token_strings = {int(k): v for k, v in json.loads(tf.read_text()).items()} if tf.exists() else {}
        self.d_sae = int(self.meta["d_sae"])
        self.n_tokens = int(self.meta["n_tokens"])
        self.has_logits = bool(self.meta.get("has_logits"))
        self.context = int(self.meta["context"])

    def __repr__(self) -> str:
        return f"FeatureData({str(self.path)!r}, d_sae={self.d_sae}, n_tokens={self.n_tokens})"

    def __len__(self) -> int:
        return self.d_sae

    def tok(self, i: int) -> str:
        return self.token_strings.get(int(i), f"[{int(i)}]")

    # -- table
    def density(self) -> torch.Tensor:
        return self.t["count"].double() / max(self.n_tokens, 1)

    def _center_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Token id at the centre of each row's window (-1 for empty slots)."""
        ref = self.t["ref_rows"]
        flat = rows.reshape(-1)
        idx = torch.searchsorted(ref, flat.clamp(min=0)).clamp(max=max(ref.numel() - 1, 0))
        if ref.numel() == 0:
            return torch.full_like(rows, -1)
        c = self.t["window_token_ids"][idx, self.context].long()
        return torch.where(flat >= 0, c, torch.full_like(c, -1)).reshape(rows.shape)

    def table(self, n_tokens: int = 3):
        import pandas as pd
        dens = self.density()
        cols = {"latent": torch.arange(self.d_sae).numpy(), "count": self.t["count"].numpy(),
                "density": dens.numpy(), "log10_density": torch.log10(dens.clamp(min=1e-10)).numpy(),
                "max": self.t["max"].numpy(), "mean": self.t["mean"].numpy()}
        centers = self._center_tokens(self.t["top_rows"][:, :max(n_tokens * 3, 1)]).tolist()
        tops = []
        for row in centers:
            seen: list[str] = []
            for tid in row:
                if tid < 0:
                    continue
                s = repr(self.tok(tid))
                if s not in seen:
                    seen.append(s)
                if len(seen) == n_tokens:
                    break
            tops.append(" | ".join(seen))
        cols["top_tokens"] = tops
        if self.has_logits:
            ids = self.t["logit_top_ids"][:, :n_tokens].tolist()
            cols["top_logits"] = [" | ".join(repr(self.tok(i)) for i in r) for r in ids]
        else:
            cols["top_logits"] = [""] * self.d_sae
        return pd.DataFrame(cols)

    # -- one latent
    def _check(self, i: Any) -> int:
        try:
            j = int(i)
        except (TypeError, ValueError):
            raise LatentOutOfRange(f"latent index must be an integer in 0..{self.d_sae - 1}, got {i!r}") from None
        if not 0 <= j < self.d_sae or j != i:
            raise LatentOutOfRange(f"latent {i} out of range: this SAE has {self.d_sae} latents "
                                   f"(valid: 0..{self.d_sae - 1})")
        return j

    def _example(self, row: int, value: float, acts: torch.Tensor) -> dict[str, Any]:
        ref = self.t["ref_rows"]
        k = int(torch.searchsorted(ref, torch.tensor(row)))
        ids = self.t["window_token_ids"][k].tolist()
        a = acts.float().tolist()
        tokens, token_ids, vals, center = [], [], [], 0
        for j, tid in enumerate(ids):
            if tid < 0:
                continue
            if j == self.context:
                center = len(tokens)
            tokens.append(self.tok(tid))
            token_ids.append(int(tid))
            vals.append(_fin(a[j]))
        return {"value": float(value), "row": int(row), "seq": int(self.t["ref_seq"][k]),
                "pos": int(self.t["ref_pos"][k]), "doc": int(self.t["ref_doc"][k]), "tokens": tokens,
                "token_ids": token_ids, "acts": vals, "center": center}

    def latent(self, i: int) -> dict[str, Any]:
        f = self._check(i)
        t = self.t
        count = int(t["count"][f])
        dens = count / max(self.n_tokens, 1)
        mx = float(t["max"][f])
        top = [self._example(int(r), float(v), w) for r, v, w in
               zip(t["top_rows"][f], t["top_values"][f], t["top_window_acts"][f]) if int(r) >= 0]
        B = int(self.meta.get("n_buckets", 0))
        buckets = []
        if count and B:
            for b in range(B):
                ex = [self._example(int(r), float(v), w) for r, v, w in
                      zip(t["bucket_rows"][f, b], t["bucket_values"][f, b], t["bucket_window_acts"][f, b])
                      if int(r) >= 0]
                buckets.append({"lo": mx * b / B, "hi": mx * (b + 1) / B, "count": int(t["bucket_counts"][f, b]),
                                "examples": ex})
        H = t["hist_counts"].shape[1]
        hist = {"edges": [mx * h / H for h in range(H + 1)], "counts": t["hist_counts"][f].tolist()}
        logits = None
        if self.has_logits:
            lo, hi = (float(x) for x in t["logit_hist_range"][f])
            LB = t["logit_hist_counts"].shape[1]
            logits = {
                "top": [{"token": self.tok(j), "id": int(j), "value": float(v)}
                        for j, v in zip(t["logit_top_ids"][f].tolist(), t["logit_top_values"][f].tolist())],
                "bottom": [{"token": self.tok(j), "id": int(j), "value": float(v)}
                           for j, v in zip(t["logit_bottom_ids"][f].tolist(), t["logit_bottom_values"][f].tolist())],
                "histogram": {"edges": [lo + (hi - lo) * h / LB for h in range(LB + 1)],
                              "counts": t["logit_hist_counts"][f].tolist()},
            }
        return {
            "latent": f, "count": count, "density": dens, "log10_density": math.log10(max(dens, 1e-10)),
            "max": mx, "mean": float(t["mean"][f]), "top_examples": top, "buckets": buckets, "histogram": hist,
            "logits": logits,
            "neighbours": [{"latent": int(j), "cosine": float(c)} for j, c in
                           zip(t["neighbour_ids"][f].tolist(), t["neighbour_cos"][f].tolist())],
            "neurons": [{"neuron": int(j), "weight": float(w), "fraction": float(q)} for j, w, q in
                        zip(t["neuron_ids"][f].tolist(), t["neuron_values"][f].tolist(),
                            t["neuron_fraction"][f].tolist())],
        }


def load_features(path: str | Path) -> FeatureData:
    """Read a features result folder (kind "features")."""
    return FeatureData(path)


# ----------------------------------------------------------------------------------------- text box
_SAE_CACHE: dict[tuple, Any] = {}
_MODEL_CACHE: dict[str, Any] = {}


@torch.no_grad()
def latent_activations_for_text(sae_path: str | Path | Any, text: str, model: Any = None, hook: str | None = None,
                                device: str = "cpu") -> tuple[list[str], torch.Tensor]:
    """Tokens of `text` (each decoded on its own) and the SAE's latent activations [n_tokens, d_sae]
    at its hook. `sae_path`: an SAE folder (or an SAE object); `model`: a spec string, a loaded
    workbench Model, or None for the SAE's metadata model_name. The last SAE and model are cached."""
    if isinstance(sae_path, (str, Path)):
        p = Path(sae_path).resolve()
        key = (str(p), (p / "cfg.json").stat().st_mtime if (p / "cfg.json").exists() else 0, str(device))
        if key not in _SAE_CACHE:
            _SAE_CACHE.clear()
            _SAE_CACHE[key] = _load_sae(p, device=device)
        sae = _SAE_CACHE[key]
    else:
        sae = sae_path
    hook = hook or _sae_meta(sae, "hook_name", "")
    if not hook:
        raise WorkbenchError("the SAE's metadata has no hook_name; pass hook=")
    if model is None:
        model = _sae_meta(sae, "model_name", "")
        if not model:
            raise WorkbenchError("the SAE's metadata has no model_name; pass model=")
    if isinstance(model, (str, Path)):
        spec = str(model)
        if spec not in _MODEL_CACHE:
            from ..models import load_model
            _MODEL_CACHE.clear()
            _MODEL_CACHE[spec] = load_model(spec, device=device)
        model = _MODEL_CACHE[spec]
    tok = model.tokenizer(text, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if ids.shape[1] == 0:
        return [], torch.zeros((0, int(_sae_param(sae, "W_dec").shape[0])))
    acts = model.run(ids.to(model.device), mask.to(model.device), [hook])[hook][0]
    W_enc = _sae_param(sae, "W_enc")
    z = sae.encode(acts.to(W_enc.device, W_enc.dtype)).float().cpu()
    tokens = _decode_tokens(model.tokenizer, ids[0].tolist())
    return tokens, z
