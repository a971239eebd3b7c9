"""`workbench` command line. Step commands are generated from the step configs (one dataclass per
step, see workbench.steps); a few commands (models, store, runs, sweep, demo, app) are written out.
Each command: --json prints a machine-readable summary on stdout, progress goes to stderr, and a
user error exits 2 with one clear line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
import typing
from typing import Any

from .errors import BUG_HINT, WorkbenchError


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(p: argparse.ArgumentParser, config_cls: type) -> None:
    from .steps import unwrap_type
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        md = f.metadata or {}
        if md.get("cli") is False:
            continue
        base, is_list, _ = unwrap_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        helptext = md.get("help", "")
        if has_default and default not in (None, "", []) and base is not bool and "default" not in helptext:
            helptext += f" (default: {default})"   # not when the help states it (0 often means "computed")
        kw: dict[str, Any] = {"help": helptext.replace("%", "%%"), "dest": f.name}
        if md.get("choices"):
            kw["choices"] = md["choices"]
        names = [_opt(f.name), *(md.get("flag") or [])]
        if md.get("positional"):
            kw.pop("dest")
            if is_list:
                p.add_argument(f.name, nargs="+" if not has_default else "*", type=base, **kw)
            elif has_default:
                p.add_argument(f.name, nargs="?", type=base, default=default, **kw)
            else:
                p.add_argument(f.name, type=base, **kw)
        elif base is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif md.get("many"):   # a scalar that may be a grid: --d-sae 4608 9216 (see config_from_args)
            p.add_argument(*names, nargs="+", action="extend", type=base, default=None, **kw)
        elif is_list:
            # repeatable, and each occurrence may hold several values: --hooks a b --hooks c
            p.add_argument(*names, nargs="+", action="extend", type=base, default=None, **kw)
        else:
            p.add_argument(*names, type=base, default=default, required=not has_default, **kw)


def config_from_args(config_cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_cls):
        if (f.metadata or {}).get("cli") is False or not hasattr(ns, f.name):
            continue
        v = getattr(ns, f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:
            continue   # list option not given: keep the dataclass default
        if (f.metadata or {}).get("many") and not (f.metadata or {}).get("positional"):
            if v is None:
                continue   # grid option not given: the dataclass default
            v = v[0] if len(v) == 1 else list(v)
        out[f.name] = v
    return out


def _emit(args, payload: dict, human: str | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    elif human is not None:
        print(human)
    else:
        print(json.dumps(payload, indent=2, default=str))


def _human_result(name: str, res) -> str:
    lines = [f"{name}: done" + (f" (run {res.run_id})" if res.run_id else "")]
    for k, v in res.artifacts.items():
        lines.append(f"  {k}: {v}")
    for k, v in res.metrics.items():
        lines.append(f"  {k} = {v:.6g}" if isinstance(v, float) else f"  {k} = {v}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import steps

    parser = argparse.ArgumentParser(
        prog="workbench", description="Interpretability workbench: collect activations, run PCA, "
        "SAEs and subspace comparisons, explore them in the browser.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    # ------------------------------------------------------------- step commands
    for name, st in steps.STEPS.items():
        h = st.help.replace("%", "%%")     # argparse %-formats help strings ("99% variance")
        p = sub.add_parser(name.replace("_", "-"), parents=[common], help=h, description=h)
        add_config_arguments(p, st.config_cls)
        if not any(f.name == "workspace" for f in dataclasses.fields(st.config_cls)):
            p.add_argument("--workspace", default=None,
                           help="workspace to record the run in (default: found from --out)")
        p.set_defaults(_step=name)

    # ------------------------------------------------------------- written-out commands
    p = sub.add_parser("models", parents=[common], help="list model specs and whether each is available offline")
    p.set_defaults(_fn=_cmd_models)

    p = sub.add_parser("store", help="inspect or verify an activation store")
    ssub = p.add_subparsers(dest="store_cmd", metavar="ACTION", required=True)
    for action, h in (("info", "metadata of a store"), ("verify", "check every shard's sha256")):
        q = ssub.add_parser(action, parents=[common], help=h)
        q.add_argument("path")
        q.set_defaults(_fn=_cmd_store)

    p = sub.add_parser("runs", help="the runs recorded in a workspace")
    rsub = p.add_subparsers(dest="runs_cmd", metavar="ACTION", required=True)
    q = rsub.add_parser("list", parents=[common], help="one line per run")
    q.add_argument("--workspace", default=".")
    q.add_argument("--step", default=None)
    q.add_argument("--status", default=None, choices=["running", "done", "failed"])
    q.set_defaults(_fn=_cmd_runs)
    q = rsub.add_parser("show", parents=[common], help="everything about one run")
    q.add_argument("run_id")
    q.add_argument("--workspace", default=".")
    q.set_defaults(_fn=_cmd_runs)
    q = rsub.add_parser("rm", parents=[common], help="forget a run (artefacts are kept unless --files)")
    q.add_argument("run_id")
    q.add_argument("--workspace", default=".")
    q.add_argument("--files", action="store_true", help="also delete the run's artefacts")
    q.set_defaults(_fn=_cmd_runs)
    q = rsub.add_parser("export", parents=[common], help="results table as CSV or Parquet")
    q.add_argument("--workspace", default=".")
    q.add_argument("--out", required=True, help="file ending in .csv or .parquet")
    q.set_defaults(_fn=_cmd_runs)

    from . import sweep as _sweep
    _sweep.add_cli(sub, common)

    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on the embedded defaults, then the UI")
    p.add_argument("--workspace", default="demo-workspace")
    p.add_argument("--no-app", action="store_true", help="do not start the UI at the end")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--quick", action="store_true", help="smaller sizes (for tests and slow machines)")
    p.set_defaults(_fn=_cmd_demo)

    p = sub.add_parser("app", help="open the Streamlit workbench on a workspace")
    p.add_argument("--workspace", default="demo-workspace")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.set_defaults(_fn=_cmd_app)
    return parser


# ----------------------------------------------------------------- handlers
def _cmd_models(args) -> int:
    from .models import list_specs
    specs = list_specs()
    human = "\n".join(f"{'yes' if s['available'] else 'no ':4} {s['spec']:28} {s['description']}"
                      + ("" if s["available"] else f"  [{s.get('reason', '')}]") for s in specs)
    _emit(args, {"models": specs}, "avail spec                         description\n" + human)
    return 0


def _cmd_store(args) -> int:
    from .store import ActivationStore
    s = ActivationStore.open(args.path, verify=False)
    if args.store_cmd == "verify":
        s.verify()
        _emit(args, {"path": args.path, "ok": True}, f"{args.path}: ok ({len(s.shard_files())} files verified)")
    else:
        info = s.info()
        human = "\n".join(f"{k}: {v}" for k, v in info.items())
        _emit(args, info, human)
    return 0


def _cmd_runs(args) -> int:
    from .workspace import Workspace
    ws = Workspace(args.workspace, create=False)
    if args.runs_cmd == "list":
        runs = ws.runs(step=args.step, status=args.status)
        human = "\n".join(
            f"{r.id}  {r.step:12} {r.status:8} {(r.seconds or 0):8.1f}s  "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in list(r.metrics.items())[:4]) for r in runs) or "(no runs)"
        _emit(args, {"runs": [r.to_dict() for r in runs]}, human)
    elif args.runs_cmd == "show":
        _emit(args, ws.get_run(args.run_id).to_dict())
    elif args.runs_cmd == "rm":
        run = ws.delete_run(args.run_id)
        if args.files:
            import shutil
            for p in run.artifacts.values():
                path = ws.abs(p)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        _emit(args, {"removed": run.id}, f"removed run {run.id}")
    elif args.runs_cmd == "export":
        from .sweep import results_table
        df = results_table(ws)
        if args.out.endswith(".parquet"):
            df.to_parquet(args.out)
        elif args.out.endswith(".csv"):
            df.to_csv(args.out, index=False)
        else:
            raise WorkbenchError(f"--out must end in .csv or .parquet, got {args.out!r}")
        _emit(args, {"out": args.out, "rows": len(df)}, f"wrote {len(df)} runs to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    summary = run_demo(args.workspace, quick=args.quick)
    _emit(args, summary, f"demo workspace ready: {summary['workspace']}")
    if not args.no_app:
        from .ui import launch
        return launch(args.workspace, port=args.port)
    return 0


def _cmd_app(args) -> int:
    from .ui import launch
    return launch(args.workspace, port=args.port, host=args.host)


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_cli
    setup_cli()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "_step"):
            from .steps import STEPS, run_step
            cfg = config_from_args(STEPS[args._step].config_cls, args)
            res = run_step(args._step, cfg, workspace=getattr(args, "workspace", None)
                           if "workspace" not in cfg else None)
            _emit(args, res.to_json(), _human_result(args._step, res))
            return 0
        return args._fn(args) or 0
    except WorkbenchError as e:           # bad input: one line, exit 2
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted (complete shards/checkpoints are kept; rerun to resume)", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: the traceback, and where to report it
        traceback.print_exc()
        print(f"workbench: internal error: {BUG_HINT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
