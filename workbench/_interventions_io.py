"""Inputs of workbench.interventions: SAEs, models, prompts, PCA directions, each checked against the
others (an SAE or PCA result made on another model or hook is refused, naming both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import WorkbenchError

_MODELS: dict[tuple[str, str], Any] = {}
_SAES: dict[tuple[str, float, str], Any] = {}


def _sae_meta(sae: Any, key: str):
    cfg = getattr(sae, "cfg", None)
    md = getattr(cfg, "metadata", None) or {}
    v = md.get(key) if isinstance(md, dict) else getattr(md, key, None)
    return v if v is not None else getattr(cfg, key, None)


def resolve_sae(sae: Any, device: str = "cpu") -> tuple[Any, str | None]:
    """(SAE object, its metadata hook_name) from a folder (cached by mtime) or an SAE object."""
    if isinstance(sae, (str, Path)):
        p = Path(sae)
        if not (p / "cfg.json").exists():
            raise WorkbenchError(f"{p} is not an SAE folder (no cfg.json); give a folder written by "
                                 "train-sae or export-sae (SAELens format)")
        key = (str(p.resolve()), (p / "cfg.json").stat().st_mtime, str(device))
        if key not in _SAES:
            from analyses.sae import load_sae
            _SAES.clear()
            try:
                _SAES[key] = load_sae(p, device=device).eval()
            except (ValueError, FileNotFoundError) as e:
                raise WorkbenchError(f"cannot load the SAE at {p}: {e}") from None
        sae = _SAES[key]
    if not hasattr(sae, "W_dec") or not hasattr(sae, "encode"):
        raise WorkbenchError(f"expected an SAE folder or object with encode/W_dec, got {type(sae).__name__}")
    return sae, _sae_meta(sae, "hook_name")


def resolve_model(model: Any, sae: Any = None, device: str = "cpu"):
    """A loaded Model from a spec / Model / None (= the SAE's metadata model_name); refuses an SAE
    whose metadata names another model."""
    sae_model = _sae_meta(sae, "model_name") if sae is not None else None
    if model is None or model == "":
        if not sae_model:
            raise WorkbenchError("which model? pass --model (the SAE's metadata has no model_name)")
        model = sae_model
    if isinstance(model, (str, Path)):
        spec = str(model)
        key = (spec, str(device))
        if key not in _MODELS:
            from .models import load_model
            _MODELS.clear()
            _MODELS[key] = load_model(spec, device=device)
        model = _MODELS[key]
    if sae_model and str(sae_model) != str(model.name):
        raise WorkbenchError(f"the SAE was trained on model {sae_model!r}, not {model.name!r}: steer "
                             f"{sae_model} (or pass an SAE trained on {model.name})")
    return model


def tokenize(model, text: str, prepend_bos: bool = True) -> tuple[torch.Tensor, int]:
    """([1, s] ids, number of leading positions that are the prepended BOS) — windows start as the
    collector starts them (``Model.text_bos_id``), so the SAE sees the same kind of context."""
    if not isinstance(text, str) or not text:
        raise WorkbenchError("the prompt / text is empty; give some text")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(model, "text_bos_id", None)
    skip = 0
    if prepend_bos and model.kind == "causal" and bos is not None:
        ids, skip = [int(bos)] + list(ids), 1
    if len(ids) == 0:
        raise WorkbenchError(f"{text!r} gives no tokens")
    return torch.tensor([ids], dtype=torch.long), skip


def check_prompt_length(model, n_prompt: int, n_new: int) -> None:
    if n_new < 0:
        raise WorkbenchError(f"max_new_tokens must be >= 0, got {n_new}")
    if model.n_ctx and n_prompt + n_new > model.n_ctx:
        raise WorkbenchError(f"the prompt is {n_prompt} tokens (+{n_new} to generate) but {model.name}'s "
                             f"context is {model.n_ctx} tokens: shorten the prompt or generate fewer tokens")


def token_id(model, target: Any) -> int:
    """A token id from an int, a digit string, or a string that is exactly one token."""
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise WorkbenchError(f"target {target!r} is {len(ids)} tokens ({ids}); give a single token "
                                 "(e.g. with its leading space, ' Paris') or a token id")
        return int(ids[0])
    i = int(target)
    if not 0 <= i < model.vocab_size:
        raise WorkbenchError(f"target token id {i} is out of range 0..{model.vocab_size - 1}")
    return i


def encode_rows(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """SAE codes of rows x [n, d] (any dtype / device), on x's device."""
    W = sae.W_dec
    f = sae.encode(x.to(W.device, W.dtype))
    return f.to(x.device)


def pca_edits(path: str, components: Iterable[int], coefs: Iterable[float], mode: str, model, hook: str):
    """Edits along principal components of a `pca` result made on this model and hook (read through
    its typed reader, ``steps.pca.read_pca_result``)."""
    from .interventions import Edit, paired_values
    from .steps.pca import read_pca_result
    r = read_pca_result(path)                # WorkbenchError for a missing / incomplete / other result
    comps = [int(c) for c in components]
    if not comps:
        raise WorkbenchError("--pca needs --component (which principal component, 0-based)")
    coefs = paired_values(comps, coefs, mode, what="components", flag="coef")
    if r.model and str(r.model) != str(model.name):
        raise WorkbenchError(f"the PCA result {path} was fitted on model {r.model!r}, not {model.name!r}")
    if model.canonical(r.hook) != model.canonical(hook):
        raise WorkbenchError(f"the PCA result {path} is of hook {r.hook!r}, not {hook!r}")
    t = r.tensors
    if "components" not in t:
        raise WorkbenchError(f"{path}: the pca result has no 'components' tensor; rerun the pca step")
    C = t["components"].float()
    if C.shape[1] != model.d(hook):
        raise WorkbenchError(f"the PCA components have d={C.shape[1]} but {hook} has d={model.d(hook)}")
    mean = t["mean"].float() if "mean" in t else None
    out = []
    for j, c in zip(comps, coefs):
        if not 0 <= j < C.shape[0]:
            raise WorkbenchError(f"component {j} is out of range: {path} has k={C.shape[0]} (0..{C.shape[0] - 1})")
        u = C[j] / C[j].norm().clamp_min(1e-12)
        out.append(Edit(c, mode, direction=u, center=mean, label=f"PC{j} {mode} {c:g}"))
    return out
