"""SAE steps: ``train_sae``, ``eval_sae``, ``export_sae`` (CLI: train-sae, eval-sae, export-sae).

    workbench train-sae STORE --hook H --arch topk --d-sae 4608 --k 32 --out ws/saes/NAME
    workbench eval-sae SAE STORE [--hook H] [--max-tokens N] [--ce-sequences N] --out ws/results/NAME
    workbench export-sae SAE --format saelens|sparsify|neuronpedia --out DIR

train-sae feeds shuffled batches of the store (``store.batches(hook, batch_size, shuffle=True,
seed=seed * 1000 + epoch)``) to :func:`analyses.sae.train_sae`, keeps checkpoints in
``OUT/.checkpoints`` while it runs (so rerunning the same command after a kill resumes), writes the SAE
folder (SAELens format, cfg.json last) and evaluates it on ``eval_tokens`` rows of the store (written in
``OUT/eval/`` as an ``sae_eval`` result and in cfg.json ``metadata.workbench.eval``).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError, closest
from . import StepResult, arg, default_out, register

ARCH_CHOICES = ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"]
FORMAT_CHOICES = ["saelens", "sparsify", "neuronpedia"]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


def _open_store(path: str):
    from ..store import ActivationStore
    if not path:
        raise WorkbenchError("give an activation store folder (made by `workbench collect`)")
    return ActivationStore.open(path)


def _pick_hook(store, hook: str, hint: str | None = None) -> str:
    hooks = list(store.hooks)
    if hook:
        if hook not in hooks:
            raise WorkbenchError(f"hook {hook!r} is not in store {store.path}; closest: {closest(hook, hooks)}")
        return hook
    if hint and hint in hooks:
        return hint
    if len(hooks) == 1:
        return hooks[0]
    raise WorkbenchError(f"store {store.path} has several hooks; pick one with --hook: {', '.join(hooks)}")


def _load_sae(path: str, device: str = "cpu"):
    from analyses.sae import load_sae
    p = Path(path)
    if not p.exists():
        raise WorkbenchError(f"no SAE at {p}")
    try:
        return load_sae(p, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise WorkbenchError(str(e)) from None


def _store_meta(store, hook: str) -> dict[str, Any]:
    man = store.manifest
    corpus = man.get("corpus")
    if isinstance(corpus, dict):
        corpus = corpus.get("spec") or corpus.get("name") or str(corpus)
    special = man.get("special_tokens")
    return {"model_name": man.get("model"), "hook_name": hook, "context_size": man.get("seq_len"),
            "prepend_bos": store.prepend_bos, "dataset_path": corpus,
            "store": str(store.path), "special_tokens": special}


# --------------------------------------------------------------------------------------------- train

@dataclass
class TrainSAEConfig:
    store: str = field(metadata=arg("activation store folder", positional=True))
    hook: str = field(default="", metadata=arg("hook to train on (default: the store's only hook)"))
    arch: str = field(default="topk", metadata=arg("SAE architecture", choices=ARCH_CHOICES))
    d_sae: int = field(default=0, metadata=arg("number of latents (default 8 x d_in)"))
    k: int = field(default=32, metadata=arg("active latents per token (topk, batchtopk, matryoshka)"))
    n_tokens: int = field(default=0, metadata=arg("training tokens (default: one pass over the store)"))
    batch_size: int = field(default=4096, metadata=arg("tokens per optimiser step"))
    lr: float = field(default=0.0, metadata=arg("learning rate (default 2e-4 / sqrt(d_sae / 2^14))"))
    seed: int = field(default=0, metadata=arg("random seed (init and data order)"))
    device: str = field(default="auto", metadata=arg("cpu, cuda, cuda:1, ... or auto"))
    out: str = field(default="", metadata=arg("SAE folder to write (default: WORKSPACE/saes/ARCH-HOOK-D_SAE)"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing SAE at --out"))
    eval_tokens: int = field(default=50_000, metadata=arg("store rows to evaluate on at the end (0: skip)"))
    l1_coef: float = field(default=0.0, metadata=arg("relu: L1 coefficient (default 3e-2)"))
    l0_coef: float = field(default=0.0, metadata=arg("jumprelu: L0 coefficient (default 1e-2)"))
    checkpoint_every: int = field(default=0, metadata=arg("steps between checkpoints (default: ~10 per run)"))
    progress: bool = field(default=True, metadata=arg("progress bar on stderr", cli=False))


@register("train_sae", TrainSAEConfig, help="train a sparse autoencoder on one hook of a store")
def train_sae_step(cfg: TrainSAEConfig) -> StepResult:
    from analyses.sae import SAETrainingError, evaluate_sae, train_sae
    store = _open_store(cfg.store)
    hook = _pick_hook(store, cfg.hook)
    d_in = store.d(hook)
    d_sae = cfg.d_sae or 8 * d_in
    if cfg.arch not in ARCH_CHOICES:
        raise WorkbenchError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    k = cfg.k if cfg.arch in TOPK_FAMILY else None
    if k is not None and not 1 <= k <= d_sae:
        raise WorkbenchError(f"k={k} must be between 1 and d_sae={d_sae}")
    out = default_out(cfg.out, cfg.store, "saes", f"{cfg.arch}-{hook}-{d_sae}")
    if (out / "cfg.json").exists():
        if not cfg.overwrite:
            raise WorkbenchError(f"{out} already holds an SAE; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)   # a half-written folder keeps its checkpoints: resume
    ckpt = out / ".checkpoints"
    arch_cfg: dict[str, Any] = {}
    if cfg.l1_coef:
        arch_cfg["l1_coef"] = cfg.l1_coef
    if cfg.l0_coef:
        arch_cfg["l0_coef"] = cfg.l0_coef
    seed = int(cfg.seed)
    bs = int(cfg.batch_size)

    def source(epoch: int):
        return store.batches(hook, bs, shuffle=True, seed=seed * 1000 + epoch)

    try:
        sae = train_sae(source, arch=cfg.arch, d_sae=d_sae, k=k, n_tokens=cfg.n_tokens or store.n_rows,
                        batch_size=bs, lr=cfg.lr or None, seed=seed, device=cfg.device,
                        checkpoint_dir=ckpt, checkpoint_every=cfg.checkpoint_every or None,
                        progress=cfg.progress, metadata=_store_meta(store, hook), **arch_cfg)
    except (SAETrainingError, ValueError) as e:
        raise WorkbenchError(f"train-sae: {e}") from None
    metrics: dict[str, float] = {}
    wb = sae.cfg.metadata.get("workbench", {})
    for key in ("fvu", "l0", "dead_fraction"):
        if isinstance(wb.get(key), (int, float)) and math.isfinite(wb[key]):
            metrics[f"train_{key}"] = float(wb[key])
    ev = None
    if cfg.eval_tokens > 0:
        ev = evaluate_sae(sae, store.batches(hook, 4096, shuffle=True, seed=10_007 + seed),
                          max_tokens=cfg.eval_tokens, device=sae.device)
        sae.sparsity = ev["log10_density"]
        wb["eval"] = {kk: v for kk, v in ev.items() if isinstance(v, (int, float))}
        for key in ("fvu", "explained_variance", "l0", "dead_fraction", "cosine", "mse"):
            metrics[key] = float(ev[key])
    sae.to("cpu")
    if ev is not None:
        _write_eval(out / "eval", ev, sae_path=str(out), store=str(store.path), hook=hook, ce=None)
    sae.save(out)            # cfg.json last: the folder is complete from here on
    shutil.rmtree(ckpt, ignore_errors=True)
    return StepResult(
        summary={"sae": str(out), "arch": cfg.arch, "hook": hook, "d_in": d_in, "d_sae": d_sae, "k": k,
                 "n_tokens": wb.get("n_tokens")},
        metrics=metrics, artifacts={"sae": str(out), **({"eval": str(out / "eval")} if ev is not None else {})})


# --------------------------------------------------------------------------------------------- eval

def _write_eval(out: Path, ev: dict[str, Any], *, sae_path: str, store: str, hook: str,
                ce: dict[str, Any] | None, ce_reason: str = "") -> Path:
    from ..results import write_result
    figures = {}
    try:
        import plotly.graph_objects as go
        h = ev["density_histogram"]
        centres = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        fig = go.Figure(go.Bar(x=centres, y=h["counts"], width=(h["edges"][1] - h["edges"][0])))
        fig.update_layout(title=f"latent density (log10 firing rate), L0={ev['l0']:.1f}, "
                                f"dead={100 * ev['dead_fraction']:.1f}%",
                          xaxis_title="log10 density", yaxis_title="latents")
        figures["density_histogram"] = fig
    except ImportError:  # pragma: no cover
        pass
    metrics = {kk: v for kk, v in ev.items() if isinstance(v, (int, float))}
    data = {"sae": sae_path, "store": store, "hook": hook, "metrics": metrics,
            "density_histogram": ev["density_histogram"], "ce": ce, "ce_reason": ce_reason}
    out.mkdir(parents=True, exist_ok=True)
    return write_result(out, "sae_eval", data, tensors={"log10_density": ev["log10_density"]}, figures=figures)


@dataclass
class EvalSAEConfig:
    sae: str = field(metadata=arg("SAE folder (SAELens or sparsify format)", positional=True))
    store: str = field(metadata=arg("activation store folder", positional=True))
    hook: str = field(default="", metadata=arg("hook (default: the SAE's hook_name, or the store's only hook)"))
    max_tokens: int = field(default=100_000, metadata=arg("store rows to evaluate on"))
    ce_sequences: int = field(default=16, metadata=arg(
        "sequences for the spliced CE loss (causal models only; 0: skip)"))
    batch_size: int = field(default=4096, metadata=arg("rows per batch"))
    device: str = field(default="auto", metadata=arg("cpu, cuda, ... or auto"))
    out: str = field(default="", metadata=arg("result folder (default: WORKSPACE/results/eval-SAE)"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result at --out"))


def _ce_metrics(sae, store, hook: str, n_seq: int, device) -> tuple[dict | None, str]:
    if n_seq <= 0:
        return None, "ce_sequences=0"
    try:
        from ..splice import splice_eval
    except ImportError as e:
        return None, f"workbench.splice unavailable ({e})"
    spec = store.manifest.get("model")
    try:
        from ..models import load_model
        model = load_model(spec, device=str(device))
    except Exception as e:  # noqa: BLE001 - any failure to get the model just skips CE
        return None, f"model {spec!r} not loadable here: {e}"
    if getattr(model, "kind", "causal") != "causal":
        return None, f"model {spec!r} is not causal"
    seqs = store.sequences()
    ids = seqs["token_ids"][:n_seq]
    mask = seqs["attention_mask"][:n_seq]
    sae = sae.to(model.device)

    def reconstruct(act):
        return sae(act.to(sae.dtype)).to(act.dtype)

    # splice where the store has rows (what the SAE was trained on): special tokens the collector
    # excluded (e.g. the prepended BOS, an attention sink) keep their own activations, as SAELens'
    # exclude_special_tokens_from_reconstruction
    import torch
    excluded = (store.manifest.get("special_tokens") or {}).get("excluded_ids") or []
    where = mask & ~torch.isin(ids, torch.tensor(excluded, dtype=ids.dtype)) if excluded else None
    res = splice_eval(model, hook, reconstruct, ids, mask, splice_mask=where)
    out = {kk: float(v) for kk, v in res.items() if isinstance(v, (int, float))}
    out["n_spliced"] = float(int(where.sum()) if where is not None else int(mask.sum()))
    return out, ""


@register("eval_sae", EvalSAEConfig, help="evaluate an SAE on a store: L0, FVU, density, CE loss recovered")
def eval_sae_step(cfg: EvalSAEConfig) -> StepResult:
    from analyses._util import resolve_device
    from analyses.sae import evaluate_sae
    from ..results import prepare_out
    sae = _load_sae(cfg.sae)
    store = _open_store(cfg.store)
    hook = _pick_hook(store, cfg.hook, hint=sae.cfg.metadata.get("hook_name"))
    if store.d(hook) != sae.cfg.d_in:
        raise WorkbenchError(f"hook {hook} has d={store.d(hook)} (activations [n, {store.d(hook)}]) but the SAE "
                             f"expects d_in={sae.cfg.d_in} (W_enc {tuple(sae.W_enc.shape)})")
    dev = resolve_device(cfg.device)
    sae = sae.to(dev)
    name = Path(cfg.sae).name
    out = default_out(cfg.out, cfg.store, "results", f"eval-{name}")
    out = prepare_out(out, cfg.overwrite, "result")
    ev = evaluate_sae(sae, store.batches(hook, cfg.batch_size, shuffle=True, seed=10_007),
                      max_tokens=cfg.max_tokens, device=dev)
    ce, reason = _ce_metrics(sae, store, hook, cfg.ce_sequences, dev)
    _write_eval(out, ev, sae_path=str(cfg.sae), store=str(store.path), hook=hook, ce=ce, ce_reason=reason)
    metrics = {kk: float(v) for kk, v in ev.items() if isinstance(v, (int, float))}
    if ce:
        metrics.update({f"ce_{kk}" if not kk.startswith("ce_") else kk: v for kk, v in ce.items()})
    return StepResult(summary={"result": str(out), "sae": str(cfg.sae), "hook": hook, "ce_reason": reason},
                      metrics=metrics, artifacts={"result": str(out)})


# --------------------------------------------------------------------------------------------- export

@dataclass
class ExportSAEConfig:
    sae: str = field(metadata=arg("SAE folder to export", positional=True))
    format: str = field(default="saelens", metadata=arg("target format", choices=FORMAT_CHOICES))
    out: str = field(default="", metadata=arg("output folder (required)"))
    overwrite: bool = field(default=False, metadata=arg("replace a non-empty --out"))


@register("export_sae", ExportSAEConfig, help="export an SAE as saelens, sparsify or a neuronpedia bundle")
def export_sae_step(cfg: ExportSAEConfig) -> StepResult:
    from analyses.sae import export_sae
    if not cfg.out:
        raise WorkbenchError("export-sae needs --out DIR")
    if cfg.format not in FORMAT_CHOICES:
        raise WorkbenchError(f"unknown format {cfg.format!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    from ..results import prepare_out, write_result
    sae = _load_sae(cfg.sae)
    out = prepare_out(cfg.out, cfg.overwrite, f"{cfg.format} export")
    try:
        path = export_sae(sae, cfg.format, out, overwrite=True)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    # result.json last: marks the export complete (sweeps skip it, the UI lists it)
    write_result(path, "export", {"format": cfg.format, "sae": str(cfg.sae), "arch": sae.arch,
                                  "files": files})
    return StepResult(summary={"out": str(path), "format": cfg.format, "arch": sae.arch},
                      artifacts={"export": str(path)})
