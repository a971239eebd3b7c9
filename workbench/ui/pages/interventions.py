"""Interventions page: type a text and see, per token, the SAE latents active there and their
attributed effect on the text's loss (linear estimate for all, exact zero-ablation for the top ones;
each latent links to its dashboard on the Features page); and a steering panel (prompt, latent or
principal component, value, mode) showing the generations with and without the intervention and the
next-token probability shifts. Everything is computed by workbench.interventions."""

from __future__ import annotations

import html
from pathlib import Path

import streamlit as st

from workbench.errors import WorkbenchError
from workbench.ui import common, steering


def _sae_info(path: Path) -> tuple[object, str, str]:
    return steering.sae_info(path)


@st.cache_data(show_spinner="Attributing…", max_entries=32)
def _attribute(sae_path: str, key: int, spec: str, hook: str, text: str, n_exact: int):
    from workbench.interventions import attribute
    sae, _, _ = _sae_info(Path(sae_path))
    df = attribute(text, sae=sae, model=steering.model(spec), hook=hook or None, n_exact=n_exact)
    return df, dict(df.attrs)


def text_panel(sae_path: Path, spec: str, hook: str) -> None:
    st.subheader("What the latents do on a text")
    text = st.text_area("Text", "The capital of France is Paris, and the capital of Italy is Rome.",
                        key="iv_text")
    a, b = st.columns(2)
    n_exact = a.number_input("exact ablations (largest estimates)", 0, 256, 16, key="iv_nexact")
    n_show = b.number_input("latents per token", 1, 20, 4, key="iv_nshow")
    if not text.strip():
        return
    df, attrs = _attribute(str(sae_path), common.stamp(sae_path, "cfg.json"), spec, hook, text,
                            int(n_exact))
    ag = attrs["agreement"]
    st.caption(f"metric: summed next-token loss of the text = {attrs['metric_value']:.3f} nats · effect of "
               f"zero-ablating each latent at its token (SAE spliced with its error term); linear "
               f"estimate for all {len(df):,} active, exact for {ag.get('n', 0)}"
               + (f" · agreement: Pearson {ag['pearson']:.3f}, sign {ag['sign_agreement']:.0%}"
                  if ag.get("n", 0) > 1 else ""))
    lines = []
    for p, tok in enumerate(attrs["tokens"]):
        g = df[df["position"] == p].head(int(n_show))
        cells = []
        for r in g.itertuples():
            exact = "" if r.exact != r.exact else f" / exact {r.exact:+.3f}"
            color = "#c62828" if r.attribution > 0 else "#2e7d32"
            cells.append(f'<a href="features?latent={int(r.latent)}" target="_self">#{int(r.latent)}</a> '
                         f'<span style="color:{color}">{r.attribution:+.3f}</span>{exact}')
        lines.append(f"<tr><td><code>{html.escape(common.show_token(tok))}</code></td>"
                     f"<td>{' · '.join(cells) or '<span style=color:#888>–</span>'}</td></tr>")
    st.markdown("<table><tr><th>token</th><th>latent: effect on the loss when ablated (+ = the latent "
                "lowers the loss)</th></tr>" + "".join(lines) + "</table>", unsafe_allow_html=True)
    with st.expander("Full table"):
        st.dataframe(df, hide_index=True, width="stretch")


def steer_panel(ws, sae_path: Path | None, spec: str, hook: str, d_sae: int | None) -> None:
    st.subheader("Steer")
    prompt = st.text_input("Prompt", "The weather today is", key="iv_prompt")
    kinds = (["SAE latent"] if sae_path else []) + ["principal component"]
    kind = st.radio("Direction", kinds, horizontal=True, key="iv_kind")
    c = st.columns(5)
    kw: dict = {}
    if kind == "SAE latent":
        qp = st.query_params.get("latent")          # the dashboard links here with ?latent=N&sae=NAME
        if "iv_latent" not in st.session_state and qp and qp.isdigit() and int(qp) < d_sae:
            st.session_state["iv_latent"] = int(qp)
        latent = c[0].number_input(f"latent (0 – {d_sae - 1})", 0, d_sae - 1, 0, key="iv_latent")
        kw.update(latents=[int(latent)], values=[c[1].number_input("value", value=20.0, key="iv_value")],
                  mode=c[2].selectbox("mode", ["clamp", "add"], key="iv_mode"))
    else:
        pcas = [p for p in ws.list_results("pca")]
        if not pcas:
            st.info("No `pca` results in this workspace: run `workbench pca ...` first.", icon=":material/info:")
            return
        pca = c[0].selectbox("PCA result", [p.name for p in pcas], key="iv_pca")
        kw.update(pca=str(ws.results / pca), components=[int(c[1].number_input("component", 0, 10_000, 0,
                                                                                key="iv_comp"))],
                  coefs=[c[2].number_input("coefficient", value=20.0, key="iv_coef")],
                  pca_mode=c[2].selectbox("mode", ["add", "clamp"], key="iv_pmode"))
        sae_path = None
    kw.update(steering.generation_inputs([c[3], c[4], c[4]], "iv"))
    if not steering.pressed("Generate", "iv_go", (prompt, sae_path, spec, hook, kw)):
        return
    with st.spinner("Generating with and without the intervention…"):
        df, attrs = steering.steer(sae_path, spec, hook, prompt=prompt, **kw)
    steering.show_steering(prompt, df, attrs)


def body() -> None:
    st.title("Interventions")
    ws = common.open_workspace()
    if ws is None:
        return
    saes = ws.list_saes()
    sae_path = None
    qp_sae = st.query_params.get("sae")
    if saes:
        names = [p.name for p in saes]
        if "iv_sae" not in st.session_state and qp_sae in names:
            st.session_state["iv_sae"] = qp_sae
        name = st.selectbox("SAE", names, key="iv_sae")
        sae_path = ws.saes / name
    sae, model_name, hook = _sae_info(sae_path) if sae_path else (None, "", "")
    a, b = st.columns(2)
    spec = a.text_input("Model", model_name or "smollm2-135m", key="iv_model",
                        help="default: the model the SAE was trained on (its cfg metadata)")
    hook = b.text_input("Hook", hook, key="iv_hook", help="default: the SAE's hook")
    if not spec or not hook:
        raise WorkbenchError("give a model and a hook (the SAE's metadata names neither)")
    text_tab, steer_tab = st.tabs(["Text", "Steer"])
    with text_tab:
        if sae_path is None:
            st.info("No SAE in this workspace: train one with `workbench train-sae ...`.", icon=":material/info:")
        else:
            common.guard(lambda: text_panel(sae_path, spec, hook), "attribution")
    with steer_tab:
        d_sae = int(sae.W_dec.shape[0]) if sae is not None else None
        common.guard(lambda: steer_panel(ws, sae_path, spec, hook, d_sae), "steering")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
