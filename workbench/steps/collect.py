"""The `collect` step: a model's activations at some hooks over a corpus -> an activation store."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import StepResult, arg, register


@dataclass
class CollectConfig:
    model: str = field(default="smollm2-135m", metadata=arg(
        "model spec: smollm2-135m, minilm-l6, tiny-random[:...], a local HF folder, a .gguf file",
        role="model"))
    hooks: list[str] = field(default_factory=list, metadata=arg(
        "hook names or patterns (repeatable): blocks.6.hook_resid_post, 'blocks.*.hook_resid_post', "
        "'blocks.{6,15}.hook_resid_post'", role="hooks"))
    corpus: str = field(default="builtin", metadata=arg(
        "builtin, calendar (synthetic weekday/month/year sentences), a .txt file (:lines / :paragraphs) or "
        "folder, FILE.jsonl[:field], hf:NAME[:split[:field]]; SPEC*N: N epochs of it (same document ids)"))
    max_tokens: int = field(default=50_000, metadata=arg("number of token rows to collect"))
    seq_len: int = field(default=128, metadata=arg("tokens per window (one document per window)"))
    batch_size: int = field(default=16, metadata=arg("windows per forward pass"))
    out: str = field(default="", metadata=arg("output store folder (required)", role="out"))
    dtype: str = field(default="", metadata=arg(
        "storage dtype (default: the model's dtype)", choices=["float32", "float16", "bfloat16"]))
    device: str = field(default="auto", metadata=arg("cpu, cuda, cuda:1, ... or auto"))
    special_tokens: str = field(default="exclude", metadata=arg(
        "which special tokens become rows: exclude, include, or a comma list of kinds to keep "
        "(bos,eos,cls,sep)"))
    windows_per_doc: int = field(default=0, metadata=arg(
        "keep only each document's first N windows (0: all); many documents in few tokens"))
    prepend_bos: str = field(default="auto", metadata=arg(
        "start every window with BOS (its row is not stored unless --special-tokens keeps bos); "
        "auto: yes for causal models with a BOS token, as TransformerLens", choices=["auto", "yes", "no"]))
    overwrite: bool = field(default=False, metadata=arg("replace an existing store at --out"))
    progress: bool = field(default=True, metadata=arg("progress bar on stderr", cli=False))


@register("collect", CollectConfig, help="collect a model's activations at some hooks into a store",
          produces="store")
def collect_step(cfg: CollectConfig) -> StepResult:
    from ..collector import collect
    from ..errors import WorkbenchError
    if not cfg.out:
        raise WorkbenchError("collect needs --out PATH (the store folder to write)")
    if not cfg.hooks:
        raise WorkbenchError("collect needs --hooks NAME (repeatable; patterns like "
                             "'blocks.*.hook_resid_post' work)")
    store = collect(cfg.model, list(cfg.hooks), corpus=cfg.corpus, out=cfg.out,
                    max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                    dtype=cfg.dtype or None, device=cfg.device, special_tokens=cfg.special_tokens,
                    overwrite=cfg.overwrite, progress=cfg.progress, windows_per_doc=cfg.windows_per_doc,
                    prepend_bos={"auto": None, "yes": True, "no": False}[cfg.prepend_bos])
    last = getattr(store, "last_run", None) or {}
    return StepResult(
        summary={"store": str(store.path), "model": store.model_name, "hooks": store.hooks,
                 "n_rows": store.n_rows, "n_seq": store.n_seq, "dtype": store.manifest["dtype"]},
        metrics={"tokens": float(store.n_rows),
                 "tokens_collected": float(last.get("tokens", 0)),
                 "tokens_per_s": round(float(last.get("tokens_per_s", 0.0)), 1)},
        artifacts={"store": str(store.path)},
    )
