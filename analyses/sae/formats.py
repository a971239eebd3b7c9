"""On-disk formats: SAELens 6.x (native), EleutherAI sparsify, and a Neuronpedia upload bundle.

Native = SAELens 6.x folder, written so ``sae_lens.SAE.load_from_disk(path)`` gives the same encode/decode:

* ``cfg.json``: ``architecture`` (relu -> ``standard``, topk -> ``topk`` + ``k``, jumprelu / batchtopk /
  matryoshka -> ``jumprelu``), ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations: "none"`` (our input scaling is folded into the weights), ``reshape_activations``
  and ``metadata`` {``sae_lens_version`` (>= 6.0.0), ``model_name``, ``hook_name``, ``context_size``,
  ``prepend_bos``, ``dataset_path``, ``workbench_arch`` (our class: batchtopk/matryoshka reload as
  themselves), ``workbench`` {k, training options and stats}}.
* ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_in], ``b_dec``
  (+ ``threshold`` [d_sae] for jumprelu; BatchTopK/Matryoshka: their global threshold broadcast).
* ``sparsity.safetensors`` (after training): ``sparsity`` [d_sae] = log10(firing rate + 1e-10).

cfg.json is written last (atomically), so a folder without it is never taken for a complete SAE.

sparsify layout (export / import, in ``sparsify.py``): ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``,
the folder named by the Hugging Face module path sparsify hooks (``layers.6`` for
``blocks.6.hook_resid_post`` of a Llama-style model), the TransformerLens hook kept in cfg.json ``hook_name``.
sparsify encodes ``topk(relu(encoder(x - b_dec)))`` — our TopK (``apply_b_dec_to_input=False`` is folded
into the encoder bias) — so only TopK SAEs export there.

Native-only architectures (SAELens has no such activation; ``saelens_arch`` not a SAELens name): ``topafa``
is saved in the same layout with ``architecture: "topafa"`` (weights W_enc, b_enc, W_dec, b_dec only; the
per-token rule is in analyses/sae/topafa.py). ``load_sae`` reads it back as itself;
``export_sae(..., "saelens" | "neuronpedia")`` refuses it with an explanation instead of writing a folder
SAELens cannot load. Mutual / Feature Choice SAEs infer with a calibrated JumpReLU threshold, so they are
SAELens ``jumprelu`` (feature choice: one threshold per latent) and reload as themselves.
Matching pursuit (``mp``) is SAELens' own ``matching_pursuit`` (cfg ``max_iterations`` = k,
``residual_threshold``, ``stop_on_duplicate_support``; tensors ``W_dec``, ``b_dec`` only: the encoder is
W_dec^T). Group Bias Adaptation (``gba``) infers with JumpReLU, so it is a SAELens ``jumprelu``
(W_enc = W_dec^T diag(a), b_enc = 0, threshold = -a b) and reloads as itself. Architectures with tied or
extra tensors provide ``saelens_state`` / ``saelens_cfg_extra`` / ``options_from_saelens`` /
``load_saelens_tensors`` (see mp.py, gba.py).

Neuronpedia bundle (``export_sae(..., "neuronpedia")``): Neuronpedia ingests SAEs in SAELens format
hosted as a Hugging Face model repo (``library_name: saelens``); its dashboard generator (SAEDashboard's
Neuronpedia runner) loads the folder with SAELens and needs the model id, layer, hook and the sparsity
(features with log10 density < -6 are skipped). We write: the SAELens folder (cfg.json with
``metadata.neuronpedia_id`` set, weights, sparsity) + ``README.md`` (HF model card with
``library_name: saelens`` front matter, how to load) + ``neuronpedia.json`` (modelId, layer, hookName,
sourceSetName, neuronpediaId, architecture, dIn, dSae, k, training stats) — upload the folder to a HF repo
and submit that repo / these fields through Neuronpedia's SAE upload form.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._util import atomic_write

from .base import DTYPES, KNOWN_ARCHS, SAE, SAEConfig, dtype_name
from .sparsify import hook_from_hookpoint, load_sparsify, save_sparsify, sparsify_hookpoint  # noqa: F401

SAELENS_REQUIRED = ("architecture", "d_in", "d_sae", "dtype")
SAELENS_READABLE = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "matching_pursuit": "mp"}
FORMATS = ("saelens", "sparsify", "neuronpedia")
MIN_SAELENS_VERSION = "6.0.0"


def _sae_lens_version() -> str:
    try:
        from importlib.metadata import version
        v = version("sae-lens")
        return v if int(v.split(".")[0]) >= 6 else MIN_SAELENS_VERSION
    except Exception:  # noqa: BLE001
        return MIN_SAELENS_VERSION


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(
        obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n"))


def _registry() -> dict[str, type[SAE]]:
    from . import ARCHS
    return ARCHS


# ----------------------------------------------------------------------------------- SAELens

def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if hasattr(sae, "saelens_state"):      # an architecture with its own tensor set (matching_pursuit)
        t = sae.saelens_state()
    if sae.saelens_arch == "jumprelu":
        t["threshold"] = sae.thresholds()
    return {k: v.detach().to("cpu", DTYPES.get(sae.cfg.dtype, torch.float32)).contiguous() for k, v in t.items()}


def saelens_cfg(sae: SAE) -> dict[str, Any]:
    c = sae.cfg
    meta = dict(c.metadata)
    meta.setdefault("model_name", None)
    meta.setdefault("hook_name", None)
    meta.setdefault("hook_head_index", None)
    meta.setdefault("context_size", None)
    meta.setdefault("prepend_bos", True)
    meta.setdefault("dataset_path", None)
    meta["sae_lens_version"] = _sae_lens_version()
    meta["workbench_arch"] = sae.arch
    wb = dict(meta.get("workbench") or {})
    wb.update({"arch": sae.arch, "k": c.k, **c.training_options()})
    if sae.arch == "matryoshka":
        wb["matryoshka_widths"] = sae.widths()
    meta["workbench"] = wb
    cfg = {"architecture": sae.saelens_arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype,
           "device": "cpu", "apply_b_dec_to_input": bool(c.apply_b_dec_to_input),
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}
    if sae.saelens_arch == "topk":
        cfg["k"] = int(c.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    if hasattr(sae, "saelens_cfg_extra"):  # architecture-specific SAELens cfg keys (matching_pursuit)
        cfg.update(sae.saelens_cfg_extra())
    return cfg


def save_saelens(sae: SAE, path: str | Path, *, sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` as a SAELens 6.x folder (cfg.json last, atomically). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_file = path / "cfg.json"
    if cfg_file.exists():
        cfg_file.unlink()          # the folder is incomplete until the new cfg.json lands
    save_file(saelens_tensors(sae), path / "sae_weights.safetensors")
    sp = sparsity if sparsity is not None else sae.sparsity
    if sp is not None:
        save_file({"sparsity": sp.detach().float().cpu().contiguous()}, path / "sparsity.safetensors")
    _atomic_json(cfg_file, saelens_cfg(sae))
    return path


def _check_shapes(tensors: dict[str, torch.Tensor], d_in: int, d_sae: int, path: Path) -> None:
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in want.items():
        if name not in tensors:
            raise ValueError(f"{path}: sae_weights.safetensors has no {name!r} (has {', '.join(sorted(tensors))})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                             f"(d_in={d_in}, d_sae={d_sae}) needs {shape}")


def _dtype_key(dtype: Any, path: Path) -> str:
    """``"float32"``, ``"torch.float32"`` (what SAELens writes when its cfg got that string; its
    ``constants.DTYPE_MAP`` reads both) or a torch.dtype -> our key in DTYPES."""
    key = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).strip()
    key = key[len("torch."):] if key.startswith("torch.") else key
    if key not in DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r} not supported; use one of "
                         f"{', '.join(DTYPES)} (or the same with a 'torch.' prefix)")
    return key


def load_saelens(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
    """Load a SAELens folder (ours, or written by SAELens itself, e.g. Gemma Scope style jumprelu)."""
    path = Path(path)
    cfg_file = path / "cfg.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no cfg.json: not a SAELens SAE folder (expected cfg.json + "
                                "sae_weights.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if "hook_point" in raw and "hook_name" not in raw:   # pre-6 configs
        raw["hook_name"] = raw["hook_point"]
    if "architecture" not in raw and "d_in" in raw and "d_sae" in raw and "dtype" in raw:
        is_topk = "topk" in (raw.get("activation_fn"), raw.get("activation_fn_str"))
        raw["architecture"] = "topk" if is_topk else "standard"
        if raw["architecture"] == "topk" and "k" not in raw:
            raw["k"] = (raw.get("activation_fn_kwargs") or {}).get("k")
    missing = [k for k in SAELENS_REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{cfg_file} is missing required key(s) {', '.join(missing)} "
                         f"(a SAELens cfg.json needs {', '.join(SAELENS_REQUIRED)})")
    arch_sl = raw["architecture"]
    meta = dict(raw.get("metadata") or {})
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path", "hook_head_index"):
        if key in raw and key not in meta:
            meta[key] = raw[key]
    wb = dict(meta.get("workbench") or {})
    ours = meta.get("workbench_arch")
    native = ours in _registry() and _registry()[ours].saelens_arch == arch_sl   # e.g. topafa
    if arch_sl not in SAELENS_READABLE and not native:
        raise ValueError(f"{path}: unknown or unsupported SAE architecture {arch_sl!r}; known: "
                         f"{', '.join(SAELENS_READABLE)} (SAELens names) = {', '.join(KNOWN_ARCHS)} (workbench)")
    arch = SAELENS_READABLE.get(arch_sl, ours)
    if ours in _registry() and _registry()[ours].saelens_arch == arch_sl:
        arch = ours
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{path}: normalize_activations={norm!r} is not supported; fold the normalisation "
                         "into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{path}: reshape_activations={raw['reshape_activations']!r} is not supported")
    k = raw.get("k", wb.get("k"))
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    want_dtype = _dtype_key(dtype or raw["dtype"], path)
    opts = {kk: v for kk, v in wb.items() if kk in {f for f in SAEConfig.__dataclass_fields__}
            and kk not in ("arch", "d_in", "d_sae", "k", "dtype", "device", "metadata")}
    if hasattr(_registry()[arch], "options_from_saelens"):   # e.g. matching_pursuit's max_iterations -> k
        extra = _registry()[arch].options_from_saelens(raw)
        k = k if k is not None else extra.pop("k", None)
        extra.pop("k", None)
        opts = {**extra, **opts}
    cfg = SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=int(k) if k is not None else None,
                    dtype=want_dtype, device=str(device),
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), metadata=meta, **opts)
    if _registry()[arch].uses_k and cfg.k is None:
        raise ValueError(f"{cfg_file}: a {arch} SAE needs 'k' (top-level for topk, metadata.workbench.k)")
    weights = path / "sae_weights.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path} has cfg.json but no sae_weights.safetensors")
    tensors = load_file(weights)
    if arch_sl == "matching_pursuit" and "W_dec" in tensors:   # tied, no encoder tensors on disk
        tensors.setdefault("W_enc", tensors["W_dec"].t())
        tensors.setdefault("b_enc", torch.zeros(tensors["W_dec"].shape[0], dtype=tensors["W_dec"].dtype))
    _check_shapes(tensors, d_in, d_sae, path)
    if arch_sl == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        # fold decoder norms: scale-invariant selection becomes plain topk on unit-norm rows
        n = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
        tensors["W_dec"] = tensors["W_dec"] / n[:, None]
        tensors["W_enc"] = tensors["W_enc"] * n[None, :]
        tensors["b_enc"] = tensors["b_enc"] * n
    sae = _registry()[arch](cfg, init=False)
    dt = DTYPES[want_dtype]
    with torch.no_grad():
        if hasattr(sae, "load_saelens_tensors"):     # tied architectures (mp, gba) rebuild their own
            sae.load_saelens_tensors(tensors)
        else:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(tensors[name].to(dt))
        if hasattr(sae, "load_saelens_tensors"):
            pass
        elif arch == "jumprelu":
            if "threshold" in tensors:
                sae.set_thresholds(tensors["threshold"].float())
            elif "log_threshold" in tensors:
                sae.set_thresholds(tensors["log_threshold"].float().exp())
            else:
                raise ValueError(f"{path}: jumprelu SAE without 'threshold' tensor")
        elif _registry()[arch].saelens_arch == "jumprelu":   # a global threshold (BatchTopK family)
            thr = tensors.get("threshold")
            if thr is None:
                raise ValueError(f"{path}: {arch} SAE without 'threshold' tensor")
            if sae.threshold.dim() == 1:                 # one per latent (feature choice)
                sae.threshold.copy_(thr.double())
            else:
                sae.threshold.fill_(float(thr.double().mean()))
    sp = path / "sparsity.safetensors"
    if sp.exists():
        try:
            sae.sparsity = load_file(sp).get("sparsity")
        except Exception:  # noqa: BLE001
            sae.sparsity = None
    return sae.to(device)


# ----------------------------------------------------------------------------------- generic

def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
             hook: str | None = None) -> SAE:
    """Load a SAELens folder or a sparsify folder (detected from the files present)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}")
    if (path / "cfg.json").exists() and not (path / "sae.safetensors").exists():
        return load_saelens(path, device=device, dtype=dtype)
    if (path / "sae.safetensors").exists() or (path.is_dir() and any(
            (p / "sae.safetensors").exists() for p in path.iterdir() if p.is_dir())):
        return load_sparsify(path, hook=hook, device=device)
    raise FileNotFoundError(f"{path} is not an SAE folder: expected SAELens cfg.json + "
                            "sae_weights.safetensors, or sparsify <hook>/cfg.json + <hook>/sae.safetensors")


def _layer_of(hook: str | None) -> int:
    m = re.search(r"(?:blocks|layers)\.(\d+)", hook or "")
    return int(m.group(1)) if m else 0


def export_neuronpedia(sae: SAE, out: str | Path) -> Path:
    out = Path(out)
    meta = sae.cfg.metadata
    model = meta.get("model_name") or "unknown-model"
    hook = meta.get("hook_name") or "unknown-hook"
    layer = _layer_of(hook)
    set_name = f"workbench-{sae.arch}-{sae.cfg.d_sae}"
    np_id = f"{model}/{layer}-{set_name}"
    sae.cfg.metadata = {**meta, "neuronpedia_id": np_id}
    try:
        save_saelens(sae, out)
    finally:
        sae.cfg.metadata = meta
    wb = (sae.cfg.metadata.get("workbench") or {})
    info = {"modelId": model, "layer": layer, "hookName": hook, "sourceSetName": set_name,
            "neuronpediaId": np_id, "format": "saelens", "saelensVersion": _sae_lens_version(),
            "architecture": sae.saelens_arch, "workbenchArch": sae.arch, "dIn": sae.cfg.d_in,
            "dSae": sae.cfg.d_sae, "k": sae.cfg.k, "datasetPath": meta.get("dataset_path"),
            "contextSize": meta.get("context_size"), "prependBos": meta.get("prepend_bos"),
            "hasSparsity": (out / "sparsity.safetensors").exists(),
            "trainingStats": {k: v for k, v in wb.items() if k in ("n_tokens", "fvu", "l0", "dead_fraction")}}
    _atomic_json(out / "neuronpedia.json", info)
    readme = f"""---
library_name: saelens
tags:
- sparse-autoencoder
- saelens
- workbench
---
# {sae.arch} SAE on `{model}` / `{hook}`

SAELens 6.x format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`), trained with workbench.
d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}, architecture `{sae.saelens_arch}` (trained as `{sae.arch}`).

```python
from sae_lens import SAE
sae = SAE.load_from_disk("path/to/this/folder", device="cpu")
```

Neuronpedia: upload this folder to a Hugging Face model repo, then submit it with the fields of
`neuronpedia.json` (model `{model}`, layer {layer}, hook `{hook}`, set `{set_name}`).
"""
    (out / "README.md").write_text(readme)
    return out


def export_sae(sae: SAE | str | Path, format: str, out: str | Path, *, overwrite: bool = False,
               hook: str | None = None, model_type: str | None = None) -> Path:
    """Export an SAE (object or folder) as ``saelens`` | ``sparsify`` | ``neuronpedia``. sparsify:
    `model_type` (Hugging Face config ``model_type``; None = Llama-style) names the hookpoint folder,
    `hook` overrides that name."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) or choose another --out")
        shutil.rmtree(out)
    if format in ("saelens", "neuronpedia") and sae.saelens_arch not in SAELENS_READABLE:
        raise ValueError(f"SAELens has no {sae.arch!r} architecture, so a {format} export could not be loaded "
                         f"by SAELens; the SAE's own folder (architecture {sae.saelens_arch!r}, documented in "
                         "analyses/sae/formats.py) is the format to share: it loads with analyses.sae.load_sae")
    if format == "saelens":
        return save_saelens(sae, out)
    if format == "sparsify":
        save_sparsify(sae, out, hook=hook, model_type=model_type)
        return out
    return export_neuronpedia(sae, out)
