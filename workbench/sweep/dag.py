"""From a validated SweepSpec to a DAG of nodes with identities, output paths and status.

Status of a node, decided against the workspace (index + disk):
  done     the index holds a `done` run of exactly this config and the artefact is complete
  pending  never run (or only failed / interrupted runs)
  redo     something is there but it cannot be trusted: a complete artefact the index does not
           vouch for, or a `done` run whose artefact is gone / half-written
  failed   its last run failed (tried again)

One-pass groups: nodes of a step whose config class declares ``sweep_group = {"vary": (fields...), "run":
fn}`` (train_sae) and that differ only in their hook and those fields (same inputs and every other option:
source, seed, token budget, batch size) form a group, run by ``fn(configs)`` in one pass over their input
(``Plan.groups``: node key -> the keys of its group). Each node keeps its own identity, output folder and
index row, so a group member that is done is skipped and the rest resume from their checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hooks import select_hooks
from ..results import is_complete
from ..workspace import Workspace, config_hash
from .pairs import add_pair_nodes
from .spec import (ModelEntry, StepEntry, SweepError, SweepSpec, _slug, field_for, field_roles,
                   sae_steps, source_step)

PATH_ROLES = ("out", "store", "store_b", "sae", "sae_b", "result")    # made relative to the workspace
NON_IDENTITY = ("out", "overwrite", "workspace", "progress")   # do not change results
HOOK_CACHE = "sweep-hooks.json"


@dataclass
class Node:
    key: str                      # readable unique id, e.g. "pca/smol/blocks.0.hook_resid_post"
    step: str
    config: dict[str, Any]        # the config run_step gets (absolute paths)
    deps: list[str]               # keys of the nodes whose outputs this one reads
    identity: str                 # hash of config (minus out) + inputs' identities
    out: str | None               # absolute output folder (None when the step has no `out`)
    labels: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"       # done | pending | redo   (plan time)
    run_id: str | None = None     # the done run, when status == done


@dataclass
class Plan:
    spec: SweepSpec
    workspace: Workspace
    nodes: dict[str, Node]        # in a topological order
    groups: dict[str, list[str]] = field(default_factory=dict)   # node key -> its one-pass group

    def order(self) -> list[Node]:
        return list(self.nodes.values())

    def summary_rows(self) -> list[dict[str, Any]]:
        return [{"key": n.key, "step": n.step, "status": n.status, "deps": n.deps,
                 "identity": n.identity, "out": self.workspace.rel(n.out) if n.out else None}
                for n in self.nodes.values()]


# --------------------------------------------------------------------------- hooks
def match_hooks(hooks: list[str], patterns: list[str]) -> list[str]:
    """The collected hooks a step table's `hooks = [...]` selects (in collection order)."""
    return select_hooks(hooks, patterns, strict=False, keep_order=True)


def _cache_file() -> Path:
    from .._model_cache import cache_root
    return cache_root().parent / HOOK_CACHE


def _cache_key(m: ModelEntry) -> str:
    try:
        from importlib.metadata import version
        __version__ = version("workbench")
    except Exception:   # noqa: BLE001 - not installed: running from a checkout
        __version__ = "dev"
    p = Path(m.spec).expanduser()
    stamp = p.stat().st_mtime if p.exists() else ""     # a local model folder / file may change
    return json.dumps([__version__, m.spec, stamp, m.hooks])


def _read_cache() -> dict[str, list[str]]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def resolve_hooks(spec: SweepSpec) -> dict[str, list[str]]:
    """model name -> resolved hook names. A model is loaded (on the CPU) only when its (spec,
    patterns) are not in the user cache (``~/.cache/workbench/sweep-hooks.json``, or under
    $WORKBENCH_CACHE), so planning is cheap after the first time."""
    cache = _read_cache()
    out, errors, new = {}, [], {}
    for m in spec.models:
        key = _cache_key(m)
        if isinstance(cache.get(key), list):
            out[m.name] = cache[key]
            continue
        try:
            from ..models import load_model
            model = load_model(m.spec, device="cpu")
            hooks = list(model.resolve_hooks(m.hooks))
            del model
        except Exception as e:   # noqa: BLE001 - any load / hook error is the file's problem
            errors.append(f"{m.where} (model {m.name!r}, spec {m.spec!r}): {e}")
            continue
        if not hooks:
            errors.append(f"{m.where}.hooks: {m.hooks} matches no hook of {m.spec}")
            continue
        out[m.name] = new[key] = hooks
    if errors:
        raise SweepError(f"{spec.source}: " + "\n  ".join(errors))
    if new:
        try:
            from ..results import atomic_write_json
            atomic_write_json(_cache_file(), {**_read_cache(), **new})
        except OSError:
            pass                  # a read-only home: just no cache
    return out


# --------------------------------------------------------------------------- identity
def _path_fields(step: str) -> set[str]:
    from ..steps import STEPS
    if step not in STEPS:          # a run of a step this process does not know: compare verbatim
        return set()
    return {name for name, r in field_roles(step).items() if r in PATH_ROLES}


def _norm_config(ws: Workspace, step: str, cfg: dict[str, Any]) -> str:
    """Index lookup key: the config with its paths relative to the workspace."""
    d = dict(cfg)
    for k in _path_fields(step):
        if isinstance(d.get(k), str) and d[k]:
            d[k] = ws.rel(d[k])
        elif isinstance(d.get(k), list):
            d[k] = [ws.rel(x) if isinstance(x, str) and x else x for x in d[k]]
    return json.dumps(d, sort_keys=True, default=str)


def _layer_rank(h: str) -> tuple[int, str]:
    """Sort key of a hook: its block index (-1 without one), then the name."""
    import re
    m = re.match(r"blocks\.(\d+)\.", h)
    return (int(m.group(1)) if m else -1, h)


def _short_hook(h: str) -> str:
    return h.replace("blocks.", "L").replace("hook_", "")


class _Builder:
    def __init__(self, spec: SweepSpec, ws: Workspace, hooks: dict[str, list[str]]):
        from ..steps import config_dict, make_config
        self._make, self._dict = make_config, config_dict
        self.spec, self.ws, self.hooks = spec, ws, hooks
        self.nodes: dict[str, Node] = {}

    def add(self, key: str, step: str, wired: dict[str, Any], opts: dict[str, Any],
            inputs: dict[str, Node], label: str, labels: dict[str, Any]) -> Node:
        """`wired`: role -> value (hook, hooks, model, ...); `inputs`: role -> the node making it.
        Both land in the fields declared with that role, whatever they are named."""
        from ..steps import output_dir

        def fk(role: str) -> str:
            name = field_for(step, role)
            if name is None:     # part_of() guarantees the roles a part needs: a bug if missing
                raise RuntimeError(f"step {step!r} declares no field with role {role!r}")
            return name
        cfg = dict(opts)
        cfg.update({fk(r): v for r, v in wired.items()})
        # an input is one node, or a list of nodes for a list field (match_layers: results)
        cfg.update({fk(r): [d.out for d in dep] if isinstance(dep, list) else dep.out
                    for r, dep in inputs.items()})
        in_fields = {fk(r) for r in inputs}
        out_field = field_for(step, "out")
        ident_cfg = {k: v for k, v in cfg.items() if k not in NON_IDENTITY and k != out_field}
        for r, dep in inputs.items():
            ident_cfg[fk(r)] = ([f"node:{d.identity}" for d in dep] if isinstance(dep, list)
                                else f"node:{dep.identity}")
        # defaults count too: the identity is of the full config
        probe = dict(cfg)
        if out_field:
            probe[out_field] = "placeholder"
        full = self._dict(self._make(step, probe))
        for k, v in full.items():
            if k not in NON_IDENTITY and k != out_field and k not in in_fields:
                ident_cfg[k] = v
        identity = config_hash(step, ident_cfg)
        out = None
        if out_field:
            out = str(self.ws.root / output_dir(step) / f"{_slug(label, 80)}-{identity}")
            cfg[out_field] = out
        config = self._dict(self._make(step, cfg))
        if key in self.nodes:
            raise SweepError(f"two steps of the sweep are the same ({key}); remove the duplicate")
        deps = [d for dep in inputs.values() for d in (dep if isinstance(dep, list) else [dep])]
        node = Node(key, step, config, list(dict.fromkeys(d.key for d in deps)), identity, out, labels)
        self.nodes[key] = node
        return node


def _variant_label(entry: StepEntry, var: dict[str, Any]) -> str:
    return ",".join(f"{k}={var[k]}" for k in entry.grid_keys)


def plan(spec_or_config: Any, workspace: str | Path | Workspace | None = None, *,
         create: bool = True) -> Plan:
    """Build the DAG (resolving hooks) and decide what is done. Creates the workspace only when
    `create` (a dry run on a missing workspace creates nothing)."""
    from .spec import SweepSpec as _S, load
    spec = spec_or_config if isinstance(spec_or_config, _S) else load(spec_or_config)
    if isinstance(workspace, Workspace):
        root = workspace.root
    else:
        root = Path(workspace if workspace is not None else spec.workspace).expanduser().resolve()
    hooks = resolve_hooks(spec)
    view = Workspace.__new__(Workspace)            # paths only: nothing is created yet
    view.root = root
    p = _build(spec, view, hooks)                  # errors so far did no work
    if isinstance(workspace, Workspace):
        p.workspace = workspace
    elif create or (root / "workbench.db").exists():
        p.workspace = Workspace(root, create=create)
    refresh_status(p)
    return p


def _build(spec: SweepSpec, ws: Workspace, hooks: dict[str, list[str]]) -> Plan:
    b = _Builder(spec, ws, hooks)
    src = source_step()
    stores: dict[str, Node] = {}
    for m in spec.models:
        stores[m.name] = b.add(f"{src}/{m.name}", src, {"model": m.spec, "hooks": hooks[m.name]},
                               m.collect, {}, m.name, {"model": m.name})
    roles_of = {e.step: set(field_roles(e.step).values()) for e in spec.steps}
    sae_makers = sae_steps()
    saes: list[Node] = []

    def models_for(e: StepEntry) -> list[str]:
        return e.models if e.models is not None else [m.name for m in spec.models]

    def hooks_for(e: StepEntry, model: str) -> list[str]:
        return hooks[model] if e.hooks is None else match_hooks(hooks[model], e.hooks)

    def check_hooks(e: StepEntry, models: list[str]):
        if e.hooks is not None and not any(hooks_for(e, m) for m in models):
            raise SweepError(f"{spec.source}: {e.where}.hooks {e.hooks} matches no collected hook of "
                             f"{', '.join(models)} (collected: "
                             f"{', '.join(h for m in models for h in hooks[m][:6])} ...)")

    # per-model and per-hook steps first (SAE producers among them), then per-SAE, SAE pairs, store pairs
    for e in [e for e in spec.steps if e.role in ("per_hook", "per_model")]:
        ms = models_for(e)
        check_hooks(e, ms)
        for m in ms:
            for var in e.variants:
                vl = _variant_label(e, var)
                if e.role == "per_model":
                    wired = {"hooks": hooks_for(e, m)} if "hooks" in roles_of[e.step] else {}
                    key = f"{e.step}/{m}" + (f"/{vl}" if vl else "")
                    b.add(key, e.step, wired, var, {"store": stores[m]}, f"{e.step}-{m}-{vl}",
                          {"model": m, **var})
                    continue
                for h in hooks_for(e, m):
                    key = f"{e.step}/{m}/{h}" + (f"/{vl}" if vl else "")
                    node = b.add(key, e.step, {"hook": h}, var, {"store": stores[m]},
                                 f"{e.step}-{m}-{_short_hook(h)}-{vl}", {"model": m, "hook": h, **var})
                    if e.step in sae_makers:
                        saes.append(node)
    for e in [e for e in spec.steps if e.role == "per_sae"]:
        ms = models_for(e)
        check_hooks(e, ms)
        roles = roles_of[e.step]
        for sae in saes:
            m, h = sae.labels["model"], sae.labels["hook"]
            if m not in ms or (e.hooks is not None and not match_hooks([h], e.hooks)):
                continue
            for var in e.variants:
                vl = _variant_label(e, var)
                wired = {"hook": h} if "hook" in roles else {}
                inputs = {"sae": sae}
                if "store" in roles:
                    inputs["store"] = stores[m]
                key = f"{e.step}/{sae.key.split('/', 1)[1]}" + (f"/{vl}" if vl else "")
                b.add(key, e.step, wired, var, inputs,
                      f"{e.step}-{m}-{_short_hook(h)}-{sae.identity[:6]}-{vl}",
                      {**sae.labels, "sae": sae.key, **var})
    order = [m.name for m in spec.models]
    for e in [e for e in spec.steps if e.role == "sae_pair"]:
        ms = models_for(e)
        check_hooks(e, ms)
        add_pair_nodes(b, e, saes, stores, order,
                       lambda s, e=e, ms=ms: s.labels["model"] in ms and (
                           e.hooks is None or bool(match_hooks([s.labels["hook"]], e.hooks))),
                       _short_hook)
    refused: list[str] = []
    for e in [e for e in spec.steps if e.role == "pair"]:
        roles = roles_of[e.step]
        pairs: list[tuple[str, str]] = []
        if e.within:
            pool = e.within if isinstance(e.within, list) else models_for(e)
            pairs += [(m, m) for m in pool]
        pairs += list(e.across)
        check_hooks(e, sorted({m for p in pairs for m in p}))
        for a, c in pairs:
            for var in e.variants:
                vl = _variant_label(e, var)
                wired = {}
                if "hooks" in roles:
                    wired["hooks"] = hooks_for(e, a)
                if "hooks_b" in roles:
                    wired["hooks_b"] = hooks_for(e, c)
                inputs = {"store": stores[a], "store_b": stores[c]}
                pair = a if a == c else f"{a}-vs-{c}"
                problem = _sweep_check(spec, e.step, var, a, c)
                if problem:
                    refused.append(f"{e.where} ({pair}{', ' + vl if vl else ''}): {problem}")
                key = f"{e.step}/{pair}" + (f"/{vl}" if vl else "")
                b.add(key, e.step, wired, var, inputs, f"{e.step}-{pair}-{vl}",
                      {"model": a, "model_b": c, **var})
    if refused:
        raise SweepError(f"{spec.source}: refused before anything runs:\n  " + "\n  ".join(refused))
    return Plan(spec, ws, b.nodes, one_pass_groups(b.nodes))


def one_pass_groups(nodes: dict[str, Node]) -> dict[str, list[str]]:
    """node key -> keys of the nodes trained with it in one pass (groups of two or more; see the docstring)."""
    from ..steps import STEPS
    found: dict[tuple, list[str]] = {}
    for n in nodes.values():
        g = getattr(STEPS[n.step].config_cls, "sweep_group", None) if n.step in STEPS else None
        if not g:
            continue
        free = set(g["vary"]) | {field_for(n.step, "hook"), field_for(n.step, "out")}
        same = json.dumps({k: v for k, v in n.config.items() if k not in free}, sort_keys=True, default=str)
        found.setdefault((n.step, tuple(n.deps), same), []).append(n.key)
    return {k: keys for keys in found.values() if len(keys) > 1 for k in keys}


def _sweep_check(spec: SweepSpec, step: str, opts: dict[str, Any], a: str, c: str) -> str | None:
    """A step config class may carry ``sweep_check(opts, source_a, source_b, same_source)`` (e.g.
    compare: enough documents / rows for the metric); it sees the collect options of both stores
    with the collect defaults filled in."""
    import dataclasses
    from ..steps import STEPS
    check = getattr(STEPS[step].config_cls, "sweep_check", None)
    if check is None:
        return None
    src_cls = STEPS[source_step()].config_cls
    defaults = {f.name: f.default for f in dataclasses.fields(src_cls) if f.default is not dataclasses.MISSING}
    models = {m.name: m for m in spec.models}
    return check(dict(opts), {**defaults, **models[a].collect}, {**defaults, **models[c].collect}, a == c)


def refresh_status(p: Plan) -> None:
    ws = p.workspace
    done: dict[tuple[str, str], str] = {}
    last: dict[tuple[str, str], str] = {}
    if (ws.root / "workbench.db").exists():
        for r in ws.runs():                # newest first
            key = (r.step, _norm_config(ws, r.step, r.config))
            last.setdefault(key, r.status)
            if r.status == "done":
                done.setdefault(key, r.id)
    for n in p.nodes.values():
        run_id = done.get((n.step, _norm_config(ws, n.step, n.config)))
        complete = is_complete(n.out) if n.out is not None else run_id is not None
        if run_id and complete:
            n.status, n.run_id = "done", run_id
        elif complete or (n.out and Path(n.out).exists()) or run_id:
            n.status, n.run_id = "redo", None
        elif last.get((n.step, _norm_config(ws, n.step, n.config))) == "failed":
            n.status, n.run_id = "failed", None      # will be tried again
        else:
            n.status, n.run_id = "pending", None


def node_index_key(ws: Workspace, n: Node) -> tuple[str, str]:
    return n.step, _norm_config(ws, n.step, n.config)
