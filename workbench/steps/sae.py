"""SAE steps: ``train_sae``, ``eval_sae``, ``export_sae`` (CLI: train-sae, eval-sae, export-sae).

    workbench train-sae STORE --hook H --arch topk --d-sae 4608 --k 32 --out ws/saes/NAME
    workbench eval-sae SAE STORE [--hook H] [--max-tokens N] [--ce-sequences N] --out ws/results/NAME
    workbench export-sae SAE --format saelens|sparsify|neuronpedia --out DIR

train-sae feeds shuffled batches of the store (``store.batches(hook, batch_size, shuffle=True,
seed=seed * 1000 + epoch)``) to :func:`analyses.sae.train_sae`, keeps checkpoints in
``OUT/.checkpoints`` while it runs (so rerunning the same command after a kill resumes), writes the SAE
folder (SAELens format, cfg.json last) and evaluates it on ``eval_tokens`` rows of the store (written in
``OUT/eval/`` as an ``sae_eval`` result and in cfg.json ``metadata.workbench.eval``). ``--holdout``
(default 5%) documents of the store are held out of training and are what that evaluation (and
eval-sae by default) uses; see :mod:`workbench.steps._sae_eval` for the split and density rules.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from ..hooks import pick_hook
from ..logs import progress_stream
from . import StepResult, arg, default_out, register, torchrun_rank
from ._sae_eval import SPLIT_CHOICES, ce_metrics, density_block, eval_rows, write_eval

CE_SEQUENCES = 64      # default for eval-sae: see ce_metrics / README for the measured standard error

# SAE architectures come from the one registry (analyses/sae/registry.py): a live view, so an architecture
# registered after this import is a CLI / sweep / UI choice too
from analyses.sae import ARCHS as _SAE_ARCHS  # noqa: E402

ARCH_CHOICES = _SAE_ARCHS.keys()
FORMAT_CHOICES = ["saelens", "sparsify", "neuronpedia"]


class _UsesK:
    """``arch in TOPK_FAMILY``: the registered class declares ``uses_k``."""

    def __contains__(self, arch: object) -> bool:
        return arch in _SAE_ARCHS and bool(_SAE_ARCHS[arch].uses_k)


TOPK_FAMILY = _UsesK()


def _open_store(path: str):
    from ..store import ActivationStore
    if not path:
        raise WorkbenchError("give an activation store folder (made by `workbench collect`)")
    return ActivationStore.open(path)


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

def autocast_option(cfg) -> bool | None:
    """train_sae's ``autocast`` from the step's field (auto: the trainer's default)."""
    modes = {"auto": None, "on": True, "off": False}
    if cfg.autocast not in modes:
        raise WorkbenchError(f"--autocast must be auto, on or off, got {cfg.autocast!r}")
    return modes[cfg.autocast]


def _init_options(cfg) -> dict[str, Any]:
    """train_sae's init / subspace / keep_subspace from the step's fields (checked here: bad input)."""
    if cfg.init == "random":
        if cfg.keep_subspace or cfg.subspace:
            raise WorkbenchError("--subspace / --keep-subspace need --init active-subspace")
        return {}
    if cfg.init != "active-subspace":
        raise WorkbenchError(f"--init must be random or active-subspace, got {cfg.init!r}")
    s = float(cfg.subspace)
    if s < 0 or (s > 1 and s != int(s)):
        raise WorkbenchError(f"--subspace must be a variance fraction in (0, 1] or a whole number of "
                             f"directions, got {cfg.subspace}")
    sub = None if s == 0 else (s if s <= 1 else int(s))
    return {"init": cfg.init, "subspace": sub, "keep_subspace": bool(cfg.keep_subspace)}


@dataclass
class TrainSAEConfig:
    store: str = field(default="", metadata=arg(
        "activation store folder (or none, with --model and --corpus: straight from the model)",
        positional=True, role="store"))
    hook: str = field(default="", metadata=arg(
        "hook(s) to train on (default: the store's only hook); several, braces or globs ('blocks.{3,6}."
        "hook_resid_post') train one SAE per hook from one pass", role="hook", flag=["--hooks"], many=True))
    arch: str = field(default="topk", metadata=arg("SAE architecture", choices=ARCH_CHOICES))
    d_sae: int = field(default=0, metadata=arg("number of latents (default 8 x d_in); several: one SAE each",
                                               many=True))
    k: int = field(default=32, metadata=arg("active latents per token (topk, batchtopk, matryoshka); "
                                            "several: one SAE each", many=True))
    n_tokens: int = field(default=0, metadata=arg("training tokens (default: one pass over the store)"))
    batch_size: int = field(default=0, metadata=arg(
        "tokens per optimiser step (default: 4096 for runs of 4.1M+ tokens, else ~1000 steps' worth, >= 256)"))
    lr: float = field(default=0.0, metadata=arg(
        "learning rate (default analyses.sae.default_lr: 2e-4 / sqrt(d_sae / 2^14) from 16k latents, larger "
        "below, at most 1.28 / d_in)"))
    seed: int = field(default=0, metadata=arg("random seed (init and data order; with several, the first "
                                              "orders the data)", many=True))
    device: str = field(default="auto", metadata=arg("cpu, cuda, cuda:1, ... or auto"))
    autocast: str = field(default="auto", metadata=arg(
        "bf16 autocast of the training step: auto (on on CUDA, off on CPU), on (on CPU too: fast only with "
        "bf16 matrix units such as AMX; changes the numbers), off", choices=["auto", "on", "off"]))
    out: str = field(default="", metadata=arg("SAE folder to write (default: WORKSPACE/saes/ARCH-HOOK-D_SAE)",
                                                     role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing SAE at --out"))
    eval_tokens: int = field(default=50_000, metadata=arg("held-out rows to evaluate on at the end (0: skip)"))
    holdout: float = field(default=0.05, metadata=arg(
        "fraction of the store's documents held out of training and evaluated on (0: none, in-sample eval)"))
    holdout_seed: int = field(default=0, metadata=arg("seed of the held-out document choice"))
    l1_coef: float = field(default=0.0, metadata=arg("relu: L1 coefficient (default 3e-2)"))
    l0_coef: float = field(default=0.0, metadata=arg("jumprelu: L0 coefficient (default 1e-2)"))
    checkpoint_every: int = field(default=0, metadata=arg("steps between checkpoints (default: ~10 per run)"))
    init: str = field(default="random", metadata=arg(
        "decoder init: random (uniform directions) or active-subspace (inside the top-variance subspace of "
        "the first batch; Wang et al. 2025, fewer dead latents on attention outputs)",
        choices=["random", "active-subspace"]))
    subspace: float = field(default=0.0, metadata=arg(
        "active-subspace size: variance fraction (<= 1, default 0.99) or number of directions (> 1)"))
    keep_subspace: bool = field(default=False, metadata=arg(
        "keep the decoder rows inside the active subspace during training (with --init active-subspace)"))
    model: str = field(default="", metadata=arg(
        "train straight from this model (no store): needs --corpus, --hooks and --n-tokens", many=True))
    corpus: str = field(default="builtin", metadata=arg("corpus spec for --model"))
    seq_len: int = field(default=128, metadata=arg("window length for --model"))
    buffer_tokens: int = field(default=1 << 16, metadata=arg(
        "shuffle buffer for --model, in tokens (fill, shuffle, serve half, refill; >= one batch)"))
    keep_store: str = field(default="", metadata=arg(
        "with --model: also write the activations into this store folder on the way (resumable; a later "
        "train-sae STORE reuses it)"))
    progress: bool = field(default=True, metadata=arg("progress bar on stderr", cli=False))


@register("train_sae", TrainSAEConfig, help="train a sparse autoencoder on one hook of a store",
          produces="sae")
def train_sae_step(cfg: TrainSAEConfig) -> StepResult:
    from analyses.sae import SAETrainingError, train_sae
    from ._sae_multi import is_grid, train_grid
    if is_grid(cfg):            # several hooks / widths / k / seeds, or --model: one pass, many SAEs
        return train_grid(cfg, TOPK_FAMILY)
    store = _open_store(cfg.store)
    one = prepare_one(cfg, store)
    seed, hook = int(cfg.seed), one["hook"]

    def source(epoch: int):
        return store.batches(hook, one["bs"], shuffle=True, seed=seed * 1000 + epoch, rows=one["train_rows"])

    try:
        with disk_space_guard(one["out"], checkpoint_bytes(one["d_in"], one["d_sae"]), "an SAE checkpoint"):
            sae = train_sae(source, arch=cfg.arch, d_sae=one["d_sae"], k=one["k"], n_tokens=one["n_tokens"],
                            batch_size=one["bs"], lr=cfg.lr or None, seed=seed, device=cfg.device,
                            autocast=autocast_option(cfg), checkpoint_dir=one["ckpt"],
                            checkpoint_every=cfg.checkpoint_every or None,
                            progress=progress_stream() if cfg.progress else False, metadata=one["meta"],
                            **_init_options(cfg), **one["arch_cfg"])
    except (SAETrainingError, ValueError) as e:
        raise WorkbenchError(f"train-sae: {e}") from None
    if (rank := torchrun_rank()) > 0:     # data-parallel: every rank holds the same SAE; rank 0 writes it
        return StepResult(summary={"sae": str(one["out"]), "rank": rank, "written_by": "rank 0"})
    return finish_one(cfg, store, one, sae)


def checkpoint_bytes(d_in: int, d_sae: int) -> int:
    """About what one SAE checkpoint takes on disk: weights + Adam's two moments, float32, plus slack."""
    return int(3 * 4 * (2 * d_in * d_sae + d_sae + d_in) * 1.1) + (1 << 20)


def disk_space_guard(folder, need: int, what: str):
    from ..store import disk_space_guard as guard
    return guard(folder, need, what)


def prepare_one(cfg: TrainSAEConfig, store) -> dict[str, Any]:
    """Checks and settings of one SAE of ``cfg`` on ``store`` (its output folder made, kept when it holds
    checkpoints: a rerun resumes). Shared by train-sae and the sweeps' one-pass groups."""
    from analyses.sae.train import default_batch_size
    from ._sae_eval import split_meta
    hook = pick_hook(store, cfg.hook)
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
    arch_cfg: dict[str, Any] = {}
    if cfg.l1_coef:
        arch_cfg["l1_coef"] = cfg.l1_coef
    if cfg.l0_coef:
        arch_cfg["l0_coef"] = cfg.l0_coef
    sp = store.split(cfg.holdout, cfg.holdout_seed)
    held = sp.heldout_rows.numel() > 0
    if cfg.batch_size < 0:
        raise WorkbenchError(f"--batch-size {cfg.batch_size}: give a positive number of rows, or 0 for the default")
    n_tokens = cfg.n_tokens or int(sp.train_rows.numel())
    return {"hook": hook, "d_in": d_in, "d_sae": d_sae, "k": k, "out": out, "ckpt": out / ".checkpoints",
            "arch_cfg": arch_cfg, "sp": sp, "held": held, "train_rows": sp.train_rows if held else None,
            "n_tokens": n_tokens, "bs": int(cfg.batch_size) or default_batch_size(n_tokens),
            "meta": {**_store_meta(store, hook), "workbench": {"split": split_meta(store, sp)}}}


def finish_one(cfg: TrainSAEConfig, store, one: dict[str, Any], sae) -> StepResult:
    """After training: held-out evaluation (OUT/eval), density, save (cfg.json last), drop the checkpoints."""
    from analyses.sae import evaluate_sae
    from ._sae_eval import best_density
    hook, sp, held, out, seed = one["hook"], one["sp"], one["held"], one["out"], int(cfg.seed)
    metrics: dict[str, float] = {}
    wb = sae.cfg.metadata.setdefault("workbench", {})
    wb.setdefault("split", one["meta"]["workbench"]["split"])
    for key in ("fvu", "l0", "dead_fraction"):
        if isinstance(wb.get(key), (int, float)) and math.isfinite(wb[key]):
            metrics[f"train_{key}"] = float(wb[key])
    split = "held_out" if held else "in_sample"
    note = (f"held-out {sp.unit}s of the store ({cfg.holdout:.0%})" + (f"; {sp.note}" if sp.note else "")
            if held else "--holdout 0: evaluated on the training rows (in-sample)")
    ev = None
    if cfg.eval_tokens > 0:
        ev = evaluate_sae(sae, store.batches(hook, 4096, shuffle=True, seed=10_007 + seed,
                                             rows=sp.heldout_rows if held else None),
                          max_tokens=cfg.eval_tokens, device=sae.device)
        wb["eval"] = {**{kk: v for kk, v in ev.items() if isinstance(v, (int, float))}, "split": split}
        for key in ("fvu", "explained_variance", "explained_variance_around_zero", "l0", "cosine", "mse"):
            metrics[key] = float(ev[key])
        metrics["eval_tokens"] = float(ev["n_tokens"])
    dens = best_density(sae, ev, split)     # the trainer's counts unless the eval saw more tokens
    if dens:
        metrics["dead_fraction"] = dens["best"]["dead_fraction"]
        metrics["dead_fraction_tokens"] = float(dens["best"]["n_tokens"])
    sae.to("cpu")
    with disk_space_guard(out, checkpoint_bytes(one["d_in"], one["d_sae"]) // 3, "the SAE and its evaluation"):
        if ev is not None:
            write_eval(out / "eval", ev, sae_path=str(out), store=str(store.path), hook=hook, split=split,
                       split_note=note, split_info=wb["split"], density=dens, ce=None,
                       ce_reason="train-sae does not splice (run eval-sae)")
        sae.save(out)            # cfg.json last: the folder is complete from here on
    shutil.rmtree(one["ckpt"], ignore_errors=True)
    return StepResult(
        summary={"sae": str(out), "arch": cfg.arch, "hook": hook, "d_in": one["d_in"], "d_sae": one["d_sae"],
                 "k": one["k"], "n_tokens": wb.get("n_tokens"), "batch_size": one["bs"], "split": split,
                 "split_note": note, "n_train_rows": int(sp.train_rows.numel()),
                 "n_heldout_rows": int(sp.heldout_rows.numel()), "density": (dens or {}).get("best"),
                 **({"data_exhausted": wb["data_exhausted"]} if wb.get("data_exhausted") else {})},
        metrics=metrics, artifacts={"sae": str(out), **({"eval": str(out / "eval")} if ev is not None else {})})


def _one_pass_group(cfgs: list) -> list:
    from ._sae_multi import train_one_pass
    return train_one_pass(cfgs, TOPK_FAMILY)


# read by the sweep planner (workbench.sweep.dag): train_sae nodes that differ only in these fields (and the
# hook) are trained in one pass by _one_pass_group, each still its own node, folder and index row
TrainSAEConfig.sweep_group = {"vary": ("d_sae", "k"), "run": _one_pass_group}


# --------------------------------------------------------------------------------------------- eval

@dataclass
class EvalSAEConfig:
    sae: str = field(metadata=arg("SAE folder (SAELens or sparsify format)", positional=True, role="sae"))
    store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
    hook: str = field(default="", metadata=arg("hook (default: the SAE's hook_name, or the store's only hook)",
                                               role="hook"))
    split: str = field(default="auto", metadata=arg(
        "rows to evaluate: auto (the SAE's held-out rows of its own training store; all rows of another "
        "store), held_out, train (in-sample), all", choices=SPLIT_CHOICES))
    max_tokens: int = field(default=100_000, metadata=arg("store rows to evaluate on"))
    ce_sequences: int = field(default=CE_SEQUENCES, metadata=arg(
        "sequences (of the evaluated split) for the spliced CE loss (causal models only; 0: skip)"))
    batch_size: int = field(default=4096, metadata=arg("rows per batch"))
    device: str = field(default="auto", metadata=arg("cpu, cuda, ... or auto"))
    out: str = field(default="", metadata=arg("result folder (default: WORKSPACE/results/eval-SAE)",
                                                     role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result at --out"))


@register("eval_sae", EvalSAEConfig, help="evaluate an SAE on a store: L0, FVU, density, CE loss recovered")
def eval_sae_step(cfg: EvalSAEConfig) -> StepResult:
    from analyses._util import resolve_device
    from analyses.sae import evaluate_sae
    from ..results import prepare_out
    sae = _load_sae(cfg.sae)
    store = _open_store(cfg.store)
    hook = pick_hook(store, cfg.hook, hint=sae.cfg.metadata.get("hook_name"))
    if store.d(hook) != sae.cfg.d_in:
        raise WorkbenchError(f"hook {hook} has d={store.d(hook)} (activations [n, {store.d(hook)}]) but the SAE "
                             f"expects d_in={sae.cfg.d_in} (W_enc {tuple(sae.W_enc.shape)})")
    dev = resolve_device(cfg.device)
    sae = sae.to(dev)
    name = Path(cfg.sae).name
    out = default_out(cfg.out, cfg.store, "results", f"eval-{name}")
    out = prepare_out(out, cfg.overwrite, "result")
    er = eval_rows(sae, store, cfg.split)
    ev = evaluate_sae(sae, store.batches(hook, cfg.batch_size, shuffle=True, seed=10_007, rows=er.rows),
                      max_tokens=cfg.max_tokens, device=dev)
    dens = {"this_evaluation": density_block(ev["log10_density"], int(ev["n_tokens"]), er.split, "evaluation pass")}
    recorded = (sae.cfg.metadata.get("workbench") or {}).get("density")
    if recorded:
        dens["sae_sparsity"] = recorded      # the estimate saved with the SAE (sparsity.safetensors)
    ce, reason, ce_tensors = ce_metrics(sae, store, hook, cfg.ce_sequences, dev, seqs=er.seqs)
    write_eval(out, ev, sae_path=str(cfg.sae), store=str(store.path), hook=hook, split=er.split,
               split_note=er.note, split_info=er.info, density=dens, ce=ce, ce_reason=reason,
               ce_tensors=ce_tensors)
    metrics = {kk: float(v) for kk, v in ev.items() if isinstance(v, (int, float))}
    metrics["dead_fraction_tokens"] = float(ev["n_tokens"])
    if ce:
        metrics.update({f"ce_{kk}" if not kk.startswith("ce_") else kk: float(v) for kk, v in ce.items()
                        if isinstance(v, (int, float))})
    return StepResult(summary={"result": str(out), "sae": str(cfg.sae), "hook": hook, "split": er.split,
                               "split_note": er.note, "ce_reason": reason},
                      metrics=metrics, artifacts={"result": str(out)})


# --------------------------------------------------------------------------------------------- export

@dataclass
class ExportSAEConfig:
    sae: str = field(metadata=arg("SAE folder to export", positional=True, role="sae"))
    format: str = field(default="saelens", metadata=arg("target format", choices=FORMAT_CHOICES))
    out: str = field(default="", metadata=arg("output folder (required)", role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace a non-empty --out"))


@register("export_sae", ExportSAEConfig, help="export an SAE as saelens, sparsify or a neuronpedia bundle",
          produces="export")
def export_sae_step(cfg: ExportSAEConfig) -> StepResult:
    from analyses.sae import export_sae
    if not cfg.out:
        raise WorkbenchError("export-sae needs --out DIR")
    if cfg.format not in FORMAT_CHOICES:
        raise WorkbenchError(f"unknown format {cfg.format!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    from ..results import prepare_out, write_result
    sae = _load_sae(cfg.sae)
    out = prepare_out(cfg.out, cfg.overwrite, f"{cfg.format} export")
    extra: dict[str, Any] = {}
    model_type = None
    if cfg.format == "sparsify":
        # the folder is the HF module path sparsify hooks (layers.6), which depends on the model family
        from analyses.sae.sparsify import sparsify_hookpoint
        from ..models import hf_model_type
        spec = sae.cfg.metadata.get("model_name")
        model_type = (hf_model_type(spec) or "unknown") if spec else None
        hook = sae.cfg.metadata.get("hook_name")
        hp = sparsify_hookpoint(hook, model_type) if hook else None
        extra = {"model_type": model_type, "hook_name": hook, "hookpoint": hp}
        if hp is None:
            extra["note"] = (f"no module of {spec or 'the model'} ({model_type or 'type unknown'}) outputs "
                             f"{hook!r}: the folder is named by the TransformerLens hook; sparsify's "
                             "load_many / hookpoint matching will not find it on the model")
            import logging
            logging.getLogger(__name__).warning("sparsify export: %s", extra["note"])
    try:
        path = export_sae(sae, cfg.format, out, overwrite=True, model_type=model_type)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    # result.json last: marks the export complete (sweeps skip it, the UI lists it)
    write_result(path, "export", {"format": cfg.format, "sae": str(cfg.sae), "arch": sae.arch,
                                  "files": files, **extra})
    return StepResult(summary={"out": str(path), "format": cfg.format, "arch": sae.arch, **extra},
                      artifacts={"export": str(path)})


@dataclass(frozen=True)
class ExportResult:
    """The result.json an ``export_sae`` folder ends with (read by ``read_export_result``)."""
    path: Path
    format: str
    sae: str
    arch: str
    files: list[str]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)   # + hookpoint / note for sparsify


def read_export_result(path: str | Path) -> ExportResult:
    """The one reader of an export folder's result.json (WorkbenchError for a missing one or another kind)."""
    from ..results import read_result
    m = read_result(path, "export")
    try:
        return ExportResult(path=Path(path), format=m["format"], sae=m["sae"], arch=m["arch"],
                            files=list(m["files"]), meta=m)
    except KeyError as e:
        raise WorkbenchError(f"{path}: the export result has no {e.args[0]!r}; rerun export-sae") from None
