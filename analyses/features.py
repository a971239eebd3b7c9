"""Feature-dashboard statistics for the latents of a sparse autoencoder (what sae_vis / Neuronpedia
show per latent), computed in a streaming way with bounded memory.

Activation-based panels (``FeatureStatsAccumulator``), from batches of latent activations
[rows, d_sae] with their global row ids:

- firing count (a latent fires on a token when its activation is > 0), density = count / n_tokens,
  max activation, mean activation over the firing tokens;
- top-k activating rows per latent: a running merge. Per chunk only the entries >= the latent's
  current k-th best value are candidates; candidates are buffered, and when the buffer is as large
  as the state, buffer + state of the touched latents are sorted by (latent, value descending, row
  ascending) — one int64 sort of packed (latent, value bits) keys, a stable re-sort by row only
  when values tie — and the first k of each latent kept. Ties go to the lower row id; the result
  does not depend on batch order or batch size;
- activation-range buckets: ``n_buckets`` equal-width bins over (0, max], ``per_bucket`` examples
  each, drawn uniformly at random inside the bin. The max is only known after a full pass, so this
  is a SECOND pass over the same rows (the honest way: the bins are exact). The sample of a bin is
  a bottom-k sketch: every (row, latent) pair gets a deterministic 32-bit hash key and the
  ``per_bucket`` smallest keys are kept, which is a uniform sample without replacement that does
  not depend on batch order;
- activation histogram per latent: ``hist_bins`` linear bins from 0 to the latent's max (firing
  tokens only; the last bin includes the max), also filled in the second pass, so the counts of a
  latent sum to its firing count;
- optional per-token activations of a context window around every kept example: the caller passes
  ``window_index`` [rows, W] (indices into the batch, -1 = no such row) and the accumulator keeps
  ``acts[window_index, latent]`` alongside each kept example (NaN where -1).

Everything after the nonzero scan of a chunk is O(nnz) — for sparse codes (TopK: k per row) that is
a small fraction of rows x d_sae. State is O(d_sae * (n_top + n_buckets * per_bucket) * W); a
[n_tokens, d_sae] matrix is never built.

Weight-based panels: ``logit_table`` (top / bottom entries of W_dec[f] @ W_U_folded, plus a histogram),
``decoder_neighbours`` (nearest latents by decoder cosine, computed in row blocks) and
``neuron_alignment`` (largest |W_dec[f, n]|).

Usage::

    acc = FeatureStatsAccumulator(d_sae, n_top=20)
    for p in range(acc.n_passes):           # 2 passes (1 when n_buckets == 0 and hist_bins == 0)
        for acts, row_ids in make_batches():  # SAME rows and values each pass, any order
            acc.update(acts, row_ids)
        acc.end_pass()
    stats = acc.result()                    # FeatureStats
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

import torch

_EMPTY_KEY = 1 << 62          # sentinel hash key of an empty bucket slot (> any 32-bit key)
_M32 = 0xFFFFFFFF


@dataclass
class FeatureStats:
    """Result of the accumulator. Empty example slots have row -1 and value 0 (window acts NaN)."""

    n_tokens: int
    count: torch.Tensor              # i64 [d_sae]
    max: torch.Tensor                # f32 [d_sae] (0 for dead latents)
    mean: torch.Tensor               # f32 [d_sae] mean over firing tokens (0 for dead latents)
    top_values: torch.Tensor         # f32 [d_sae, n_top] descending
    top_rows: torch.Tensor           # i64 [d_sae, n_top]
    top_window_acts: torch.Tensor    # f32 [d_sae, n_top, W]
    bucket_values: torch.Tensor      # f32 [d_sae, n_buckets, per_bucket] descending in a bucket
    bucket_rows: torch.Tensor        # i64 [d_sae, n_buckets, per_bucket]
    bucket_window_acts: torch.Tensor  # f32 [d_sae, n_buckets, per_bucket, W]
    bucket_counts: torch.Tensor      # i64 [d_sae, n_buckets] firings per bucket
    hist_counts: torch.Tensor        # i64 [d_sae, hist_bins] linear bins over [0, max]

    @property
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    def bucket_edges(self) -> torch.Tensor:
        """[d_sae, n_buckets + 1] edges: linspace(0, max, n_buckets + 1) per latent."""
        b = self.bucket_values.shape[1]
        return self.max[:, None] * torch.linspace(0, 1, b + 1, dtype=self.max.dtype, device=self.max.device)

    def hist_edges(self) -> torch.Tensor:
        h = self.hist_counts.shape[1]
        return self.max[:, None] * torch.linspace(0, 1, h + 1, dtype=self.max.dtype, device=self.max.device)

    def to(self, device) -> "FeatureStats":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return FeatureStats(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})


def hash_keys(rows: torch.Tensor, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random 32-bit keys (as int64) of (row, latent) pairs (murmur3 finaliser).
    int64 products may wrap; only the low 32 bits are kept, which wrapping does not disturb."""
    x = (rows.long() * 0x9E3779B1 + latents.long() * 0x85EBCA77 + (seed * 0xC2B2AE3D + 0x27D4EB2F)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    x = x ^ (x >> 16)
    return x


def _segmented_first_k(group: torch.Tensor, key: torch.Tensor, row: torch.Tensor, k: int):
    """Sort entries by (group asc, key asc, row asc); return (order, group, rank) of the first k
    entries of every group (order indexes the inputs). `key` is int64 in [0, 2^32) (see _value_key)
    and group < 2^31, so (group, key) packs into one int64: one sort, plus a stable re-sort only
    when two entries of a group share a key (then the row decides)."""
    n = group.numel()
    if n == 0:
        e = group.new_empty(0)
        return e, e, e
    packed = (group << 32) | key
    sp, o = torch.sort(packed)
    if bool((sp[1:] == sp[:-1]).any()):          # ties: order by row first, then stable by (group, key)
        o = torch.argsort(row, stable=True)
        o = o[torch.argsort(packed[o], stable=True)]
    g = group[o]
    starts = torch.ones_like(g, dtype=torch.bool)
    starts[1:] = g[1:] != g[:-1]
    pos = torch.arange(n, device=g.device)
    seg_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    rank = pos - seg_start
    keep = rank < k
    return o[keep], g[keep], rank[keep]


def _value_key(v: torch.Tensor) -> torch.Tensor:
    """int64 key in [0, 2^31) that sorts positive float32 values DESCENDING (IEEE bits of a
    positive float are monotone in its value)."""
    bits = v.float().contiguous().view(torch.int32).long()
    return 0x7FFFFFFF - bits


class _BottomK:
    """Per group, the k entries with the smallest (key, row); each entry carries a value and a window
    payload. Offered candidates are buffered and merged in bulk (one sort per merge) once the buffer
    reaches the state's size, so the cost per candidate is amortised O(log); candidates are filtered
    against the last merged state (a stale threshold is still a correct filter)."""

    def __init__(self, n_groups: int, k: int, W: int, device: torch.device):
        self.k, self.W = k, W
        self.key = torch.full((n_groups, k), _EMPTY_KEY, dtype=torch.long, device=device)
        self.val = torch.zeros((n_groups, k), device=device)
        self.row = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        self.win = torch.full((n_groups, k, W), float("nan"), device=device)
        self.buf: list[tuple[torch.Tensor, ...]] = []
        self.buf_n = 0
        self.limit = max(n_groups * k, 1 << 16)

    def threshold(self, group: torch.Tensor) -> torch.Tensor:
        """Key an entry must not exceed to enter (empty slots: always enter)."""
        return self.key[group, -1]

    def offer(self, group, key, val, row, win) -> None:
        if group.numel():
            self.buf.append((group, key, val, row, win))
            self.buf_n += group.numel()
            if self.buf_n >= self.limit:
                self.merge()

    def merge(self) -> None:
        if not self.buf:
            return
        cg, ck, cv, cr, cw = (torch.cat(x) for x in zip(*self.buf))
        self.buf, self.buf_n = [], 0
        present = torch.zeros(self.key.shape[0], dtype=torch.bool, device=cg.device)
        present[cg] = True                                   # unique groups without a sort
        ug = present.nonzero().flatten()
        inv = (torch.cumsum(present, 0) - 1)[cg]
        sk, sv, sr, sw = self.key[ug], self.val[ug], self.row[ug], self.win[ug]
        ok = sr >= 0
        u_idx = torch.arange(ug.numel(), device=ug.device)[:, None].expand_as(sr)
        group = torch.cat([u_idx[ok], inv])
        keys = torch.cat([sk[ok], ck])
        val = torch.cat([sv[ok], cv])
        row = torch.cat([sr[ok], cr])
        payload = torch.cat([sw[ok], cw])
        o, g, rank = _segmented_first_k(group, keys, row, self.k)
        nk = torch.full_like(sk, _EMPTY_KEY)
        nv = torch.zeros_like(sv)
        nr = torch.full_like(sr, -1)
        nw = torch.full_like(sw, float("nan"))
        nk[g, rank], nv[g, rank], nr[g, rank], nw[g, rank] = keys[o], val[o], row[o], payload[o]
        self.key[ug], self.val[ug], self.row[ug], self.win[ug] = nk, nv, nr, nw


class FeatureStatsAccumulator:
    """Streaming per-latent statistics for feature dashboards (see the module docstring).

    d_sae: number of latents. n_top: top examples per latent. n_buckets / per_bucket: activation-range
    buckets and examples per bucket (0 disables). hist_bins: histogram bins (0 disables). window:
    width W of the per-token activation windows the caller provides via ``window_index`` (0: none).
    seed: seed of the bucket sampling hash. chunk_elems: rows of a batch are processed in pieces of
    at most this many rows x d_sae elements (bounds temporary memory).
    """

    def __init__(self, d_sae: int, n_top: int = 20, n_buckets: int = 10, per_bucket: int = 5,
                 hist_bins: int = 40, window: int = 0, seed: int = 0, device: str | torch.device = "cpu",
                 chunk_elems: int = 1 << 22):
        if d_sae <= 0 or n_top < 0 or n_buckets < 0 or per_bucket < 0 or hist_bins < 0 or window < 0:
            raise ValueError("d_sae must be > 0 and n_top, n_buckets, per_bucket, hist_bins, window >= 0")
        self.d_sae, self.n_top, self.window, self.seed = int(d_sae), int(n_top), int(window), int(seed)
        self.n_buckets = int(n_buckets) if per_bucket else 0
        self.per_bucket = int(per_bucket) if n_buckets else 0
        self.hist_bins = int(hist_bins)
        self.device = torch.device(device)
        self.chunk_elems = int(chunk_elems)
        self.n_passes = 2 if (self.n_buckets or self.hist_bins) else 1
        self.pass_index = 0
        d, dev, W = self.d_sae, self.device, max(self.window, 0)
        self.n_tokens = 0
        self._n_tokens_pass = 0
        self.count = torch.zeros(d, dtype=torch.long, device=dev)
        self.sum = torch.zeros(d, dtype=torch.float64, device=dev)
        self.max = torch.zeros(d, dtype=torch.float32, device=dev)
        self.top = _BottomK(d, self.n_top, W, dev)               # key = value descending
        G = d * self.n_buckets
        self.buckets = _BottomK(G, self.per_bucket, W, dev)      # key = hash of (row, latent)
        self.b_counts = torch.zeros(G, dtype=torch.long, device=dev)
        self.hist = torch.zeros(d * self.hist_bins, dtype=torch.long, device=dev)

    # ------------------------------------------------------------------ feeding
    def update(self, acts: torch.Tensor, row_ids: Any, core: Any = None,
               window_index: Any = None) -> None:
        """Feed one batch.

        acts: [m, d_sae] latent activations (dense). row_ids: [n] global row ids of the counted rows.
        core: [n] indices into acts of the counted rows (default: all m rows, n == m) — extra rows
        of acts are context only (a halo for the windows). window_index: [n, W] indices into acts
        of each counted row's window (-1 = absent); default: only the row itself at the centre.
        """
        if self.pass_index >= self.n_passes:
            raise RuntimeError("all passes are done; call result()")
        if acts.ndim != 2 or acts.shape[1] != self.d_sae:
            raise ValueError(f"acts must be [rows, d_sae={self.d_sae}], got {tuple(acts.shape)}")
        acts = acts.to(self.device)
        if not acts.is_floating_point():
            acts = acts.float()
        row_ids = torch.as_tensor(row_ids, dtype=torch.long).reshape(-1).to(self.device)
        core = (torch.arange(acts.shape[0], device=self.device) if core is None
                else torch.as_tensor(core, dtype=torch.long).reshape(-1).to(self.device))
        if core.numel() != row_ids.numel():
            raise ValueError(f"row_ids has {row_ids.numel()} entries but {core.numel()} rows are counted")
        W = self.window
        if W:
            if window_index is None:
                window_index = torch.full((core.numel(), W), -1, dtype=torch.long, device=self.device)
                window_index[:, W // 2] = core
            window_index = torch.as_tensor(window_index, dtype=torch.long).to(self.device)
            if window_index.shape != (core.numel(), W):
                raise ValueError(f"window_index must be [{core.numel()}, {W}], got {tuple(window_index.shape)}")
        step = max(1, self.chunk_elems // self.d_sae)
        for s in range(0, core.numel(), step):
            e = min(s + step, core.numel())
            wi = window_index[s:e] if W else None
            if self.pass_index == 0:
                self._pass1(acts, core[s:e], row_ids[s:e], wi)
            else:
                self._pass2(acts, core[s:e], row_ids[s:e], wi)
        self._n_tokens_pass += core.numel()

    def _nonzero(self, acts, core):
        """(chunk-local row, latent, value) of the firing entries of acts[core], and the chunk."""
        n = core.numel()
        c0 = int(core[0])
        if n == 1 or (int(core[-1]) - c0 + 1 == n and bool((core[1:] - core[:-1] == 1).all())):
            sub = acts[c0:c0 + n]                    # contiguous: a view, no copy
        else:
            sub = acts[core]
        idx = (sub > 0).nonzero()
        i, f = idx[:, 0], idx[:, 1]
        return i, f, sub[i, f].float(), sub

    def _window_payload(self, acts, wi, i, f):
        if not self.window:
            return torch.empty((i.numel(), 0), device=self.device)
        w = wi[i]                                   # [C, W] indices into acts
        vals = acts[w.clamp(min=0), f[:, None]].float()
        return torch.where(w >= 0, vals, torch.full_like(vals, float("nan")))

    def _pass1(self, acts, core, rows, wi):
        i, f, v, sub = self._nonzero(acts, core)
        d = self.d_sae
        self.count += torch.bincount(f, minlength=d)
        self.sum += torch.bincount(f, weights=v.double(), minlength=d)
        self.max.scatter_reduce_(0, f, v, reduce="amax", include_self=True)
        if not self.n_top or f.numel() == 0:
            return
        key = _value_key(v)
        cand = key <= self.top.threshold(f)
        if f.numel() > 2 * self.n_top * d and sub.shape[0] > self.n_top:
            # dense chunk: also require being in the chunk's own top k (bounds the candidates)
            cand &= v >= sub.topk(self.n_top, dim=0).values[-1].float()[f]
        i, f, v, key = i[cand], f[cand], v[cand], key[cand]
        self.top.offer(f, key, v, rows[i], self._window_payload(acts, wi, i, f))

    def _pass2(self, acts, core, rows, wi):
        i, f, v, _ = self._nonzero(acts, core)
        if f.numel() == 0:
            return
        mx = self.max[f]
        frac = v / mx.clamp(min=torch.finfo(torch.float32).tiny)
        if self.hist_bins:
            hb = (frac * self.hist_bins).floor().long().clamp(0, self.hist_bins - 1)
            self.hist += torch.bincount(f * self.hist_bins + hb, minlength=self.hist.numel())
        if not self.n_buckets:
            return
        B = self.n_buckets
        grp = f * B + (frac * B).floor().long().clamp(0, B - 1)
        self.b_counts += torch.bincount(grp, minlength=self.b_counts.numel())
        r = rows[i]
        key = hash_keys(r, f, self.seed)
        cand = key <= self.buckets.threshold(grp)
        i, f, v, r, key, grp = i[cand], f[cand], v[cand], r[cand], key[cand], grp[cand]
        self.buckets.offer(grp, key, v, r, self._window_payload(acts, wi, i, f))

    def end_pass(self) -> None:
        """Close the current pass (the next pass must feed exactly the same rows)."""
        (self.top if self.pass_index == 0 else self.buckets).merge()
        if self.pass_index == 0:
            self.n_tokens = self._n_tokens_pass
        elif self._n_tokens_pass != self.n_tokens:
            raise RuntimeError(f"pass {self.pass_index + 1} saw {self._n_tokens_pass} rows but pass 1 saw "
                               f"{self.n_tokens}; every pass must feed the same rows")
        self._n_tokens_pass = 0
        self.pass_index += 1

    # ------------------------------------------------------------------ output
    def result(self) -> FeatureStats:
        if self.pass_index < self.n_passes:
            raise RuntimeError(f"{self.n_passes} passes needed, {self.pass_index} done (call end_pass())")
        d, B, P, W = self.d_sae, self.n_buckets, self.per_bucket, self.window
        mean = torch.where(self.count > 0, self.sum / self.count.clamp(min=1), torch.zeros_like(self.sum))
        tv = torch.where(self.top.row >= 0, self.top.val, torch.zeros_like(self.top.val))
        # buckets: show each bucket's sample by value descending (ties: lower row first)
        bv, br, bw = self.buckets.val, self.buckets.row, self.buckets.win
        if bv.numel():
            G = bv.shape[0]
            g = torch.arange(G, device=self.device)[:, None].expand_as(bv).reshape(-1)
            key = torch.where(br >= 0, _value_key(bv.clamp(min=0)), torch.full_like(br, _M32)).reshape(-1)
            rr = torch.where(br >= 0, br, torch.full_like(br, 1 << 62)).reshape(-1)
            o, gg, rank = _segmented_first_k(g, key, rr, P)
            bv = bv.reshape(-1)[o].reshape(G, P)
            br = br.reshape(-1)[o].reshape(G, P)
            bw = bw.flatten(0, 1)[o].reshape(G, P, W)
        return FeatureStats(
            n_tokens=self.n_tokens, count=self.count.clone(), max=self.max.clone(),
            mean=mean.float(), top_values=tv, top_rows=self.top.row.clone(), top_window_acts=self.top.win.clone(),
            bucket_values=bv.reshape(d, B, P), bucket_rows=br.reshape(d, B, P),
            bucket_window_acts=bw.reshape(d, B, P, W), bucket_counts=self.b_counts.reshape(d, B),
            hist_counts=self.hist.reshape(d, self.hist_bins))


def feature_stats(make_batches: Callable[[], Iterable], d_sae: int, encode: Callable | None = None,
                  **kw) -> FeatureStats:
    """All passes in one call. make_batches() returns a FRESH iterable each time, of (x, row_ids) or
    (x, row_ids, core, window_index); x is latent activations, or SAE inputs when `encode` is given."""
    acc = FeatureStatsAccumulator(d_sae, **kw)
    for _ in range(acc.n_passes):
        for item in make_batches():
            x, rows, *rest = item
            a = encode(x) if encode is not None else x
            acc.update(a, rows, *rest)
        acc.end_pass()
    return acc.result()


# ---------------------------------------------------------------------- weight-based panels
def logit_table(W_dec: torch.Tensor, W_U: torch.Tensor, k: int = 10, bins: int = 40,
                max_block_elems: int = 1 << 22) -> dict[str, torch.Tensor]:
    """Direct logit effect of each latent, W_dec[f] @ W_U, in row blocks. Pass W_U with the final norm's
    gain folded in (diag(g) @ W_U, LayerNorm also centred over d_model; workbench ``Model.W_U_folded``), as
    sae_vis / Neuronpedia do (TransformerLens fold_ln): a raw W_U reorders the tokens when g is not flat.

    Returns top_ids / top_values [d_sae, k] (largest first), bottom_ids / bottom_values (most
    negative first), hist_counts [d_sae, bins] over linear bins from the row's min to its max, and
    hist_range [d_sae, 2] = (min, max)."""
    d_sae, d_in = W_dec.shape
    if W_U.shape[0] != d_in:
        raise ValueError(f"W_U must be [d_in={d_in}, vocab], got {tuple(W_U.shape)}")
    V = W_U.shape[1]
    k = min(k, V)
    W_U = W_U.to(W_dec.device, torch.float32)
    out = {n: [] for n in ("top_ids", "top_values", "bottom_ids", "bottom_values", "hist_counts", "hist_range")}
    blk = max(1, max_block_elems // V)
    for s in range(0, d_sae, blk):
        L = W_dec[s:s + blk].float() @ W_U                      # [b, V]
        t = L.topk(k, dim=1)
        bt = L.topk(k, dim=1, largest=False)
        out["top_ids"].append(t.indices)
        out["top_values"].append(t.values)
        out["bottom_ids"].append(bt.indices)
        out["bottom_values"].append(bt.values)
        lo, hi = L.min(1).values, L.max(1).values
        out["hist_range"].append(torch.stack([lo, hi], 1))
        if bins:   # in place on L (no longer needed): bin = floor((x - lo) / (hi - lo) * bins)
            scale = bins / (hi - lo).clamp(min=1e-30)
            hb = L.sub_(lo[:, None]).mul_(scale[:, None]).long()      # >= 0, so truncation = floor
            hb.clamp_(max=bins - 1).add_(torch.arange(L.shape[0], device=L.device)[:, None] * bins)
            out["hist_counts"].append(torch.bincount(hb.view(-1), minlength=L.shape[0] * bins).view(-1, bins))
        else:
            out["hist_counts"].append(torch.zeros((L.shape[0], 0), dtype=torch.long, device=L.device))
    return {n: torch.cat(v) for n, v in out.items()}


def decoder_neighbours(W_dec: torch.Tensor, n: int = 10, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest latents by cosine of decoder rows, self excluded: (ids, cosines) [d_sae, n], largest
    first. Row blocks of `block` x d_sae (never d_sae x d_sae at once). Zero rows have cosine 0."""
    d_sae = W_dec.shape[0]
    n = min(n, d_sae - 1)
    Wn = W_dec.float()
    Wn = Wn / Wn.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ids, cos = [], []
    for s in range(0, d_sae, block):
        S = Wn[s:s + block] @ Wn.T                              # [b, d_sae]
        r = torch.arange(S.shape[0], device=S.device)
        S[r, r + s] = float("-inf")
        t = S.topk(n, dim=1)
        ids.append(t.indices)
        cos.append(t.values)
    return torch.cat(ids), torch.cat(cos)


def neuron_alignment(W_dec: torch.Tensor, n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest |W_dec[f, j]| per latent: (neuron ids, signed weights, fraction of the row's L1 norm),
    each [d_sae, n], largest |w| first."""
    W = W_dec.float()
    n = min(n, W.shape[1])
    t = W.abs().topk(n, dim=1)
    vals = W.gather(1, t.indices)
    frac = t.values / W.abs().sum(1, keepdim=True).clamp(min=1e-30)
    return t.indices, vals, frac
