"""Every step of the workbench, run and registered the one way.

A step is a function ``fn(cfg) -> StepResult`` plus a dataclass config. The config doubles as the
CLI (``workbench.cli`` builds one sub-command per step from the dataclass fields), as the sweep
file schema, and as the form the UI fills. ``run_step`` validates the config, records the run in
the workspace index (running -> done | failed, with timings, metrics and artefact paths) and
returns the result. The CLI, sweeps and the UI call ``run_step``; none of them computes anything.

Registering a step (in a module of this package, imported at the bottom of this file)::

    @dataclass
    class PCAConfig:
        store: str = field(metadata=arg("activation store folder", positional=True, role="store"))
        hook: str = field(default="", metadata=arg("hook name", role="hook"))
        k: int = field(default=50, metadata=arg("components"))
        out: str = field(default="", metadata=arg("output folder", role="out"))

    @register("pca", PCAConfig, help="PCA of one hook of a store", produces="result")
    def pca(cfg: PCAConfig) -> StepResult: ...

Field metadata (see ``arg``): ``help``, ``positional``, ``choices``, ``flag`` (alternative option
names), ``cli=False`` to hide a field from the CLI, and ``role``: what the value IS, for the
parts that wire steps together (sweeps, the UI's pickers, the workspace guess). Nothing reads
meaning from a field's name; rename a field freely, keep its role. Roles (``ROLES``):

    model    a model spec                 store    an input activation store
    hooks    hook names / patterns        store_b  a second store (pairwise steps)
    hook     one hook name                hooks_b  hooks of the second store
    sae      an input SAE folder          result   an input result folder
    sae_b    a second SAE (pairwise)      out      the output folder

``register(..., produces=)`` says what the step writes (store, sae, result, export); that alone
decides the default output folder (``workspace.OUTPUT_DIRS``) for the CLI, sweeps and the UI.
``list[str]`` fields become repeatable options. A ``workspace`` field is added by the runner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError, closest
from ..workspace import OUTPUT_DIRS, Workspace

log = logging.getLogger(__name__)

ROLES = ("model", "hooks", "hook", "store", "store_b", "hooks_b", "sae", "sae_b", "result", "out")


def arg(help: str, *, positional: bool = False, choices: list[str] | None = None,
        flag: list[str] | None = None, cli: bool = True, role: str | None = None,
        many: bool = False) -> dict[str, Any]:
    """Metadata for a config field: how it shows up in the CLI and the UI forms, and its role.
    ``many``: a scalar field whose CLI option also takes several values (a grid: train-sae --d-sae 4608
    9216); one value stays a scalar, several become a list."""
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown field role {role!r}; roles: {', '.join(ROLES)}")
    md = {"help": help, "positional": positional, "choices": choices, "flag": flag, "cli": cli, "role": role}
    if many:
        md["many"] = True
    return md


def role_of(f: dataclasses.Field) -> str | None:
    """The declared role of a config field (None: a plain option)."""
    return (f.metadata or {}).get("role")


def inputs_of(config_cls: type, role: str) -> list[str]:
    """Names of the fields of `config_cls` declared with `role`, in field order."""
    return [f.name for f in dataclasses.fields(config_cls) if role_of(f) == role]


def field_for(config_cls: type, role: str) -> str | None:
    """The (first) field of `config_cls` declared with `role`, or None."""
    names = inputs_of(config_cls, role)
    return names[0] if names else None


def unwrap_type(tp) -> tuple[Any, bool, bool]:
    """(base type, is_list, optional) of a config field annotation: ``list[int] | None`` ->
    (int, True, True). The CLI, sweep schema and UI forms all read field types through this."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if not args:
            return Any, False, True
        base, is_list, _ = unwrap_type(args[0])
        return base, is_list, len(args) < len(typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        return inner, True, False
    return tp, False, False


@dataclass
class StepResult:
    """What a step returns: a JSON summary (printed by --json), metrics, and artefact paths."""

    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)   # name -> path
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **self.summary, "metrics": self.metrics,
                "artifacts": self.artifacts}


@dataclass
class Step:
    name: str
    config_cls: type
    fn: Callable[[Any], StepResult]
    help: str
    produces: str = "result"      # store | sae | result | export (-> workspace.OUTPUT_DIRS)


STEPS: dict[str, Step] = {}


def register(name: str, config_cls: type, help: str, produces: str = "result"):
    if produces not in OUTPUT_DIRS:
        raise ValueError(f"step {name!r}: produces must be one of {', '.join(OUTPUT_DIRS)}, "
                         f"got {produces!r}")

    def deco(fn):
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, config_cls, fn, help, produces)
        return fn
    return deco


def output_dir(step: str) -> str:
    """Workspace sub-folder where `step` writes when no --out is given (the one rule)."""
    return OUTPUT_DIRS[STEPS[step].produces]


def make_config(name: str, config: Any = None, **overrides) -> Any:
    """A step's config from a dataclass, a dict (sweep files, UI forms) or keywords; unknown keys
    are an error that lists the valid ones."""
    if name not in STEPS:
        raise WorkbenchError(f"unknown step {name!r}; known steps: {closest(name, STEPS)}")
    cls = STEPS[name].config_cls
    if isinstance(config, cls):
        return dataclasses.replace(config, **overrides) if overrides else config
    values = dict(config or {})
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - names)
    if bad:
        raise WorkbenchError(f"step {name!r} has no option(s) {', '.join(bad)}; "
                             f"valid options: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as e:   # missing required field
        raise WorkbenchError(f"step {name!r}: {e}") from None


def default_out(out: str, near: str, folder: str, name: str) -> Path:
    """`out` when given, else WORKSPACE/<folder>/<name> in the workspace holding `near` (a store).
    `folder` is what the step produces (store, sae, result, export) or its folder (results...)."""
    if out:
        return Path(out)
    sub = OUTPUT_DIRS.get(folder, folder)
    if sub not in OUTPUT_DIRS.values():
        raise ValueError(f"default_out: unknown output kind {folder!r}")   # a bug in the step
    ws = Workspace.find(near)
    if ws is None:
        raise WorkbenchError(f"pass --out: no workspace found above {near} to put the result in")
    return ws.root / sub / name


def config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


_GUESS_ROLES = ("out", "store", "sae", "store_b", "sae_b", "result")


def _guess_workspace(cfg: Any) -> Workspace | None:
    """The workspace holding the step's output or one of its inputs (by declared role)."""
    names = [n for role in _GUESS_ROLES for n in inputs_of(type(cfg), role)]
    for attr in names:
        p = getattr(cfg, attr, None)
        if isinstance(p, str) and p:
            ws = Workspace.find(Path(p).parent if not Path(p).exists() else p)
            if ws is not None:
                return ws
    return None


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 outside it): only rank 0 writes results and index rows."""
    import os
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def run_step(name: str, config: Any = None, *, workspace: str | Workspace | None = None,
             sweep: str | None = None, **overrides) -> StepResult:
    """Run a registered step and record it in the workspace index (given, or found by walking up
    from the step's output / input paths; no index is written when there is none)."""
    cfg = make_config(name, config, **overrides)
    ws = Workspace(workspace) if isinstance(workspace, (str, Path)) else workspace
    if ws is None:
        ws = _guess_workspace(cfg)
    if torchrun_rank() > 0:      # under torchrun the run is recorded once, by rank 0
        ws = None
    record = ws.start_run(name, config_dict(cfg), sweep=sweep) if ws is not None else None
    t0 = time.time()
    try:
        result = STEPS[name].fn(cfg)
    except BaseException as e:
        if record is not None:
            msg = f"{type(e).__name__}: {e}"
            if not isinstance(e, (WorkbenchError, KeyboardInterrupt)):
                msg += "\n" + traceback.format_exc(limit=8)
            ws.finish_run(record, "failed", error=msg)
        raise
    result.metrics.setdefault("seconds", round(time.time() - t0, 3))
    if record is not None:
        ws.finish_run(record, "done", metrics=result.metrics, artifacts=result.artifacts)
        result.run_id = record.id
    return result


# The built-in steps register themselves on import (after everything above exists).
from . import collect, compare, features, interventions, match, match_layers, multid, pca, sae, subspace  # noqa: E402,F401
