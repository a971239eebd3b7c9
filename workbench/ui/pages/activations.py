"""Activations page: the PCA of one hook of a store as a 2-D / 3-D scatter (coloured by token,
position, document or one SAE latent's activation; hovering shows the token in its context), the
scree plot and the geometry numbers, and steering along a chosen component (generations with and
without x + c u, `workbench.steer` with the result as its PCA direction). Reads "pca" results and the
store they were fitted on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.ui import common, figures, readers, steering

COLOR_BY = ["token", "position", "document", "feature activation"]
N_TOKEN_COLOURS = 10
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#393b79"]
CONTEXT_BEFORE, CONTEXT_AFTER = 6, 3
VIEWS = ["Scatter", "Scree & geometry", "Steer"]


@st.cache_data(show_spinner="Reading the store…", max_entries=16)
def point_table(pca_path: str, key: int, store_path: str, store_key: int, max_points: int) -> pd.DataFrame:
    """One row per plotted point: PC coordinates, store row, sequence, position, document, token
    and its context (decoded)."""
    coords, rows = readers.pca_projection(pca_path)
    n = coords.shape[0]
    if n > max_points:   # an even, deterministic thinning for the browser
        keep = np.linspace(0, n - 1, max_points).round().astype(np.int64)
        coords, rows = coords[keep], rows[keep]
    store = common.open_store(store_path)
    if rows.size and int(rows.max()) >= store.n_rows:
        raise WorkbenchError(f"{pca_path} refers to store row {int(rows.max())} but {store_path} has "
                             f"only {store.n_rows} rows; was the store recollected? rerun the pca step")
    rinfo = store.rows()
    seqs = store.sequences()
    seq = rinfo["seq_index"].numpy()[rows]
    pos = rinfo["position"].numpy()[rows]
    tok_ids = seqs["token_ids"].numpy()
    mask = seqs["attention_mask"].numpy()
    docs = seqs["doc_ids"].numpy()[seq]
    tt = common.token_text(store.model_name)
    tokens, contexts = [], []
    L = tok_ids.shape[1]
    for s, p in zip(seq.tolist(), pos.tolist()):
        tokens.append(tt(tok_ids[s, p]))
        lo, hi = max(0, p - CONTEXT_BEFORE), min(L, p + CONTEXT_AFTER + 1)
        parts = []
        for q in range(lo, hi):
            if not mask[s, q]:
                continue
            t = common.show_token(tt(tok_ids[s, q]))
            parts.append(f"<b>[{t}]</b>" if q == p else t)
        contexts.append(("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < L else ""))
    df = pd.DataFrame({"row": rows, "seq": seq, "position": pos, "document": docs,
                       "token": [common.show_token(t) for t in tokens], "context": contexts})
    for j in range(coords.shape[1]):
        df[f"PC{j + 1}"] = coords[:, j]
    return df


@st.cache_data(show_spinner="Projecting rows on more components…", max_entries=16)
def more_components(pca_path: str, key: int, store_path: str, hook: str, rows: tuple,
                    comps: tuple) -> np.ndarray:
    """Coordinates of `rows` on components `comps` (1-based), from the PCA model the step saved
    (the result itself stores only PC1 and PC2 of its sample)."""
    import torch
    model = readers.pca_model(pca_path)
    store = common.open_store(store_path)
    idx = torch.as_tensor(rows, dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    x = store.read(hook, lo, hi)[idx - lo]
    z = model.transform(x)
    z = z.detach().cpu().numpy() if hasattr(z, "detach") else np.asarray(z)
    return z[:, [c - 1 for c in comps]].astype(np.float32)


@st.cache_resource(show_spinner=False, max_entries=2)
def _sae(path: str, key: int):
    from analyses.sae import load_sae
    return load_sae(path, device="cpu")


@st.cache_data(show_spinner="Encoding rows with the SAE…", max_entries=16)
def feature_values(sae_path: str, sae_key: int, store_path: str, hook: str, rows: tuple,
                   latent: int) -> np.ndarray:
    """One latent's activation on the plotted rows (the features step's reader when it offers
    one; else the SAE's own encode)."""
    import torch
    store = common.open_store(store_path)
    sae = _sae(sae_path, sae_key)
    d_sae = int(sae.W_dec.shape[0])
    if not 0 <= latent < d_sae:
        raise WorkbenchError(f"latent {latent} is out of range (0 – {d_sae - 1})")
    idx = torch.as_tensor(rows, dtype=torch.long)
    order = torch.argsort(idx)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    x = store.read(hook, lo, hi)[idx[order] - lo]
    with torch.inference_mode():
        f = sae.encode(x.to(sae.W_enc.dtype))[:, latent].float()
    out = torch.empty_like(f)
    out[order] = f
    return out.numpy()


def scatter(df: pd.DataFrame, dims: list[str], color: str, values: np.ndarray | None,
            title: str) -> go.Figure:
    hover = ("%{customdata[0]}<br>row %{customdata[1]} · seq %{customdata[2]} · pos %{customdata[3]} · "
             "doc %{customdata[4]}<extra></extra>")
    custom = df[["context", "row", "seq", "position", "document"]].to_numpy()
    three = len(dims) == 3
    Trace = go.Scatter3d if three else go.Scattergl
    msize = 3 if three else 6

    def xyz(sel):
        d = {"x": df.loc[sel, dims[0]].to_numpy(), "y": df.loc[sel, dims[1]].to_numpy()}
        if three:
            d["z"] = df.loc[sel, dims[2]].to_numpy()
        return d

    fig = go.Figure()
    if color in ("token", "document"):
        col = df["token"] if color == "token" else df["document"].astype(str)
        common_vals = [v for v, _ in Counter(col).most_common(N_TOKEN_COLOURS)]
        for k, v in enumerate(common_vals + [None]):
            sel = (col == v) if v is not None else ~col.isin(common_vals)
            if not sel.any():
                continue
            if v is None:
                name = "(other)"
            else:
                name = repr(v) if color == "token" else f"doc {v}"
            fig.add_trace(Trace(**xyz(sel), mode="markers", name=name,
                                marker=dict(size=msize, opacity=0.8 if v is not None else 0.5,
                                            color=PALETTE[k % len(PALETTE)] if v is not None
                                            else "#bbbbbb"),
                                customdata=custom[sel.to_numpy()], hovertemplate=hover))
    else:
        c = df["position"].to_numpy() if color == "position" else values
        fig.add_trace(Trace(**xyz(slice(None)), mode="markers", name=color,
                            marker=dict(size=msize, color=c, colorscale="Viridis" if color ==
                                        "position" else "Oranges", showscale=True, opacity=0.85,
                                        colorbar=dict(title=color.split()[0])),
                            customdata=custom, hovertemplate=hover))
    fig.update_layout(title=title, height=560, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(itemsizing="constant"))
    if not three:
        fig.update_layout(xaxis_title=dims[0], yaxis_title=dims[1])
    else:
        fig.update_layout(scene=dict(xaxis_title=dims[0], yaxis_title=dims[1], zaxis_title=dims[2]))
    return fig


def _matching_features(ws, store: str | None, hook: str | None) -> list[Path]:
    out = []
    for p in ws.list_results("features"):
        try:
            m = common.read_result_checked(p, "features")
        except Exception:  # noqa: BLE001
            continue
        same_store = store is None or Path(str(m.get("store", ""))).name == Path(store).name
        if m.get("hook") == hook and same_store:
            out.append(p)
    return out


def body() -> None:
    st.title("Activations")
    ws = common.open_workspace()
    if ws is None:
        return
    path = common.select_result(ws, "pca", "PCA result", "act_result",
                                "Fit one with `workbench pca STORE --hook H --k K --out ...` or "
                                "on the Run page (step `pca`).")
    if path is None:
        return
    r = readers.pca(path)
    store_path = common.resolve_path(ws, r.store)
    st.caption(f"hook `{r.hook}` · store `{r.store}` · k = {r.k} · method {r.method}")
    massive = r.massive_rows
    if r.rows_dropped:
        st.caption(f"{r.rows_dropped} rows with norms over {r.max_norm_ratio:g}x the median "
                   "left out (attention sinks / massive activations)")
    elif massive.get("sq_norm_share", 0) > 0.5:
        st.warning(f"{massive['rows']} rows ({100 * massive['row_fraction']:.2f}%) with norms over "
                   f"{massive['ratio']:g}x the median carry {100 * massive['sq_norm_share']:.0f}% of the squared "
                   f"norm, so the first components mostly describe them. Refit with max_norm_ratio = "
                   f"{massive['ratio']:g} to leave them out.")

    rogue = r.rogue_dims
    if rogue.get("top1_share", 0) > 0.25:
        st.caption(f"dimension(s) {rogue.get('dims')} hold {100 * rogue['top1_share']:.0f}% (top 1) of the "
                   "variance: 'rogue dimensions', so the first components are mostly those coordinates")
    # one view at a time: only the chart on screen is sent to the browser
    view = st.segmented_control("View", VIEWS, default="Scatter",
                                key="act_view", label_visibility="collapsed") or "Scatter"
    if view == "Scatter":
        common.guard(lambda: scatter_panel(ws, r, store_path), "scatter")
    elif view == "Steer":
        common.guard(lambda: steer_panel(r), "steering")
    else:
        common.guard(lambda: scree_panel(r), "scree")


def steer_panel(r) -> None:
    """Generate with and without moving the hook's activation along one principal component
    (add: x + c u; clamp: (x - mean) . u set to c), at every position of the prompt and the continuation."""
    if not r.model:
        raise WorkbenchError(f"{r.path.name} does not name the model it was fitted on; rerun the pca step")
    st.caption(f"Steers `{r.model}` at `{r.hook}` along a component of this PCA (unit direction u): "
               "add moves every position by c u, clamp sets its coordinate (x - mean) · u to c.")
    prompt = st.text_input("Prompt", "The weather today is", key="act_st_prompt")
    c = st.columns(6)
    pc = c[0].selectbox("Component", [f"PC{i + 1}" for i in range(r.k)], key="act_st_pc")
    j = int(pc[2:]) - 1
    ev = r.tensors.get("explained_variance")
    sd = float(ev[j].clamp_min(0).sqrt()) if ev is not None and j < ev.numel() else 1.0
    coef = c[1].number_input("coefficient", value=float(round(4 * sd, 3)) or 1.0, key="act_st_coef",
                             help=f"this component's standard deviation is {sd:.4g}")
    mode = c[2].selectbox("mode", ["add", "clamp"], key="act_st_mode")
    kw = {"pca": str(r.path), "components": [j], "coefs": [float(coef)], "pca_mode": mode}
    kw.update(steering.generation_inputs(c[3:], "act_st"))
    if not steering.pressed("Steer", "act_st_go", (str(r.path), prompt, kw)):
        return
    with st.spinner("Generating with and without the intervention…"):
        df, attrs = steering.steer(None, str(r.model), r.hook, prompt=prompt, **kw)
    steering.show_steering(prompt, df, attrs, title=f"{pc} {mode} {float(coef):g}")


def scree_panel(r) -> None:
    ratios, cum = r.explained_variance_ratio, r.cumulative_variance_ratio
    geo = readers.pca_geometry(r)
    if geo:
        cols = st.columns(len(geo))
        for c, (k, v) in zip(cols, geo.items()):
            c.metric(readers.GEOMETRY_LABELS.get(k, k),
                     f"{v:.4g}" if isinstance(v, float) else str(v))
    st.plotly_chart(figures.scree(ratios, f"Scree: {r.hook}", cumulative=cum),
                    key="act_scree", width="stretch")
    st.dataframe(pd.DataFrame({"component": np.arange(1, len(ratios) + 1),
                               "explained_variance_ratio": ratios, "cumulative": cum}),
                 hide_index=True, height=220, key="act_scree_table")


def scatter_panel(ws, r, store_path: Path | None) -> None:
    path, hook = r.path, r.hook
    if store_path is None or not Path(store_path).exists():
        raise WorkbenchError(f"the store this PCA was fitted on ({r.store}) is not "
                             "there any more; the scatter needs its tokens")
    c1, c2, c3, c4 = st.columns([1, 1, 2, 2])
    dim = c1.radio("Dimensions", ["2-D", "3-D"], horizontal=True, key="act_dim")
    max_points = c2.selectbox("Points", [500, 1000, 2000, 5000], index=2, key="act_points",
                              help="at most the rows the pca step sampled (its --sample)")
    color = c3.selectbox("Colour by", COLOR_BY, key="act_color")
    df = point_table(str(path), common.stamp(path, "result.json"), str(store_path),
                     common.stamp(store_path, "manifest.json"), int(max_points))
    pcs = [f"PC{i + 1}" for i in range(r.k)]
    want = 3 if dim == "3-D" else 2
    if len(pcs) < want:
        st.warning(f"this result has only {len(pcs)} component(s); showing {len(pcs)}-D")
        want = len(pcs)
    dims = c4.multiselect("Components", pcs, default=pcs[:want], max_selections=want,
                          key=f"act_pcs_{want}")
    if len(dims) != want:
        st.info(f"Pick {want} components.")
        return
    missing = [c for c in dims if c not in df.columns]
    if missing:
        extra = more_components(str(path), common.stamp(path, "result.json"), str(store_path), hook,
                                tuple(int(r) for r in df["row"]),
                                tuple(int(c[2:]) for c in missing))
        df = df.copy()
        for j, c in enumerate(missing):
            df[c] = extra[:, j]
    values = None
    if color == "feature activation":
        feats = _matching_features(ws, r.store, hook)
        if not feats:
            st.info(f"No features result for hook `{hook}` of this store; make one on the Run page "
                    "(step `features`). Colouring by position instead.")
            color = "position"
        else:
            a, b = st.columns([2, 1])
            fpath = ws.results / a.selectbox("Features result", [p.name for p in feats],
                                             key="act_feat_result")
            from workbench.ui.pages.features import features_of
            fd = features_of(fpath)
            d_sae = fd.d_sae
            latent = int(b.number_input(f"Latent (0 – {d_sae - 1})", value=0, step=1,
                                        key="act_latent"))
            if not 0 <= latent < d_sae:
                st.error(f"Latent {latent} is out of range: the SAE has {d_sae} latents "
                         f"(valid: 0 – {d_sae - 1}).")
                return
            sae_path = common.resolve_path(ws, fd.meta.get("sae"))
            if sae_path is None or not Path(sae_path).exists():
                raise WorkbenchError(f"the SAE of {fpath.name} ({fd.meta.get('sae')}) is missing")
            values = feature_values(str(sae_path), common.stamp(sae_path, "cfg.json",
                                                                "sae_weights.safetensors"),
                                    str(store_path), hook, tuple(int(r) for r in df["row"]), latent)
            color = f"feature {latent} activation"
    title = f"PCA of {hook} ({len(df):,} tokens)"
    st.plotly_chart(scatter(df, dims, color, values, title), key="act_scatter", width="stretch")
    st.caption("Hover a point to see its token in context (the token in **[brackets]**).")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
