"""Running a plan: `local` (sequential, in this process) or `ray` (each step a Ray task).

Both executors call ``workbench.steps.run_step`` on the same workspace path, so the index, the
artefacts and the results are the same either way. Outcome of a node:
  cached   done before (index + complete artefact): not run again
  done     run now, successfully
  failed   run now, raised (the index holds the run with its error)
  skipped  a step it needs failed or was skipped

A one-pass group (``Plan.groups``) runs as one call (one Ray task) when its first member comes up: the
members not done yet are trained together by the step's ``sweep_group["run"]`` and each gets its own run in
the index (its own config, metrics and artefact), as if run alone.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..workspace import Workspace
from ..results import is_complete
from .dag import Node, Plan, node_index_key, plan as make_plan
from .spec import SweepError, SweepSpec, load

Outcome = dict[str, Any]   # {"outcome", "run_id", "seconds", "error"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparing a node
def _prepare(p: Plan, n: Node, t_start: float) -> None:
    """Before (re)running a node: forget interrupted runs of it and clear an artefact that is
    complete on disk but not vouched for by the index (a half-written one is left to the step,
    which clears it or resumes from it)."""
    ws = p.workspace
    key = node_index_key(ws, n)
    from .dag import _norm_config
    for r in ws.runs(step=n.step, status="running"):
        if r.started < t_start and (r.step, _norm_config(ws, r.step, r.config)) == key:
            ws.finish_run(r, "failed", error="interrupted (the process stopped before the step "
                                             "finished); redone by sweep " + p.spec.name)
    if n.out and is_complete(n.out):
        shutil.rmtree(n.out)


def _latest_run_id(p: Plan, n: Node) -> str | None:
    ws = p.workspace
    key = node_index_key(ws, n)
    from .dag import _norm_config
    for r in ws.runs(step=n.step):
        if (r.step, _norm_config(ws, r.step, r.config)) == key:
            return r.id
    return None


def _run_node_here(step: str, config: dict, ws_root: str, sweep: str, imports: list[str]) -> Outcome:
    """Run one step and report, never raise (what a Ray task runs too)."""
    for mod in imports:
        importlib.import_module(mod)
    from ..steps import run_step
    t0 = time.time()
    try:
        res = run_step(step, config, workspace=ws_root, sweep=sweep)
    except Exception as e:   # noqa: BLE001 - recorded in the index by run_step, reported here
        return {"outcome": "failed", "run_id": None, "seconds": time.time() - t0,
                "error": f"{type(e).__name__}: {e}"}
    return {"outcome": "done", "run_id": res.run_id, "seconds": time.time() - t0, "error": None}


def _run_group_here(step: str, configs: list[dict], ws_root: str, sweep: str, imports: list[str]) -> list[Outcome]:
    """Run a one-pass group and record one index run per member (as ``run_step`` does for one); never raises
    an Exception (what a Ray task runs too)."""
    import traceback
    for mod in imports:
        importlib.import_module(mod)
    from ..errors import WorkbenchError
    from ..steps import STEPS, config_dict, make_config
    ws = Workspace(ws_root)
    t0 = time.time()
    try:
        cfgs = [make_config(step, c) for c in configs]
    except Exception as e:   # noqa: BLE001 - a bad table: every member fails with it
        msg = f"{type(e).__name__}: {e}"
        return [{"outcome": "failed", "run_id": None, "seconds": 0.0, "error": msg} for _ in configs]
    records = [ws.start_run(step, config_dict(c), sweep=sweep) for c in cfgs]

    def failed(r, e: BaseException) -> Outcome:
        msg = f"{type(e).__name__}: {e}"
        if not isinstance(e, (WorkbenchError, KeyboardInterrupt)):
            msg += "\n" + "".join(traceback.format_exception(e, limit=8))
        ws.finish_run(r, "failed", error=msg)
        return {"outcome": "failed", "run_id": r.id, "seconds": time.time() - t0, "error": msg}
    try:
        results = STEPS[step].config_cls.sweep_group["run"](cfgs)
    except BaseException as e:
        outs = [failed(r, e) for r in records]
        if not isinstance(e, Exception):
            raise
        return outs
    secs, outs = time.time() - t0, []
    for r, res in zip(records, results):
        if isinstance(res, BaseException):
            outs.append(failed(r, res))
            continue
        res.metrics.setdefault("seconds", round(secs, 3))
        res.metrics["one_pass_saes"] = float(len(cfgs))
        ws.finish_run(r, "done", metrics=res.metrics, artifacts=res.artifacts)
        outs.append({"outcome": "done", "run_id": r.id, "seconds": secs, "error": None})
    return outs


def _group_todo(p: Plan, n: Node, outcomes: dict[str, Outcome], busy: set[str] = frozenset()) -> list[Node]:
    """The members of n's one-pass group still to run (n first); [n] when n is in no group."""
    keys = p.groups.get(n.key, [n.key])
    return [n] + [p.nodes[k] for k in keys if k != n.key and k not in outcomes and k not in busy
                  and p.nodes[k].status != "done" and _blocked(p.nodes[k], outcomes) is None]


# --------------------------------------------------------------------------- executors
class _Progress:
    def __init__(self, p: Plan, show: bool):
        self.total = len(p.nodes)
        self.i = 0
        self.show = show

    def __call__(self, n: Node, o: Outcome) -> None:
        self.i += 1
        if not self.show:
            return
        w = len(str(self.total))
        tail = ""
        if o["outcome"] == "done":
            tail = f"{o['seconds']:.1f}s"
        elif o["outcome"] == "failed":
            tail = (o["error"] or "").splitlines()[0][:160]
        elif o["outcome"] == "skipped":
            tail = o["error"] or ""
        _stderr(f"[{self.i:>{w}}/{self.total}] {o['outcome']:7} {n.key}  {tail}".rstrip())

    def start(self, n: Node) -> None:
        if self.show:
            _stderr(f"{'':>{2 * len(str(self.total)) + 3}} running {n.key} ...")


def _blocked(n: Node, outcomes: dict[str, Outcome]) -> str | None:
    for d in n.deps:
        o = outcomes.get(d)
        if o is not None and o["outcome"] in ("failed", "skipped"):
            return f"needs {d} ({o['outcome']})"
    return None


def _execute_local(p: Plan, progress: _Progress, t_start: float) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    ws_root = str(p.workspace.root)
    for n in p.order():
        if n.key in outcomes:            # trained earlier with its one-pass group
            progress(n, outcomes[n.key])
            continue
        if n.status == "done":
            outcomes[n.key] = {"outcome": "cached", "run_id": n.run_id, "seconds": 0.0, "error": None}
        elif (why := _blocked(n, outcomes)) is not None:
            outcomes[n.key] = {"outcome": "skipped", "run_id": None, "seconds": 0.0, "error": why}
        elif len(group := _group_todo(p, n, outcomes)) > 1:
            for m in group:
                _prepare(p, m, t_start)
            progress.start(n)
            for m, o in zip(group, _run_group_here(n.step, [m.config for m in group], ws_root, p.spec.name,
                                                   p.spec.imports)):
                outcomes[m.key] = o
        else:
            _prepare(p, n, t_start)
            progress.start(n)
            outcomes[n.key] = _run_node_here(n.step, n.config, ws_root, p.spec.name, p.spec.imports)
            if outcomes[n.key]["outcome"] == "failed":
                outcomes[n.key]["run_id"] = _latest_run_id(p, n)
        progress(n, outcomes[n.key])
    return outcomes


def _ray_resources(p: Plan, n: Node, n_gpus: float) -> dict[str, float]:
    res = {"num_cpus": 1, "num_gpus": 0}
    if n_gpus > 0 and "device" in n.config and str(n.config.get("device")) != "cpu":
        res["num_gpus"] = 1
    res.update(p.spec.resources.get(n.step, {}))
    return res


def _execute_ray(p: Plan, progress: _Progress, t_start: float, address: str | None) -> dict[str, Outcome]:
    try:
        import ray
    except ImportError:
        raise SweepError("the ray executor needs Ray: pip install 'workbench[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    n_gpus = float(ray.cluster_resources().get("GPU", 0))
    task, group_task = ray.remote(_run_node_here), ray.remote(_run_group_here)
    ws_root = str(p.workspace.root)
    outcomes: dict[str, Outcome] = {}
    waiting = list(p.order())
    running: dict[Any, list[Node]] = {}
    while waiting or running:
        still = []
        busy = {m.key for ms in running.values() for m in ms}
        for n in waiting:
            if n.key in outcomes:        # trained with its one-pass group
                continue
            if n.key in busy:
                still.append(n)
            elif n.status == "done":
                outcomes[n.key] = {"outcome": "cached", "run_id": n.run_id, "seconds": 0.0, "error": None}
                progress(n, outcomes[n.key])
            elif (why := _blocked(n, outcomes)) is not None:
                outcomes[n.key] = {"outcome": "skipped", "run_id": None, "seconds": 0.0, "error": why}
                progress(n, outcomes[n.key])
            elif all(outcomes.get(d, {}).get("outcome") in ("cached", "done") for d in n.deps):
                group = _group_todo(p, n, outcomes, busy)
                for m in group:
                    _prepare(p, m, t_start)
                progress.start(n)
                if len(group) > 1:
                    ref = group_task.options(**_ray_resources(p, n, n_gpus)).remote(
                        n.step, [m.config for m in group], ws_root, p.spec.name, p.spec.imports)
                else:
                    ref = task.options(**_ray_resources(p, n, n_gpus)).remote(
                        n.step, n.config, ws_root, p.spec.name, p.spec.imports)
                running[ref] = group
                busy |= {m.key for m in group}
            else:
                still.append(n)
        if len(still) == len(waiting) and not running and still:
            raise RuntimeError(f"sweep DAG is stuck at {still[0].key}")   # a bug, not user error
        waiting = still
        if running:
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                group = running.pop(ref)
                try:
                    got = ray.get(ref)
                except Exception as e:   # noqa: BLE001 - the worker died (OOM, node lost)
                    got = {"outcome": "failed", "run_id": None, "seconds": 0.0,
                           "error": f"Ray task lost: {type(e).__name__}: {e}"}
                got = got if isinstance(got, list) else [got] * len(group)
                for n, o in zip(group, got):
                    o = dict(o)
                    if o["outcome"] == "failed" and not o.get("run_id"):
                        o["run_id"] = _latest_run_id(p, n)
                    outcomes[n.key] = o
                    progress(n, o)
    return outcomes


def execute(p: Plan, executor: str = "local", ray_address: str | None = None,
            progress: bool = True) -> dict[str, Outcome]:
    """Run the nodes of a plan that are not done; returns node key -> outcome."""
    if executor not in ("local", "ray"):
        raise SweepError(f"unknown executor {executor!r}; choose from local, ray")
    t_start = time.time()
    _save_plan(p)
    prog = _Progress(p, progress)
    if executor == "ray":
        return _execute_ray(p, prog, t_start, ray_address)
    return _execute_local(p, prog, t_start)


def _save_plan(p: Plan) -> None:
    from ..results import atomic_write_json
    atomic_write_json(p.workspace.root / ".sweep" / f"{p.spec.name}.plan.json",
                      {"sweep": p.spec.name, "source": p.spec.source, "nodes": p.summary_rows(),
                       "written": time.time()})


# --------------------------------------------------------------------------- reporting
def summary_text(p: Plan, outcomes: dict[str, Outcome]) -> str:
    rows = []
    for n in p.order():
        o = outcomes[n.key]
        if o["outcome"] in ("failed", "skipped"):
            info = (o["error"] or "").splitlines()[0][:100]
        else:
            run = o.get("_run")
            info = ""
            if run is not None:
                info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in list(run.metrics.items())[:3] if k != "seconds")
        secs = f"{o['seconds']:.1f}" if o["outcome"] == "done" else ""
        rows.append((o["outcome"], n.key, secs, info))
    w = [max(len(r[i]) for r in rows + [("outcome", "step", "sec", "")]) for i in range(3)]
    w[1] = min(w[1], 70)
    lines = [f"{'outcome':{w[0]}}  {'step':{w[1]}}  {'sec':>{w[2]}}  metrics / error"]
    lines += [f"{a:{w[0]}}  {b:{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    counts = {k: sum(o["outcome"] == k for o in outcomes.values())
              for k in ("done", "cached", "failed", "skipped")}
    lines.append(f"sweep {p.spec.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                 + f"  (workspace {p.workspace.root})")
    return "\n".join(lines)


def dry_run_text(p: Plan) -> str:
    rows = [(n.status, n.key, ", ".join(n.deps) or "-") for n in p.order()]
    w = [max(len(r[i]) for r in rows + [("status", "step", "")]) for i in range(2)]
    lines = [f"sweep {p.spec.name}: {len(rows)} steps in {p.workspace.root}",
             f"{'status':{w[0]}}  {'step':{w[1]}}  needs"]
    lines += [f"{a:{w[0]}}  {b:{w[1]}}  {c}" for a, b, c in rows]
    counts = {k: sum(r[0] == k for r in rows) for k in ("done", "pending", "redo", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    groups = {tuple(g) for g in p.groups.values()}
    if groups:
        lines.append(f"one pass: {len(groups)} group(s) of steps trained together "
                     f"({', '.join(str(len(g)) for g in sorted(groups))} each)")
    return "\n".join(lines)


def outcomes_frame(p: Plan, outcomes: dict[str, Outcome]):
    """One row per node of this sweep: node, outcome, plus the results_table columns of its run."""
    import pandas as pd
    from .table import results_table
    ids = [o["run_id"] for o in outcomes.values() if o.get("run_id")]
    runs = results_table(p.workspace, run_ids=ids)
    by_id = {r["id"]: r for r in runs.to_dict("records")} if len(runs) else {}
    rows = []
    for n in p.order():
        o = outcomes[n.key]
        row = {"node": n.key, "outcome": o["outcome"], "identity": n.identity}
        base = by_id.get(o.get("run_id"), {"step": n.step, "status": "skipped" if o["outcome"] == "skipped"
                                           else None, "error": o.get("error")})
        row.update(base)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df


# --------------------------------------------------------------------------- python API
def run(config: str | Path | dict[str, Any] | SweepSpec, workspace: str | Path | Workspace | None = None,
        executor: str | None = None, *, ray_address: str | None = None, progress: bool = True,
        summary: bool = False):
    """Validate, plan and run a sweep; returns a pandas DataFrame with one row per step of this
    sweep (node, outcome = done|cached|failed|skipped, and the `results_table` columns of its run).
    Nothing runs when the file is invalid (SweepError)."""
    spec = config if isinstance(config, SweepSpec) else load(config)
    p = make_plan(spec, workspace, create=True)
    outcomes = execute(p, executor or spec.executor, ray_address or spec.ray_address, progress=progress)
    if summary:
        _attach_runs(p, outcomes)
        _stderr(summary_text(p, outcomes))
    return outcomes_frame(p, outcomes)


def _attach_runs(p: Plan, outcomes: dict[str, Outcome]) -> None:
    ws = p.workspace
    for o in outcomes.values():
        if o.get("run_id"):
            try:
                o["_run"] = ws.get_run(o["run_id"])
            except KeyError:
                pass
