"""Features page: the latents of an SAE (searchable, sortable table), a dashboard per latent
(top examples with per-token highlighting, activation-range samples, histogram, logit table,
neighbours, neuron alignment), and a text box showing which latents fire on each token.
Everything comes from a "features" result through `workbench.steps.features.load_features` and
`latent_activations_for_text`. Under the dashboard, "What it does": steer with the latent (two
generations and the probability shifts, `workbench.steer`) and its measured effect on the next-token
predictions when zero-ablated at its top examples (`workbench.interventions.ablate_examples`), on a
button press, cached."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.ui import common, steering

SORTS = {
    "latent": ("latent", True),
    "density (high first)": ("density", False),
    "density (low first)": ("density", True),
    "max activation": ("max", False),
    "mean activation": ("mean", False),
}


# ------------------------------------------------------------------ cached reads
@st.cache_resource(show_spinner="Loading feature data…", max_entries=8)
def _features(path: str, key: int):
    from workbench.steps.features import load_features
    return load_features(path)


def features_of(path: Path):
    if not (path / "result.json").exists():
        raise WorkbenchError(f"{path} is not a complete result (no result.json); rerun the "
                             "`features` step that makes it")
    return _features(str(path), common.stamp(path, "result.json"))


@st.cache_data(show_spinner=False, max_entries=16)
def _table(path: str, key: int) -> pd.DataFrame:
    return _features(path, key).table()


@st.cache_data(show_spinner=False, max_entries=512)
def _latent(path: str, key: int, i: int) -> dict:
    return _features(path, key).latent(i)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def _model(spec: str):
    from workbench.models import load_model
    return load_model(spec, device="cpu")


@st.cache_data(show_spinner="Encoding the text…", max_entries=64)
def _text_acts(sae_path: str, text: str, model_spec: str | None, hook: str | None):
    from workbench.steps.features import latent_activations_for_text
    model = _model(model_spec) if model_spec else None
    tokens, acts = latent_activations_for_text(sae_path, text, model=model, hook=hook)
    return list(tokens), acts.float().cpu().numpy()


# ------------------------------------------------------------------ renderers
def example_html(ex: dict, vmax: float) -> str:
    acts = [0.0 if a is None else float(a) for a in ex.get("acts", [])]
    toks = list(ex.get("tokens", []))
    body = common.highlight_html(toks, acts, vmax=vmax, focus=ex.get("center"))
    where = f"seq {ex.get('seq')} · pos {ex.get('pos')} · doc {ex.get('doc')}"
    return (f'<div style="display:flex;gap:0.8em;align-items:baseline;margin:2px 0;">'
            f'<code style="min-width:5.5em;text-align:right;">{float(ex.get("value", 0)):.3f}</code>'
            f'<div style="flex:1">{body}</div>'
            f'<span style="color:#888;font-size:0.7rem;white-space:nowrap">{html.escape(where)}</span>'
            f"</div>")


def examples_block(examples: list[dict], vmax: float) -> str:
    if not examples:
        return "<p><em>no examples</em></p>"
    return "".join(example_html(e, vmax) for e in examples)


def hist_figure(h: dict, title: str, xlabel: str, color: str = "#f58518") -> go.Figure:
    edges = list(h.get("edges") or [])
    counts = list(h.get("counts") or [])
    centers = [(edges[k] + edges[k + 1]) / 2 for k in range(len(counts))]
    widths = [edges[k + 1] - edges[k] for k in range(len(counts))]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker_color=color, name="count",
                           hovertemplate="%{x:.3g}: %{y}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="count", height=260,
                      margin=dict(l=10, r=10, t=40, b=10), bargap=0)
    return fig


def _pick_neighbour() -> None:
    """Callback of the neighbour pills: open that latent, clear the pick."""
    i = st.session_state.get("feat_nb_pick")
    if i is not None:
        st.session_state["feat_latent"] = int(i)
        st.session_state["feat_nb_pick"] = None


def dashboard(path: Path, key: int, fd, i: int) -> None:
    d = _latent(str(path), key, int(i))
    st.subheader(f"Latent {d['latent']}")
    c = st.columns(5)
    c[0].metric("density", f"{d['density']:.3g}")
    c[1].metric("log10 density", f"{d['log10_density']:.2f}")
    c[2].metric("firings", f"{d['count']:,}")
    c[3].metric("max activation", f"{d['max']:.3g}")
    c[4].metric("mean (when firing)", f"{d['mean']:.3g}")
    if d["count"] == 0:
        st.warning("This latent never fired on the tokens the dashboard was built from (dead).")
    if d["log10_density"] < -6 and d["count"] > 0:
        st.caption("Very rare latent (log10 density below -6; Neuronpedia would skip it).")

    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Top activating examples**")
        st.html(examples_block(d.get("top_examples") or [], d["max"]))
        buckets = [b for b in (d.get("buckets") or []) if b.get("examples")]
        if buckets:
            st.markdown("**Examples by activation range**")
            for b in reversed(buckets):
                with st.expander(f"{b['lo']:.3g} – {b['hi']:.3g}  ({b['count']:,} firings)"):
                    st.html(examples_block(b["examples"], d["max"]))
    with right:
        h = d.get("histogram") or {}
        if h.get("counts"):
            st.plotly_chart(hist_figure(h, "Activation histogram (firing tokens)", "activation"),
                            key="feat_hist", width="stretch")
        lg = d.get("logits")
        if lg:
            st.markdown("**Logit effect** (W_dec · W_U, final-norm gain folded in)")
            a, b = st.columns(2)
            a.dataframe(pd.DataFrame([{"token": common.show_token(t["token"]), "logit": t["value"]}
                                      for t in lg.get("top", [])]),
                        hide_index=True, width="stretch", key="feat_logit_top")
            b.dataframe(pd.DataFrame([{"token": common.show_token(t["token"]), "logit": t["value"]}
                                      for t in lg.get("bottom", [])]),
                        hide_index=True, width="stretch", key="feat_logit_bottom")
            if (lg.get("histogram") or {}).get("counts"):
                st.plotly_chart(hist_figure(lg["histogram"], "Logit histogram (whole vocabulary)",
                                            "logit", color="#4c78a8"),
                                key="feat_logit_hist", width="stretch")
        elif not fd.has_logits:
            reason = fd.meta.get("logits_reason") or "no unembedding"
            st.caption(f"No logit table: {reason}.")
        nb = d.get("neighbours") or []
        if nb:
            st.markdown("**Nearest latents** (decoder cosine)")
            st.dataframe(pd.DataFrame(nb), hide_index=True, width="stretch", key="feat_neigh")
            st.pills("Open a neighbour", [n["latent"] for n in nb[:8]], key="feat_nb_pick",
                     on_change=_pick_neighbour)
        nr = d.get("neurons") or []
        if nr:
            st.markdown("**Neuron alignment** (largest |W_dec| entries)")
            st.dataframe(pd.DataFrame(nr), hide_index=True, width="stretch", key="feat_neurons")


# ------------------------------------------------------------------ what it does (interventions)
def _artefact(fd, field: str, what: str) -> Path:
    p = common.resolve_path(common.open_workspace_quiet(), fd.meta.get(field))
    if p is None or not Path(p).exists():
        raise WorkbenchError(f"the {what} this result was made from ({fd.meta.get(field)}) is not there "
                             f"any more; steering and ablation need it")
    return Path(p)


@st.cache_data(show_spinner="Ablating the latent at its top examples…", max_entries=64)
def _ablation(path: str, key: int, sae_path: str, store_path: str, spec: str, hook: str, latent: int):
    from workbench.interventions import ablate_examples
    examples = _latent(path, key, latent)["top_examples"]
    df = ablate_examples(sae_path, latent, store_path, examples, model=steering.model(spec), hook=hook)
    return df, dict(df.attrs)


def _token_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"token": common.show_token(r["token"]), "Δ log p": r["value"]} for r in rows])


def what_it_does(path: Path, key: int, fd, latent: int) -> None:
    d = _latent(str(path), key, latent)
    sae_path = _artefact(fd, "sae", "SAE")
    spec, hook = str(fd.meta.get("model")), str(fd.meta.get("hook"))
    st.markdown("#### What it does")
    ws = common.open_workspace_quiet()
    in_ws = ws is not None and (ws.saes / sae_path.name).resolve() == sae_path.resolve()
    sae_q = f"&sae={sae_path.name}" if in_ws else ""
    st.markdown(f'<a href="interventions?latent={latent}{sae_q}" target="_self">Open latent {latent} on the '
                f"Interventions page</a> (attribution on your own text, several latents, PCA directions)",
                unsafe_allow_html=True)
    steer_tab, ablate_tab = st.tabs(["Steer", "Ablate at its top examples"])
    with steer_tab:
        prompt = st.text_input("Prompt", "The weather today is", key="feat_st_prompt")
        c = st.columns(5)
        value = c[0].number_input("value", value=float(round(2 * d["max"], 3)) if d["max"] > 0 else 10.0,
                                  key="feat_st_value", help="clamp: the latent is set to this at every "
                                  "position; add: this is added to it (x + v W_dec[i])")
        mode = c[1].selectbox("mode", ["clamp", "add"], key="feat_st_mode")
        kw = {"latents": [latent], "values": [float(value)], "mode": mode}
        kw.update(steering.generation_inputs(c[2:], "feat_st"))
        if steering.pressed("Steer", "feat_st_go", (str(sae_path), spec, hook, prompt, kw)):
            with st.spinner("Generating with and without the intervention…"):
                df, attrs = steering.steer(sae_path, spec, hook, prompt=prompt, **kw)
            steering.show_steering(prompt, df, attrs)
    with ablate_tab:
        if not d.get("top_examples"):
            st.info("No top examples (the latent never fired): nothing to ablate.", icon=":material/info:")
            return
        st.caption(f"Zero-ablates latent {latent} at the centre token of each of its "
                   f"{len(d['top_examples'])} top examples (SAE spliced with its error term, so only this "
                   "latent changes) and compares the next-token predictions. Δ loss > 0: the latent helps "
                   "predict the actual next token; Δ log p > 0: the latent raises that token.")
        store_path = _artefact(fd, "store", "store")
        if not steering.pressed("Measure by ablation", "feat_abl_go", (str(path), key, latent)):
            return
        df, attrs = _ablation(str(path), key, str(sae_path), str(store_path), spec, hook, latent)
        m = st.columns(3)
        m[0].metric("mean Δ loss (next token)", f"{attrs['mean_d_loss_next']:+.4g}")
        m[1].metric("mean Δ loss (all later tokens)", f"{attrs['mean_d_loss_after']:+.4g}")
        m[2].metric("mean KL(clean || ablated)", f"{attrs['mean_kl']:.4g}")
        a, b = st.columns(2)
        a.markdown("**Promotes** (mean Δ log p at its top examples)")
        a.dataframe(_token_table(attrs["promotes"]), hide_index=True, width="stretch", key="feat_abl_up")
        b.markdown("**Suppresses**")
        b.dataframe(_token_table(attrs["suppresses"]), hide_index=True, width="stretch", key="feat_abl_down")
        st.dataframe(df.assign(token=df["token"].map(common.show_token),
                               next_token=df["next_token"].map(common.show_token)),
                     hide_index=True, width="stretch", key="feat_abl_table")


def text_probe(path: Path, fd, latent: int | None) -> None:
    st.subheader("Which latents fire on a text")
    meta = fd.meta
    text = st.text_area("Text", key="feat_text", height=90,
                        placeholder="Type a sentence and press Ctrl+Enter",
                        help=f"Runs {meta.get('model')} up to {meta.get('hook')} and encodes with "
                             "the SAE (the model loads on first use).")
    if not text or not text.strip():
        return
    sae_path = common.resolve_path(common.open_workspace_quiet(), meta.get("sae"))
    if sae_path is None or not Path(sae_path).exists():
        raise WorkbenchError(f"the SAE this result was made from ({meta.get('sae')}) is not "
                             "there any more; the text probe needs it")
    tokens, acts = _text_acts(str(sae_path), text, meta.get("model"), meta.get("hook"))
    if len(tokens) == 0:
        st.warning("The text has no tokens.")
        return
    n = acts.shape[1]
    if latent is not None and 0 <= latent < n:
        col = acts[:, latent]
        st.markdown(f"Latent **{latent}** on your text (max {col.max():.3g}):")
        st.html(common.highlight_html(tokens, col.tolist(),
                                      vmax=max(float(col.max()), 1e-9)))
    top_k = min(5, n)
    order = (-acts).argsort(axis=1)[:, :top_k]
    rows = []
    for t, tok in enumerate(tokens):
        fired = [(int(j), float(acts[t, j])) for j in order[t] if acts[t, j] > 0]
        rows.append({"#": t, "token": common.show_token(tok), "active latents": int((acts[t] > 0).sum()),
                     "top latents": ", ".join(f"{j} ({v:.2f})" for j, v in fired)})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="feat_text_table")


def body() -> None:
    st.title("Features")
    ws = common.open_workspace()
    if ws is None:
        return
    path = common.select_result(ws, "features", "Feature result", "feat_result",
                                "Build one with `workbench features SAE STORE --out ...` or on "
                                "the Run page (step `features`).")
    if path is None:
        return
    key = common.stamp(path, "result.json")
    fd = features_of(path)
    meta = fd.meta
    c = st.columns(5)
    c[0].metric("latents", f"{fd.d_sae:,}")
    c[1].metric("tokens", f"{fd.n_tokens:,}")
    c[2].metric("dead", f"{float(meta.get('dead_fraction', 0)):.1%}")
    c[3].metric("architecture", str(meta.get("architecture", "?")))
    l0 = meta.get("mean_l0", (meta.get("metrics") or {}).get("mean_l0"))
    c[4].metric("mean L0", f"{float(l0):.3g}" if l0 is not None else "–")
    st.caption(f"hook `{meta.get('hook')}` · SAE `{meta.get('sae')}` · store `{meta.get('store')}` · "
               f"model `{meta.get('model')}`")

    table = _table(str(path), key)
    with st.expander("Latent table", expanded=True):
        a, b, c2 = st.columns([3, 2, 1])
        q = a.text_input("Search", key="feat_search",
                         placeholder="a latent number, or text in its top tokens / logits")
        sort = b.selectbox("Sort by", list(SORTS), key="feat_sort")
        hide_dead = c2.checkbox("hide dead", value=True, key="feat_hide_dead")
        shown = table
        if hide_dead:
            shown = shown[shown["count"] > 0]
        if q:
            ql = q.strip().lower()
            mask = shown["top_tokens"].astype(str).str.lower().str.contains(ql, regex=False)
            if "top_logits" in shown:
                mask |= shown["top_logits"].astype(str).str.lower().str.contains(ql, regex=False)
            if ql.isdigit():
                mask |= shown["latent"] == int(ql)
            shown = shown[mask]
        col, asc = SORTS[sort]
        shown = shown.sort_values([col, "latent"], ascending=[asc, True], kind="stable")
        st.caption(f"{len(shown):,} of {len(table):,} latents")
        ev = st.dataframe(shown, hide_index=True, width="stretch", height=300, key="feat_table",
                          on_select="rerun", selection_mode="single-row",
                          column_config={"log10_density": st.column_config.NumberColumn(format="%.2f"),
                                         "density": st.column_config.NumberColumn(format="%.2e")})
        sel = getattr(getattr(ev, "selection", None), "rows", None) or []
        if sel:
            picked = int(shown.iloc[sel[0]]["latent"])
            if st.session_state.get("_feat_last_pick") != picked:
                st.session_state["_feat_last_pick"] = picked
                st.session_state["feat_latent"] = picked

    if "feat_latent" not in st.session_state:
        qp = st.query_params.get("latent")
        alive = table[table["count"] > 0]
        st.session_state["feat_latent"] = int(qp) if qp and qp.lstrip("-").isdigit() else (
            int(alive.sort_values("max", ascending=False)["latent"].iloc[0]) if len(alive) else 0)
    latent = st.number_input(f"Latent (0 – {fd.d_sae - 1})", step=1, key="feat_latent")
    latent = int(latent)
    if not 0 <= latent < fd.d_sae:
        st.error(f"Latent {latent} is out of range: this SAE has {fd.d_sae} latents "
                 f"(valid: 0 – {fd.d_sae - 1}).", icon=":material/error:")
        latent_ok = None
    else:
        common.guard(lambda: dashboard(path, key, fd, latent), f"latent {latent}")
        common.guard(lambda: what_it_does(path, key, fd, latent), f"what latent {latent} does")
        latent_ok = latent
    st.divider()
    common.guard(lambda: text_probe(path, fd, latent_ok), "text probe")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
