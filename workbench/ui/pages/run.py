"""Run page: a form per step, generated from the step's config dataclass (field types give the
widgets, field metadata the help and choices); submitting starts the step in the background via
`run_step` (which records it in the workspace index) and shows its progress live."""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Any

import streamlit as st

from workbench.errors import WorkbenchError
from workbench.steps import output_dir, role_of, unwrap_type
from workbench.ui import common, jobs

# Field roles (workbench.steps.ROLES) whose value names an artefact of the workspace.
_INPUT_ROLES = {"store", "store_b", "sae", "sae_b", "result"}
_HIDDEN = {"workspace"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _suggest_out(step: str) -> str:
    """WS-relative output folder, in the folder every face uses for this step (steps.output_dir)."""
    return f"{output_dir(step)}/{step.replace('_', '-')}-{time.strftime('%m%d-%H%M%S')}"


def _options_for(role: str | None, ws) -> list[str]:
    """Existing artefacts a field of this role can name (stores, SAEs, results)."""
    if ws is None or role not in _INPUT_ROLES:
        return []
    if role in ("sae", "sae_b"):
        return [ws.rel(p) for p in ws.list_saes()]
    if role == "result":
        return [ws.rel(p) for p in ws.list_results()]
    return [ws.rel(p) for p in ws.list_stores()]


@st.cache_data(show_spinner=False, ttl=600)
def _model_specs() -> list[str]:
    """Model specs available offline (for the model pickers; other specs can be typed)."""
    try:
        from workbench.models import list_specs
        return [s["spec"] for s in list_specs() if s.get("available") and not s["spec"].startswith("<")]
    except Exception:  # noqa: BLE001
        return []


def _widget(step: str, f: dataclasses.Field, tp, ws) -> tuple[Any, str]:
    """Draw one field's widget; returns (raw value, kind) to be parsed after submit."""
    md = f.metadata or {}
    role = role_of(f)
    base, is_list, optional = unwrap_type(tp)
    default = _default(f)
    required = default is dataclasses.MISSING
    label = f.name + (" *" if required else "")
    helptext = md.get("help") or None
    key = f"run_{step}_{f.name}"
    choices = md.get("choices")
    if choices and not is_list:
        opts = list(choices)
        idx = opts.index(default) if default in opts else 0
        return st.selectbox(label, opts, index=idx, help=helptext, key=key), "choice"
    if base is bool and not is_list:
        return st.checkbox(f.name, value=bool(default) if default is not dataclasses.MISSING
                           else False, help=helptext, key=key), "bool"
    if is_list:
        opts = _options_for(role, ws)
        if choices or opts:
            dflt = [d for d in (default if isinstance(default, list) else []) if d in (choices or opts)]
            return st.multiselect(label, list(choices or opts), default=dflt, help=helptext,
                                  key=key, accept_new_options=not choices), "list_sel"
        txt = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else ""
        return st.text_input(label, value=txt, key=key,
                             help=(helptext or "") + " (comma- or newline-separated)"), f"list:{base.__name__}"
    if base in (int, float) and not optional and default not in (None, dataclasses.MISSING):
        if base is int:
            return st.number_input(label, value=int(default), step=1, help=helptext, key=key), "int"
        return st.number_input(label, value=float(default), format="%g", help=helptext,
                               key=key), "float"
    if base in (int, float):
        txt = "" if default in (None, dataclasses.MISSING) else str(default)
        return st.text_input(label, value=txt, help=(helptext or "") + " (empty: default)",
                             key=key), f"opt:{base.__name__}"
    # strings (paths, hooks, specs, ...)
    opts = _options_for(role, ws)
    if role == "out":
        required_out = default is dataclasses.MISSING or "required" in (helptext or "")
        dflt = _suggest_out(step) if required_out and not default else (default or "")
        return st.text_input(label, value=str(dflt), help=(helptext or "") +
                             " (relative paths are inside the workspace; empty: the step's "
                             "default)", key=key), "path"
    if role == "model":
        opts = _model_specs()
        if default not in (None, "", dataclasses.MISSING) and default not in opts:
            opts = [str(default), *opts]
    if opts:
        idx = opts.index(default) if default in opts else 0
        return st.selectbox(label, opts, index=idx, help=helptext, key=key,
                            accept_new_options=True), "path"
    txt = "" if default in (None, dataclasses.MISSING) else str(default)
    return st.text_input(label, value=txt, help=helptext, key=key), "str"


def split_list(text: str) -> list[str]:
    """Comma / newline separated items; commas inside {...} (hook patterns such as
    'blocks.{3,6}.hook_resid_post') do not split."""
    items, cur, depth = [], [], 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if (ch == "," and depth == 0) or ch == "\n":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [x.strip() for x in items if x.strip()]


def _parse(name: str, raw: Any, kind: str, ws, role: str | None = None) -> Any:
    if kind in ("choice", "bool", "int", "float", "list_sel"):
        if kind == "list_sel":
            return [_abs(ws, v) for v in raw]
        return raw
    if kind.startswith("list:"):
        typ = {"int": int, "float": float}.get(kind.split(":", 1)[1], str)
        items = split_list(str(raw))
        try:
            return [typ(x) for x in items]
        except ValueError:
            raise WorkbenchError(f"{name}: expected a comma-separated list of {typ.__name__}s, "
                                 f"got {raw!r}") from None
    if kind.startswith("opt:"):
        txt = str(raw).strip()
        if not txt or txt.lower() == "none":
            return None
        typ = int if kind.endswith("int") else float
        try:
            return typ(txt)
        except ValueError:
            raise WorkbenchError(f"{name}: expected {'an integer' if typ is int else 'a number'} "
                                 f"or nothing, got {txt!r}") from None
    if kind == "path":
        return _abs(ws, str(raw).strip(), out=(role == "out"))
    return raw


def _abs(ws, value: str, out: bool = False) -> str:
    """Relative paths of the form are inside the workspace (outputs always; inputs when they
    exist there)."""
    if not value or ws is None:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if out or (ws.root / p).exists():
        return str(ws.root / p)
    return value


def _job_panel(ws_root: str) -> None:
    js = jobs.jobs(ws_root)
    if not js:
        return
    st.subheader("Runs started here")
    for j in js[:6]:
        label = f"{j.step} — {j.status} ({j.seconds:.1f} s)"
        state = {"queued": "running", "running": "running", "done": "complete",
                 "failed": "error"}[j.status]
        with st.status(label, state=state, expanded=(j is js[0])):
            if j.status in ("running", "queued"):
                frac = j.progress()
                st.progress(frac if frac is not None else 0.0,
                            text=f"{frac:.0%}" if frac is not None else "working…")
            log = j.log_text()
            if j.status == "done" and j.result is not None:
                r = j.result
                st.success(f"{j.step} finished in {j.seconds:.1f} s"
                           + (f" (run {r.run_id})" if r.run_id else ""))
                if r.artifacts:
                    st.write({k: str(v) for k, v in r.artifacts.items()})
                if r.metrics:
                    st.json(r.metrics, expanded=False)
            elif j.status == "failed":
                st.error(f"{j.step} failed: {j.error}")
            if log:
                st.code(log[-3000:], language=None)
            st.caption("config: " + json.dumps(j.config, default=str)[:400])


def body() -> None:
    st.title("Run a step")
    from workbench.steps import STEPS

    root = common.workspace_root()
    ws = common.open_workspace_quiet(root)
    if ws is None:
        st.info(f"`{root}` is not a workspace yet: it is created when you start the first run "
                "(begin with **collect**), or run `workbench demo --workspace "
                f"{root} --no-app`.", icon=":material/info:")
    elif common.is_empty(ws):
        st.info("This workspace is empty: start with **collect** (a model's activations into a "
                f"store), or fill it in one go with `workbench demo --workspace {root} --no-app`.",
                icon=":material/info:")
    if not STEPS:
        st.warning("No steps are registered (the step modules failed to import?).")
        return
    names = list(STEPS)
    qp = st.query_params.get("step")
    if "run_step_name" not in st.session_state and qp in names:
        st.session_state["run_step_name"] = qp
    step = st.selectbox("Step", names, key="run_step_name",
                        format_func=lambda n: f"{n} — {STEPS[n].help}")
    spec = STEPS[step]
    hints = typing.get_type_hints(spec.config_cls)
    fields = [f for f in dataclasses.fields(spec.config_cls)
              if f.name not in _HIDDEN and (f.metadata or {}).get("cli", True) is not False]
    with st.form(f"run_form_{step}"):
        raw = {}
        for f in fields:
            raw[f.name] = _widget(step, f, hints[f.name], ws)
        submitted = st.form_submit_button(f"Run {step}", type="primary")
    if submitted:
        try:
            from workbench.steps import config_dict, make_config
            wsp = ws if ws is not None else common.create_workspace(root)
            values = {}
            for f in fields:
                v, kind = raw[f.name]
                v = _parse(f.name, v, kind, wsp, role_of(f))
                if v in ("", None) or v == []:
                    if _default(f) is dataclasses.MISSING:
                        raise WorkbenchError(f"{f.name} is required ({(f.metadata or {}).get('help', '')})")
                    continue   # keep the step's own default
                values[f.name] = v
            cfg = make_config(step, values)
            jobs.start(step, cfg, config_dict(cfg), str(wsp.root))
            st.toast(f"started {step}")
        except Exception as e:  # noqa: BLE001
            common.show_error(e, f"cannot start {step}")

    running = any(j.status in ("queued", "running") for j in jobs.jobs(str(root)))

    @st.fragment(run_every=1.0 if running else None)
    def live():
        _job_panel(str(root))
        if running and not any(j.status in ("queued", "running") for j in jobs.jobs(str(root))):
            st.rerun()   # a job just finished: refresh the whole page (lists of results)

    live()


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
