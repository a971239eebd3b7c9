"""Activation store: a folder of safetensors shards plus a manifest, read memory-mapped.

Layout (format ``workbench.activation_store`` version 1)::

    STORE/manifest.json                   written LAST, atomically (temp + rename): the store is
                                          complete iff this file exists; sha256 of every data file
    STORE/shards/shard-00000.safetensors  one file per shard, holding ALL hooks of that shard:
        acts.<hook>      [rows, d]        activations in the storage dtype (float32/float16/bfloat16)
        seq_index        [rows]   int32   global sequence index of each row
        position         [rows]   int32   token position of each row inside its sequence
        token_ids        [n_seq, seq_len] int32   the sequences this shard introduces
        attention_mask   [n_seq, seq_len] bool    (False = padding; padding never becomes a row)
        doc_ids          [n_seq]  int64   document id of each sequence (one document per sequence)
        char_end         [n_seq, seq_len] int32   optional: character of the document where each
                                          token ends (-1: special / padding); stores collected
                                          before it existed lack it (``has_char_offsets``)
    STORE/documents.json                  optional: names of the documents (doc id -> name)
    STORE/progress.json                   only while collecting: settings + the shards done so far

Why one file per shard with every hook (not one file per hook): a shard is the unit of writing and
of resuming (it is renamed into place complete, then recorded in progress.json), and reading one
hook out of it is still one contiguous byte range of the file (safetensors stores each tensor
contiguously), so nothing is lost for read speed.

Reading never loads a whole file: each shard's safetensors header is parsed once and its tensors
are ``numpy.memmap`` views; ``read`` copies only the requested rows. ``batches`` streams a hook
shuffled with bounded memory (see its docstring). Reading a store never imports
``workbench.models``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from analyses._util import DTYPES as _ALL_DTYPES, dtype_key

from .errors import OutputExists, StoreCorrupted, WorkbenchError, closest
from .results import atomic_write_bytes, atomic_write_json

FORMAT = "workbench.activation_store"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
DOCUMENTS = "documents.json"
SHARD_DIR = "shards"

# Storage dtypes: a subset of the one dtype map (analyses._util.DTYPES).
DTYPES: dict[str, torch.dtype] = {k: _ALL_DTYPES[k] for k in ("float32", "float16", "bfloat16")}
_ST_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

DEFAULT_BUFFER_BYTES = 256 << 20   # shuffle window of `batches`


def dtype_name(dtype: torch.dtype | str | None) -> str:
    try:
        return dtype_key(dtype, DTYPES)
    except ValueError:
        raise WorkbenchError(f"storage dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None


def shard_name(i: int) -> str:
    return f"{SHARD_DIR}/shard-{i:05d}.safetensors"


def sha256_file(path: Path, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _to_torch(arr: np.ndarray, st_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if st_dtype == "BF16":
        t = t.view(torch.bfloat16)
    return t


class _Shard:
    """A memory-mapped safetensors file: header parsed once, tensors as numpy.memmap views."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise StoreCorrupted(f"{path}: unreadable safetensors file ({e}); "
                                 "run `workbench store verify` on the store") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.tensors = header
        self._maps: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def st_dtype(self, name: str) -> str:
        return self.tensors[name]["dtype"]

    def array(self, name: str) -> np.ndarray:
        """memmap view (no data read until sliced) of one tensor; BF16 appears as uint16."""
        m = self._maps.get(name)
        if m is None:
            info = self.tensors[name]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            npd = _ST_NUMPY[info["dtype"]]
            if end == begin:
                m = np.zeros(shape, dtype=npd)
            else:
                m = np.memmap(self.path, dtype=npd, mode="r", offset=self.base + begin, shape=shape)
            self._maps[name] = m
        return m

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, copied out of the map."""
        a = self.array(name)
        return _to_torch(np.array(a[start:stop]), self.st_dtype(name))


# ---------------------------------------------------------------------------------------------
class ActivationStore:
    """A complete activation store (open with ``ActivationStore.open(path)``).

    Row r of every hook is the activation at token
    ``sequences()["token_ids"][rows()["seq_index"][r], rows()["position"][r]]``.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._hooks = {h["name"]: int(h["d"]) for h in manifest["hooks"]}
        self._shards_meta = manifest["shards"]
        self._row_starts = [int(s["row_start"]) for s in self._shards_meta]
        self._open: dict[int, _Shard] = {}
        self._rows_cache: dict[str, torch.Tensor] | None = None
        self._seq_cache: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "ActivationStore":
        """Open a complete store. Cheap checks always (every file present with the right size);
        ``verify=True`` also checks every file's sha256."""
        path = Path(path)
        if not path.exists():
            raise WorkbenchError(f"no activation store at {path} (folder does not exist)")
        if not path.is_dir():
            raise WorkbenchError(f"{path} is a file, not an activation store folder")
        mf = path / MANIFEST
        if not mf.exists():
            if (path / PROGRESS).exists():
                try:
                    done = len(json.loads((path / PROGRESS).read_text()).get("shards", []))
                except ValueError:
                    done = "?"
                raise WorkbenchError(
                    f"{path} is an incomplete activation store (collection was interrupted after "
                    f"{done} complete shard(s); no {MANIFEST}). Rerun the same `workbench collect` "
                    "command to resume, or pass --overwrite to start over")
            raise WorkbenchError(f"{path} is not an activation store (no {MANIFEST}); "
                                 "make one with `workbench collect`")
        try:
            manifest = json.loads(mf.read_text())
        except ValueError as e:
            raise StoreCorrupted(f"{mf}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise WorkbenchError(f"{mf} is not an activation store manifest "
                                 f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
        if int(manifest.get("version", 0)) > VERSION:
            raise WorkbenchError(f"{path} was written by a newer workbench (store version "
                                 f"{manifest['version']}, this one reads <= {VERSION}); upgrade workbench")
        store = cls(path, manifest)
        store._check_sizes()
        if verify:
            store.verify()
        return store

    def _files(self) -> list[tuple[str, str, int]]:
        """(relative file, sha256, bytes) of every data file the manifest lists."""
        out = [(s["file"], s["sha256"], int(s["bytes"])) for s in self._shards_meta]
        for name, f in sorted(self.manifest.get("files", {}).items()):
            out.append((name, f["sha256"], int(f["bytes"])))
        return out

    def _check_sizes(self) -> None:
        for rel, _, size in self._files():
            p = self.path / rel
            if not p.exists():
                raise StoreCorrupted(f"{p}: missing (the store lists it in {MANIFEST})")
            actual = p.stat().st_size
            if actual != size:
                raise StoreCorrupted(f"{p}: {'truncated' if actual < size else 'wrong size'} "
                                     f"({actual} bytes, expected {size})")

    def verify(self) -> None:
        """Check that every file exists with the size and sha256 the manifest records; raise
        StoreCorrupted naming the first bad file."""
        self._check_sizes()
        for rel, sha, _ in self._files():
            p = self.path / rel
            got = sha256_file(p)
            if got != sha:
                raise StoreCorrupted(f"{p}: sha256 mismatch (file was edited or damaged): "
                                     f"{got[:16]}... != {sha[:16]}... recorded in {MANIFEST}")

    # ------------------------------------------------------------------ metadata
    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def prepend_bos(self) -> bool:
        """Whether every window started with a BOS token the collector added (stores from before
        this setting existed: False)."""
        return bool((self.manifest.get("collect", {}).get("settings") or {}).get("prepend_bos", False))

    @property
    def hooks(self) -> list[str]:
        return list(self._hooks)

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_seq(self) -> int:
        return int(self.manifest["n_seq"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model_name!r}, hooks={self.hooks}, "
                f"n_rows={self.n_rows}, dtype={self.manifest['dtype']})")

    def d(self, hook: str) -> int:
        return self._hooks[self._check_hook(hook)]

    def _check_hook(self, hook: str) -> str:
        if hook not in self._hooks:
            raise WorkbenchError(f"hook {hook!r} is not in store {self.path}; "
                                 f"it has: {closest(hook, self._hooks)}")
        return hook

    def shard_files(self) -> list[Path]:
        return [self.path / s["file"] for s in self._shards_meta]

    def documents(self) -> list[str] | None:
        """Names of the documents (index = doc id), when the collector recorded them."""
        p = self.path / DOCUMENTS
        return json.loads(p.read_text()) if p.exists() else None

    def info(self) -> dict[str, Any]:
        m = self.manifest
        size = sum(int(b) for _, _, b in self._files()) + (self.path / MANIFEST).stat().st_size
        return {
            "path": str(self.path), "model": m["model"],
            "hooks": dict(self._hooks), "n_rows": self.n_rows, "n_seq": self.n_seq,
            "seq_len": self.seq_len, "dtype": m["dtype"], "shards": len(self._shards_meta),
            "bytes_on_disk": size, "size": _human_bytes(size),
            "corpus": m.get("corpus"), "special_tokens": m.get("special_tokens"),
            "created": m.get("created"),
        }

    # ------------------------------------------------------------------ reading
    def _shard(self, i: int) -> _Shard:
        sh = self._open.get(i)
        if sh is None:
            sh = self._open[i] = _Shard(self.path / self._shards_meta[i]["file"])
        return sh

    def __getstate__(self):   # picklable (DataLoader workers, ray): drop open maps
        st = dict(self.__dict__)
        st["_open"] = {}
        return st

    def read(self, hook: str, start: int = 0, stop: int | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """Rows [start, stop) of one hook as a [rows, d] tensor (memory-mapped: only those rows are
        read). dtype None keeps the storage dtype."""
        self._check_hook(hook)
        n = self.n_rows
        stop = n if stop is None else stop
        if start < 0:
            start += n
        if stop < 0:
            stop += n
        if not 0 <= start <= stop <= n:
            raise WorkbenchError(f"rows [{start}, {stop}) out of range: store has {n} rows")
        d = self._hooks[hook]
        out = torch.empty((stop - start, d), dtype=self.dtype)
        key = "acts." + hook
        i = max(0, bisect.bisect_right(self._row_starts, start) - 1)
        pos = start
        while pos < stop and i < len(self._shards_meta):
            s0 = self._row_starts[i]
            s1 = s0 + int(self._shards_meta[i]["rows"])
            if s1 > pos:
                a, b = pos - s0, min(stop, s1) - s0
                out[pos - start: pos - start + (b - a)] = self._shard(i).tensor(key, a, b)
                pos += b - a
            i += 1
        return _move(out, device, dtype)

    def _column(self, name: str) -> torch.Tensor:
        """One per-shard tensor over the whole store, as int64 (bool stays bool), shards in order."""
        parts = [self._shard(i).tensor(name) for i in range(len(self._shards_meta))]
        dtype = torch.bool if name == "attention_mask" else torch.long
        shape = (0, self.seq_len) if name in ("token_ids", "attention_mask", "char_end") else (0,)
        return _cat([t.to(dtype).reshape(-1, *shape[1:]) for t in parts], dtype, shape)

    def rows(self) -> dict[str, torch.Tensor]:
        """{"seq_index": LongTensor[n_rows], "position": LongTensor[n_rows]}."""
        if self._rows_cache is None:
            self._rows_cache = {k: self._column(k) for k in ("seq_index", "position")}
        return {k: v.clone() for k, v in self._rows_cache.items()}

    def _by_shard(self, idx: torch.Tensor, what: str):
        """Check row (``what="rows"``) or sequence indices and group them by shard: yields (shard, mask of
        idx in that shard, offsets inside it)."""
        n, starts = (self.n_rows, self._row_starts) if what == "rows" else (self.n_seq, self._seq_starts())
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise WorkbenchError(f"{what} must be indices in [0, {n}) (the store's {what}), got min "
                                 f"{int(idx.min())}, max {int(idx.max())}")
        shard = torch.searchsorted(torch.tensor(starts, dtype=torch.long), idx, right=True) - 1
        for i in torch.unique(shard).tolist():
            m = shard == i
            yield i, m, idx[m] - starts[i]

    def _seq_starts(self) -> list[int]:
        counts = [int(m["n_seq"]) for m in self._shards_meta]
        return [sum(counts[:i]) for i in range(len(counts))]

    def row_index(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_index, position) LongTensors of the given rows, read from their shards' maps alone: memory in
        the number of rows asked for, not the store's (``rows()`` holds every row's)."""
        idx = torch.as_tensor(rows).long().reshape(-1)
        seq, pos = torch.empty_like(idx), torch.empty_like(idx)
        for i, m, local in self._by_shard(idx, "rows"):
            sh = self._shard(i)
            seq[m] = torch.from_numpy(np.asarray(sh.array("seq_index")[local.numpy()]).astype(np.int64))
            pos[m] = torch.from_numpy(np.asarray(sh.array("position")[local.numpy()]).astype(np.int64))
        return seq, pos

    def sequences_at(self, seqs) -> dict[str, torch.Tensor]:
        """``sequences()`` restricted to the given sequence indices, in that order, read from their shards
        alone (``char_end`` too when every shard has it)."""
        idx = torch.as_tensor(seqs).long().reshape(-1)
        L = self.seq_len
        names = ["token_ids", "attention_mask", "doc_ids"] + (["char_end"] if self.has_char_offsets else [])
        out = {k: torch.empty((idx.numel(),) if k == "doc_ids" else (idx.numel(), L),
                              dtype=torch.bool if k == "attention_mask" else torch.long) for k in names}
        for i, m, local in self._by_shard(idx, "sequences"):
            sh = self._shard(i)
            for k in names:
                a = sh.array(k) if k == "doc_ids" else sh.array(k).reshape(-1, L)
                out[k][m] = torch.from_numpy(np.asarray(a[local.numpy()]).astype(bool if k == "attention_mask"
                                                                                  else np.int64))
        return out

    def doc_ids(self) -> torch.Tensor:
        """LongTensor[n_seq]: each sequence's document id, read alone (not the token ids with it)."""
        return self._seq_cache["doc_ids"].clone() if self._seq_cache is not None else self._column("doc_ids")

    def seq_index(self) -> torch.Tensor:
        """LongTensor[n_rows]: the sequence of every row, read alone (not the positions with it)."""
        return self._rows_cache["seq_index"].clone() if self._rows_cache is not None else self._column("seq_index")

    def sequences(self) -> dict[str, torch.Tensor]:
        """{"token_ids": LongTensor[n_seq, seq_len], "attention_mask": BoolTensor[n_seq, seq_len],
        "doc_ids": LongTensor[n_seq]}."""
        if self._seq_cache is None:
            names = ["token_ids", "attention_mask", "doc_ids"] + (["char_end"] if self.has_char_offsets else [])
            self._seq_cache = {k: self._column(k) for k in names}
        return {k: v.clone() for k, v in self._seq_cache.items()}

    @property
    def has_char_offsets(self) -> bool:
        """Whether every shard records where each token ends in its document (``char_end``)."""
        return bool(self._shards_meta) and all(self._shard(i).has("char_end")
                                                for i in range(len(self._shards_meta)))

    def row_char_end(self) -> torch.Tensor:
        """LongTensor[n_rows]: the character of its document where row r's token ends (-1: none).
        WorkbenchError for a store collected without offsets."""
        if not self.has_char_offsets:
            raise WorkbenchError(f"store {self.path} has no character offsets (collected before they were "
                                 "recorded, or with a slow tokenizer); collect it again")
        r = self.rows()
        return self.sequences()["char_end"][r["seq_index"], r["position"]]

    def split(self, holdout: float = 0.05, seed: int = 0):
        """Deterministic train / held-out split by document (see :mod:`workbench.store_split`):
        -> ``StoreSplit`` with ``train_rows``, ``heldout_rows``, ``heldout_seqs``, ``meta()``."""
        from .store_split import split_store
        return split_store(self, holdout, seed)

    def split_rows(self, holdout: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(train_row_idx, heldout_row_idx), sorted LongTensors (8 bytes a row: ``split()`` gives them as
        ``RowRanges``, which ``batches(rows=...)`` takes directly); rule in :mod:`workbench.store_split`."""
        sp = self.split(holdout, seed)
        return sp.train_rows.indices(), sp.heldout_rows.indices()

    def _select(self, rows) -> "_Selection":
        """Rows (a ``RowRanges``, or indices in any order, duplicates ignored) -> the shards holding any of
        them, with their counts and sorted offsets inside each shard."""
        from .store_split import RowRanges
        if isinstance(rows, RowRanges):
            if rows.n_ranges and (int(rows.starts[0]) < 0 or int(rows.ends[-1]) > self.n_rows):
                raise WorkbenchError(f"rows must be indices in [0, {self.n_rows}) (the store's rows), got "
                                     f"[{int(rows.starts[0])}, {int(rows.ends[-1])})")
            return _Selection(self, rows)
        idx = torch.unique(torch.as_tensor(rows).long().reshape(-1))       # sorted
        return _Selection(self, {i: local for i, _, local in self._by_shard(idx, "rows")})

    def _take(self, i: int, key: str, local: torch.Tensor | None) -> torch.Tensor:
        """Rows of shard i (all, or the sorted offsets ``local``), reading contiguous runs as slices of the
        map (held-out documents are runs of rows); mostly scattered rows by fancy index."""
        from .store_split import RowRanges
        sh = self._shard(i)
        if local is None:
            return sh.tensor(key)
        if local.numel() == 0:
            return torch.empty((0, int(sh.tensors[key]["shape"][1])), dtype=self.dtype)
        runs = RowRanges.from_indices(local)
        if runs.n_ranges > max(4, local.numel() // 8):      # mostly scattered rows
            return _to_torch(np.asarray(sh.array(key)[local.numpy()]), sh.st_dtype(key))
        parts = [sh.tensor(key, a, b) for a, b in zip(runs.starts.tolist(), runs.ends.tolist())]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def batches(self, hook: str, batch_size: int, shuffle: bool = True, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                drop_last: bool = False, buffer_rows: int | None = None,
                rows=None) -> Iterator[torch.Tensor]:
        """Stream one hook as [batch_size, d] tensors; every row exactly once per pass (the last
        batch is smaller unless drop_last). ``rows`` (a ``RowRanges`` such as ``split().train_rows``,
        or row indices) restricts the stream to those rows, each once (duplicates ignored); only
        their shards are read, contiguous runs as slices. Ranges become a shard's row offsets only
        when that shard is read (never a list over the store), with the same batches as the indices.

        Shuffle scheme (bounded memory): the shard order is permuted with ``seed``; shards are then
        taken in that order into a window of at least ``buffer_rows`` rows (default: as many rows as
        fit in 256 MiB, at least one shard); the window's rows plus the < batch_size rows carried
        over from the previous window are permuted and yielded in batches, and the remainder
        carries on. At most one window + one shard + one carry + one batch are in memory, whatever
        the store's size. Rows from far-apart parts of the corpus mix because the shard order is
        random; rows only mix across shards of the same window. ``shuffle=False`` streams rows in
        store order. Same seed -> same batches.
        """
        self._check_hook(hook)
        if batch_size < 1:
            raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
        d = self._hooks[hook]
        key = "acts." + hook
        sel = None if rows is None else self._select(rows)
        if not shuffle and sel is None:
            for s in range(0, self.n_rows, batch_size):
                stop = min(s + batch_size, self.n_rows)
                if drop_last and stop - s < batch_size:
                    return
                yield self.read(hook, s, stop, device=device, dtype=dtype)
            return
        if not shuffle:                   # selected rows in store order, shard by shard
            carry = torch.empty((0, d), dtype=self.dtype)
            for i in sel.shards:
                buf = torch.cat([carry, self._take(i, key, sel.local(i))])
                full = (buf.shape[0] // batch_size) * batch_size
                for s in range(0, full, batch_size):
                    yield _move(buf[s:s + batch_size], device, dtype)
                carry = buf[full:]
            if carry.shape[0] and not drop_last:
                yield _move(carry, device, dtype)
            return
        if buffer_rows is None:
            buffer_rows = max(batch_size, DEFAULT_BUFFER_BYTES // (d * self.dtype.itemsize))
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(self._shards_meta), generator=g).tolist()
        if sel is not None:
            order = [i for i in order if sel.count(i)]
        carry = torch.empty((0, d), dtype=self.dtype)
        k = 0
        while k < len(order):
            take, n = [], carry.shape[0]
            while k < len(order) and (n < buffer_rows or not take):
                take.append(order[k])
                n += int(self._shards_meta[order[k]]["rows"]) if sel is None else sel.count(order[k])
                k += 1
            buf = torch.empty((n, d), dtype=self.dtype)    # filled shard by shard: no second window-sized copy
            buf[:carry.shape[0]] = carry
            pos = carry.shape[0]
            for i in take:
                t = self._take(i, key, None if sel is None else sel.local(i))
                buf[pos:pos + t.shape[0]] = t
                pos += t.shape[0]
                del t
            perm = torch.randperm(buf.shape[0], generator=g)
            full = (buf.shape[0] // batch_size) * batch_size
            for s in range(0, full, batch_size):
                yield _move(buf[perm[s:s + batch_size]], device, dtype)
            carry = buf[perm[full:]]
            del buf
        if carry.shape[0] and not drop_last:
            yield _move(carry, device, dtype)


class _Selection:
    """The rows ``batches`` streams, shard by shard: from index tensors, the offsets grouped once (as many
    as the indices); from ``RowRanges``, counts from the ranges and each shard's offsets made only when
    ``local`` is asked for it (None: the whole shard, read as one slice)."""

    def __init__(self, store: "ActivationStore", rows):
        self._rows = rows
        if isinstance(rows, dict):
            self._counts = {i: int(t.numel()) for i, t in rows.items()}
        else:
            self._bounds = {i: (int(m["row_start"]), int(m["row_start"]) + int(m["rows"]))
                            for i, m in enumerate(store._shards_meta)}
            self._counts = {i: c for i, (a, b) in self._bounds.items() if (c := rows.count(a, b))}
        self.shards = sorted(i for i, c in self._counts.items() if c)

    def count(self, i: int) -> int:
        return self._counts.get(i, 0)

    def local(self, i: int) -> torch.Tensor | None:
        if isinstance(self._rows, dict):
            return self._rows[i]
        return self._rows.in_shard(*self._bounds[i])


def _cat(ts: list[torch.Tensor], dtype: torch.dtype, empty_shape=(0,)) -> torch.Tensor:
    return torch.cat(ts) if ts else torch.empty(empty_shape, dtype=dtype)


def _move(t: torch.Tensor, device, dtype) -> torch.Tensor:
    dt = None if dtype is None else (DTYPES[dtype_name(dtype)] if isinstance(dtype, str) else dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(dev, non_blocking=True)
    if dt is not None or t.device != dev:
        t = t.to(device=dev, dtype=dt or t.dtype)
    return t


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Writing
def serialize_shard(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a shard (no metadata, so the bytes depend only on the tensors)."""
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


class StoreWriter:
    """Writes a store shard by shard (used by ``collect`` and ``write_store``).

    Each shard is serialised, hashed, written to a temp file, fsynced and renamed into place, and
    only then recorded in ``progress.json`` (atomic). ``finalize`` writes ``manifest.json`` last.
    ``StoreWriter.start`` resumes a folder whose progress.json has the same ``settings``: shards
    listed there and intact are kept, anything after the first bad one is dropped.
    """

    def __init__(self, path: Path, header: dict[str, Any], shards: list[dict[str, Any]]):
        self.path = path
        self.header = header          # settings, hooks, dtype, seq_len, model
        self.shards = shards

    @classmethod
    def start(cls, path: str | os.PathLike, *, model: str, hooks: dict[str, int], dtype: str,
              seq_len: int, settings: dict[str, Any], overwrite: bool = False,
              resume: bool = True) -> "StoreWriter":
        path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "model": model,
                  "hooks": [{"name": h, "d": int(d)} for h, d in hooks.items()],
                  "dtype": dtype_name(dtype), "seq_len": int(seq_len),
                  "settings": json.loads(json.dumps(settings, default=str))}
        if path.exists() and not path.is_dir():
            raise WorkbenchError(f"{path} is a file; --out must be a folder")
        if path.exists() and any(path.iterdir()):
            is_store = (path / MANIFEST).exists() or (path / PROGRESS).exists()
            if overwrite and is_store:
                shutil.rmtree(path)
            elif overwrite:
                raise OutputExists(f"{path} exists and is not an activation store; refusing to "
                                      "delete it even with --overwrite: choose another --out")
            elif (path / MANIFEST).exists():
                raise OutputExists(f"{path} already holds a complete activation store; pass "
                                      "--overwrite to replace it or choose another --out")
            elif (path / PROGRESS).exists():
                try:
                    prog = json.loads((path / PROGRESS).read_text())
                except ValueError:
                    prog = None
                if prog is None or not resume:
                    raise OutputExists(f"{path} holds an unreadable or unresumable partial store; "
                                          "pass --overwrite to start over")
                diff = _settings_diff(prog, header)
                if diff:
                    raise OutputExists(
                        f"{path} holds a partial store collected with different settings ({diff}); "
                        "rerun with the original settings to resume, pass --overwrite to start "
                        "over, or choose another --out")
                w = cls(path, header, [])
                w._recover(prog.get("shards", []))
                return w
            else:
                raise OutputExists(f"{path} exists and is not an activation store; choose "
                                      "another --out or pass --overwrite to replace it")
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        w = cls(path, header, [])
        w._save_progress()
        return w

    def _recover(self, listed: list[dict[str, Any]]) -> None:
        keep: list[dict[str, Any]] = []
        for s in listed:
            p = self.path / s["file"]
            if (s["file"] != shard_name(len(keep)) or not p.exists()
                    or p.stat().st_size != int(s["bytes"]) or sha256_file(p) != s["sha256"]):
                break
            keep.append(s)
        self.shards = keep
        known = {s["file"] for s in keep}
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for p in sorted((self.path / SHARD_DIR).iterdir()):   # half-written / unrecorded leftovers
            if f"{SHARD_DIR}/{p.name}" not in known:
                p.unlink()
        self._save_progress()

    @property
    def n_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def n_seq(self) -> int:
        return sum(int(s["n_seq"]) for s in self.shards)

    def _save_progress(self) -> None:
        atomic_write_json(self.path / PROGRESS, {**self.header, "shards": self.shards})

    def write_shard(self, acts: dict[str, torch.Tensor], seq_index: torch.Tensor,
                    position: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor,
                    doc_ids: torch.Tensor, char_end: torch.Tensor | None = None) -> dict[str, Any]:
        dt = DTYPES[self.header["dtype"]]
        seq_len = self.header["seq_len"]
        rows = int(seq_index.shape[0])
        tensors: dict[str, torch.Tensor] = {}
        for h in self.header["hooks"]:
            a = acts[h["name"]]
            if a.shape != (rows, h["d"]):
                raise WorkbenchError(f"hook {h['name']}: got activations of shape {tuple(a.shape)}, "
                                     f"expected ({rows}, {h['d']})")
            tensors["acts." + h["name"]] = a.to(dt)
        n_seq = int(token_ids.shape[0])
        tensors["seq_index"] = seq_index.to(torch.int32)
        tensors["position"] = position.to(torch.int32)
        tensors["token_ids"] = token_ids.reshape(n_seq, seq_len).to(torch.int32)
        tensors["attention_mask"] = attention_mask.reshape(n_seq, seq_len).to(torch.bool)
        tensors["doc_ids"] = doc_ids.reshape(n_seq).to(torch.int64)
        if char_end is not None:
            tensors["char_end"] = torch.as_tensor(char_end).reshape(n_seq, seq_len).to(torch.int32)
        data = serialize_shard(tensors)
        del tensors
        rel = shard_name(len(self.shards))
        entry = {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "rows": rows, "row_start": self.n_rows, "n_seq": n_seq, "seq_start": self.n_seq}
        with disk_space_guard(self.path, len(data), "the next shard"):
            atomic_write_bytes(self.path / rel, data)      # temp + rename: no half shard is left behind
            self.shards.append(entry)
            try:
                self._save_progress()
            except BaseException:
                self.shards.pop()                          # not recorded: a resume rewrites it
                raise
        return entry

    def finalize(self, *, corpus: Any = None, special_tokens: Any = None,
                 documents: list[str] | None = None, extra: dict[str, Any] | None = None,
                 stats: dict[str, Any] | None = None) -> ActivationStore:
        files = {}
        if documents is not None:
            text = json.dumps(list(documents)).encode()
            atomic_write_bytes(self.path / DOCUMENTS, text)
            files[DOCUMENTS] = {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
        manifest = {
            **{k: v for k, v in self.header.items() if k != "settings"},
            "n_rows": self.n_rows, "n_seq": self.n_seq,
            "corpus": corpus, "special_tokens": special_tokens,
            "collect": {"settings": self.header["settings"], **(stats or {})},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workbench_version": _version(),
            "extra": extra or {},
            "files": files,
            "shards": self.shards,
        }
        with disk_space_guard(self.path, len(json.dumps(manifest)), "the manifest"):
            atomic_write_json(self.path / MANIFEST, manifest)
        (self.path / PROGRESS).unlink(missing_ok=True)
        return ActivationStore.open(self.path)


class disk_space_guard:
    """Turns "no space left on device" (ENOSPC / EDQUOT) inside the block into a WorkbenchError naming the
    folder, the free space and what the write needed; the writes in such blocks are atomic (temp + rename),
    so what was complete before stays complete and a rerun resumes."""

    def __init__(self, folder: str | os.PathLike, need_bytes: int, what: str = "the write"):
        self.folder, self.need, self.what = Path(folder), int(need_bytes), what

    def __enter__(self) -> "disk_space_guard":
        return self

    def __exit__(self, typ, e, tb) -> bool:
        import errno
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(self.folder if self.folder.exists() else self.folder.parent).free
            except OSError:
                free = 0
            raise WorkbenchError(
                f"no space left on the disk of {self.folder} ({_human_bytes(free)} free; {self.what} needs "
                f"{_human_bytes(self.need)}): free at least {_human_bytes(self.need)} there (or choose another "
                "folder) and rerun the same command: it resumes from what was written completely") from None
        return False


def _settings_diff(prog: dict[str, Any], header: dict[str, Any]) -> str:
    old = {k: prog.get(k) for k in ("model", "hooks", "dtype", "seq_len")}
    old.update({f"{k}": v for k, v in (prog.get("settings") or {}).items()})
    new = {k: header.get(k) for k in ("model", "hooks", "dtype", "seq_len")}
    new.update(header["settings"])
    diffs = [f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:   # pragma: no cover
        return "?"


def write_store(path: str | os.PathLike, acts: dict[str, torch.Tensor], token_ids: torch.Tensor,
                attention_mask: torch.Tensor, doc_ids: torch.Tensor, seq_index: torch.Tensor,
                position: torch.Tensor, model_name: str, extra: dict[str, Any] | None = None, *,
                dtype: torch.dtype | str | None = None, shard_rows: int | None = None,
                documents: list[str] | None = None, corpus: Any = None,
                overwrite: bool = False, char_end: torch.Tensor | None = None) -> ActivationStore:
    """A complete, valid store in one call (tests, synthetic data, imports).

    acts: {hook: [n_rows, d]}; token_ids / attention_mask: [n_seq, seq_len]; doc_ids: [n_seq];
    seq_index / position: [n_rows] (row r is token token_ids[seq_index[r], position[r]], which
    must not be padding). char_end: optional [n_seq, seq_len] character ends (see the module
    docstring). dtype: storage dtype (default: that of the first hook's tensor, float32
    if it is not a float16/bfloat16/float32). shard_rows: rows per shard (default ~64 MiB).
    """
    if not acts:
        raise WorkbenchError("write_store needs at least one hook in `acts`")
    token_ids = torch.as_tensor(token_ids)
    attention_mask = torch.as_tensor(attention_mask).bool()
    doc_ids = torch.as_tensor(doc_ids).long().reshape(-1)
    seq_index = torch.as_tensor(seq_index).long().reshape(-1)
    position = torch.as_tensor(position).long().reshape(-1)
    if token_ids.ndim != 2:
        raise WorkbenchError(f"token_ids must be [n_seq, seq_len], got shape {tuple(token_ids.shape)}")
    n_seq, seq_len = token_ids.shape
    if attention_mask.shape != token_ids.shape:
        raise WorkbenchError(f"attention_mask shape {tuple(attention_mask.shape)} != token_ids shape "
                             f"{tuple(token_ids.shape)}")
    if doc_ids.shape[0] != n_seq:
        raise WorkbenchError(f"doc_ids has {doc_ids.shape[0]} entries, expected one per sequence ({n_seq})")
    n_rows = seq_index.shape[0]
    if position.shape[0] != n_rows:
        raise WorkbenchError(f"position has {position.shape[0]} entries, seq_index {n_rows}")
    hooks: dict[str, int] = {}
    for h, a in acts.items():
        if a.ndim != 2 or a.shape[0] != n_rows:
            raise WorkbenchError(f"acts[{h!r}] must be [n_rows={n_rows}, d], got shape {tuple(a.shape)}")
        hooks[h] = int(a.shape[1])
    if n_rows:
        if int(seq_index.min()) < 0 or int(seq_index.max()) >= n_seq:
            raise WorkbenchError(f"seq_index out of range [0, {n_seq})")
        if int(position.min()) < 0 or int(position.max()) >= seq_len:
            raise WorkbenchError(f"position out of range [0, {seq_len})")
        if not bool(attention_mask[seq_index, position].all()):
            bad = int((~attention_mask[seq_index, position]).nonzero()[0, 0])
            raise WorkbenchError(f"row {bad} points at padding (attention_mask is False there); "
                                 "padding never becomes a row")
    first = next(iter(acts.values()))
    if dtype is None:
        dtype = first.dtype if first.dtype in DTYPES.values() else torch.float32
    dname = dtype_name(dtype)
    bytes_per_row = sum(hooks.values()) * DTYPES[dname].itemsize
    if shard_rows is None:
        shard_rows = max(1, (64 << 20) // max(1, bytes_per_row))
    n_shards = max(1, math.ceil(n_rows / shard_rows))
    seq_per = math.ceil(n_seq / n_shards) if n_seq else 0
    w = StoreWriter.start(path, model=model_name, hooks=hooks, dtype=dname, seq_len=seq_len,
                          settings={"writer": "write_store"}, overwrite=overwrite, resume=False)
    for i in range(n_shards):
        r0, r1 = i * shard_rows, min(n_rows, (i + 1) * shard_rows)
        q0, q1 = min(n_seq, i * seq_per), min(n_seq, (i + 1) * seq_per)
        w.write_shard({h: a[r0:r1] for h, a in acts.items()}, seq_index[r0:r1], position[r0:r1],
                      token_ids[q0:q1], attention_mask[q0:q1], doc_ids[q0:q1],
                      None if char_end is None else torch.as_tensor(char_end)[q0:q1])
    return w.finalize(corpus=corpus, documents=documents, extra=extra)
