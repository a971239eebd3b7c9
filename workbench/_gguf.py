"""GGUF -> plain Hugging Face folder (dequantised float32 safetensors + tokenizer).

transformers reads GGUF files itself (`from_pretrained(folder, gguf_file=...)`, with the `gguf`
package): it dequantises every tensor to float and rebuilds the tokenizer. The model it returns
is flagged as quantised and refuses `save_pretrained`, so the weights are moved into a fresh,
unflagged model of the same class (built on the meta device: no extra memory) and saved from
there. The result is an ordinary folder that loads fast and boots the TransformerLens bridge.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ._model_cache import cached_folder


def _dtype_kw(dtype) -> dict:
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantise `gguf_path` into a safetensors HF folder at `out_dir` (which must exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **_dtype_kw(torch.float32))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    plain_cfg = type(model.config).from_dict(cfg)
    with torch.device("meta"):
        plain = type(model)(plain_cfg)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(plain_cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    del model, plain


def gguf_cache_name(gguf_path: str | os.PathLike) -> str:
    """Cache folder name for a .gguf file: its stem plus a hash of path, size and mtime."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{int(st.st_mtime)}".encode()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem)[:60]
    return f"gguf-{stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def gguf_folder(gguf_path: str | os.PathLike, name: str | None = None) -> Path:
    """The converted HF folder for `gguf_path`, converting once (atomically) if needed."""
    p = Path(gguf_path).resolve()
    return cached_folder(name or gguf_cache_name(p), lambda tmp: convert_gguf(p, tmp),
                         meta={"source": str(p)})
