"""Every step of the workbench, run and registered the one way.

A step is a function ``fn(cfg) -> StepResult`` plus a dataclass config. The config doubles as the
CLI (``workbench.cli`` builds one sub-command per step from the dataclass fields), as the sweep
file schema, and as the form the UI fills. ``run_step`` validates the config, records the run in
the workspace index (running -> done | failed, with timings, metrics and artefact paths) and
returns the result. The CLI, sweeps and the UI call ``run_step``; none of them computes anything.

Registering a step (in a module of this package, imported at the bottom of this file)::

    @dataclass
    class PCAConfig:
        store: str = field(metadata=arg("activation store folder", positional=True))
        hook: str = field(default="", metadata=arg("hook name"))
        k: int = field(default=50, metadata=arg("components"))
        out: str = field(default="", metadata=arg("output folder"))

    @register("pca", PCAConfig, help="PCA of one hook of a store")
    def pca(cfg: PCAConfig) -> StepResult: ...

Field metadata (see ``arg``): ``help``, ``positional``, ``choices``, ``flag`` (alternative option
names), ``cli=False`` to hide a field from the CLI. ``list[str]`` fields become repeatable options.
Every config may have an ``out`` field; a ``workspace`` field is added by the runner, not the step.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..workspace import Workspace


def arg(help: str, *, positional: bool = False, choices: list[str] | None = None,
        flag: list[str] | None = None, cli: bool = True) -> dict[str, Any]:
    """Metadata for a config field: how it shows up in the CLI and the UI forms."""
    return {"help": help, "positional": positional, "choices": choices, "flag": flag, "cli": cli}


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


STEPS: dict[str, Step] = {}


def register(name: str, config_cls: type, help: str):
    def deco(fn):
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, config_cls, fn, help)
        return fn
    return deco


def make_config(name: str, config: Any = None, **overrides) -> Any:
    """A step's config from a dataclass, a dict (sweep files, UI forms) or keywords; unknown keys
    are an error that lists the valid ones."""
    if name not in STEPS:
        from ..errors import closest
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
    """`out` when given, else WORKSPACE/<folder>/<name> in the workspace holding `near` (a store)."""
    if out:
        return Path(out)
    ws = Workspace.find(near)
    if ws is None:
        raise WorkbenchError(f"pass --out: no workspace found above {near} to put the result in")
    return getattr(ws, folder) / name


def config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _guess_workspace(cfg: Any) -> Workspace | None:
    for attr in ("out", "store", "sae", "store_a"):
        p = getattr(cfg, attr, None)
        if isinstance(p, str) and p:
            ws = Workspace.find(Path(p).parent if not Path(p).exists() else p)
            if ws is not None:
                return ws
    return None


def run_step(name: str, config: Any = None, *, workspace: str | Workspace | None = None,
             sweep: str | None = None, **overrides) -> StepResult:
    """Run a registered step and record it in the workspace index (given, or found by walking up
    from the step's output / input paths; no index is written when there is none)."""
    cfg = make_config(name, config, **overrides)
    ws = Workspace(workspace) if isinstance(workspace, (str, Path)) else workspace
    if ws is None:
        ws = _guess_workspace(cfg)
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


# Step modules register themselves on import. Each is optional while the project grows:
# a missing module simply means the step is not there yet.
import importlib as _importlib

for _mod in ("collect", "pca", "compare", "sae", "features"):
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # only tolerate the module itself being absent
        if _e.name != f"{__name__}.{_mod}":
            raise
