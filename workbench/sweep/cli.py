"""`workbench sweep FILE [--dry-run] [--workspace W] [--executor local|ray] [--ray-address A] [--json]`"""

from __future__ import annotations

import json
import sys


def add_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "sweep", parents=[common], help="run a sweep file (TOML): a resumable DAG of steps",
        description="Run every step of a sweep file in a workspace. Steps already done (index + "
        "complete artefact) are skipped; a failing step does not stop independent ones. "
        "Schema: `python -c 'import workbench.sweep; help(workbench.sweep)'` or examples/*.toml.")
    p.add_argument("file", help="sweep file (.toml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, dependencies, "
                   "done/pending) and run nothing")
    p.add_argument("--workspace", default=None, help="workspace folder (default: [sweep].workspace)")
    p.add_argument("--executor", default=None, choices=["local", "ray"],
                   help="local: one step after the other in this process (default); ray: Ray tasks")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(_fn=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from .execute import _attach_runs, dry_run_text, execute, summary_text
    from .dag import plan
    from .spec import load
    spec = load(args.file)
    if args.dry_run:
        p = plan(spec, args.workspace, create=False)
        if args.json:
            print(json.dumps({"sweep": spec.name, "workspace": str(p.workspace.root),
                              "steps": p.summary_rows()}, indent=2))
        else:
            print(dry_run_text(p))
        return 0
    p = plan(spec, args.workspace, create=True)
    outcomes = execute(p, args.executor or spec.executor, args.ray_address or spec.ray_address,
                       progress=True)
    _attach_runs(p, outcomes)
    if args.json:
        print(json.dumps({"sweep": spec.name, "workspace": str(p.workspace.root), "steps": [
            {"key": n.key, "step": n.step, "outcome": outcomes[n.key]["outcome"],
             "run_id": outcomes[n.key].get("run_id"), "error": outcomes[n.key].get("error"),
             "out": p.workspace.rel(n.out) if n.out else None,
             "metrics": getattr(outcomes[n.key].get("_run"), "metrics", {})}
            for n in p.order()]}, indent=2, default=str))
        print(summary_text(p, outcomes), file=sys.stderr)
    else:
        print(summary_text(p, outcomes))
    return 1 if any(o["outcome"] in ("failed", "skipped") for o in outcomes.values()) else 0
