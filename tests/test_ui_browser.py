"""End-to-end: `workbench app` in a subprocess, driven by headless Chromium through Playwright.
Opens every page, picks a latent, types a text, starts a small run and waits for it to finish.
Screenshots go to test-artifacts/ui/. Needs a `chromium` binary (scripts/install_browser.sh)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ui_fixtures import REPO, SAE_HOOK, ui_workspace  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMINGS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ui_workspace):  # noqa: F811
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = (ARTIFACTS.parent / "ui-server.log")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "app", "--workspace",
                             str(ui_workspace["root"]), "--port", str(port)],
                            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            fh.close()
            pytest.fail(f"the UI server did not come up; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    fh.close()


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.fail("no chromium on PATH: run scripts/install_browser.sh")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking"])
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        ctx.close()
        browser.close()


def _idle(pg, timeout=30_000):
    """Wait until Streamlit has finished the script run and every element is drawn."""
    pg.wait_for_timeout(150)
    pg.wait_for_selector("[data-test-script-state=notRunning]", timeout=timeout)
    pg.wait_for_function("() => !document.querySelector('[data-testid=stSkeleton]')",
                         timeout=timeout)


def _open(pg, base, path, ready_selector, name):
    t = time.time()
    pg.goto(f"{base}/{path}")
    pg.wait_for_selector(ready_selector, state="visible")
    _idle(pg)
    TIMINGS[name] = round(time.time() - t, 2)
    _no_traceback(pg)


def _no_traceback(pg):
    assert pg.locator("[data-testid='stException']").count() == 0, "a page shows an exception"
    assert "Traceback (most recent call last)" not in pg.inner_text("body")


def _shot(pg, name):
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _nav(pg, title, ready_selector, name):
    """Client-side navigation through the sidebar (what a user does once the app is open)."""
    t = time.time()
    pg.locator("[data-testid='stSidebarNavLink']", has_text=title).click()
    pg.wait_for_selector(ready_selector, state="visible")
    _idle(pg)
    TIMINGS[name] = round(time.time() - t, 2)
    _no_traceback(pg)


PAGES = [("Workspace", "", "text=Activation stores"),
         ("Activations", "activations", ".js-plotly-plot"),
         ("Features", "features", "text=Top activating examples"),
         ("Compare", "compare", ".js-plotly-plot"),
         ("Run", "run", "text=Run a step"),
         ("Export", "export", "text=Tables (CSV)")]


def test_pages_open(page, server):
    pg = page
    # first visit of each page by URL (a full load of the app; the first one imports torch etc.)
    for title, path, sel in PAGES:
        _open(pg, server, path, sel, f"{title} (url, first)")
        _shot(pg, title.lower())
    # warm (every page's data already read once): client-side navigation through the sidebar
    for title, _path, sel in PAGES:
        _nav(pg, title, sel, title)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    print("page-open timings (s):", TIMINGS)
    for title, _path, _sel in PAGES:
        assert TIMINGS[title] < 4.0, f"{title} took {TIMINGS[title]} s to open warm"


def test_features_latent_and_text(page, server):
    pg = page
    _open(pg, server, "features", "text=Top activating examples", "features-latent")
    box = pg.locator("input[aria-label^='Latent (0']")
    box.fill("3")
    box.press("Enter")
    pg.wait_for_selector("text=Latent 3", state="visible")
    _idle(pg)
    assert pg.locator("span.wb-tok").count() > 0, "no highlighted tokens"
    _shot(pg, "features-latent3")
    area = pg.locator("textarea[aria-label='Text']")
    area.fill("The cat sat on the mat. def foo(x): return x")
    area.press("Control+Enter")
    pg.wait_for_selector("text=on your text", state="visible", timeout=60_000)
    _idle(pg, 60_000)
    _no_traceback(pg)
    _shot(pg, "features-text")


def test_run_a_step(page, server, ui_workspace):  # noqa: F811
    pg = page
    _open(pg, server, "run?step=pca", "text=Run a step", "run-step")
    pg.wait_for_selector("button:has-text('Run pca')")
    hook = pg.locator("input[aria-label='hook']")
    hook.fill(SAE_HOOK)
    out = pg.locator("input[aria-label='out']")
    out.fill("results/pca-from-browser")
    pg.get_by_role("button", name="Run pca").click()
    pg.wait_for_selector("text=pca finished", timeout=90_000)
    _idle(pg)
    _no_traceback(pg)
    _shot(pg, "run-done")
    assert (ui_workspace["root"] / "results" / "pca-from-browser" / "result.json").exists()
    runs = [r for r in ui_workspace["ws"].runs(step="pca") if r.status == "done"]
    assert any("pca-from-browser" in json.dumps(r.config) for r in runs)


def test_compare_click_a_cell(page, server):
    """Clicking a heatmap cell selects the two hooks (plotly selection -> rerun)."""
    from ui_fixtures import HOOKS
    pg = page
    _open(pg, server, "compare", ".js-plotly-plot", "compare-click")
    drag = pg.locator(".js-plotly-plot .nsewdrag").first
    box = drag.bounding_box()
    # bottom-left cell: row = HOOKS[1] (rows run top to bottom), column = HOOKS[0]
    pg.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.75)
    pg.wait_for_selector(f"text=({HOOKS[1]}, {HOOKS[0]})", timeout=20_000)
    _idle(pg)
    _no_traceback(pg)
    _shot(pg, "compare-clicked")
