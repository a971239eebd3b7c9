"""Collect a model's activations at some hooks over a corpus into an ActivationStore.

``collect(model, hooks, corpus, out, ...)``:

- hooks are resolved with ``model.resolve_hooks`` (exact names, globs, braces);
- the corpus is packed into windows of ``seq_len`` tokens, one document per window
  (``workbench.corpus.pack``), batched ``batch_size`` windows at a time (right padding, each batch
  trimmed to its longest window) and run under ``torch.inference_mode`` through ``model.run``,
  which stops after the deepest hooked layer and runs attention fused (SDPA) unless a hook needs
  the attention pattern; the next batches are tokenised in a background thread meanwhile
  (``READ_AHEAD`` batches ahead; the windows and their order are the same either way);
- the rows kept are the real tokens (``attention_mask``), minus the special tokens excluded by
  ``special_tokens``; padding never becomes a row. Rows are ordered by (sequence, position);
- exactly ``max_tokens`` rows are collected (the last window may contribute only its first rows;
  a ``max_tokens`` smaller than one batch simply gives one smaller batch). When the corpus runs
  out first, the store holds what there was, a warning says so and the manifest records
  ``exhausted: true``;
- rows stream to shards of about ``shard_mb`` MiB (a whole number of batches each), written by a
  background thread while the next shard is computed, so memory stays bounded (about two shards
  plus one forward pass) whatever ``max_tokens`` is; freed heap memory is handed back to the OS
  every ``TRIM_EVERY`` bytes of shards (glibc ``malloc_trim``) so the resident size does not creep up;
- deterministic: the same command gives byte-identical shards. Resumable: each shard is renamed
  into place complete and recorded in ``progress.json``; rerunning the same command after an
  interruption (Ctrl-C, SIGKILL, crash) keeps the intact shards and continues with the next batch,
  ending byte-identical to an uninterrupted run. An ``out`` holding a store (complete or partial)
  made with different settings is refused; ``overwrite=True`` replaces it. Rerunning a command
  whose store is already complete returns that store.

Special tokens (``special_tokens``): ``"exclude"`` (default: BOS/EOS/CLS/SEP/PAD ids never become
rows), ``"include"`` (every real token becomes a row), or a comma list of the kinds to keep as
rows, e.g. ``"bos"`` or ``"cls,sep"`` (the others are excluded). The manifest records the mode and
the excluded ids.

BOS (``prepend_bos``, default: as TransformerLens, on for causal models with a BOS token): every
window starts with the model's document-start token (``Model.text_bos_id``), whose row the default
``special_tokens="exclude"`` drops. Without it the first text token of each window becomes the
attention sink (SmolLM2: row norms ~100x the median; one PCA direction holding >99% of the variance).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .corpus import ReadAhead, corpus_fingerprint, iter_documents, pack
from .errors import OutputExists, WorkbenchError
from .logs import bar as bar_for
from .store import (DTYPES, MANIFEST, ActivationStore, StoreWriter, _settings_diff, dtype_name)

SPECIAL_KINDS = ("bos", "eos", "cls", "sep", "pad")
READ_AHEAD = 4      # batches of windows tokenised ahead in a background thread (0: inline)
log = logging.getLogger(__name__)


def _excluded_ids(special_tokens: str, special_ids: dict[str, int | None]) -> tuple[str, list[int]]:
    mode = (special_tokens or "exclude").strip().lower()
    if mode == "include":
        keep = set(SPECIAL_KINDS)
    elif mode == "exclude":
        keep = set()
    else:
        keep = {k.strip() for k in mode.split(",") if k.strip()}
        bad = sorted(keep - set(SPECIAL_KINDS))
        if bad or not keep:
            raise WorkbenchError(f"special_tokens must be 'exclude', 'include' or a comma list of "
                                 f"kinds to keep as rows from {', '.join(SPECIAL_KINDS)}; got {special_tokens!r}")
        mode = ",".join(k for k in SPECIAL_KINDS if k in keep)
    keep_ids = {special_ids.get(k) for k in keep} - {None}
    excluded = sorted({int(v) for k, v in special_ids.items()
                       if v is not None and k in SPECIAL_KINDS and k not in keep and v not in keep_ids})
    return mode, excluded


def _batches(windows: Iterator, batch_size: int) -> Iterator[list]:
    batch = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Docs:
    """Passes documents through, remembering their names (doc id -> name)."""

    def __init__(self, docs):
        self.docs, self.names = docs, []

    def __iter__(self):
        for d in self.docs:
            self.names.append(d.name)
            yield d


def collect(model: Any, hooks: str | Sequence[str], corpus: str = "builtin", out: str | os.PathLike | None = None,
            max_tokens: int = 50_000, seq_len: int = 128, batch_size: int = 16,
            dtype: torch.dtype | str | None = None, device: str = "auto",
            special_tokens: str = "exclude", overwrite: bool = False, progress: bool = True,
            shard_mb: float = 32, windows_per_doc: int = 0,
            prepend_bos: bool | None = None) -> ActivationStore:
    """Collect activations into a store at ``out`` (see the module docstring). ``model`` is a
    loaded Model or a model spec string; ``dtype`` is the storage dtype (float32 / float16 /
    bfloat16; default: the model's dtype when it is one of those, else float32). ``prepend_bos``
    (None: as TransformerLens, True for causal models with a BOS token) starts every window with
    BOS; with the default ``special_tokens="exclude"`` that token's row is not stored, so the
    attention-sink activations of a model's first position (norms ~100x the rest in SmolLM2)
    land on BOS instead of on the first real token."""
    out, hooks = _check_args(out, hooks, max_tokens, seq_len, batch_size, windows_per_doc, shard_mb)
    iter_documents(corpus)            # fail fast on a bad corpus spec before loading a model
    model = _model(model, device)
    plan = _Plan.make(model, hooks, corpus, max_tokens, seq_len, batch_size, dtype,
                      special_tokens, shard_mb, windows_per_doc, prepend_bos)
    if (out / MANIFEST).exists() and not overwrite:
        existing = ActivationStore.open(out)
        m = existing.manifest
        old = {**{k: m.get(k) for k in ("model", "hooks", "dtype", "seq_len")},
               "settings": m.get("collect", {}).get("settings") or {}}
        diff = _settings_diff(old, _header(plan.header_kw))
        if diff:
            raise OutputExists(f"{out} already holds a store made with different settings ({diff}); "
                               "pass --overwrite to replace it or choose another --out")
        _log(progress, f"{out} is already complete with these settings ({existing.n_rows} rows)")
        return existing

    writer = StoreWriter.start(out, overwrite=overwrite, **plan.header_kw)
    if writer.shards:
        _log(progress, f"resuming {out} after {len(writer.shards)} complete shard(s) "
                       f"({writer.n_rows} rows)")
    docs = _Docs(iter_documents(corpus))
    t0 = time.perf_counter()
    rows_new, max_doc, exhausted = _run(model, plan, docs, writer, progress, out.name)
    seconds = time.perf_counter() - t0
    if writer.n_rows == 0:
        raise WorkbenchError(f"corpus {corpus!r} gave no tokens to collect (every token was padding "
                             "or an excluded special token)")
    if exhausted and writer.n_rows < max_tokens:
        warnings.warn(f"corpus {corpus!r} ran out after {writer.n_rows} tokens (max_tokens={max_tokens}); "
                      "the store holds all of it", stacklevel=2)
    n_docs_store = int(max(
        [max_doc] + ([int(_last_doc(writer))] if writer.shards else []))) + 1
    names = docs.names[:n_docs_store] if len(docs.names) >= n_docs_store else None
    store = writer.finalize(
        corpus=plan.fingerprint,
        special_tokens={"mode": plan.mode, "excluded_ids": plan.excluded,
                        "special_ids": plan.special},
        documents=names,
        extra={"model_kind": getattr(model, "kind", None), "prepend_bos": plan.prepend_bos,
               "attention": (model.attention_for(plan.hooks) if hasattr(model, "attention_for")
                             else None)},
        stats={"tokens": writer.n_rows, "exhausted": bool(exhausted and writer.n_rows < max_tokens),
               "seconds_last_run": round(seconds, 3),
               "tokens_per_s_last_run": round(rows_new / seconds, 1) if seconds > 0 else None},
    )
    store.last_run = {"tokens": rows_new, "seconds": seconds,
                      "tokens_per_s": rows_new / seconds if seconds > 0 else 0.0}
    return store


def _check_args(out, hooks, max_tokens, seq_len, batch_size, windows_per_doc, shard_mb):
    if out is None or str(out) == "":
        raise WorkbenchError("collect needs an output folder (--out PATH)")
    for name, v, lo in (("max_tokens", max_tokens, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                        ("windows_per_doc", windows_per_doc, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise WorkbenchError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not shard_mb or shard_mb <= 0:
        raise WorkbenchError(f"shard_mb must be > 0, got {shard_mb!r}")
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise WorkbenchError("give at least one hook (--hooks NAME or a pattern like 'blocks.*.hook_resid_post')")
    return Path(out), list(hooks)


def _model(model: Any, device: str):
    """A loaded Model from a spec (on `device`), or the given one (which must be on `device`)."""
    if isinstance(model, str):
        from .models import load_model
        return load_model(model, device=device)
    if device not in (None, "auto") and torch.device(device).type != torch.device(model.device).type:
        raise WorkbenchError(f"the model is loaded on {model.device}, not {device}; load it with "
                             f"device={device!r} or pass device='auto'")
    return model


@dataclass
class _Plan:
    """Everything decided before the first forward pass; `settings` go into the manifest (a
    rerun with other settings is refused, with the same ones it resumes)."""

    dev: torch.device
    hooks: list[str]
    st_dtype: torch.dtype
    special: dict[str, Any]
    prepend_bos: bool
    bos: int | None
    mode: str
    excluded: list[int]
    shard_batches: int
    max_tokens: int
    seq_len: int
    batch_size: int
    windows_per_doc: int
    fingerprint: Any
    header_kw: dict[str, Any]

    @classmethod
    def make(cls, model, hooks, corpus, max_tokens, seq_len, batch_size, dtype, special_tokens,
             shard_mb, windows_per_doc, prepend_bos) -> "_Plan":
        dev = torch.device(model.device)
        resolved = list(dict.fromkeys(model.resolve_hooks(list(hooks))))
        dims = {h: int(model.d(h)) for h in resolved}
        if dtype is None:
            dtype = model.dtype if model.dtype in DTYPES.values() else torch.float32
        dname = dtype_name(dtype)
        st_dtype = DTYPES[dname]
        special = dict(model.special_ids)
        bos = getattr(model, "text_bos_id", special.get("bos"))
        if prepend_bos is None:
            prepend_bos = (getattr(model, "kind", None) == "causal" and bos is not None and
                           bool(getattr(getattr(model.bridge, "cfg", None), "default_prepend_bos", True)))
        elif prepend_bos and bos is None:
            raise WorkbenchError(f"{model.name} has no BOS token to prepend; collect with prepend_bos=False "
                                 "(--prepend-bos no)")
        prepend_bos = bool(prepend_bos)
        if prepend_bos:
            special["bos"] = int(bos)    # the token we put first is the BOS that special_tokens means
        mode, excluded = _excluded_ids(special_tokens, special)
        bytes_per_token = sum(dims.values()) * st_dtype.itemsize
        shard_batches = max(1, int(shard_mb * (1 << 20)) // (batch_size * seq_len * bytes_per_token))
        fingerprint = corpus_fingerprint(corpus)
        settings = {
            "model": model.name, "model_dtype": str(model.dtype).replace("torch.", ""),
            "device": dev.type, "hooks": resolved, "corpus": fingerprint, "max_tokens": max_tokens,
            "seq_len": seq_len, "batch_size": batch_size, "dtype": dname,
            "special_tokens": mode, "excluded_ids": excluded, "shard_batches": shard_batches,
            "windows_per_doc": int(windows_per_doc), "prepend_bos": prepend_bos,
            "bos_id": int(bos) if prepend_bos else None,
        }
        header_kw = dict(model=model.name, hooks=dims, dtype=dname, seq_len=seq_len, settings=settings)
        return cls(dev, resolved, st_dtype, special, prepend_bos, bos, mode, excluded, shard_batches,
                   max_tokens, seq_len, batch_size, int(windows_per_doc), fingerprint, header_kw)


def _batch_rows(batch: list, plan: _Plan, pad_id: int, excl: torch.Tensor, remaining: int):
    """Token ids, mask and the rows to keep of one batch of windows, planned on the CPU before
    any compute; the batch that reaches max_tokens is cut at exactly `remaining` rows. Last: the
    character end of every token ([n, seq_len] int32, -1 for specials / padding) or None."""
    n = len(batch)
    ids = torch.full((n, plan.seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, plan.seq_len), dtype=torch.bool)
    ends = torch.full((n, plan.seq_len), -1, dtype=torch.int32) if all(
        getattr(w, "char_end", None) is not None for w in batch) else None
    for i, w in enumerate(batch):
        ids[i, :len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
        mask[i, :len(w.ids)] = True
        if ends is not None:
            ends[i, :len(w.ids)] = torch.tensor(w.char_end, dtype=torch.int32)
    keep = mask.clone()
    if len(excl):
        keep &= ~torch.isin(ids, excl)
    cum = torch.cumsum(keep.sum(1), 0)
    if int(cum[-1]) >= remaining:        # the last batch: cut at exactly max_tokens rows
        n_used = int((cum < remaining).sum()) + 1
        batch, ids, mask, keep = batch[:n_used], ids[:n_used], mask[:n_used], keep[:n_used]
        flat = keep.reshape(-1)
        over = int(flat.sum()) - remaining
        if over > 0:
            flat[flat.nonzero()[-over:, 0]] = False
            keep = flat.reshape(keep.shape)
    return batch, ids, mask, keep, (None if ends is None else ends[:len(batch)])


def _run(model, plan: _Plan, docs: "_Docs", writer: StoreWriter, progress: bool,
         label: str) -> tuple[int, int, bool]:
    """The forward passes: rows stream into shards written by a background thread (one in
    flight). Returns (rows collected now, largest doc id, whether the corpus ran out)."""
    rows_done, seq_done = writer.n_rows, writer.n_seq
    pad_id = model.special_ids.get("pad")
    pad_id = 0 if pad_id is None else int(pad_id)
    windows = pack(docs, model.tokenizer, plan.seq_len, windows_per_doc=plan.windows_per_doc,
                   bos_id=int(plan.bos) if plan.prepend_bos else None)
    excl = torch.tensor(plan.excluded, dtype=torch.long)
    bar = bar_for(total=plan.max_tokens, initial=rows_done, unit="tok", unit_scale=True,
                  desc=f"collect {label}", smoothing=0.1) if progress else None
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    pending: cf.Future | None = None
    rows_new, max_doc, exhausted = 0, -1, True
    ahead = ReadAhead(_batches(windows, plan.batch_size), READ_AHEAD)   # tokenise while computing
    try:
        buf = _ShardBuffer(plan.hooks)
        seq_counter, rows_total = 0, 0
        for batch in ahead:
            batch, ids, mask, keep, ends = _batch_rows(batch, plan, pad_id, excl, plan.max_tokens - rows_total)
            n, L = len(batch), max(len(w.ids) for w in batch)
            n_rows = int(keep.sum())
            rows_total += n_rows
            seq_start = seq_counter
            seq_counter += n
            if seq_counter <= seq_done:          # already in a complete shard (resume)
                if rows_total >= plan.max_tokens:
                    exhausted = False
                    break
                continue
            with torch.inference_mode():
                acts = model.run(ids[:, :L].to(plan.dev), mask[:, :L].to(plan.dev), plan.hooks)
                k = keep[:, :L]
                kd = k.to(plan.dev)
                rows = {h: acts[h].reshape(n, L, -1)[kd].to(plan.st_dtype).to("cpu") for h in plan.hooks}
            del acts
            si, po = k.nonzero(as_tuple=True)
            buf.add(rows, si + seq_start, po, ids, mask, torch.tensor([w.doc_id for w in batch]),
                    ends)
            max_doc = max(max_doc, max(w.doc_id for w in batch))
            rows_new += n_rows
            if bar is not None:
                bar.update(n_rows)
            done = rows_total >= plan.max_tokens
            if buf.n_batches >= plan.shard_batches or done:
                pending = _submit(pool, pending, writer, buf)
                buf = _ShardBuffer(plan.hooks)
                if bar is not None:
                    bar.set_postfix(shards=len(writer.shards) + 1, refresh=False)
            if done:
                exhausted = False
                break
        if buf.n_batches:
            pending = _submit(pool, pending, writer, buf)
        if pending is not None:
            pending.result()
    finally:
        ahead.close()
        if bar is not None:
            bar.close()
        pool.shutdown(wait=True)   # an in-flight shard write completes (it is atomic either way)
    return rows_new, max_doc, exhausted


def _header(kw: dict[str, Any]) -> dict[str, Any]:
    return {"model": kw["model"], "hooks": [{"name": h, "d": int(d)} for h, d in kw["hooks"].items()],
            "dtype": kw["dtype"], "seq_len": int(kw["seq_len"]), "settings": kw["settings"]}


def _last_doc(writer: StoreWriter) -> int:
    from .store import _Shard
    sh = _Shard(writer.path / writer.shards[-1]["file"])
    d = sh.tensor("doc_ids")
    return int(d.max()) if d.numel() else -1


class _ShardBuffer:
    def __init__(self, hooks: list[str]):
        self.hooks = hooks
        self.acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        self.si, self.po, self.tok, self.mask, self.doc, self.ends = [], [], [], [], [], []
        self.n_batches = 0

    def add(self, rows, si, po, tok, mask, doc, ends=None):
        for h in self.hooks:
            self.acts[h].append(rows[h])
        self.si.append(si)
        self.po.append(po)
        self.tok.append(tok)
        self.mask.append(mask)
        self.doc.append(doc)
        self.ends.append(ends)
        self.n_batches += 1

    def tensors(self):
        return ({h: torch.cat(v) for h, v in self.acts.items()}, torch.cat(self.si), torch.cat(self.po),
                torch.cat(self.tok), torch.cat(self.mask), torch.cat(self.doc),
                torch.cat(self.ends) if self.ends and all(e is not None for e in self.ends) else None)


def _submit(pool: cf.ThreadPoolExecutor, pending: cf.Future | None, writer: StoreWriter,
            buf: _ShardBuffer) -> cf.Future:
    """Queue a shard write, after the previous one finished (at most one in flight).

    The shard's tensors are joined and given their stored dtypes here, on the calling thread, so
    the writer thread runs no torch op (it only serialises, hashes and writes bytes). A torch op
    on a second thread starts a second OpenMP team, and libgomp then stops its threads spinning
    between parallel regions while that thread lives: the forward passes would run in another
    regime than a plain forward (measured on an oversubscribed 2-core machine: 2.4x faster; on a
    quiet one, sleeping threads add wake-up latency instead), so not like-for-like."""
    if pending is not None:
        pending.result()
    nbytes = sum(t.numel() * t.element_size() for v in buf.acts.values() for t in v)
    acts, si, po, tok, mask, doc, ends = buf.tensors()
    shard = (acts, si.to(torch.int32), po.to(torch.int32), tok.to(torch.int32), mask.to(torch.bool),
             doc.to(torch.int64), None if ends is None else ends.to(torch.int32))
    buf.__init__(buf.hooks)              # drop the batches' tensors now

    def job():
        entry = writer.write_shard(*shard)
        shard[0].clear()
        _trim_heap(nbytes)
        return entry
    return pool.submit(job)


TRIM_EVERY = 256 << 20   # bytes of shards written between two heap trims
_TRIMMED = [0]


def _trim_heap(nbytes: int | None = None) -> None:
    """Give freed heap memory back to the OS once every TRIM_EVERY bytes of shards (glibc keeps it
    otherwise, and the resident size creeps up with fragmentation over a long collection); `None`:
    now. Not after every shard: each trim makes the next forward passes fault their buffers back in
    (smollm2, 8 MiB shards: ~0.5M page faults and +1 s of system time per 20k tokens, measured
    with getrusage). No-op off Linux."""
    global _MALLOC_TRIM
    if nbytes is not None:
        _TRIMMED[0] += nbytes
        if _TRIMMED[0] < TRIM_EVERY:
            return
    _TRIMMED[0] = 0
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _log(progress: bool, msg: str) -> None:
    if progress:
        log.info(msg)
