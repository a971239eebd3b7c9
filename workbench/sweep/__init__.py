"""Scripted sweeps: one TOML file -> a DAG of steps, run resumably in a workspace.

    workbench sweep examples/smol-layers.toml [--dry-run] [--workspace W] [--executor local|ray]
                    [--ray-address A] [--json]

    import workbench.sweep
    df = workbench.sweep.run("examples/demo.toml", workspace="ws")   # -> pandas.DataFrame
    df = workbench.sweep.run({"sweep": {...}, "models": [...], ...})  # a dict works too

Sweep file schema (TOML)
========================

::

    [sweep]                        # optional table
    name = "smol-layers"           # recorded in the runs index (`sweep` column); default: file stem
    workspace = "ws"               # default workspace folder, relative to the CURRENT directory
                                   #   (`--workspace` / run(workspace=) override it); default "ws"
    executor = "local"             # "local" (sequential, default) or "ray"
    ray_address = ""               # join a Ray cluster; empty = start a local Ray instance
    imports = []                   # extra Python modules to import (they may register steps)
    [sweep.resources]              # Ray task needs per step (default num_cpus=1; num_gpus=1 for
    train_sae = {num_cpus = 1, num_gpus = 1}   #   steps with a `device` field when the cluster has GPUs)

    [[models]]                     # one table per model (at least one)
    spec = "smollm2-135m"          # any model spec (`workbench models`)
    name = "smol"                  # short label used in plans and folder names (default: from spec)
    hooks = ["blocks.*.hook_resid_post"]   # exact names, globs and braces ('blocks.{0,3}.x')
    batch_size = 8                 # any other key: a `collect` option for this model only

    [corpus]                       # the corpus every model reads (same documents for all)
    spec = "builtin"               # -> collect.corpus
    max_tokens = 20000             # any other key: a `collect` option (max_tokens, seq_len, ...)
    seq_len = 128

    [collect]                      # optional: more collect options for every model
    [pca]                          # one PCA per (model, hook)
    [train_sae]                    # one SAE per (model, hook, grid point)
    [eval_sae]                     # one per SAE
    [features]                     # one per SAE
    [compare]                      # one per metric: within each model and/or across model pairs
    [match_saes]                   # one per pair of SAEs of the sweep that differ only in ...
    pairs = ["seed", "width"]      #   seed | width (d_sae) | layer (hook) | model | any SAE option;
                                   #   "layer" also writes a match_layers result: the layer x layer
                                   #   matrix of "fraction of latents with a mutual match at r >= threshold"

Every step table holds that step's options (the same names as its CLI options / config dataclass
fields, e.g. `workbench pca --help`). A LIST value for an option that takes one value is a grid
axis; several axes make a product (arch x d_sae x k below = 8 SAEs per hook). A plural key whose
singular is an option is a grid too (`metrics = [...]` = grid over `metric`). A step table may
also be an array of tables (`[[compare]]`), each expanded on its own. Selection keys, which are
not step options:

    models = ["smol"]                       # only these models (default: all)
    hooks = ["blocks.{0,5}.hook_resid_post"]  # only hooks matching these patterns (default: all)
    within = true                           # compare: layer x layer inside each (selected) model;
                                            #   or a list of model names. Default true.
    across = [["smol", "mini"]]             # compare: model pairs (A rows x B columns); "all" =
                                            #   every pair. Default none.

Fields that wire the DAG are set by the sweep and may not be given: collect `model`, `hooks`,
`out`; pca/train_sae `store`, `hook`, `out`; eval_sae/features `sae`, `store`, `hook`;
compare `store_a`, `store_b`, `hooks_a`, `hooks_b`; match_saes `sae_a`, `sae_b`, `store`, `store_b`.
Which step plays which part is read from the
ROLES its config fields declare (``arg(..., role=...)``, never the field names): a `store` and a
`hook` input: per hook; a `store` only: per model; an `sae`: per SAE; an `sae` and an `sae_b`:
pairs of SAEs (``workbench.sweep.pairs``); a `store_b`: pairs of stores; the
step that produces a store from a `model`: the source. Steps that produce an SAE feed the per-SAE
ones. So any registered step can appear as a table. Outputs go to the folder of what the step
produces (``workbench.steps.output_dir``: stores/, saes/, results/, exports/), as from the CLI
and the UI.

Hook patterns are resolved at PLAN time with ``workbench.models.load_model(spec).resolve_hooks``
on the CPU (so a bad hook is reported before any work starts, and `--dry-run` shows the exact
plan); the answer is cached per (spec, patterns) in ``~/.cache/workbench/sweep-hooks.json``
(``$WORKBENCH_CACHE`` moves it; a local model folder's mtime is part of the key), so later plans
load no model. Collect then receives the resolved names.

Identity and resume: each step's identity is ``workspace.config_hash`` of its config with the
input paths replaced by the identities of the steps that make them (and without `out`); its
output folder is derived from it (``WS/stores|saes|results/<label>-<identity>``). A rerun skips
a step when the index holds a `done` run of exactly that config AND the artefact is complete on
disk (manifest.json / cfg.json / result.json); a half-written artefact is redone (collect resumes
from its last complete shard). A failing step is recorded with its error (by ``run_step``); the
steps that need its output are marked skipped, independent steps still run.

Public API: ``run``, ``load``, ``plan``, ``execute``, ``results_table``, ``add_cli``,
``SweepError``.
"""

from __future__ import annotations

from .spec import SweepError, SweepSpec, load
from .dag import Node, Plan, plan
from .execute import execute, run
from .table import results_table
from .cli import add_cli

__all__ = ["SweepError", "SweepSpec", "load", "Node", "Plan", "plan", "execute", "run",
           "results_table", "add_cli"]
