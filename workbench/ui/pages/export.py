"""Export page: an SAE as a zip in SAELens / sparsify / Neuronpedia layout (made by the
`export_sae` step), the figures of every result as HTML (PNG too when kaleido is installed and
finds a browser), and tables as CSV."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.ui import common, figures

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


def _export_fields() -> dict[str, str]:
    """Names of the export_sae config fields for (sae path, format, out, overwrite)."""
    from workbench.steps import STEPS
    cls = STEPS["export_sae"].config_cls
    names = [f.name for f in dataclasses.fields(cls)]
    pos = [f.name for f in dataclasses.fields(cls) if (f.metadata or {}).get("positional")]
    out = {"sae": next((n for n in ("sae", "path", "sae_path", "source") if n in names),
                       pos[0] if pos else names[0]),
           "format": next((n for n in ("format", "fmt", "to") if n in names), "format"),
           "out": "out" if "out" in names else ""}
    if "overwrite" in names:
        out["overwrite"] = "overwrite"
    return out


def export_sae(ws, sae: Path, fmt: str) -> Path:
    """Run export_sae into WS/exports/NAME-FORMAT (reused when already there and newer than the
    SAE) and return the folder."""
    from workbench.steps import STEPS, run_step
    if "export_sae" not in STEPS:
        if fmt == "saelens":
            return sae   # our native format is SAELens already
        raise WorkbenchError("the export_sae step is not available in this installation")
    dest = ws.root / "exports" / f"{sae.name}-{fmt}"
    if dest.exists() and any(dest.iterdir()) and \
            dest.stat().st_mtime_ns >= common.stamp(sae, "cfg.json", "sae_weights.safetensors"):
        return dest
    f = _export_fields()
    cfg = {f["sae"]: str(sae), f["format"]: fmt}
    if f.get("out"):
        cfg[f["out"]] = str(dest)
    if f.get("overwrite"):
        cfg[f["overwrite"]] = True
    res = run_step("export_sae", cfg, workspace=ws)
    out = res.artifacts.get("out") or res.artifacts.get(fmt) or next(iter(res.artifacts.values()),
                                                                     str(dest))
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
        data = _zip_cached(str(folder), common.stamp(folder, "cfg.json") + len(list(folder.rglob("*"))))
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        st.download_button(f"Download {name}-{fmt}.zip ({common.human_size(len(data))})", data,
                           file_name=f"{name}-{fmt}.zip", mime="application/zip", key="exp_dl_sae",
                           type="primary")
        st.caption("contents: " + ", ".join(files[:20]))


def figure_section(ws) -> None:
    st.subheader("Figures")
    rows = []
    for p in ws.list_results():
        try:
            meta = common.read_result_checked(p)
        except Exception:  # noqa: BLE001 - listed on the Workspace page
            continue
        for fname, file in (meta.get("figures") or {}).items():
            f = p / file
            if f.exists():
                rows.append((p.name, meta.get("kind"), fname, f))
    if not rows:
        st.caption("No figures saved by the steps yet.")
    for k, (res, kind, fname, f) in enumerate(rows):
        c1, c2 = st.columns([4, 1])
        c1.markdown(f"`{res}` · {kind} · **{fname}**")
        c2.download_button("HTML", f.read_bytes(), file_name=f"{res}-{fname}.html",
                           mime="text/html", key=f"exp_fig_{k}")
    # Figures drawn by the UI from stored numbers: HTML, and PNG when kaleido can render.
    built = []
    for p in ws.list_results("pca"):
        try:
            meta = common.read_result_checked(p, "pca")
            from workbench.ui.readers import pca_spectrum
            ratios, cum = pca_spectrum(p, meta)
            built.append((f"{p.name}-scree", figures.scree(ratios, f"Scree: {p.name}",
                                                           cumulative=cum)))
        except Exception:  # noqa: BLE001
            continue
    for p in ws.list_results("compare"):
        try:
            from workbench.ui.readers import compare_matrices
            for name, m in compare_matrices(p).items():
                built.append((f"{p.name}-{name}", figures.heatmap(
                    m["matrix"], m["x_labels"], m["y_labels"], f"{p.name}: {name}",
                    metric=m["metric"], clickable=False)))
        except Exception:  # noqa: BLE001
            continue
    if built:
        st.markdown("**Figures drawn by the UI**")
        png_ok = st.checkbox("also offer PNG (needs kaleido + a browser)", value=False,
                             key="exp_png")
        for k, (name, fig) in enumerate(built):
            c1, c2, c3 = st.columns([4, 1, 1])
            c1.markdown(f"**{name}**")
            c2.download_button("HTML", common.fig_html(fig), file_name=f"{name}.html",
                               mime="text/html", key=f"exp_bfig_{k}")
            if png_ok:
                png = figures.png_bytes(fig)
                if png is None:
                    c3.caption("PNG unavailable (pip install kaleido)")
                else:
                    c3.download_button("PNG", png, file_name=f"{name}.png", mime="image/png",
                                       key=f"exp_bpng_{k}")


def table_section(ws) -> None:
    st.subheader("Tables (CSV)")
    from workbench.ui.pages.workspace import _runs_frame
    runs = ws.runs()
    tables: list[tuple[str, pd.DataFrame]] = []
    if runs:
        df = _runs_frame(runs)
        flat = pd.DataFrame([{"id": r.id, "step": r.step, "status": r.status,
                              "started": r.started, "seconds": r.seconds,
                              **{f"metric.{k}": v for k, v in r.metrics.items()},
                              "config": json.dumps(r.config, default=str)} for r in runs])
        tables.append(("runs", flat if len(flat.columns) else df))
    for p in ws.list_results("features"):
        try:
            from workbench.ui.pages.features import _table
            tables.append((f"{p.name}-latents", _table(str(p), common.stamp(p, "result.json"))))
        except Exception:  # noqa: BLE001
            continue
    for p in ws.list_results("compare"):
        try:
            from workbench.ui.readers import compare_matrices
            for name, m in compare_matrices(p).items():
                tables.append((f"{p.name}-{name}", pd.DataFrame(
                    m["matrix"], index=m["y_labels"], columns=m["x_labels"])))
        except Exception:  # noqa: BLE001
            continue
    for p in ws.list_results("pca"):
        try:
            from workbench.ui.readers import pca_spectrum
            ratios, cum = pca_spectrum(p, common.read_result_checked(p, "pca"))
            tables.append((f"{p.name}-spectrum", pd.DataFrame(
                {"component": range(1, len(ratios) + 1), "explained_variance_ratio": ratios,
                 "cumulative": cum})))
        except Exception:  # noqa: BLE001
            continue
    if not tables:
        st.caption("No tables yet.")
    for k, (name, df) in enumerate(tables):
        c1, c2 = st.columns([4, 1])
        c1.markdown(f"**{name}** — {len(df):,} rows")
        c2.download_button("CSV", df.to_csv(index=not isinstance(df.index, pd.RangeIndex)).encode(),
                           file_name=f"{name}.csv", mime="text/csv", key=f"exp_csv_{k}")


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
