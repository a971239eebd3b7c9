"""Fast decoding for steering: the Hugging Face model under the TransformerBridge, run directly with
ONE torch forward hook at the module whose output is the steered TransformerLens hook.

Why: the bridge wraps every HF module in a component with TransformerLens hook points, ~59k Python
module calls for a 32-token SmolLM2-135M generation (~55 ms/token on CPU, about twice bare HF).
Steering needs one hook, so we decode on a *plain* copy of the module tree: each bridge component is
replaced by the HF module it wraps (``original_component``), the copies share every parameter and
buffer with the bridge (no weights copied), carry none of the bridge's hooks, and have their own config
(SDPA attention where the model supports it, as ``from_pretrained`` does by default).

Hook -> module: ``analyses.sae.sparsify.sparsify_hookpoint`` (the table the sparsify export uses:
``blocks.i.hook_resid_post`` -> ``layers.i``, ``hook_mlp_out`` -> ``layers.i.mlp``, ``hook_attn_out`` ->
``layers.i.self_attn``, ...; ``blocks.i.hook_resid_pre`` -> ``layers.{i-1}``). Hooks with no module
output (``hook_resid_mid``, ``attn.hook_z``, ...) or model families not in that table take the bridge
path. Checked once per model (:func:`fast_decoder`, on 7 tokens): every mapped module's output equals
the bridge's activation at its hook, the logits equal the bridge's, and KV-cached decoding equals the
full forward; a hook that fails any of these takes the bridge path too.

Steering decodes the unsteered and the steered continuation of one prompt together, as ONE batch of 2
(:meth:`FastDecoder.generate_pair`; the intervention acts on row 1 only): batch-1 decoding on a CPU is
bound by reading the weights (SmolLM2-135M in fp32: ~0.5 GB per token), so the second row costs ~10%
more, not 2x. Both rows have the same length at every step (same prompt, one token each), so no padding
or attention mask is needed, and rows never attend to each other. Through the bridge, where Python
overhead dominates, batching gained nothing: the bridge path decodes them one after the other.
This module also holds the bridge path's KV-cache helpers (:func:`kv_cache_works`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import weakref
from typing import Callable

import torch

from .errors import WorkbenchError

PATHS = ("auto", "fast", "bridge")
_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # Model -> FastDecoder | None
_KV_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # Model -> bridge KV cache works
_LOCK = threading.Lock()


def cache_kw(hf) -> str:
    """The KV-cache keyword of this transformers version (``cache`` from 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def cached_step(hf, ids, past, kw, **extra):
    """One cached forward: (logits [b, s, V], the cache to pass next)."""
    res = hf(input_ids=ids, use_cache=True, **{kw: past}, **extra)
    cache = getattr(res, kw, None)
    return res.logits, (cache if cache is not None else getattr(res, "past_key_values", None))


# ----------------------------------------------------------------------- the bridge's KV cache

_KV_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _cache_shim(hf):
    """TransformerLens 3.9's bridged attention reads its KV cache from ``past_key_values`` while
    transformers 5.x decoder layers pass it as ``cache``: hand it over under both names while we
    generate (forward pre-hooks on the bridge's attention modules, removed afterwards)."""
    def pre(mod, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None
    handles = [mod.register_forward_pre_hook(pre, with_kwargs=True)
               for mod in hf.modules() if hasattr(mod, "_update_kv_cache")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kv_cache_works(model) -> bool:
    """Whether cached decoding through the bridge (with :func:`_cache_shim`) gives the full forward's
    logits; without the shim, TransformerLens 3.9 + transformers 5.x silently ignore the cache
    (tiny-random: last-token logits off by ~5). When it does not, generation falls back to one full
    forward per token. Probed once per model on 6 tokens."""
    ok = _KV_OK.get(model)
    if ok is None:
        hf, kw = model.hf_model, cache_kw(model.hf_model)
        ids = (torch.arange(6) * 7 % max(model.vocab_size - 1, 1) + 1)[None].to(model.device)
        with torch.inference_mode(), _cache_shim(hf):
            full = hf(input_ids=ids).logits[0, -1].float()
            _, past = cached_step(hf, ids[:, :-1], None, kw)
            last = cached_step(hf, ids[:, -1:], past, kw)[0][0, -1].float() if past is not None else None
        ok = last is not None and bool(torch.allclose(last, full, rtol=1e-3, atol=1e-3 * float(full.abs().max())))
        _KV_OK[model] = ok
    return ok


# ------------------------------------------------------------------------------- the plain model

def _unwrap(mod):
    while getattr(mod, "original_component", None) is not None:
        mod = mod.original_component
    return mod


def plain_copy(hf):
    """The HF module tree with bridge components replaced by the modules they wrap: shallow copies
    (parameters, buffers and config shared), with no forward / backward / state-dict hooks."""
    memo: dict[int, torch.nn.Module] = {}

    def rec(mod):
        mod = _unwrap(mod)
        if id(mod) in memo:
            return memo[id(mod)]
        new = copy.copy(mod)
        memo[id(mod)] = new
        for k, v in list(new.__dict__.items()):
            if k.startswith("_") and "hooks" in k and isinstance(v, dict):
                new.__dict__[k] = type(v)()          # the bridge's hooks stay on the bridge's modules
        new.__dict__["_modules"] = {n: None if c is None else rec(c) for n, c in mod._modules.items()}
        return new
    return rec(hf)


def _splice(fn: Callable, t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    return fn(flat).to(t.dtype).reshape(t.shape)


class FastDecoder:
    """The plain HF model of one workbench Model, and which TransformerLens hooks map to a module."""

    def __init__(self, model):
        hf = model.hf_model
        self.hf = plain_copy(hf).eval()
        cfg = copy.copy(hf.config)
        if getattr(hf, "_supports_sdpa", False):
            cfg._attn_implementation = "sdpa"
        for mod in self.hf.modules():
            if "config" in mod.__dict__:
                mod.__dict__["config"] = cfg
        self.kw = cache_kw(self.hf)
        # decoding needs the last position's logits only (Hugging Face generate does the same)
        keep = "logits_to_keep" in inspect.signature(self.hf.forward).parameters
        self._last = {"logits_to_keep": 1} if keep else {}
        self.device = model.device
        base = self.hf.base_model
        from analyses.sae.sparsify import sparsify_hookpoint
        mt = getattr(hf.config, "model_type", None)
        self.paths: dict[str, str] = {}
        for h in model.hook_names:
            p = sparsify_hookpoint(h, mt)
            if p is not None and _has(base, p):
                self.paths[h] = p
        self.ok: frozenset[str] = frozenset()
        self._probe(model, base)

    def _probe(self, model, base) -> None:
        """Keep the hooks whose module output equals the bridge's activation (fp32: 1e-4 of the
        largest value; half types 2e-2), when the logits and the KV cache agree too."""
        ids = (torch.arange(7) * 7919 % max(model.vocab_size - 1, 1) + 1)[None].to(self.device)
        got: dict[str, torch.Tensor] = {}

        def grab(path):
            def fn(mod, args, out):
                t = out[0] if isinstance(out, tuple) else out
                got.setdefault(path, t.detach().reshape(t.shape[0], t.shape[1], -1).float().clone())
            return fn
        handles = [base.get_submodule(p).register_forward_hook(grab(p)) for p in set(self.paths.values())]
        try:
            with torch.inference_mode():
                full = self.hf(input_ids=ids).logits.float()
        finally:
            for h in handles:
                h.remove()
        ref: dict[str, torch.Tensor] = {}

        def rec(h):
            def fn(t, hook=None):
                ref.setdefault(h, t.detach().reshape(t.shape[0], t.shape[1], -1).float().clone())
            return fn
        with torch.inference_mode():      # ONE bridge forward: its logits and every mapped activation
            with model._hooked([(model._points[model._pid(h)], rec(h)) for h in self.paths]):
                ref_logits = model.logits(ids).float()
            _, past = cached_step(self.hf, ids[:, :-1], None, self.kw)
            last = cached_step(self.hf, ids[:, -1:], past, self.kw)[0][0, -1].float()
        tol = 1e-4 if model.dtype == torch.float32 else 2e-2
        if not (_close(full, ref_logits, tol) and _close(last, full[0, -1], tol)):
            return
        self.ok = frozenset(h for h, p in self.paths.items()
                            if p in got and h in ref and _close(got[p], ref[h], tol))

    def module(self, hook: str):
        return self.hf.base_model.get_submodule(self.paths[hook])

    @contextlib.contextmanager
    def hooked(self, hook: str, fn: Callable | None):
        """`fn(act[b, s, d]) -> act` spliced in at `hook`'s module, for forwards run by this thread
        (another thread steering the same model at the same time is left alone)."""
        if fn is None:
            yield
            return
        owner = threading.get_ident()

        def h(mod, args, out):
            if threading.get_ident() != owner:
                return None
            if isinstance(out, tuple):
                return (_splice(fn, out[0]),) + tuple(out[1:])
            return _splice(fn, out)
        handle = self.module(hook).register_forward_hook(h)
        try:
            yield
        finally:
            handle.remove()

    def step(self, ids, past):
        """One cached decode step: (logits [b, 1, V] of the last position, the next cache)."""
        logits, past = cached_step(self.hf, ids, past, self.kw, **self._last)
        return logits[:, -1:], past

    def logits(self, ids: torch.Tensor, hook: str, fn: Callable | None = None) -> torch.Tensor:
        """Full forward to logits [b, s, V], `fn` spliced in at `hook` (None: unchanged)."""
        with torch.inference_mode(), self.hooked(hook, fn):
            return self.hf(input_ids=ids.to(self.device), use_cache=False).logits

    def logits_pair(self, ids: torch.Tensor, hook: str, apply: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [s, V] of ids [1, s] unchanged and with `apply(act, 0)` at `hook`, in one batch of 2."""
        out = self.logits(ids.expand(2, -1), hook, _second_row(apply, lambda: 0))
        return out[0], out[1]

    @torch.inference_mode()
    def generate_pair(self, ids: torch.Tensor, hook: str, apply: Callable | None, max_new_tokens: int,
                      picks: tuple[Callable, Callable], eos: int | None,
                      records: tuple[list, list] | None = None) -> tuple[list[int], list[int]]:
        """New token ids of ids [1, s] continued unchanged (row 0) and with `apply(act, offset)` at
        `hook` (row 1), KV-cached, one batch of 2. picks[r](logits [V]) -> token of row r (each
        with its own sampler, so each row draws what a generation alone would); a row that reached
        `eos` stops (it is fed eos while the other goes on, and its outputs are ignored)."""
        state = {"offset": 0}
        out: tuple[list[int], list[int]] = ([], [])
        done = [False, False]
        cur, past = ids.to(self.device).expand(2, -1), None
        with self.hooked(hook, None if apply is None else _second_row(apply, lambda: state["offset"])):
            for _ in range(int(max_new_tokens)):
                logits, past = self.step(cur, past)
                state["offset"] += cur.shape[1]
                for r in (0, 1):
                    if done[r]:
                        continue
                    lg = logits[r, -1].float()
                    if records is not None:
                        records[r].append(lg.clone())
                    out[r].append(picks[r](lg))
                    done[r] = eos is not None and out[r][-1] == eos
                if all(done):
                    break
                cur = torch.tensor([[out[0][-1]], [out[1][-1]]], device=self.device)
        return out


def _second_row(apply: Callable, offset: Callable) -> Callable:
    """`apply(act, offset())` on row 1 of a batch of 2; row 0 left as it is."""
    def fn(act):
        return torch.cat([act[:1], apply(act[1:], offset()).to(act.dtype)])
    return fn


def _has(base, path: str) -> bool:
    try:
        base.get_submodule(path)
        return True
    except AttributeError:
        return False


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


def prepare(model) -> FastDecoder | None:
    """Build and check the fast decoder of `model` once (a bridge forward and three plain ones on 7
    tokens); None for encoders and module trees it does not fit. The UI calls it when it loads a model,
    so the first steering answer does not pay for it."""
    if model.kind != "causal":
        return None
    with _LOCK:
        if model not in _FAST:
            try:
                _FAST[model] = FastDecoder(model)
            except Exception:  # noqa: BLE001 - a module tree this does not fit: decode through the bridge
                _FAST[model] = None
    return _FAST[model]


def fast_decoder(model, hook: str, path: str = "auto") -> FastDecoder | None:
    """The fast decoder for steering `hook` of `model`, or None for the bridge path. path: "auto"
    (fast where the hook maps to a checked HF module), "fast" (refuse when it does not), "bridge"."""
    if path not in PATHS:
        raise WorkbenchError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "bridge":
        return None
    fd = prepare(model)
    canon = model.canonical(hook)
    if fd is not None and canon in fd.ok:
        return fd
    if path == "fast":
        why = ("no Hugging Face module outputs it" if fd is None or canon not in fd.paths
               else "the module's output differs from the bridge's activation")
        raise WorkbenchError(f"no fast decode path for {canon} of {model.name}: {why}; use path='auto' "
                             f"(falls back to the bridge) or a hook such as blocks.0.hook_resid_post")
    return None


__all__ = ["FastDecoder", "fast_decoder", "prepare", "plain_copy", "cache_kw", "cached_step", "kv_cache_works",
           "PATHS"]
