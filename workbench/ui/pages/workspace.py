"""Workspace page: what the workspace holds (stores, SAEs, results) and the runs that made it."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from workbench.ui import common, readers


def _corpus_text(c) -> str:
    if isinstance(c, dict):
        return str(c.get("spec") or c.get("name") or c)[:60]
    return "" if c is None else str(c)[:60]


def _store_rows(ws) -> list[dict]:
    rows = []
    for p in ws.list_stores():
        key = common.stamp(p, "manifest.json")
        row = {"name": p.name, "status": "", "size": common.human_size(common.cached_size(str(p), key)),
               "model": None, "hooks": "", "rows": None, "sequences": None, "seq_len": None,
               "dtype": None, "corpus": ""}
        try:
            info = common.store_info(str(p), key)
            hooks = info.get("hooks") or []
            if isinstance(hooks, dict):
                hook_txt = ", ".join(f"{h} (d={d})" for h, d in hooks.items())
            else:
                hook_txt = ", ".join(str(h) if not isinstance(h, dict) else
                                     f"{h.get('name')} (d={h.get('d')})" for h in hooks)
            row.update({"model": info.get("model") or info.get("model_name"),
                        "hooks": hook_txt,
                        "rows": info.get("n_rows"), "sequences": info.get("n_seq"),
                        "seq_len": info.get("seq_len"), "dtype": info.get("dtype"),
                        "corpus": _corpus_text(info.get("corpus")), "status": "ok"})
        except Exception as e:  # noqa: BLE001 - one bad store must not hide the others
            row["status"] = f"unreadable: {common.error_message(e)}"
        rows.append(row)
    return rows


def _sae_rows(ws) -> list[dict]:
    rows = []
    for p in ws.list_saes():
        key = common.stamp(p, "cfg.json")
        row = {"name": p.name, "status": "", "size": common.human_size(common.cached_size(str(p), key)),
               "architecture": None, "d_in": None, "d_sae": None, "k": None, "model": None,
               "hook": None, "eval split": None, "L0": None, "explained var. (around mean)": None,
               "dead": None, "dead: tokens": None}
        try:
            cfg = json.loads((p / "cfg.json").read_text())
            md = cfg.get("metadata") or {}
            wb = md.get("workbench") if isinstance(md.get("workbench"), dict) else {}
            ev = wb.get("eval") if isinstance(wb.get("eval"), dict) else wb
            dens = wb.get("density") if isinstance(wb.get("density"), dict) else {}
            # explained variance around the per-dimension mean (SAELens >= 2026 / SAEBench corrected);
            # dead: the SAE's best density estimate with the tokens it was measured on
            row.update({"eval split": ev.get("split", "in_sample (pre-split SAE)" if ev else None),
                        "L0": ev.get("l0"), "explained var. (around mean)": ev.get("explained_variance"),
                        "dead": dens.get("dead_fraction", ev.get("dead_fraction")),
                        "dead: tokens": dens.get("n_tokens", ev.get("n_tokens"))})
            row.update({"architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"),
                        "d_sae": cfg.get("d_sae"), "k": cfg.get("k"),
                        "model": md.get("model_name"), "hook": md.get("hook_name"),
                        "status": "ok" if (p / "sae_weights.safetensors").exists()
                        else "missing sae_weights.safetensors"})
        except Exception as e:  # noqa: BLE001
            row["status"] = f"unreadable cfg.json: {common.error_message(e)}"
        rows.append(row)
    return rows


def export_kind(p) -> str | None:
    """The format of an SAE export folder (export_sae writes them, also under results/)."""
    if (p / "cfg.json").exists() and (p / "sae_weights.safetensors").exists():
        return "neuronpedia" if (p / "neuronpedia.json").exists() else "saelens"
    try:
        if any((c / "sae.safetensors").exists() for c in p.iterdir() if c.is_dir()):
            return "sparsify"
    except OSError:
        pass
    return None


def _result_rows(ws) -> list[dict]:
    rows = []
    if not ws.results.exists():
        return rows
    for p in sorted(ws.results.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        key = common.stamp(p, "result.json")
        row = {"name": p.name, "status": "", "kind": "",
               "size": common.human_size(common.cached_size(str(p), key))}
        export = export_kind(p)
        if not (p / "result.json").exists() and export:
            row.update({"kind": f"SAE export ({export})", "status": "ok"})
        elif not (p / "result.json").exists():
            row.update({"kind": "", "status": "incomplete (no result.json): still being written, "
                                              "or interrupted — rerun the step that makes it"})
        else:
            try:
                meta = common.result_meta(str(p), key)
                row.update({"kind": meta.get("kind"), "version": meta.get("version"),
                            "figures": ", ".join((meta.get("figures") or {}).keys()),
                            "status": "ok"})
                if meta.get("kind") == "sae_eval":
                    row["summary"] = _sae_eval_summary(readers.sae_eval(p))
            except Exception as e:  # noqa: BLE001
                row.update({"kind": "", "status": f"unreadable: {common.error_message(e)}"})
        rows.append(row)
    return rows


def _sae_eval_summary(r) -> str:
    """Every number with its split; explained variance around the mean; CE loss recovered +- SE, and
    SAELens' convention next to it (r: an SAEEvalResult)."""
    m, ce, split = r.metrics, r.ce or {}, r.split
    parts = [f"{split}, {int(m.get('n_tokens', 0)):,} tokens"]
    if m.get("explained_variance") is not None:
        parts.append(f"explained var. (around mean) {m['explained_variance']:.3f}")
    if m.get("dead_fraction") is not None:
        parts.append(f"dead {m['dead_fraction']:.1%} of latents over {int(m.get('n_tokens', 0)):,} tokens")
    if ce.get("ce_loss_recovered") is not None:
        se = ce.get("ce_loss_recovered_se")
        parts.append(f"CE loss recovered {ce['ce_loss_recovered']:.3f}" + (f" ± {se:.3f}" if se is not None else "")
                     + f" on {ce.get('n_sequences', '?')} sequences")
    if ce.get("ce_loss_recovered_saelens") is not None:
        parts.append(f"SAELens convention {ce['ce_loss_recovered_saelens']:.3f}")
    return "; ".join(parts)


def _fmt_metrics(m: dict) -> str:
    out = []
    for k, v in list(m.items())[:6]:
        out.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(out)


def _runs_frame(runs) -> pd.DataFrame:
    return pd.DataFrame([{
        "id": r.id, "step": r.step, "status": r.status, "started": common.ago(r.started),
        "seconds": None if r.seconds is None else round(r.seconds, 2),
        "metrics": _fmt_metrics(r.metrics),
        "artifacts": ", ".join(r.artifacts.values()),
        "error": (r.error or "").splitlines()[0] if r.error else "",
        "sweep": r.sweep or "",
    } for r in runs])


def body() -> None:
    st.title("Workspace")
    ws = common.open_workspace()
    if ws is None:
        return
    st.caption(f"`{ws.root}`")
    stores, saes, results, runs = _store_rows(ws), _sae_rows(ws), _result_rows(ws), ws.runs()
    c = st.columns(4)
    c[0].metric("Activation stores", len(stores))
    c[1].metric("SAEs", len(saes))
    c[2].metric("Results", len(results))
    c[3].metric("Runs", len(runs),
                delta=f"{sum(r.status == 'failed' for r in runs)} failed" if any(
                    r.status == "failed" for r in runs) else None, delta_color="inverse")
    if not (stores or saes or results or runs):
        common.empty_workspace_help(ws.root)
        return

    st.subheader("Activation stores")
    if stores:
        st.dataframe(pd.DataFrame(stores), hide_index=True, width="stretch", key="ws_stores")
    else:
        st.caption("none yet: `workbench collect ...` or the Run page")
    st.subheader("SAEs")
    if saes:
        st.dataframe(pd.DataFrame(saes), hide_index=True, width="stretch", key="ws_saes")
    else:
        st.caption("none yet: `workbench train-sae ...` or the Run page")
    st.subheader("Results")
    if results:
        st.dataframe(pd.DataFrame(results), hide_index=True, width="stretch", key="ws_results")
    else:
        st.caption("none yet")

    problems = [f"store **{r['name']}**: {r['status']}" for r in stores if r["status"] != "ok"]
    problems += [f"SAE **{r['name']}**: {r['status']}" for r in saes if r["status"] != "ok"]
    problems += [f"result **{r['name']}**: {r['status']}" for r in results if r["status"] != "ok"]
    if problems:
        st.error("Some artefacts cannot be used:\n\n" + "\n".join(f"- {p}" for p in problems),
                 icon=":material/error:")

    st.subheader("Runs")
    if not runs:
        st.caption("no runs recorded")
        return
    c1, c2 = st.columns(2)
    steps = sorted({r.step for r in runs})
    step = c1.selectbox("Step", ["(all)", *steps], key="ws_run_step")
    status = c2.selectbox("Status", ["(all)", "running", "done", "failed"], key="ws_run_status")
    shown = [r for r in runs if (step == "(all)" or r.step == step)
             and (status == "(all)" or r.status == status)]
    st.dataframe(_runs_frame(shown), hide_index=True, width="stretch", key="ws_runs")
    if shown:
        rid = st.selectbox("Run details", [r.id for r in shown],
                           format_func=lambda i: next(f"{r.id}  {r.step}  {r.status}"
                                                      for r in shown if r.id == i),
                           key="ws_run_detail")
        run = next(r for r in shown if r.id == rid)
        if run.error:
            st.warning(f"run {run.id} failed: {run.error.splitlines()[0]}")
        st.json(run.to_dict(), expanded=False)


def render() -> None:
    common.guard(body)


if __name__ == "__main__":
    render()
