"""Export page: an SAE as a zip in SAELens / sparsify / Neuronpedia layout (made by the
`export_sae` step), the figures of every result as HTML (PNG too when kaleido is installed and
finds a browser), and tables as CSV."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from workbench.ui import common, figures, readers

FORMATS = ["saelens", "sparsify", "neuronpedia"]


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    folder = Path(folder)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                z.write(p, Path(folder.name) / p.relative_to(folder))
    return buf.getvalue()


@st.cache_data(show_spinner=False, max_entries=16)
def _zip_cached(folder: str, key: int) -> bytes:
    return zip_folder(Path(folder))


def export_sae(ws, sae: Path, fmt: str) -> Path:
    """Run export_sae into WS/exports/NAME-FORMAT (the step's output folder, as from the CLI or a
    sweep; reused when already there and newer than the SAE) and return the folder."""
    from workbench.steps import STEPS, field_for, output_dir, run_step
    cls = STEPS["export_sae"].config_cls
    sae_f, out_f = field_for(cls, "sae"), field_for(cls, "out")
    newer = common.stamp(sae, "cfg.json", "sae_weights.safetensors")
    # an export this workspace already made (e.g. by `workbench demo`), newer than the SAE
    for run in ws.runs(step="export_sae", status="done"):
        cfg = run.config or {}
        if cfg.get("format") != fmt or not cfg.get(sae_f):
            continue
        if ws.abs(str(cfg[sae_f])).resolve() != sae.resolve():
            continue
        for art in run.artifacts.values():
            folder = ws.abs(art)
            if folder.is_dir() and any(folder.iterdir()) and folder.stat().st_mtime_ns >= newer:
                return folder
    dest = ws.root / output_dir("export_sae") / f"{sae.name}-{fmt}"
    if dest.exists() and any(dest.iterdir()) and dest.stat().st_mtime_ns >= newer:
        return dest
    res = run_step("export_sae", {sae_f: str(sae), "format": fmt, out_f: str(dest), "overwrite": True},
                   workspace=ws)
    out = res.artifacts.get("export") or next(iter(res.artifacts.values()), str(dest))
    return Path(out) if Path(out).exists() else dest


def sae_section(ws) -> None:
    st.subheader("SAEs")
    saes = ws.list_saes()
    if not saes:
        st.info("No SAEs in this workspace yet (train one on the Run page: `train_sae`).")
        return
    a, b = st.columns([3, 2])
    name = a.selectbox("SAE", [p.name for p in saes], key="exp_sae")
    fmt = b.selectbox("Format", FORMATS, key="exp_fmt",
                      help="saelens: cfg.json + sae_weights.safetensors (SAELens 6.x "
                           "SAE.load_from_disk); sparsify: <hook>/cfg.json + sae.safetensors; "
                           "neuronpedia: the layout Neuronpedia uploads expect")
    sae = ws.saes / name
    if st.button("Prepare download", key="exp_prepare"):
        with st.spinner(f"Exporting {name} as {fmt}…"):
            try:
                folder = export_sae(ws, sae, fmt)
                st.session_state["exp_ready"] = (name, fmt, str(folder))
            except Exception as e:  # noqa: BLE001
                common.show_error(e, f"export of {name} as {fmt}")
    ready = st.session_state.get("exp_ready")
    if ready and ready[0] == name and ready[1] == fmt and Path(ready[2]).exists():
        folder = Path(ready[2])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        key = common.stamp(folder, "cfg.json") + len(files)
        st.download_button(f"Download {name}-{fmt}.zip ({common.human_size(common.folder_size(folder))}"
                           " before compression)", lambda: _zip_cached(str(folder), key),
                           file_name=f"{name}-{fmt}.zip", mime="application/zip", key="exp_dl_sae",
                           type="primary")
        st.caption("contents: " + ", ".join(files[:20]))


def _figure_sources(ws) -> list[tuple[str, Any]]:
    """(label, source): a figure file a step saved, or a builder of a figure the UI draws."""
    out: list[tuple[str, Any]] = []
    for p in ws.list_results():
        try:
            meta = common.read_result_checked(p)
        except Exception:  # noqa: BLE001 - listed on the Workspace page
            continue
        for fname, file in (meta.get("figures") or {}).items():
            f = p / file
            if f.exists():
                out.append((f"{p.name} · {fname} (saved by the {meta.get('kind')} step)", f))
        if meta.get("kind") == "pca":
            def build(p=p):
                r = readers.pca(p)
                return figures.scree(r.explained_variance_ratio, f"Scree: {p.name}",
                                     cumulative=r.cumulative_variance_ratio)
            out.append((f"{p.name} · scree (UI)", build))
        if meta.get("kind") == "compare":
            def build(p=p):
                r = readers.compare(p)
                return figures.heatmap(r.matrix.numpy(), r.hooks_b, r.hooks_a,
                                       f"{p.name}: {r.metric}", metric=r.metric, clickable=False)
            out.append((f"{p.name} · heatmap (UI)", build))
        if meta.get("kind") == "features":
            def build(p=p):
                from workbench.ui.pages.features import _table
                t = _table(str(p), common.stamp(p, "result.json"))
                return figures.density_histogram(t.loc[t["count"] > 0, "log10_density"],
                                                  f"Latent density: {p.name}")
            out.append((f"{p.name} · density (UI)", build))
    return out


def figure_section(ws) -> None:
    st.subheader("Figures")
    srcs = _figure_sources(ws)
    if not srcs:
        st.caption("No figures yet.")
        return
    labels = [s[0] for s in srcs]
    label = st.selectbox("Figure", labels, key="exp_fig")
    src = dict(srcs)[label]
    stem = label.split(" (")[0].replace(" · ", "-").replace(" ", "_")
    c1, c2, c3 = st.columns([1, 1, 3])
    if isinstance(src, Path):
        c1.download_button("HTML", src.read_bytes, file_name=f"{stem}.html", mime="text/html",
                           key="exp_fig_html")
        c3.caption("PNG: open the HTML and use the camera icon of the plot, or pick the (UI) "
                   "version of this figure.")
        return
    fig = src()
    c1.download_button("HTML", lambda: common.fig_html(fig), file_name=f"{stem}.html",
                       mime="text/html", key="exp_fig_html")
    if figures.png_available():
        c2.download_button("PNG", lambda: figures.png_bytes(fig) or b"", file_name=f"{stem}.png",
                           mime="image/png", key="exp_fig_png")
    else:
        c3.caption("PNG export needs kaleido (`pip install kaleido`, which uses the installed "
                   "Chromium); HTML always works.")
    st.plotly_chart(fig, key="exp_fig_preview", width="stretch")


def _table_sources(ws) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if ws.runs():
        def runs():
            return pd.DataFrame([{"id": r.id, "step": r.step, "status": r.status,
                                  "started": r.started, "seconds": r.seconds,
                                  **{f"metric.{k}": v for k, v in r.metrics.items()},
                                  "config": json.dumps(r.config, default=str), "error": r.error}
                                 for r in ws.runs()])
        out.append(("runs (workspace index)", runs))
    for p in ws.list_results("features"):
        def latents(p=p):
            from workbench.ui.pages.features import _table
            return _table(str(p), common.stamp(p, "result.json"))
        out.append((f"{p.name} · latents", latents))
    for p in ws.list_results("compare"):
        def matrix(p=p):
            r = readers.compare(p)
            return pd.DataFrame(r.matrix.numpy(), index=r.hooks_a, columns=r.hooks_b)
        out.append((f"{p.name} · matrix", matrix))
    for p in ws.list_results("pca"):
        def spectrum(p=p):
            r = readers.pca(p)
            ratios = r.explained_variance_ratio
            return pd.DataFrame({"component": range(1, len(ratios) + 1),
                                 "explained_variance_ratio": ratios, "cumulative": r.cumulative_variance_ratio})
        out.append((f"{p.name} · spectrum", spectrum))
    return out


def table_section(ws) -> None:
    st.subheader("Tables (CSV)")
    srcs = _table_sources(ws)
    if not srcs:
        st.caption("No tables yet.")
        return
    label = st.selectbox("Table", [s[0] for s in srcs], key="exp_table")
    df = dict(srcs)[label]()
    stem = label.split(" (")[0].replace(" · ", "-").replace(" ", "_")
    st.download_button("CSV", lambda: df.to_csv(index=not isinstance(df.index, pd.RangeIndex)).encode(),
                       file_name=f"{stem}.csv", mime="text/csv", key="exp_csv")
    st.caption(f"{len(df):,} rows × {len(df.columns)} columns")
    st.dataframe(df.head(500), width="stretch", height=260, key="exp_table_preview")


def body() -> None:
    st.title("Export")
    ws = common.open_workspace()
    if ws is None:
        return
    if common.is_empty(ws):
        common.empty_workspace_help(ws.root)
        return
    common.guard(lambda: sae_section(ws), "SAE export")
    st.divider()
    common.guard(lambda: figure_section(ws), "figures")
    st.divider()
    common.guard(lambda: table_section(ws), "tables")


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
