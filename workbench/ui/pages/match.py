"""Match page: a "match_saes" result — matched-decoder scores against shuffled pairings, the
histogram of matched correlations against random pairs, the table of matched pairs, and both
latents' dashboards side by side when "features" results exist for the two SAEs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from workbench.ui import common


@st.cache_data(show_spinner=False, max_entries=8)
def _read(path: str, key: int):
    from workbench.steps.match import read_match_result
    return read_match_result(path)


def _features_for(ws, sae: str) -> Path | None:
    """The newest features result built on this SAE folder."""
    best = None
    for p in ws.list_results("features"):
        try:
            meta = common.read_result_checked(p, "features")
        except Exception:  # noqa: BLE001 - listed as unreadable on the Workspace page
            continue
        if Path(str(meta.get("sae", ""))).resolve() == Path(sae).resolve():
            if best is None or common.stamp(p, "result.json") > common.stamp(best, "result.json"):
                best = p
    return best


def body() -> None:
    ws = common.open_workspace()
    if ws is None:
        return
    path = common.select_result(ws, "match_saes", "Match result", "match_result",
                                "Build one with `workbench match-saes SAE_A SAE_B --out ...` or on the Run page.")
    if path is None:
        return
    r = _read(str(path), common.stamp(path, "result.json"))
    m = r.meta
    st.caption(f"A: `{Path(r.sae_a).name}` ({r.d_sae_a} latents, {m.get('hook_a')}) — B: `{Path(r.sae_b).name}` "
               f"({r.d_sae_b} latents, {m.get('hook_b')}); {r.n_rows} rows aligned by {r.align}; "
               f"{r.method} matching")
    c = st.columns(4)
    c[0].metric("matched pairs", f"{len(r.pair_a)}")
    c[1].metric(f"mutual at r >= {r.threshold:g}", f"{100 * r.fraction_mutual_above_threshold:.1f}%")
    c[2].metric("mean matched r", f"{m['matched_corr'].get('mean', float('nan')):.3f}")
    c[3].metric("split groups", f"{m.get('n_splits', 0)}")
    if r.scores:
        st.dataframe(pd.DataFrame([{"metric": k, "matched": v["score"], "baseline mean": v["baseline_mean"],
                                    "baseline std": v["baseline_std"], "p": v["p_value"]}
                                   for k, v in r.scores.items()]), hide_index=True, key="match_scores")
    for k in ("warning", "note"):
        if m.get(k):
            st.warning(m[k])
    figs = m.get("figures") or {}
    cols = st.columns(2)
    for col, name in zip(cols, ("histogram", "scores")):
        f = path / figs.get(name, "")
        if name in figs and f.exists():
            with col:
                components.html(f.read_text(), height=440)    # the step's own plotly HTML
    df = pd.DataFrame({"latent A": r.pair_a.numpy(), "latent B": r.pair_b.numpy(),
                       "r": r.pair_corr.numpy(), "mutual": r.pair_mutual.numpy()})
    if r.pair_cos is not None:
        df["decoder cos"] = r.pair_cos.numpy()
    df = df.sort_values("r", ascending=False).reset_index(drop=True)
    st.subheader("Matched pairs")
    ev = st.dataframe(df, key="match_pairs", on_select="rerun", selection_mode="single-row", height=300)
    rows = list(getattr(getattr(ev, "selection", None), "rows", []) or [])
    i = rows[0] if rows else 0
    pa, pb = int(df.loc[i, "latent A"]), int(df.loc[i, "latent B"])
    st.markdown(f"**A latent {pa} <-> B latent {pb}** (r = {df.loc[i, 'r']:.3f}); select a row to change")
    fa, fb = _features_for(ws, r.sae_a), _features_for(ws, r.sae_b)
    if fa is None or fb is None:
        st.info("Run the `features` step on " + " and ".join(
            f"`{Path(s).name}`" for s, f in ((r.sae_a, fa), (r.sae_b, fb)) if f is None) +
            " to see the two latents' dashboards here.")
        return
    from workbench.ui.pages import features as fpage
    left, right = st.columns(2)
    for col, p, lat in ((left, fa, pa), (right, fb, pb)):
        with col:
            fpage.dashboard(p, common.stamp(p, "result.json"), fpage.features_of(p), lat)


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
