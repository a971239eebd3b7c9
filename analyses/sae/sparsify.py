"""EleutherAI sparsify layout: export and import of TopK SAEs, hookpoint names both ways.

Layout (sparsify ``SparseCoder.save_to_disk`` / ``load_from_disk``): ``<hookpoint>/cfg.json`` (the
``SparseCoderConfig`` fields plus ``d_in``; ``from_dict(drop_extra_fields=True)`` ignores our extra keys)
and ``<hookpoint>/sae.safetensors`` with ``encoder.weight`` [n, d_in], ``encoder.bias`` [n], ``W_dec``
[n, d_in], ``b_dec`` [d_in].

Forward (sparsify ``SparseCoder.encode`` + ``fused_encoder``): ``pre = relu(encoder(x - b_dec))``, keep the
``k`` largest (``activation="topk"``); decode = sum of the kept ``W_dec`` rows + ``b_dec``. The input is
ALWAYS ``x - b_dec`` (transcoders aside), so an SAE with ``apply_b_dec_to_input=False`` (SAELens / Gemma
Scope style) is exported with ``b_dec @ W_enc`` folded into the encoder bias:
``(x - b_dec) W_enc + (b_enc + b_dec W_enc) = x W_enc + b_enc``. ``activation="groupmax"`` (max inside
k contiguous groups) is a different SAE: import refuses it.

Hookpoint = the module path under ``model.base_model`` whose OUTPUT sparsify trains on (sparsify
``trainer.py`` matches ``base_model.named_modules()``; its default is ``f"{layers_name}.{i}"`` from
``utils.get_layer_list``, e.g. ``layers.6``). ``LAYOUTS`` lists, per model family, which
TransformerLens hooks equal such an output (checked against the Hugging Face modules in
tests/test_sae_formats.py). ``blocks.{i}.hook_resid_pre`` is the output of block i-1 (of the embedding
for i = 0 where there is no position embedding). Hooks with no module output (``attn.hook_z``,
``hook_resid_mid``, ``mlp.hook_post``, ``ln*.hook_normalized`` taken before the gain, ...) or of a
family not listed fall back to the TransformerLens hook name as folder name; cfg.json always keeps
``hook_name`` (TransformerLens), ``hookpoint`` (null for the fallback) and ``module_layout``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._util import atomic_write
from .base import SAE, SAEConfig

# hook name (TransformerLens or TransformerBridge alias) -> (kind, layer or None)
_HOOK_KINDS = [
    (re.compile(r"blocks\.(\d+)\.(hook_resid_post|hook_out)"), "resid_post"),
    (re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_in)"), "resid_pre"),
    (re.compile(r"blocks\.(\d+)\.(hook_attn_out|attn\.hook_out|attn\.o\.hook_out)"), "attn"),
    (re.compile(r"blocks\.(\d+)\.(hook_mlp_out|mlp\.hook_out|mlp\.out\.hook_out)"), "mlp"),
    (re.compile(r"blocks\.(\d+)\.ln1\.hook_out"), "ln1"),
    (re.compile(r"blocks\.(\d+)\.ln2\.hook_out"), "ln2"),
    (re.compile(r"(hook_embed|embed\.hook_out)"), "embed"),
    (re.compile(r"ln_final\.hook_out"), "ln_final"),
]
_CANONICAL = {"resid_post": "blocks.{i}.hook_resid_post", "attn": "blocks.{i}.hook_attn_out",
              "mlp": "blocks.{i}.hook_mlp_out", "ln1": "blocks.{i}.ln1.hook_out",
              "ln2": "blocks.{i}.ln2.hook_out", "embed": "hook_embed", "ln_final": "ln_final.hook_out"}

# module paths under model.base_model (Hugging Face names); "resid_pre0": what blocks.0.hook_resid_pre is
LAYOUTS: dict[str, dict[str, str | None]] = {
    "llama": {"resid_post": "layers.{i}", "attn": "layers.{i}.self_attn", "mlp": "layers.{i}.mlp",
              "ln1": "layers.{i}.input_layernorm", "ln2": "layers.{i}.post_attention_layernorm",
              "embed": "embed_tokens", "ln_final": "norm", "resid_pre0": "embed_tokens"},
    "gpt2": {"resid_post": "h.{i}", "attn": "h.{i}.attn", "mlp": "h.{i}.mlp", "ln1": "h.{i}.ln_1",
             "ln2": "h.{i}.ln_2", "embed": "wte", "ln_final": "ln_f", "resid_pre0": None},
    "gpt_neox": {"resid_post": "layers.{i}", "attn": "layers.{i}.attention", "mlp": "layers.{i}.mlp",
                 "ln1": "layers.{i}.input_layernorm", "ln2": "layers.{i}.post_attention_layernorm",
                 "embed": "embed_in", "ln_final": "final_layer_norm", "resid_pre0": "embed_in"},
}
# Hugging Face config.json model_type -> layout. Unknown types fall back to the TransformerLens name.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
               "gpt2": "gpt2", "gpt_neox": "gpt_neox"}
DEFAULT_LAYOUT = "llama"   # model_type unknown (None): our embedded causal models and sparsify's default


def _layout_name(model_type: str | None) -> str | None:
    if model_type is None:
        return DEFAULT_LAYOUT
    return MODEL_TYPES.get(str(model_type).lower())


def sparsify_hookpoint(hook: str, model_type: str | None = None) -> str | None:
    """The sparsify hookpoint (module path) whose output is the activation at TransformerLens `hook`,
    for a model of Hugging Face `model_type` (None: Llama-style). None when no module outputs it."""
    layout = LAYOUTS.get(_layout_name(model_type) or "")
    if layout is None or not hook:
        return None
    for rx, kind in _HOOK_KINDS:
        m = rx.fullmatch(hook)
        if not m:
            continue
        i = int(m.group(1)) if m.groups() and m.group(1).isdigit() else None
        if kind == "resid_pre":
            if i == 0:
                return layout["resid_pre0"]
            kind, i = "resid_post", i - 1
        tpl = layout.get(kind)
        return None if tpl is None else tpl.format(i=i)
    return None


def hook_from_hookpoint(hookpoint: str, model_type: str | None = None) -> str | None:
    """The TransformerLens hook name of a sparsify hookpoint (inverse of :func:`sparsify_hookpoint`;
    ``layers.5`` -> ``blocks.5.hook_resid_post``). Unknown model_type: every layout is tried."""
    names = [_layout_name(model_type)] if model_type is not None else list(LAYOUTS)
    for name in names:
        for kind, tpl in (LAYOUTS.get(name or "") or {}).items():
            if tpl is None or kind == "resid_pre0":
                continue
            rx = re.escape(tpl).replace(r"\{i\}", r"(\d+)")
            m = re.fullmatch(rx, hookpoint)
            if m:
                return _CANONICAL[kind].format(i=m.group(1) if m.groups() else "")
    return None


# ----------------------------------------------------------------------------------- export

def save_sparsify(sae: SAE, out: str | Path, hook: str | None = None, model_type: str | None = None) -> Path:
    """Write ``out/<hookpoint>/cfg.json`` + ``sae.safetensors``; returns that folder. Only TopK SAEs
    (what sparsify computes). `hook` overrides the folder name; `model_type` picks the module names."""
    if sae.arch != "topk":
        raise ValueError(f"sparsify only runs TopK SAEs; this is a {sae.arch!r} SAE — export it as saelens")
    c = sae.cfg
    tl_hook = c.metadata.get("hook_name")
    hookpoint = sparsify_hookpoint(tl_hook, model_type) if tl_hook else None
    folder_name = hook or hookpoint or tl_hook or "sae"
    folder = Path(out) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc = sae.W_enc.detach().double().cpu(), sae.b_enc.detach().double().cpu()
    W_dec, b_dec = sae.W_dec.detach().double().cpu(), sae.b_dec.detach().double().cpu()
    if not c.apply_b_dec_to_input:          # sparsify encodes x - b_dec: fold b_dec @ W_enc into the bias
        b_enc = b_enc + b_dec @ W_enc
    save_file({"encoder.weight": W_enc.t().float().contiguous(), "encoder.bias": b_enc.float().contiguous(),
               "W_dec": W_dec.float().contiguous(), "b_dec": b_dec.float().contiguous()},
              folder / "sae.safetensors")
    unit = bool(torch.allclose(W_dec.norm(dim=1), torch.ones(c.d_sae, dtype=torch.float64), atol=1e-4))
    cfg: dict[str, Any] = {
        "activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in), "normalize_decoder": unit,
        "num_latents": c.d_sae, "k": int(c.k), "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": c.d_in,
        # ours (sparsify drops unknown fields): where this SAE reads in TransformerLens terms
        "hook_name": tl_hook, "hookpoint": hookpoint, "model_name": c.metadata.get("model_name"),
        "model_type": model_type, "module_layout": _layout_name(model_type)}
    atomic_write(folder / "cfg.json", lambda f: f.write(json.dumps(cfg, indent=2) + "\n"))
    return folder


# ----------------------------------------------------------------------------------- import

def _cfg_of(folder: Path) -> dict:
    f = folder / "cfg.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _find_sparsify(path: Path, hook: str | None) -> Path:
    if (path / "sae.safetensors").exists():
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "sae.safetensors").exists()) \
        if path.is_dir() else []
    if hook is not None:
        if (path / hook / "sae.safetensors").exists():
            return path / hook
        for p in subs:          # a TransformerLens name for a folder named by its hookpoint
            raw = _cfg_of(p)
            if hook in (raw.get("hook_name"), hook_from_hookpoint(p.name, raw.get("model_type"))):
                return p
        raise FileNotFoundError(f"{path} has no sparsify SAE for hook {hook!r}; it has: "
                                f"{', '.join(p.name for p in subs) or 'none'}")
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise FileNotFoundError(f"{path} is not a sparsify SAE folder (expected <hookpoint>/cfg.json + "
                                "<hookpoint>/sae.safetensors)")
    raise ValueError(f"{path} holds several sparsify SAEs ({', '.join(p.name for p in subs)}); pass hook=")


def load_sparsify(path: str | Path, hook: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """Import a sparsify SAE (a ``<hookpoint>/`` folder, or its parent with one or more of them).
    `hook`: a folder name or a TransformerLens hook name. metadata.hook_name = the TransformerLens hook
    (cfg.json ``hook_name`` if we wrote it, else mapped from the hookpoint, else the folder name)."""
    from .topk import TopKSAE
    folder = _find_sparsify(Path(path), hook)
    raw = _cfg_of(folder)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder}: sparsify activation={activation!r} is not supported (only 'topk'; "
                         "'groupmax' keeps the max of each of k latent groups, a different SAE)")
    t = load_file(folder / "sae.safetensors")
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in t:
            raise ValueError(f"{folder}/sae.safetensors has no {name!r} (has {', '.join(sorted(t))})")
    extras = [k for k in ("transcode", "skip_connection", "embed_skip", "gram_lookup") if raw.get(k)]
    if extras or "W_skip" in t:
        raise ValueError(f"{folder}: sparsify {', '.join(extras) or 'W_skip'} is not supported "
                         "(only plain TopK autoencoders)")
    n, d_in = t["encoder.weight"].shape
    if "d_in" in raw and int(raw["d_in"]) != d_in:
        raise ValueError(f"{folder}: cfg.json d_in={raw['d_in']} but encoder.weight has shape {(n, d_in)}")
    if tuple(t["W_dec"].shape) != (n, d_in):
        raise ValueError(f"{folder}: W_dec has shape {tuple(t['W_dec'].shape)}, expected {(n, d_in)} "
                         "(sparsify stores W_dec as [num_latents, d_in])")
    k = int(raw.get("k", 32))
    if not 0 < k <= n:
        raise ValueError(f"{folder}: k={k} must be in 1..num_latents={n}")
    tl_hook = raw.get("hook_name") or hook_from_hookpoint(folder.name, raw.get("model_type")) or folder.name
    meta = {"hook_name": tl_hook, "sparsify_hookpoint": folder.name, "imported_from": "sparsify",
            "sparsify_cfg": raw}
    if raw.get("model_name"):
        meta["model_name"] = raw["model_name"]
    cfg = SAEConfig(arch="topk", d_in=int(d_in), d_sae=int(n), k=k, device=str(device), metadata=meta)
    sae = TopKSAE(cfg, init=False)
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"].float().t())
        sae.b_enc.copy_(t["encoder.bias"].float())
        sae.W_dec.copy_(t["W_dec"].float())
        sae.b_dec.copy_(t["b_dec"].float())
    return sae.to(device)
