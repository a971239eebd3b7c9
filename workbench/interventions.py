"""Causal interventions at one hook: steer with SAE latents or raw directions, ablate, attribute.

    import workbench
    df = workbench.steer("The capital of France is", sae="ws/saes/topk6", latents=[123], values=[40])
    df.attrs["unsteered"], df.attrs["steered"]        # the two generations (same seed)
    df[["token", "next_token", "p_clean", "p_steered", "kl"]]   # next-token probability shifts
    att = workbench.attribute("The cat sat on the mat", sae="ws/saes/topk6")
    att.attrs["agreement"]                            # exact ablation vs linear estimate

Conventions (SAELens ``HookedSAETransformer`` with ``use_error_term=True``; ``SAE.forward`` in
sae_lens/saes/sae.py): the SAE is spliced with its error term, x' = decode(f') + (x - decode(f)),
where f = encode(x) and f' = f with the edited latents. decode is affine, so
  clamp latent i to v:  x' = x + (v - f_i) W_dec[i]     (f'_i = v)
  add v to latent i:    x' = x + v W_dec[i]             (f'_i = f_i + v; Neuronpedia's steering adds
                                                         strength * W_dec[i] to the residual the same way)
We compute decode(f) + (decode(f') - decode(f)) + (x - decode(f)) with the difference taken over the
edited rows only (sparse), which is SAELens' splice up to float rounding; an unchanged f' (e.g. a clamp
to the latent's own activation) gives x back to fp32 rounding. Pure-`add` latent edits skip the encode.
Raw directions u (a PCA component, unit norm): add x' = x + c u; clamp sets the coordinate
(x - mean) . u to c: x' = x + (c - (x - mean) . u) u. Edits act at every position except a prepended
BOS (the SAE never saw BOS rows: the collector drops them), in the prompt and in generated tokens.
Generation (and steer's two scoring forwards) run the Hugging Face model directly with one torch hook
where the steered hook is a module's output (workbench/_fast_decode.py: ~bare HF speed), else through
the TransformerBridge; both give the same logits, and ``df.attrs["path"]`` says which ran.

Attribution (attribution patching: Nanda 2023; Syed et al. 2023 "Attribution Patching Outperforms
Automated Circuit Discovery"; Marks et al. 2024 "Sparse Feature Circuits", with the error term held
fixed): the effect of zero-ablating latent i at position t on a metric m is estimated as
  m(f_ti = 0) - m  ~=  (0 - f_ti) dm/df_ti  =  -f_ti (dm/dx_t . W_dec[i])
from ONE backward pass, for every active (t, i). The exact effect of the top ones (by |estimate|) is
measured with batched forward passes (x_t -> x_t - f_ti W_dec[i]). Metric ``loss``: the summed
next-token cross-entropy of the text (nats), so an ablation at t counts its effect on every later
prediction; metric ``logit``: one token's logit at one position. ``ablate_examples`` (in
_interventions_ablate.py) zero-ablates one latent at its top examples' positions in a store.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .errors import WorkbenchError
from ._interventions_io import (check_prompt_length, encode_rows, resolve_model, resolve_sae,  # noqa: F401
                              pca_edits, tokenize, token_id)
from ._interventions_ablate import ablate_examples  # noqa: F401  (what a latent does, by ablation)
from ._fast_decode import (PATHS, _KV_OK, _cache_shim, cache_kw as _cache_kw, cached_step as _step,  # noqa: F401
                           fast_decoder, kv_cache_works)

MODES = ("clamp", "add")
METRICS = ("loss", "logit")


@dataclass
class Edit:
    """One intervention: a latent (index into the SAE) or a unit `direction` [d], its value and mode."""

    value: float
    mode: str = "clamp"
    latent: int | None = None
    direction: torch.Tensor | None = None
    center: torch.Tensor | None = None        # clamp of a direction measures (x - center) . u
    label: str = ""
    positions: tuple[int, ...] | None = None  # sequence positions to edit (None: all but a prepended BOS)


def paired_values(items: list, values: Iterable[float], mode: str, *, what: str, flag: str) -> list[float]:
    """One finite value per item (a single value is used for every item); the mode checked too."""
    values = [float(v) for v in values]
    if mode not in MODES:
        raise WorkbenchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(values) == 1 and len(items) > 1:
        values = values * len(items)
    if len(values) != len(items):
        raise WorkbenchError(f"{len(items)} {what} but {len(values)} values: give one --{flag} for all, "
                             f"or one per item")
    for v in values:
        if not math.isfinite(v):
            raise WorkbenchError(f"steering values must be finite numbers, got {v}")
    return values


def latent_edits(latents: Iterable[int], values: Iterable[float], mode: str, d_sae: int) -> list[Edit]:
    """Edits from parallel lists; one value is used for every latent."""
    latents = [int(i) for i in latents]
    if latents and not list(values):
        raise WorkbenchError("give a --value for the latents (one for all, or one per --latent)")
    values = paired_values(latents, values, mode, what="latents", flag="value")
    for i in latents:
        if not 0 <= i < d_sae:
            raise WorkbenchError(f"latent {i} is out of range: this SAE has d_sae={d_sae} (latents 0..{d_sae - 1})")
    return [Edit(v, mode, latent=i, label=f"latent {i} {mode} {v:g}") for i, v in zip(latents, values)]


class Intervention:
    """Applies edits to an activation [b, s, d] whose first position is `offset` in the sequence.
    ``splice=True`` routes every position through the SAE with its error term even without a clamp
    (decode(f) + (x - decode(f)); used to check that the splice itself changes nothing)."""

    def __init__(self, edits: list[Edit], sae: Any = None, skip: int = 0, splice: bool = False):
        self.edits = list(edits)
        self.sae = sae
        self.skip = int(skip)                 # positions < skip are left alone (the prepended BOS)
        self._lat = [e for e in self.edits if e.latent is not None]
        if (self._lat or splice) and sae is None:
            raise WorkbenchError("latent edits need an SAE (--sae)")
        self._dirs = [e for e in self.edits if e.latent is None]
        self._splice = splice or any(e.mode == "clamp" for e in self._lat)

    def __bool__(self) -> bool:
        return bool(self.edits) or self._splice

    def _mask(self, e: Edit, pos: torch.Tensor) -> torch.Tensor:
        m = pos >= self.skip
        if e.positions is not None:
            m &= torch.isin(pos, torch.tensor(list(e.positions), device=pos.device))
        return m

    def apply(self, act: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not self:
            return act
        b, s, d = act.shape
        x = act.reshape(-1, d).float()
        pos = torch.arange(offset, offset + s, device=x.device).repeat(b)       # row r -> its position
        new = x
        if self._lat or self._splice:
            W_dec = self.sae.W_dec.detach()
            cols = torch.tensor([e.latent for e in self._lat], dtype=torch.long, device=W_dec.device)
            rows = W_dec[cols].float().to(x.device)                            # [m, d]
            v = torch.tensor([e.value for e in self._lat], dtype=torch.float32, device=x.device)
            where = torch.stack([self._mask(e, pos) for e in self._lat], 1) if self._lat else \
                torch.zeros(x.shape[0], 0, dtype=torch.bool, device=x.device)
            if self._splice:
                f = encode_rows(self.sae, x)                                   # [n, d_sae]
                x_hat = self.sae.decode(f.to(W_dec.dtype)).float().to(x.device)
                err = x - x_hat                                                # the error term, kept
                fi = f[:, cols.to(f.device)].float()                           # [n, m]
                clamp = torch.tensor([e.mode == "clamp" for e in self._lat], dtype=torch.bool, device=x.device)
                delta_f = torch.where(clamp, v - fi, v.expand_as(fi)) * where  # f' - f on the edited latents
                new = (x_hat + delta_f @ rows) + err                           # decode(f') + (x - decode(f))
            else:
                new = x + (v * where) @ rows
        for e in self._dirs:
            u = e.direction.to(x.device, torch.float32)
            w = self._mask(e, pos).float()[:, None]
            if e.mode == "add":
                new = new + w * e.value * u
            else:
                c = e.center.to(x.device, torch.float32) if e.center is not None else 0.0
                new = new + w * (e.value - (x - c) @ u)[:, None] * u
        new = new.reshape(b, s, d)
        if offset < self.skip:
            keep = torch.arange(offset, offset + s, device=act.device) < self.skip
            new = torch.where(keep[None, :, None], act.float(), new)
        return new.to(act.dtype)


# ------------------------------------------------------------------------------------ generation

def _hooked(model, hook: str, fn):
    """Context: `fn(act[b, s, d]) -> act` spliced in at `hook` for every forward (hf model or bridge)."""
    pid = model._pid(hook)

    def splice(t, hook=None):
        flat = t.reshape(t.shape[0], t.shape[1], -1)
        return fn(flat).to(t.dtype).reshape(t.shape)
    return model._hooked([(model._points[pid], splice)])


def decode_path(model, hook: str, path: str = "auto") -> str:
    """Which path :func:`generate` takes for `hook`: "fast" (the HF model run directly, one torch hook;
    see workbench/_fast_decode.py), "bridge" (KV-cached through the TransformerBridge) or "bridge-full"
    (the bridge, one full forward per token: its KV cache does not work with this model)."""
    if fast_decoder(model, hook, path) is not None:
        return "fast"
    return "bridge" if kv_cache_works(model) else "bridge-full"


def _sampler(model, temperature: float, seed: int):
    """logits [V] -> next token: argmax (temperature 0) or a draw from torch.Generator(seed)."""
    if model.kind != "causal":
        raise WorkbenchError(f"{model.name} is an encoder; steering generation needs a causal LM")
    if temperature < 0 or not math.isfinite(temperature):
        raise WorkbenchError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def pick(logits: torch.Tensor) -> int:
        if temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=gen))
    return pick


@torch.inference_mode()
def generate(model, ids: torch.Tensor, hook: str, intervention: Intervention | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, *, path: str = "auto",
             record: list | None = None) -> list[int]:
    """Greedy (temperature 0) or sampled generation, the intervention applied at every position (the
    prompt's and each new one); returns the new token ids. Sampling draws from torch.Generator(seed).
    `path` ("auto" | "fast" | "bridge"): see :func:`decode_path`; both give the same logits (fp32
    rounding). `record`: a list that gets each step's next-token logits [vocab] (float32)."""
    pick = _sampler(model, temperature, seed)
    eos = model.special_ids.get("eos")
    state = {"offset": 0}
    iv = intervention

    def fn(act):
        return iv.apply(act, state["offset"]) if iv else act

    fast = fast_decoder(model, hook, path)
    if fast is not None:
        use_cache, step, ctx = True, fast.step, fast.hooked(hook, fn if iv else None)
    else:
        use_cache = kv_cache_works(model)
        hf, kw = model.hf_model, _cache_kw(model.hf_model)
        step = lambda cur, past: _step(hf, cur, past, kw)  # noqa: E731
        ctx = contextlib.ExitStack()
        ctx.enter_context(_hooked(model, hook, fn))
        ctx.enter_context(_cache_shim(hf))
    out: list[int] = []
    seq = ids.to(model.device)
    cur, past = seq, None
    with ctx:
        for _ in range(int(max_new_tokens)):
            if use_cache:
                logits, past = step(cur, past)
                state["offset"] += cur.shape[1]
            else:
                logits = hf(input_ids=seq).logits
            logits = logits[0, -1].float()
            if record is not None:
                record.append(logits.clone())
            nxt = pick(logits)
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
            cur = torch.tensor([[nxt]], device=model.device)
            seq = torch.cat([seq, cur], 1)
    return out


def generate_pair(model, ids: torch.Tensor, hook: str, intervention: Intervention | None,
                  max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, *, path: str = "auto",
                  records: tuple[list, list] | None = None) -> tuple[list[int], list[int]]:
    """(generate(..., None), generate(..., intervention)) with the same seed. On the fast path both run
    as one batch of 2 (see workbench/_fast_decode.py: ~the cost of one on a CPU); `records`: two lists
    that get each step's logits, as `record` in :func:`generate`."""
    fast = fast_decoder(model, hook, path)
    if fast is None:
        r0, r1 = records if records is not None else (None, None)
        return (generate(model, ids, hook, None, max_new_tokens, temperature, seed, path=path, record=r0),
                generate(model, ids, hook, intervention, max_new_tokens, temperature, seed, path=path, record=r1))
    picks = (_sampler(model, temperature, seed), _sampler(model, temperature, seed))
    apply = intervention.apply if intervention else None
    return fast.generate_pair(ids, hook, apply, max_new_tokens, picks, model.special_ids.get("eos"), records)


def _top_changes(dp: torch.Tensor, tok, n: int) -> tuple[str, str]:
    up = torch.topk(dp, n).indices.tolist()
    down = torch.topk(-dp, n).indices.tolist()
    fmt = lambda ids: " | ".join(f"{tok.decode([i])!r} {float(dp[i]):+.3f}" for i in ids)  # noqa: E731
    return fmt(up), fmt(down)


def steer(prompt: str, *, sae: Any = None, latents: Iterable[int] = (), values: Iterable[float] = (),
          mode: str = "clamp", model: Any = None, hook: str | None = None, pca: str | None = None,
          components: Iterable[int] = (), coefs: Iterable[float] = (), pca_mode: str = "add",
          max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, n_top: int = 3,
          prepend_bos: bool = True, device: str = "cpu", path: str = "auto"):
    """Generate with and without the intervention (same seed) and measure next-token probability shifts
    along the unsteered sequence (prompt + unsteered continuation). Returns a pandas DataFrame, one row
    per position: position, phase (prompt|generated), token, next_token, p_clean, p_steered, delta_p,
    logprob_shift, kl (KL(clean || steered) of the next-token distribution, nats), top_up, top_down
    (tokens whose probability rose / fell most), steered_token (the steered run's token there);
    ``df.attrs``: prompt, unsteered, steered (texts), edits, hook, model, mean_kl, path (which decode
    path ran: :func:`decode_path`; `path` forces one, as in :func:`generate`)."""
    import pandas as pd
    sae_obj, sae_hook = resolve_sae(sae, device) if sae is not None else (None, None)
    m = resolve_model(model, sae_obj, device)
    hook = _pick_hook(m, hook, sae_obj, sae_hook, pca)
    edits = latent_edits(latents, values, mode, int(sae_obj.W_dec.shape[0])) if sae_obj is not None else []
    if sae_obj is None and list(latents):
        raise WorkbenchError("--latent needs --sae (the SAE whose latents to steer)")
    if pca:
        edits += pca_edits(pca, components, coefs, pca_mode, m, hook)
    if not edits:
        raise WorkbenchError("nothing to steer: give --latent/--value (with --sae) or --pca/--component/--coef")
    ids, skip = tokenize(m, prompt, prepend_bos)
    check_prompt_length(m, ids.shape[1], max_new_tokens)
    iv = Intervention(edits, sae_obj, skip)
    clean, steered = generate_pair(m, ids, hook, iv, max_new_tokens, temperature, seed, path=path)
    seq = torch.cat([ids[0].cpu(), torch.tensor(clean, dtype=torch.long)])[None]
    fast = fast_decoder(m, hook, path)
    if fast is not None:
        lc, ls = (t.float() for t in fast.logits_pair(seq, hook, iv.apply))
    else:
        lc = m.logits(seq).float()[0]
        ls = m.logits(seq, hook=hook, replace=lambda a: iv.apply(a, 0)).float()[0]
    logp_c, logp_s = torch.log_softmax(lc, -1), torch.log_softmax(ls, -1)
    kl = (logp_c.exp() * (logp_c - logp_s)).sum(-1)
    tok = m.tokenizer
    rows = []
    n_prompt = ids.shape[1]
    for t in range(seq.shape[1]):
        nxt = int(seq[0, t + 1]) if t + 1 < seq.shape[1] else None
        up, down = _top_changes(logp_s[t].exp() - logp_c[t].exp(), tok, n_top)
        g = t - n_prompt + 1                      # index of the steered token predicted here
        rows.append({
            "position": t, "phase": "prompt" if t < n_prompt else "generated",
            "token": tok.decode([int(seq[0, t])]),
            "next_token": tok.decode([nxt]) if nxt is not None else "",
            "p_clean": float(logp_c[t, nxt].exp()) if nxt is not None else math.nan,
            "p_steered": float(logp_s[t, nxt].exp()) if nxt is not None else math.nan,
            "logprob_shift": float(logp_s[t, nxt] - logp_c[t, nxt]) if nxt is not None else math.nan,
            "kl": float(kl[t]), "top_up": up, "top_down": down,
            "steered_token": tok.decode([steered[g]]) if 0 <= g < len(steered) else "",
        })
    df = pd.DataFrame(rows)
    df["delta_p"] = df["p_steered"] - df["p_clean"]
    df.attrs.update({
        "prompt": prompt, "model": m.name, "hook": hook, "edits": [e.label for e in edits],
        "unsteered": tok.decode(clean), "steered": tok.decode(steered),
        "unsteered_ids": clean, "steered_ids": steered, "mean_kl": float(kl[skip:].mean()),
        "temperature": temperature, "seed": seed, "path": decode_path(m, hook, path)})
    return df


def _pick_hook(m, hook, sae_obj, sae_hook, pca) -> str:
    if hook and sae_hook and m.canonical(hook) != m.canonical(sae_hook):
        raise WorkbenchError(f"the SAE was trained on hook {sae_hook!r}, not {hook!r}: steer it at "
                             f"{sae_hook} (or pass an SAE trained on {hook})")
    hook = hook or sae_hook
    if not hook and pca:
        from .steps.pca import read_pca_result
        hook = read_pca_result(pca).hook
    if not hook:
        raise WorkbenchError("which hook? pass --hook (the SAE's metadata has no hook_name)")
    m.resolve_hooks([hook])
    if sae_obj is not None and int(sae_obj.W_dec.shape[1]) != m.d(hook):
        raise WorkbenchError(f"the SAE has d_in={int(sae_obj.W_dec.shape[1])} but {hook} of {m.name} has "
                             f"d={m.d(hook)}: it was trained on another model or hook")
    return hook


# ----------------------------------------------------------------------------------- attribution

def _metric(logits: torch.Tensor, ids: torch.Tensor, metric: str, target: int | None, position: int):
    """[b, s, V] logits -> [b] metric values (see module doc)."""
    if metric == "loss":
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        return -logp.gather(-1, ids[:, 1:, None].expand(logits.shape[0], -1, 1)).squeeze(-1).sum(1)
    return logits[:, position, target].float()


def attribute(text: str, *, sae: Any, model: Any = None, hook: str | None = None, metric: str = "loss",
              target: Any = None, position: int = -1, n_exact: int = 16, batch_size: int = 8,
              prepend_bos: bool = True, device: str = "cpu"):
    """Every active latent's effect on `metric` when zero-ablated at its position: the linear
    estimate for all, the exact effect for the `n_exact` largest |estimates|. Returns a pandas
    DataFrame (position, token, latent, activation, attribution, exact [NaN where not measured]),
    sorted by position then |attribution|; ``df.attrs``: text, tokens, metric, metric_value, hook,
    model, agreement {n, pearson, sign_agreement, max_abs_error, mean_abs_exact}."""
    import pandas as pd
    if metric not in METRICS:
        raise WorkbenchError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    sae_obj, sae_hook = resolve_sae(sae, device)
    m = resolve_model(model, sae_obj, device)
    hook = _pick_hook(m, hook, sae_obj, sae_hook, None)
    if m.kind != "causal":
        raise WorkbenchError(f"{m.name} is an encoder; attribution to a next-token loss needs a causal LM")
    ids, skip = tokenize(m, text, prepend_bos)
    check_prompt_length(m, ids.shape[1], 0)
    s = ids.shape[1]
    tgt = None
    if metric == "logit":
        if target is None:
            raise WorkbenchError("metric 'logit' needs --target (a token string or id)")
        tgt = token_id(m, target)
        if not -s <= position < s:
            raise WorkbenchError(f"position {position} is outside the text ({s} tokens: 0..{s - 1} or -1..-{s})")
        position = position % s
    elif s < 2:
        raise WorkbenchError("the loss metric needs at least 2 tokens of text")
    ids = ids.to(m.device)
    # one forward + backward: dm/dx at every position
    cap = {}

    def grab(act):
        x = act.detach().float().requires_grad_(True)
        cap["x"] = x
        return x

    with torch.enable_grad(), _hooked(m, hook, grab):
        logits = m.bridge(ids, attention_mask=torch.ones_like(ids), return_type="logits", **m._fwd_kw)
        val = _metric(logits, ids, metric, tgt, position)[0]
        (g,) = torch.autograd.grad(val, cap["x"])
    x, g = cap["x"].detach()[0], g[0].float()                    # [s, d]
    with torch.inference_mode():
        f = encode_rows(sae_obj, x).float()                      # [s, d_sae]
        f[:skip] = 0                                             # the prepended BOS is not an SAE row
        pos, lat = f.nonzero(as_tuple=True)
        act = f[pos, lat]
        W_dec = sae_obj.W_dec.detach().float().to(g.device)
        est = -act * (g[pos] * W_dec[lat]).sum(-1)
        exact = torch.full_like(est, math.nan)
        n_ex = min(int(n_exact), int(est.numel()))
        if n_ex > 0:
            top = torch.topk(est.abs(), n_ex).indices
            base = float(_metric(m.logits(ids), ids, metric, tgt, position)[0])
            for start in range(0, n_ex, max(1, int(batch_size))):
                sel = top[start:start + batch_size]
                rows_ = torch.arange(sel.numel(), device=m.device)

                def ablate(a, sel=sel, rows_=rows_):
                    a = a.clone()
                    a[rows_, pos[sel]] -= (act[sel, None] * W_dec[lat[sel]]).to(a.dtype)
                    return a
                b_ids = ids.expand(sel.numel(), -1)
                vals = _metric(m.logits(b_ids, hook=hook, replace=ablate), b_ids, metric, tgt, position)
                exact[sel] = vals.float().cpu().to(exact.device) - base
    tokens = [m.tokenizer.decode([i]) for i in ids[0].tolist()]
    df = pd.DataFrame({"position": pos.cpu().numpy(), "token": [tokens[p] for p in pos.tolist()],
                       "latent": lat.cpu().numpy(), "activation": act.cpu().numpy(),
                       "attribution": est.cpu().numpy(), "exact": exact.cpu().numpy()})
    df = df.assign(_a=df["attribution"].abs()).sort_values(["position", "_a"], ascending=[True, False])
    df = df.drop(columns="_a").reset_index(drop=True)
    df.attrs.update({"text": text, "tokens": tokens, "metric": metric, "target": tgt,
                     "position": position if metric == "logit" else None, "metric_value": float(val.detach()),
                     "hook": hook, "model": m.name, "agreement": agreement(df)})
    return df


def agreement(df) -> dict[str, float]:
    """How well the linear estimate matches the exact ablations where both exist."""
    d = df.dropna(subset=["exact"])
    n = len(d)
    if n == 0:
        return {"n": 0}
    a = torch.tensor(d["attribution"].to_numpy(copy=True), dtype=torch.float64)
    e = torch.tensor(d["exact"].to_numpy(copy=True), dtype=torch.float64)
    r = float(torch.corrcoef(torch.stack([a, e]))[0, 1]) if n > 1 and a.std() > 0 and e.std() > 0 else math.nan
    return {"n": n, "pearson": r, "sign_agreement": float(((a > 0) == (e > 0)).double().mean()),
            "max_abs_error": float((a - e).abs().max()), "mean_abs_exact": float(e.abs().mean())}


def top_per_token(df, n: int = 5):
    """The `n` latents with the largest |attribution| at each position of an attribute() table."""
    return df.groupby("position", sort=True, group_keys=False).head(n)


__all__ = ["Edit", "Intervention", "latent_edits", "generate", "generate_pair", "decode_path", "steer", "PATHS",
           "attribute", "agreement", "top_per_token", "ablate_examples", "MODES", "METRICS"]
