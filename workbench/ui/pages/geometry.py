"""Geometry page: two result kinds about the shape of representations.

- "multid" (Engels et al. 2024): clusters of SAE latents ranked by irreducibility; per plotted cluster the
  PC1-PC2 (or PC1-PC3) scatter coloured by token, hover = the token in its context, and the mixture /
  separability indices of each PC pair.
- "subspace" (Wang et al. 2025, Marbut et al. 2023): directions for 90 / 99% of the variance, effective
  rank, spread and TwoNN dimension per hook, curves over layers and one hook's spectrum.
Numbers and figures come from the steps' results (typed readers, ``workbench.ui.readers``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from workbench.ui import common, figures, readers


def _best(pairs: list[dict]) -> dict:
    return max(pairs, key=lambda p: (1 - p["mixture_index"]) * p["separability_index"], default={})


def multid_view(ws) -> None:
    from workbench.steps.multid import cluster_figure, ranking_figure
    path = common.select_result(ws, "multid", "Multi-dimensional features result", "md_result",
                                "Make one with `workbench multid SAE STORE --out ...` (try a store collected "
                                "with `--corpus calendar`) or on the Run page (step `multid`).")
    if path is None:
        return
    r = readers.multid(path)
    m = r.meta
    st.caption(f"SAE `{Path(m['sae']).name}` on `{Path(m['store']).name}` ({m['hook']}), {m['n_tokens']} tokens; "
               f"{m['n_clusters']} clusters ({m['params']['method']}), {len(r.clusters)} scored. Irreducibility = "
               "mean over PC pairs of (1 - M) S: M = epsilon-mixture index, S = separability index (bits).")
    if not r.clusters:
        st.info("No cluster fired on enough tokens to be scored (see --min-rows, --max-tokens).")
        return
    table = pd.DataFrame([{"rank": c["rank"], "latents": c["size"], "tokens": c["n_rows"],
                           "irreducibility": c["irreducibility"],
                           "M (best pair)": _best(c["pairs"]).get("mixture_index"),
                           "S (best pair)": _best(c["pairs"]).get("separability_index"),
                           "top tokens": " | ".join(common.show_token(t) for t, _ in c["top_tokens"][:6]),
                           "plotted": c["plotted"]} for c in r.clusters])
    st.dataframe(table, hide_index=True, key="md_table", height=260)
    plotted = [c["rank"] for c in r.clusters if c["plotted"]]
    if not plotted:
        st.info("No cluster kept its points (run with --n-plots > 0).")
        return
    c1, c2 = st.columns([3, 1])
    rank = c1.selectbox("Cluster (rank)", plotted, key="md_rank",
                        format_func=lambda k: f"{k}: " + " ".join(t for t, _ in r.cluster(k)["top_tokens"][:4]))
    n_pcs = min(3, len(r.cluster(rank)["explained_variance_ratio"]))     # a planar cluster has 2
    dims = c2.radio("Plot", list(range(2, n_pcs + 1)), key="md_dims", horizontal=True,
                    format_func=lambda d: "PC1-PC2" if d == 2 else "PC1-PC3 (3-D)")
    st.plotly_chart(cluster_figure(r, rank, dims=dims), key="md_scatter", width="stretch")
    c = r.cluster(rank)
    st.caption(f"latents {c['latents'][:30]}{' ...' if len(c['latents']) > 30 else ''}; explained variance "
               "ratio of its PCs " + ", ".join(f"{v:.3f}" for v in c["explained_variance_ratio"]))
    st.dataframe(pd.DataFrame([{"PCs": f"{p['pcs'][0] + 1}-{p['pcs'][1] + 1}", "points": p["n"],
                                "mixture index M": p["mixture_index"], "separability S (bits)": p["separability_index"],
                                "(1 - M) S": (1 - p["mixture_index"]) * p["separability_index"]}
                               for p in c["pairs"]]), hide_index=True, key="md_pairs")
    with st.expander("All clusters: mixture vs separability"):
        st.plotly_chart(ranking_figure(r), key="md_ranking", width="stretch")
    with st.expander("How this follows the paper"):
        st.markdown("\n".join(f"- {d}" for d in m.get("deviations", [])))


def subspace_view(ws) -> None:
    from workbench.steps.subspace import CURVES, _figures
    path = common.select_result(ws, "subspace", "Subspace result", "sub_result",
                                "Make one with `workbench subspace STORE --out ...` or on the Run page "
                                "(step `subspace`).")
    if path is None:
        return
    r = readers.subspace(path)
    st.caption(f"store `{Path(r.store).name}`; rows over {r.max_norm_ratio:g}x the median norm dropped "
               "(solid curves) or kept (dotted); TwoNN / average cosine on a sample of "
               f"{r.twonn_rows} rows")
    rows = []
    for h in r.hooks:
        d = h["dropped"]
        rows.append({"hook": h["hook"], "component": h["component"], "layer": h["layer"], "d": h["d"],
                     "dirs 90%": d.get("n_dirs_90"), "dirs 99%": d.get("n_dirs_99"),
                     "effective rank": d.get("effective_rank"), "PC spread": d.get("pc_spread"),
                     "TwoNN dim": d.get("twonn_id"), "rows dropped": h.get("rows_dropped", 0)})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sub_table")
    figs = _figures(r.hooks)
    comps = [k for k in figs if k != "overview"]
    st.plotly_chart(figs["overview"], key="sub_overview", width="stretch")
    comp = st.selectbox("Component", comps, key="sub_component")
    st.plotly_chart(figs[comp], key="sub_component_fig", width="stretch")
    st.caption("curves: " + "; ".join(CURVES.values()))
    hook = st.selectbox("Spectrum of hook", r.hook_names, key="sub_hook")
    ev = r.eigenvalues(hook).double()
    st.plotly_chart(figures.spectra({hook: (ev / ev.sum()).numpy()}, f"Covariance spectrum of {hook} "
                                    "(massive-norm rows dropped)"), key="sub_spectrum", width="stretch")


def body() -> None:
    st.title("Geometry")
    ws = common.open_workspace()
    if ws is None:
        return
    t1, t2 = st.tabs(["Multi-dimensional features", "Subspaces"])
    with t1:
        common.guard(lambda: multid_view(ws))
    with t2:
        common.guard(lambda: subspace_view(ws))


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
