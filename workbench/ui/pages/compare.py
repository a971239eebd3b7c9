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
            r = readers.pca(p)
        except Exception:  # noqa: BLE001 - listed as unreadable on the Workspace page
            continue
        if r.hook == hook and (store_ref is None or _short(r.store) == _short(store_ref)):
            if best is None or common.stamp(p, "result.json") > common.stamp(best, "result.json"):
                best = p
    return best


def _apply_click(event, x_labels: list[str], y_labels: list[str]) -> None:
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
    if x in x_labels and y in y_labels and st.session_state.get("_cmp_last") != (x, y):
        st.session_state["_cmp_last"] = (x, y)
        st.session_state["cmp_row"] = y
        st.session_state["cmp_col"] = x


def body() -> None:
    st.title("Compare")
    ws = common.open_workspace()
    if ws is None:
        return
    path = common.select_result(ws, "compare", "Comparison result", "cmp_result",
                                "Make one with `workbench compare STORE_A [STORE_B] --metric linear_cka "
                                "--out ...` or on the Run page (step `compare`).")
    if path is None:
        return
    r = readers.compare(path)
    name, M = r.metric, r.matrix.numpy()
    xl, yl = r.hooks_b, r.hooks_a
    a, b = _short(r.store_a), _short(r.store_b)
    across = a != b
    st.caption(f"across two stores: rows = `{a}`, columns = `{b}`" if across else f"within store `{a}`")
    if r.rows_dropped:
        st.caption(f"{r.rows_dropped} rows with norms over {r.max_norm_ratio:g}x the median "
                   "left out (attention sinks / massive activations)")
    chk = r.rogue_check
    if chk.get("done") and chk.get("max_change", 0) > 0.1:
        worst = max(r.rogue_dims.items(), key=lambda kv: kv[1].get("top1_share", 0),
                    default=(None, {}))
        st.warning(f"Rogue dimensions: in `{worst[0]}` dimension(s) {worst[1].get('dims')} hold "
                   f"{100 * worst[1].get('top1_share', 0):.0f}% of the variance; without each hook's top "
                   f"{chk.get('top', 3)} dimensions the scores change by up to {chk['max_change']:.2f}. "
                   "Recompute with standardize = true (or drop_top_dims) to compare the rest.")
    elif r.standardize:
        st.caption("every dimension z-scored before the metric (standardize)")
    fig = figures.heatmap(M, xl, yl, f"{name} ({path.name})",
                          metric=name, x_title=f"{b} hooks" if across else "hook",
                          y_title=f"{a} hooks" if across else "hook")
    event = st.plotly_chart(fig, key="cmp_heatmap", on_select="rerun", selection_mode="points",
                            width="stretch")
    _apply_click(event, xl, yl)

    c1, c2 = st.columns(2)
    if st.session_state.get("cmp_row") not in yl:
        st.session_state["cmp_row"] = yl[0]
    if st.session_state.get("cmp_col") not in xl:
        st.session_state["cmp_col"] = xl[-1]
    row = c1.selectbox("Row hook", yl, key="cmp_row")
    col = c2.selectbox("Column hook", xl, key="cmp_col")
    i, j = yl.index(row), xl.index(col)
    st.metric(f"{name}({row}, {col})", f"{M[i, j]:.4f}")

    curves, missing = {}, []
    for label, store_ref, hook in ((f"{a}:{row}" if across else row, r.store_a, row),
                                   (f"{b}:{col}" if across else col, r.store_b, col)):
        p = _pca_for(ws, store_ref, hook)
        if p is None:
            missing.append(f"`{hook}` of `{_short(store_ref)}`")
            continue
        curves[label] = readers.pca(p).explained_variance_ratio
    if curves:
        st.plotly_chart(figures.spectra(curves, "PCA spectra of the two hooks"),
                        key="cmp_spectra", width="stretch")
    if missing:
        st.info("No PCA result for " + " and ".join(dict.fromkeys(missing)) +
                " — run the `pca` step on it to see its spectrum here.")
    with st.expander("Matrix as a table"):
        st.dataframe(pd.DataFrame(M, index=yl, columns=xl),
                     key="cmp_table")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
