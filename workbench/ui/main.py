"""The app shell: page config, the workspace chooser in the sidebar, and navigation."""

from __future__ import annotations

import streamlit as st

from workbench.ui import PAGES_DIR
from workbench.ui import common

PAGES = [
    # (file, title, url path, icon)
    ("workspace.py", "Workspace", "workspace", ":material/folder_open:"),
    ("activations.py", "Activations", "activations", ":material/scatter_plot:"),
    ("features.py", "Features", "features", ":material/lightbulb:"),
    ("compare.py", "Compare", "compare", ":material/grid_on:"),
    ("match.py", "Match SAEs", "match", ":material/join_inner:"),
    ("geometry.py", "Geometry", "geometry", ":material/blur_circular:"),
    ("interventions.py", "Interventions", "interventions", ":material/tune:"),
    ("run.py", "Run", "run", ":material/play_arrow:"),
    ("export.py", "Export", "export", ":material/download:"),
]


def main() -> None:
    st.set_page_config(page_title="workbench", page_icon=":material/biotech:", layout="wide")
    common.sidebar_workspace()
    pages = [st.Page(PAGES_DIR / f, title=t, url_path=u, icon=i, default=(k == 0))
             for k, (f, t, u, i) in enumerate(PAGES)]
    st.navigation(pages).run()
