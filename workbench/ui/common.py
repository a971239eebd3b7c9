"""Shared pieces of the pages: which workspace is open, cached readers of results / stores /
tokenizers, the error guard (a clear st.error, never a traceback), and small renderers (token
highlighting, downloads). Nothing here computes an analysis; it reads what the steps wrote."""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from workbench.errors import BUG_HINT, WorkbenchError, is_user_error
from workbench.ui import ENV_VAR
from workbench.workspace import INDEX_NAME, Workspace

DEFAULT_WORKSPACE = "demo-workspace"


# ------------------------------------------------------------------ workspace
def initial_workspace() -> str:
    """--workspace after `--` on the streamlit command line, else $WORKBENCH_WORKSPACE, else
    ./demo-workspace."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workspace", default=None)
    try:
        ns, _ = p.parse_known_args(sys.argv[1:])
    except SystemExit:   # pragma: no cover - malformed argv; fall through to the env var
        ns = argparse.Namespace(workspace=None)
    return ns.workspace or os.environ.get(ENV_VAR) or DEFAULT_WORKSPACE


def workspace_root() -> Path:
    if "workspace" not in st.session_state:
        st.session_state["workspace"] = initial_workspace()
    return Path(str(st.session_state["workspace"])).expanduser().resolve()


def sidebar_workspace() -> None:
    workspace_root()   # seeds the session value before the widget is drawn
    with st.sidebar:
        st.text_input("Workspace folder", key="workspace",
                      help="The folder made by `workbench demo` or by steps run with --out inside it.")
        if st.button("Reload", help="clear cached reads (after running steps from the CLI)",
                     key="_reload"):
            st.cache_data.clear()
            st.cache_resource.clear()


def open_workspace() -> Workspace | None:
    """The workspace, or None (after showing guidance) when the folder is not one yet."""
    root = workspace_root()
    if not (root / INDEX_NAME).is_file():
        empty_workspace_help(root)
        return None
    return Workspace(root, create=False)


def open_workspace_quiet(root: Path | None = None) -> Workspace | None:
    root = root or workspace_root()
    return Workspace(root, create=False) if (root / INDEX_NAME).is_file() else None


def create_workspace(root: Path) -> Workspace:
    return Workspace(root, create=True)


def is_empty(ws: Workspace) -> bool:
    return not (ws.list_stores() or ws.list_saes() or ws.list_results())


def empty_workspace_help(root: Path) -> None:
    if not root.exists():
        what = "does not exist yet"
    elif not (root / INDEX_NAME).is_file():
        what = "is not a workbench workspace yet"
    else:
        what = "is an empty workspace"
    st.info(
        f"**{root}** {what}.\n\n"
        "Fill it with the whole pipeline (a small model, activations, PCA, an SAE, its feature "
        "dashboards and a layer comparison) by running in a terminal:\n\n"
        f"```\nworkbench demo --workspace {root} --no-app\n```\n"
        "then press **Reload** in the sidebar. Or start with a single step on the **Run** page "
        "(`collect` first), or point the sidebar at another workspace folder.",
        icon=":material/info:")


def stamp(path: str | os.PathLike, *names: str) -> int:
    """A cache key that changes when a result / store / SAE folder is rewritten."""
    p = Path(path)
    best = 0
    for n in names or ("result.json", "manifest.json", "cfg.json"):
        try:
            best = max(best, (p / n).stat().st_mtime_ns)
        except OSError:
            continue
    if best == 0:
        try:
            best = p.stat().st_mtime_ns
        except OSError:
            best = -1
    return best


def folder_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


@st.cache_data(show_spinner=False, max_entries=512)
def cached_size(path: str, key: int) -> int:
    return folder_size(path)


def human_size(n: int | float | None) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def ago(t: float | None) -> str:
    if not t:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# ------------------------------------------------------------------ errors
def error_message(e: BaseException) -> str:
    """The one line shown for an error: the message of a user error, the type too for a bug."""
    if is_user_error(e):
        return str(e) or type(e).__name__
    return f"{type(e).__name__}: {e}"


def show_error(e: BaseException, context: str | None = None) -> None:
    prefix = f"{context}: " if context else ""
    st.error(prefix + error_message(e), icon=":material/error:")
    if not is_user_error(e):
        with st.expander("Technical details (for a bug report)"):
            st.text(traceback.format_exc(limit=6) + "\n" + BUG_HINT)


def guard(fn: Callable[[], Any], context: str | None = None) -> Any:
    """Run a page body; any error becomes one st.error (stop/rerun still propagate: they are
    BaseExceptions)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the UI must never show a raw traceback
        show_error(e, context)
        return None


# ------------------------------------------------------------------ cached readers
@st.cache_data(show_spinner=False, max_entries=256)
def result_meta(path: str, key: int) -> dict:
    from workbench.results import read_result
    return read_result(path)


@st.cache_resource(show_spinner=False, max_entries=64)
def result_tensors(path: str, key: int) -> dict:
    from workbench.results import read_tensors
    return read_tensors(path)


def read_result_checked(path: str | os.PathLike, kind: str | None = None) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise WorkbenchError(f"result folder {p} does not exist")
    meta = result_meta(str(p), stamp(p, "result.json"))
    if kind is not None and meta.get("kind") != kind:
        raise WorkbenchError(f"{p} holds a {meta.get('kind')!r} result, expected {kind!r}")
    return meta


def tensors_of(path: str | os.PathLike) -> dict:
    p = Path(path)
    return result_tensors(str(p), stamp(p, "tensors.safetensors", "result.json"))


@st.cache_resource(show_spinner=False, max_entries=16)
def _open_store(path: str, key: int):
    from workbench.store import ActivationStore
    return ActivationStore.open(path, verify=False)


def open_store(path: str | os.PathLike):
    p = Path(path)
    if not (p / "manifest.json").is_file():
        raise WorkbenchError(f"{p} is not an activation store (no manifest.json); "
                             "collect one with `workbench collect` or on the Run page")
    return _open_store(str(p), stamp(p, "manifest.json"))


@st.cache_data(show_spinner=False, max_entries=64)
def store_info(path: str, key: int) -> dict:
    s = _open_store(path, key)
    info = s.info() if hasattr(s, "info") else dict(s.manifest)
    return json.loads(json.dumps(info, default=str))


@st.cache_resource(show_spinner=False, max_entries=8)
def tokenizer(spec: str):
    from workbench.models import load_tokenizer
    return load_tokenizer(spec)


class TokenText:
    """id -> display string, memoised (one tokenizer.decode per distinct id)."""

    def __init__(self, tok):
        self.tok = tok
        self.memo: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        i = int(i)
        s = self.memo.get(i)
        if s is None:
            try:
                s = self.tok.decode([i]) if self.tok is not None else f"<{i}>"
            except Exception:  # noqa: BLE001 - an id outside the vocab
                s = f"<{i}>"
            self.memo[i] = s
        return s

    def many(self, ids) -> list[str]:
        return [self(i) for i in ids]


@st.cache_resource(show_spinner=False, max_entries=8)
def token_text(spec: str) -> TokenText:
    try:
        return TokenText(tokenizer(spec))
    except Exception:  # noqa: BLE001 - no tokenizer: show ids
        return TokenText(None)


def resolve_path(ws: Workspace | None, p: str | None) -> Path | None:
    """A path recorded in a result (absolute, or relative to the workspace / cwd)."""
    if not p:
        return None
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    if ws is not None and (ws.root / q).exists():
        return ws.root / q
    return q.resolve()


# ------------------------------------------------------------------ rendering
def show_token(s: str) -> str:
    """A token as readable text: whitespace made visible."""
    return s.replace("\n", "↵").replace("\t", "⇥")


def highlight_html(tokens: list[str], acts: list[float], vmax: float | None = None,
                   focus: int | None = None, color: tuple[int, int, int] = (255, 120, 0)) -> str:
    """Tokens as <span>s whose background alpha follows the activation (title = value)."""
    vmax = float(vmax) if vmax else max([float(a) for a in acts] + [0.0])
    parts = []
    for k, (t, a) in enumerate(zip(tokens, acts)):
        a = float(a)
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, a / vmax))
        style = (f"background-color: rgba({color[0]},{color[1]},{color[2]},{alpha:.3f}); "
                 "padding: 0 1px; margin-right: 1px; border-radius: 2px; "
                 "box-shadow: inset -1px 0 0 rgba(0,0,0,0.07);")
        if k == focus:
            style += " outline: 1.5px solid #333; border-radius: 2px;"
        parts.append(
            f'<span class="wb-tok" style="{style}" title="{html.escape(repr(t))}: {a:.4g}">'
            f"{html.escape(show_token(t))}</span>")
    return ('<div class="wb-example" style="font-family: ui-monospace, monospace; '
            'white-space: pre-wrap; line-height: 1.7; font-size: 0.85rem;">'
            + "".join(parts) + "</div>")


def select_result(ws: Workspace, kind: str, label: str, key: str, what: str) -> Path | None:
    """A selectbox over the workspace's results of one kind; guidance when there are none."""
    paths = ws.list_results(kind)
    qp = st.query_params.get(key)
    if qp and qp not in [p.name for p in paths]:
        bad = ws.results / qp
        if bad.is_dir() and not (bad / "result.json").exists():
            st.error(f"Result **{qp}** is incomplete (no result.json): it is still being written or "
                     "its step was interrupted; rerun the step that makes it.", icon=":material/error:")
        elif bad.is_dir():
            st.error(f"Result **{qp}** is not a {kind} result.", icon=":material/error:")
        else:
            st.error(f"There is no result **{qp}** in this workspace.", icon=":material/error:")
    if not paths:
        st.info(f"No **{kind}** results in this workspace yet. {what}\n\nOr run the whole "
                f"pipeline once: `workbench demo --workspace {ws.root} --no-app`.",
                icon=":material/info:")
        return None
    names = [p.name for p in paths]
    if key not in st.session_state and qp in names:
        st.session_state[key] = qp
    if st.session_state.get(key) not in names:
        st.session_state[key] = names[0]
    name = st.selectbox(label, names, key=key)
    return ws.results / name


def fig_html(fig) -> bytes:
    return fig.to_html(include_plotlyjs="cdn", full_html=True).encode()
