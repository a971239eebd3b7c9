"""The browser face of the workbench: a Streamlit app over one workspace.

``launch(workspace, port, host)`` runs ``streamlit run app.py`` (headless, usage statistics off,
bound to ``host``) with the workspace passed both as ``--workspace`` after ``--`` and in the
``WORKBENCH_WORKSPACE`` environment variable. The pages live in ``workbench/ui/pages/`` (one module
per page, each with a ``render()``); they only read results / the workspace index and call
``workbench.steps.run_step`` — no maths here.

Importing this package does not import streamlit (the CLI imports it to launch).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ENV_VAR = "WORKBENCH_WORKSPACE"
PAGES_DIR = Path(__file__).resolve().parent / "pages"


def entry_script() -> Path:
    """The Streamlit entry script: the project's app.py when running from a checkout, else the
    copy inside the package (an installed wheel has no top-level app.py)."""
    root_app = Path(__file__).resolve().parents[2] / "app.py"
    if root_app.is_file():
        return root_app
    return Path(__file__).resolve().parent / "entry.py"


def streamlit_command(workspace: str | os.PathLike, port: int = 8501,
                      host: str = "127.0.0.1") -> list[str]:
    """The argv that `launch` runs (exposed for tests and for people who want to run it by hand)."""
    ws = str(Path(workspace).expanduser().resolve())
    return [
        sys.executable, "-m", "streamlit", "run", str(entry_script()),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.runOnSave", "false",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--browser.serverAddress", host,
        "--client.showErrorDetails", "type",
        "--client.toolbarMode", "minimal",
        "--",
        "--workspace", ws,
    ]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def launch(workspace: str | os.PathLike, port: int = 8501, host: str = "127.0.0.1") -> int:
    """Run the Streamlit UI on `workspace` until interrupted; returns the server's exit code."""
    from ..errors import WorkbenchError

    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise WorkbenchError("the UI needs streamlit: pip install 'workbench[app]' "
                             "(or scripts/setup.sh app)") from None
    if not 0 < int(port) < 65536:
        raise WorkbenchError(f"--port must be between 1 and 65535, got {port}")
    if not _port_free(host, int(port)):
        raise WorkbenchError(f"port {port} on {host} is already in use; pass another --port "
                             f"(e.g. --port {int(port) + 1})")
    ws = Path(workspace).expanduser().resolve()
    env = dict(os.environ)
    env[ENV_VAR] = str(ws)
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"workbench: UI for {ws} at http://{shown}:{port}  (Ctrl+C to stop)", file=sys.stderr)
    proc = subprocess.Popen(streamlit_command(ws, port, host), env=env)

    def _stop(*_):
        raise KeyboardInterrupt

    old = None
    try:   # `kill PID` of the workbench process must also stop the server it started
        old = signal.signal(signal.SIGTERM, _stop)
    except ValueError:   # not the main thread: leave signals alone
        pass
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 0
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
