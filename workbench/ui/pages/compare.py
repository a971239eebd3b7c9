"""Compare page: layer x layer similarity heatmaps from "compare" results (within one model or
across two); clicking a cell (or picking the two hooks below) shows both hooks' PCA spectra when
pca results for them exist."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from workbench.ui import common, figures, readers


def _short(ref) -> str:
    return Path(str(ref)).name if ref else "?"


def _pca_for(ws, store_ref, hook) -> Path | None:
    """The newest pca result fitted on (store, hook)."""
    best = None
    for p in ws.list_results("pca"):
        try:
            m = common.read_result_checked(p, "pca")
        except Exception:  # noqa: BLE001
            continue
        s, h = readers.pca_source(m)
        if h == hook and (store_ref is None or _short(s) == _short(store_ref)):
            if best is None or common.stamp(p, "result.json") > common.stamp(best, "result.json"):
                best = p
    return best


def _apply_click(event, m: dict) -> None:
    """A point selection on the heatmap's cell markers -> the two hook pickers."""
    pts = []
    try:
        pts = list(event.selection.points)  # type: ignore[union-attr]
    except AttributeError:
        try:
            pts = list(event["selection"]["points"])  # type: ignore[index]
        except (KeyError, TypeError):
            pts = []
    if not pts:
        return
    p = pts[0]
    x, y = str(p.get("x")), str(p.get("y"))
    if x in m["x_labels"] and y in m["y_labels"] and st.session_state.get("_cmp_last") != (x, y):
        st.session_state["_cmp_last"] = (x, y)
        st.session_state["cmp_row"] = y
        st.session_state["cmp_col"] = x


def body() -> None:
    st.title("Compare")
    ws = common.open_workspace()
    if ws is None:
        return
    path = common.select_result(ws, "compare", "Comparison result", "cmp_result",
                                "Make one with `workbench compare STORE_A [STORE_B] --metric cka "
                                "--out ...` or on the Run page (step `compare`).")
    if path is None:
        return
    mats = readers.compare_matrices(path)
    meta = common.read_result_checked(path, "compare")
    name = st.selectbox("Metric", list(mats), key="cmp_metric") if len(mats) > 1 else next(iter(mats))
    m = mats[name]
    a, b = _short(m["store_a"]), _short(m["store_b"])
    across = a != b
    st.caption(("across two stores: rows = `%s`, columns = `%s`" % (a, b)) if across
               else f"within store `{a}`" + (f" · model `{meta.get('model_a') or meta.get('model')}`"
                                            if (meta.get('model_a') or meta.get('model')) else ""))
    fig = figures.heatmap(m["matrix"], m["x_labels"], m["y_labels"], f"{name} ({path.name})",
                          metric=name, x_title=f"{b} hooks" if across else "hook",
                          y_title=f"{a} hooks" if across else "hook")
    event = st.plotly_chart(fig, key="cmp_heatmap", on_select="rerun", selection_mode="points",
                            width="stretch")
    _apply_click(event, m)

    c1, c2 = st.columns(2)
    if st.session_state.get("cmp_row") not in m["y_labels"]:
        st.session_state["cmp_row"] = m["y_labels"][0]
    if st.session_state.get("cmp_col") not in m["x_labels"]:
        st.session_state["cmp_col"] = m["x_labels"][-1]
    row = c1.selectbox("Row hook", m["y_labels"], key="cmp_row")
    col = c2.selectbox("Column hook", m["x_labels"], key="cmp_col")
    i, j = m["y_labels"].index(row), m["x_labels"].index(col)
    st.metric(f"{name}({row}, {col})", f"{m['matrix'][i, j]:.4f}")

    curves, missing = {}, []
    for label, store_ref, hook in ((f"{a}:{row}" if across else row, m["store_a"], row),
                                   (f"{b}:{col}" if across else col, m["store_b"], col)):
        p = _pca_for(ws, store_ref, hook)
        if p is None:
            missing.append(f"`{hook}` of `{_short(store_ref)}`")
            continue
        ratios, _ = readers.pca_spectrum(p)
        curves[label] = ratios
    if curves:
        st.plotly_chart(figures.spectra(curves, "PCA spectra of the two hooks"),
                        key="cmp_spectra", width="stretch")
    if missing:
        st.info("No PCA result for " + " and ".join(dict.fromkeys(missing)) +
                " — run the `pca` step on it to see its spectrum here.")
    with st.expander("Matrix as a table"):
        st.dataframe(pd.DataFrame(m["matrix"], index=m["y_labels"], columns=m["x_labels"]),
                     key="cmp_table")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
