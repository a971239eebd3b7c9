"""train-sae with a grid (several hooks, --d-sae, --k, --seed values) or straight from the model
(``--model M --corpus C``, no store): every combination trains from one stream of batches
(:func:`analyses.sae.multi.train_saes`); each SAE gets its own folder (OUT/NAME, NAME by the one output
rule: ``ARCH-HOOK-D_SAE`` plus ``-kK`` / ``-sSEED`` when those vary), checkpoints, eval and index row.
The data order is seeded by the first --seed (a one-value grid is exactly ``train-sae`` alone).

One pass runs one model: several ``--model`` values, or hook patterns prefixed with another model
(``other:blocks.3.hook_resid_post``; the prefix may name the model / the store's model) are refused.
``--keep-store DIR`` (with --model) also writes the store on the way (:mod:`workbench.model_stream`).
Out of disk while checkpointing or saving: a WorkbenchError naming the folder and the space needed; the
checkpoints are written atomically, so a rerun resumes. Sweeps hand their groups of compatible train_sae
nodes to :func:`train_one_pass` (see ``TrainSAEConfig.sweep_group``).

Under torchrun both modes are data parallel (:func:`analyses.sae.multi.train_saes`): every rank reads the
same global batches (from a store: same seed; from the model: each rank runs the model on its share of every
chunk's windows and the rows are all-gathered), trains on its slice with gradients all-reduced, and ends with
the same SAEs. Rank 0 alone writes (SAE folders, checkpoints, eval, index rows, --keep-store) and evaluates;
every rank shares the held-out forward of a --model run. Other ranks return a summary naming rank 0."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from ..logs import progress_stream
from . import StepResult, default_out, torchrun_rank


def as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def is_grid(cfg) -> bool:
    hooks = as_list(cfg.hook)
    return bool(getattr(cfg, "model", "")) or any(len(as_list(getattr(cfg, f))) > 1 for f in ("d_sae", "k", "seed")) \
        or len(hooks) > 1 or any(c in h for h in hooks for c in "{*?,")


def _names(combos: list[dict], cfg) -> list[str]:
    vary_k = len({c["k"] for c in combos}) > 1
    vary_s = len({c["seed"] for c in combos}) > 1
    return [f"{cfg.arch}-{c['hook']}-{c['d_sae']}" + (f"-k{c['k']}" if vary_k else "") +
            (f"-s{c['seed']}" if vary_s else "") for c in combos]


def one_model_patterns(cfg, pats: list[str], model_name: str | None) -> list[str]:
    """The hook patterns without a ``MODEL:`` prefix naming the one model; a grid mixing models is refused."""
    given = [m for m in as_list(getattr(cfg, "model", "")) if m]
    if len(set(given)) > 1:
        raise WorkbenchError(f"train-sae got several models ({', '.join(dict.fromkeys(given))}) but one pass runs "
                             "one model: run one train-sae per model (or a sweep with one [[models]] table each)")
    named = {p.split(":", 1)[0] for p in pats if ":" in p}
    other = sorted(named - {model_name})
    if other:
        where = f"model {model_name}" if given else f"store {cfg.store} (model {model_name})"
        raise WorkbenchError(f"the hook grid names models {', '.join(other)} but one pass runs one model: the "
                             f"{where}; give one train-sae per model, or drop the prefix")
    return [p.split(":", 1)[1] if ":" in p else p for p in pats]


def train_grid(cfg, topk_family) -> StepResult:
    """The grid / from-the-model run; under torchrun it holds the process group (created here, before the
    model stream's first split forward) for the whole step, evaluation included."""
    from analyses.sae.train import setup_dist
    coll, own_pg, dev = setup_dist(cfg.device)
    try:
        return _train_grid(cfg, topk_family, coll, str(dev) if coll.world_size > 1 else cfg.device)
    finally:
        if own_pg:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train_grid(cfg, topk_family, coll, device: str) -> StepResult:
    from analyses.sae import SAETrainingError, evaluate_sae
    from analyses.sae.multi import train_saes
    from ..hooks import select_hooks
    rank = coll.rank
    pats = [p for h in as_list(cfg.hook) for p in ([h] if h else [])]
    model_mode = bool(getattr(cfg, "model", ""))
    if model_mode:
        if cfg.store:
            raise WorkbenchError("give a STORE or --model/--corpus, not both")
        if cfg.n_tokens <= 0:
            raise WorkbenchError("--model needs --n-tokens (how many tokens to train on)")
        from ..model_stream import ModelStream
        from ..models import load_model
        model_spec = as_list(cfg.model)[0]
        pats = one_model_patterns(cfg, pats, model_spec)      # before loading anything
        if not pats:
            raise WorkbenchError("--model needs --hooks (e.g. 'blocks.{3,6}.hook_resid_post')")
        model = load_model(model_spec, device=device)
        hooks = model.resolve_hooks(pats)
        ms = ModelStream(model, hooks, cfg.corpus, seq_len=cfg.seq_len, buffer_tokens=cfg.buffer_tokens,
                         seed=as_list(cfg.seed)[0], holdout=cfg.holdout, holdout_seed=cfg.holdout_seed,
                         keep_store=getattr(cfg, "keep_store", "") or None)
        ms.check_batch(cfg.batch_size)
        source, near, dims = ms, cfg.out or ".", ms.widths
        meta_base = {"model_name": model_spec, "context_size": cfg.seq_len, "dataset_path": cfg.corpus,
                     "workbench": {"source": {"from_model": ms.info()}}}
        n_tokens = cfg.n_tokens
    else:
        from .sae import _open_store, _store_meta
        from ._sae_eval import split_meta
        store = _open_store(cfg.store)
        if getattr(cfg, "keep_store", ""):
            raise WorkbenchError("--keep-store writes the store of a --model run; this run already reads a store")
        pats = one_model_patterns(cfg, pats, store.model_name)
        hooks = select_hooks(store.hooks, pats, where=f"store {cfg.store}") if pats else list(store.hooks)
        sp = store.split(cfg.holdout, cfg.holdout_seed)
        held = sp.heldout_rows.numel() > 0
        rows = sp.train_rows if held else None
        dseed, bs = int(as_list(cfg.seed)[0]), int(cfg.batch_size)

        def source(epoch: int):   # same seed for every hook: the same rows in the same order
            its = [store.batches(h, bs, shuffle=True, seed=dseed * 1000 + epoch, rows=rows) for h in hooks]
            for parts in zip(*its):
                yield dict(zip(hooks, parts))

        near, dims = cfg.store, {h: store.d(h) for h in hooks}
        meta_base = {"workbench": {"split": split_meta(store, sp)}}
        n_tokens = cfg.n_tokens or int(sp.train_rows.numel())
    combos = [dict(hook=h, d_sae=int(d) or 8 * dims[h], k=int(k), seed=int(s))
              for h, d, k, s in itertools.product(hooks, as_list(cfg.d_sae), as_list(cfg.k), as_list(cfg.seed))]
    names = _names(combos, cfg)
    outs = [Path(cfg.out) / n if cfg.out else default_out("", near, "saes", n) for n in names]
    specs = []
    for c, out in zip(combos, outs):
        k = c["k"] if cfg.arch in topk_family else None
        if k is not None and not 1 <= k <= c["d_sae"]:
            raise WorkbenchError(f"k={k} must be between 1 and d_sae={c['d_sae']}")
        if (out / "cfg.json").exists():
            if not cfg.overwrite:
                raise WorkbenchError(f"{out} already holds an SAE; pass --overwrite or choose another --out")
            if rank == 0:
                shutil.rmtree(out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        meta = {**meta_base, "hook_name": c["hook"]}
        if not model_mode:
            meta.update(_store_meta(store, c["hook"]))
        meta["workbench"] = dict(meta_base["workbench"])
        extra = {kk: v for kk, v in (("l1_coef", cfg.l1_coef), ("l0_coef", cfg.l0_coef)) if v}
        specs.append(dict(hook=c["hook"], arch=cfg.arch, d_sae=c["d_sae"], k=k, seed=c["seed"], lr=cfg.lr or None,
                          checkpoint_dir=str(out / ".checkpoints"), metadata=meta, **extra))
    from .sae import autocast_option, checkpoint_bytes, disk_space_guard
    if coll.world_size > 1:       # rank 0's folders are ready (and old SAEs removed) before anyone reads them
        import torch.distributed as dist
        dist.barrier()
    need = sum(checkpoint_bytes(dims[s["hook"]], s["d_sae"]) for s in specs)
    try:
        with disk_space_guard(outs[0].parent, need, f"the checkpoints of {len(specs)} SAEs"):
            saes = train_saes(source, specs, n_tokens=n_tokens, batch_size=int(cfg.batch_size) or None,
                              device=device, autocast=autocast_option(cfg),
                              checkpoint_every=cfg.checkpoint_every or None,
                              progress=progress_stream() if cfg.progress else False, on_error="keep")
    except (SAETrainingError, ValueError) as e:
        raise WorkbenchError(f"train-sae: {e}") from None
    kept = ms.finish_store() if model_mode else None
    rows_out, metrics, failed = [], {}, []
    held_rows: dict = {}

    def model_heldout(h: str):   # one held-out forward gives every hook's rows; split across ranks
        if not held_rows and cfg.holdout > 0:
            for b in ms.heldout_batches(4096, cfg.eval_tokens):
                for hh, x in b.items():
                    held_rows.setdefault(hh, []).append(x)
        return held_rows.get(h)

    for spec, sae, out, name in zip(specs, saes, outs, names):
        if isinstance(sae, Exception):
            failed.append(f"{name}: {sae}")
            continue
        ev = None
        if cfg.eval_tokens > 0:
            h = spec["hook"]
            if model_mode:
                data = model_heldout(h)      # every rank, in the same order
            else:
                data = store.batches(h, 4096, shuffle=True, seed=10_007 + spec["seed"],
                                     rows=sp.heldout_rows if held else None)
            if data and rank == 0:
                ev = evaluate_sae(sae, data, max_tokens=cfg.eval_tokens, device=sae.device)
                sae.cfg.metadata["workbench"]["eval"] = {kk: v for kk, v in ev.items() if isinstance(v, (int, float))}
        if rank > 0:          # data parallel: every rank holds the same SAEs; rank 0 writes them
            continue
        sae.to("cpu")
        with disk_space_guard(out, checkpoint_bytes(sae.cfg.d_in, sae.cfg.d_sae) // 3, "the SAE"):
            sae.save(out)
        shutil.rmtree(out / ".checkpoints", ignore_errors=True)
        wb = sae.cfg.metadata["workbench"]
        m = {f"train_{kk}": float(wb[kk]) for kk in ("fvu", "l0")
             if isinstance(wb.get(kk), float) and math.isfinite(wb[kk])}
        if ev is not None:
            m.update({kk: float(ev[kk]) for kk in ("fvu", "l0", "explained_variance")})
        _index_row(out, cfg, spec, m)
        rows_out.append({"sae": str(out), **{kk: spec[kk] for kk in ("hook", "d_sae", "k", "seed")}, "metrics": m,
                         "n_tokens": wb.get("n_tokens"), "data_exhausted": wb.get("data_exhausted")})
        metrics.update({f"{name}.{kk}": v for kk, v in m.items()})
    if failed and len(failed) == len(specs):
        raise WorkbenchError("every SAE diverged: " + "; ".join(failed))
    par = {"world_size": coll.world_size, **({"n_forward_tokens": ms.n_forward_tokens} if model_mode else {})}
    if rank > 0:
        return StepResult(summary={"saes": [str(o) for o in outs], "failed": failed, "rank": rank,
                                   "written_by": "rank 0", **par})
    exhausted = next((r["data_exhausted"] for r in rows_out if r.get("data_exhausted")), None)
    return StepResult(summary={"saes": rows_out, "failed": failed, "hooks": hooks,
                               "source": "model" if model_mode else "store", "kept_store": kept, **par,
                               **({"data_exhausted": exhausted} if exhausted else {})},
                      metrics=metrics, artifacts={f"sae:{r['sae']}": r["sae"] for r in rows_out})


def _index_row(out: Path, cfg, spec: dict, metrics: dict) -> None:
    """One index row per SAE of the grid (the grid run itself is recorded by run_step too)."""
    from ..workspace import Workspace
    ws = Workspace.find(out)
    if ws is None:
        return
    c = {**{f: getattr(cfg, f) for f in ("store", "arch", "n_tokens", "batch_size", "lr")},
         **{kk: spec[kk] for kk in ("d_sae", "k", "seed")}, "hook": spec["hook"], "out": str(out),
         "model": getattr(cfg, "model", ""), "one_pass_of": str(Path(out).parent)}
    r = ws.start_run("train_sae", c)
    ws.finish_run(r, "done", metrics=metrics, artifacts={"sae": str(out)})


def train_one_pass(cfgs: list, topk_family) -> list:
    """A sweep's group of train_sae configs that differ only in hook, d_sae and k (each with its own --out):
    one stream of the store's batches feeds them all (the same rows, seeded by the shared seed, that each
    would read alone), and each SAE is finished exactly as ``train-sae`` alone would (eval, save). Returns one
    StepResult or exception per config."""
    from analyses.sae import SAETrainingError
    from analyses.sae.multi import train_saes
    from .sae import (_init_options, _open_store, autocast_option, checkpoint_bytes, disk_space_guard, finish_one,
                      prepare_one)
    store = _open_store(cfgs[0].store)
    prepared: list = []
    for c in cfgs:                # a member's bad settings (k > d_sae, ...) fail that member only
        try:
            prepared.append(prepare_one(c, store))
        except WorkbenchError as e:
            prepared.append(e)
    ok = [i for i, o in enumerate(prepared) if not isinstance(o, Exception)]
    if not ok:
        return prepared
    cfgs, ones, c0 = [cfgs[i] for i in ok], [prepared[i] for i in ok], cfgs[ok[0]]
    keys = {(o["n_tokens"], o["bs"], str(o["train_rows"] is None)) for o in ones}
    if len(keys) != 1 or len({c.store for c in cfgs}) != 1 or len({int(c.seed) for c in cfgs}) != 1:
        raise WorkbenchError("a one-pass group must share the store, seed, token budget and batch size")
    hooks = list(dict.fromkeys(o["hook"] for o in ones))
    one, seed = ones[0], int(c0.seed)

    def source(epoch: int):   # what train-sae alone reads for each hook, zipped (same seed: same rows)
        its = [store.batches(h, one["bs"], shuffle=True, seed=seed * 1000 + epoch, rows=one["train_rows"])
               for h in hooks]
        for parts in zip(*its):
            yield dict(zip(hooks, parts))

    specs = [dict(hook=o["hook"], arch=c.arch, d_sae=o["d_sae"], k=o["k"], seed=seed, lr=c.lr or None,
                  checkpoint_dir=str(o["ckpt"]), metadata=o["meta"], **_init_options(c), **o["arch_cfg"])
             for c, o in zip(cfgs, ones)]
    need = sum(checkpoint_bytes(o["d_in"], o["d_sae"]) for o in ones)
    try:
        with disk_space_guard(one["out"].parent, need, f"the checkpoints of {len(specs)} SAEs"):
            saes = train_saes(source, specs, n_tokens=one["n_tokens"], batch_size=one["bs"], device=c0.device,
                              autocast=autocast_option(c0), checkpoint_every=c0.checkpoint_every or None,
                              progress=progress_stream() if c0.progress else False, on_error="keep")
    except (SAETrainingError, ValueError) as e:
        raise WorkbenchError(f"train-sae: {e}") from None
    rank = torchrun_rank()
    for i, c, o, sae in zip(ok, cfgs, ones, saes):
        if isinstance(sae, Exception):
            prepared[i] = WorkbenchError(f"train-sae: {sae}")
            continue
        if rank > 0:           # data parallel (train_saes): rank 0 evaluates and writes every SAE
            prepared[i] = StepResult(summary={"sae": str(o["out"]), "rank": rank, "written_by": "rank 0"})
            continue
        try:
            prepared[i] = finish_one(c, store, o, sae)
        except Exception as e:   # noqa: BLE001 - one SAE's failure is its own node's
            prepared[i] = e
    return prepared
