"""Every page of the Streamlit UI through streamlit.testing.v1.AppTest, on a small real workspace
(tests/ui_fixtures.py): no exception, the expected charts and tables, the figures' numbers equal
to the stored results, and bad inputs answered with st.error."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ui_fixtures import APP, D_SAE, HOOKS, SAE_HOOK, ui_workspace  # noqa: F401  (fixture)

from streamlit.testing.v1 import AppTest  # noqa: E402

PAGES = {"workspace": None, "activations": "workbench/ui/pages/activations.py",
         "features": "workbench/ui/pages/features.py", "compare": "workbench/ui/pages/compare.py",
         "run": "workbench/ui/pages/run.py", "export": "workbench/ui/pages/export.py",
         "geometry": "workbench/ui/pages/geometry.py"}


# ------------------------------------------------------------------ helpers
def open_page(root, page: str, state: dict | None = None, query: dict | None = None,
              timeout: float = 60) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.session_state["workspace"] = str(root)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    if PAGES[page]:
        at.switch_page(PAGES[page]).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def decode(v):
    """A plotly JSON array: a list, or a typed array {"dtype", "bdata"[, "shape"]}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        if "shape" in v:
            shape = v["shape"]
            shape = [int(s) for s in (shape.split(",") if isinstance(shape, str) else shape)]
            a = a.reshape(shape)
        return a
    return np.asarray(v)


def figure(at, key: str) -> dict:
    charts = [c for c in at.get("plotly_chart") if key in c.proto.id]
    assert charts, f"no plotly chart with key {key!r}; have {[c.proto.id for c in at.get('plotly_chart')]}"
    return json.loads(charts[0].proto.spec)


def frame(at, key: str, nth: int = 0):
    """A dataframe by its widget key (selectable tables) or by a column only it has."""
    for d in at.dataframe:
        if d.proto.id and d.proto.id.endswith(key):
            return d.value
    found = [d.value for d in at.dataframe if key in list(d.value.columns)]
    if len(found) > nth:
        return found[nth]
    raise AssertionError(f"no dataframe with key or column {key!r}")


# ------------------------------------------------------------------ workspace
def test_workspace_page(ui_workspace):  # noqa: F811
    W = ui_workspace
    at = open_page(W["root"], "workspace")
    assert not errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Activation stores"] == "1"
    assert metrics["SAEs"] == "1"
    assert int(metrics["Results"]) >= 4
    assert int(metrics["Runs"]) == len(W["ws"].runs())
    stores = frame(at, "hooks")
    assert list(stores["name"]) == ["tiny"]
    from workbench.store import ActivationStore
    s = ActivationStore.open(W["store"])
    assert int(stores["rows"].iloc[0]) == s.n_rows
    saes = frame(at, "architecture")
    assert int(saes["d_sae"].iloc[0]) == D_SAE and saes["hook"].iloc[0] == SAE_HOOK
    results = frame(at, "kind")
    assert {"pca", "features", "compare"} <= set(results["kind"])
    runs = frame(at, "step")
    assert set(runs["id"]) == {r.id for r in W["ws"].runs()}


def test_empty_and_missing_workspace(tmp_path):
    from workbench.workspace import Workspace
    Workspace(tmp_path / "empty")
    for root in (tmp_path / "empty", tmp_path / "nothing-here"):
        for page in PAGES:
            at = open_page(root, page)
            assert not errors(at), (page, errors(at))
            text = " ".join(i.value for i in at.info)
            assert "workbench demo --workspace" in text, (page, text)


def test_workspace_from_env(ui_workspace, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(ui_workspace["root"]))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert at.session_state["workspace"] == str(ui_workspace["root"])
    assert {m.label: m.value for m in at.metric}["SAEs"] == "1"


def test_broken_artefacts_are_reported(ui_workspace, tmp_path):  # noqa: F811
    """A store with a missing shard, a result folder without result.json: clear messages."""
    W = ui_workspace
    root = tmp_path / "ws-broken"
    shutil.copytree(W["root"], root)
    store = root / "stores" / "tiny"
    from workbench.store import ActivationStore
    shard = ActivationStore.open(store).shard_files()[0]
    shard.unlink()
    half = root / "results" / "half-written"
    half.mkdir()
    (half / "tensors.safetensors").write_bytes(b"")
    # a pca result pointing at the broken store
    pca = next(iter(W["pca"].values()))
    meta = json.loads((root / "results" / pca.name / "result.json").read_text())
    for k in ("store", "store_path"):
        if k in meta:
            meta[k] = str(store)
    (root / "results" / pca.name / "result.json").write_text(json.dumps(meta))

    at = open_page(root, "workspace")
    stores = frame(at, "hooks")
    assert "missing" in stores["status"].iloc[0]
    results = frame(at, "kind")
    row = results[results["name"] == "half-written"]
    assert "no result.json" in row["status"].iloc[0]
    errs = " ".join(errors(at))
    assert "tiny" in errs and "missing" in errs and "half-written" in errs, errs

    # a deep link to the half-written result (a page opened on its own takes query parameters)
    page = AppTest.from_file(str(APP.parent / PAGES["features"]), default_timeout=60)
    page.session_state["workspace"] = str(root)
    page.query_params["feat_result"] = "half-written"
    page.run()
    assert not page.exception
    assert any("half-written" in e and "no result.json" in e for e in errors(page)), errors(page)

    at = open_page(root, "activations", state={"act_result": pca.name})
    errs = errors(at)
    assert errs and any("missing" in e for e in errs), errs


# ------------------------------------------------------------------ features
def test_features_page(ui_workspace):  # noqa: F811
    W = ui_workspace
    from workbench.steps.features import load_features
    fd = load_features(W["features"])
    table = fd.table()
    alive = table[table["count"] > 0]
    latent = int(alive.sort_values("max", ascending=False)["latent"].iloc[0])
    at = open_page(W["root"], "features")
    assert not errors(at)
    shown = frame(at, "feat_table")
    assert len(shown) == len(alive)
    assert at.number_input(key="feat_latent").value == latent
    d = fd.latent(latent)
    # histogram bars = the stored counts
    h = figure(at, "feat_hist")
    assert np.array_equal(decode(h["data"][0]["y"]).astype(int), np.asarray(d["histogram"]["counts"]))
    edges = np.asarray(d["histogram"]["edges"])
    assert np.allclose(decode(h["data"][0]["x"]), (edges[:-1] + edges[1:]) / 2)
    # examples: one highlighted block per top example, centre token outlined
    html = at.html[0].proto.body
    assert html.count("wb-example") == len(d["top_examples"])
    assert f"{d['top_examples'][0]['value']:.3f}" in html
    if d["logits"]:
        top = frame(at, "logit")
        assert np.allclose(top["logit"].to_numpy(), [t["value"] for t in d["logits"]["top"]])
    nb = frame(at, "cosine")
    assert list(nb["latent"]) == [n["latent"] for n in d["neighbours"]]

    # open a neighbour from the pills
    first_nb = d["neighbours"][0]["latent"]
    at.pills(key="feat_nb_pick").set_value(first_nb).run()
    assert not at.exception
    assert at.number_input(key="feat_latent").value == first_nb
    assert any(f"Latent {first_nb}" == h.value for h in at.subheader)

    # another latent; search; sort
    other = int(alive["latent"].iloc[0])
    at.number_input(key="feat_latent").set_value(other).run()
    assert not at.exception and not errors(at)
    assert any(f"Latent {other}" == h.value for h in at.subheader)
    at.selectbox(key="feat_sort").set_value("max activation").run()
    t = frame(at, "feat_table")
    assert list(t["max"]) == sorted(t["max"], reverse=True)
    at.text_input(key="feat_search").set_value(str(other)).run()
    assert other in list(frame(at, "feat_table")["latent"])


def test_features_bad_latent_and_text(ui_workspace):  # noqa: F811
    W = ui_workspace
    at = open_page(W["root"], "features")
    at.number_input(key="feat_latent").set_value(D_SAE + 5).run()
    assert not at.exception
    assert any("out of range" in e and str(D_SAE - 1) in e for e in errors(at)), errors(at)
    at.number_input(key="feat_latent").set_value(-1).run()
    assert any("out of range" in e for e in errors(at))
    # text probe
    at.number_input(key="feat_latent").set_value(0).run()
    at.text_area(key="feat_text").set_value("the quick brown fox").run(timeout=120)
    assert not at.exception and not errors(at), errors(at)
    from workbench.steps.features import latent_activations_for_text
    tokens, acts = latent_activations_for_text(W["sae"], "the quick brown fox")
    tt = frame(at, "active latents")
    assert len(tt) == len(tokens)
    assert list(tt["active latents"]) == [int((a > 0).sum()) for a in acts]


# ------------------------------------------------------------------ activations
def test_activations_page(ui_workspace):  # noqa: F811
    W = ui_workspace
    from workbench.results import read_result, read_tensors
    name = sorted(W["pca"].values())[0].name
    path = W["root"] / "results" / name
    meta, tens = read_result(path, "pca"), read_tensors(path)
    at = open_page(W["root"], "activations", state={"act_result": name})
    assert not errors(at), errors(at)
    # scree = stored explained-variance ratios (read here from the raw files, not through the reader)
    ratios = np.asarray(meta["explained_variance_ratio"], float)
    assert np.allclose(ratios, tens["explained_variance_ratio"].numpy())
    at.segmented_control(key="act_view").set_value("Scree & geometry").run()
    assert not at.exception and not errors(at), errors(at)
    scree = figure(at, "act_scree")
    assert np.allclose(decode(scree["data"][0]["y"]), ratios)
    geo = meta["geometry"]
    shown = {m.label: m.value for m in at.metric}
    assert shown["participation ratio"] == f"{geo['participation_ratio']:.4g}"
    assert shown["directions for 90% var."] == str(geo["n_dirs_90"])
    at.segmented_control(key="act_view").set_value("Scatter").run()
    # scatter coordinates = stored projections of the plotted rows (colour by token: one trace
    # per frequent token; together they hold every plotted point)
    fig = figure(at, "act_scatter")
    coords, rows = tens["projection"].numpy(), tens["sample_rows"].numpy()
    by_row = {int(r): c for r, c in zip(rows, coords)}
    n = 0
    for tr in fig["data"]:
        xs, ys = decode(tr["x"]), decode(tr["y"])
        for cd, x, y in zip(tr["customdata"], xs, ys):
            c = by_row[int(cd[1])]
            assert np.isclose(x, c[0], atol=1e-5) and np.isclose(y, c[1], atol=1e-5)
            n += 1
    assert n == min(len(coords), 2000)
    # hover text holds the token in its context
    assert "[" in fig["data"][0]["customdata"][0][0]
    # other colourings, 3-D
    for colour in ("position", "document"):
        at.selectbox(key="act_color").set_value(colour).run()
        assert not at.exception and not errors(at)
    at.radio(key="act_dim").set_value("3-D").run()
    assert not at.exception and not errors(at)
    fig = figure(at, "act_scatter")
    assert fig["data"][0]["type"] == "scatter3d"
    at.radio(key="act_dim").set_value("2-D").run()


def test_activations_feature_colour(ui_workspace):  # noqa: F811
    W = ui_workspace
    pca = W["pca"][SAE_HOOK].name
    at = open_page(W["root"], "activations", state={"act_result": pca})
    at.selectbox(key="act_color").set_value("feature activation").run()
    assert not at.exception and not errors(at), errors(at)
    at.number_input(key="act_latent").set_value(1).run()
    fig = figure(at, "act_scatter")
    vals = decode(fig["data"][0]["marker"]["color"])
    rows = [int(cd[1]) for cd in fig["data"][0]["customdata"]]
    from analyses.sae import load_sae
    from workbench.store import ActivationStore
    sae = load_sae(W["sae"])
    x = ActivationStore.open(W["store"]).read(SAE_HOOK)[torch.as_tensor(rows)]
    with torch.no_grad():
        want = sae.encode(x)[:, 1].numpy()
    assert np.allclose(vals, want, atol=1e-4)
    at.number_input(key="act_latent").set_value(D_SAE).run()
    assert any("out of range" in e for e in errors(at))


# ------------------------------------------------------------------ compare
def test_compare_page(ui_workspace):  # noqa: F811
    W = ui_workspace
    from workbench.results import read_result, read_tensors
    meta, M = read_result(W["compare"], "compare"), read_tensors(W["compare"])["matrix"].numpy()
    at = open_page(W["root"], "compare", state={"cmp_result": W["compare"].name})
    assert not errors(at), errors(at)
    fig = figure(at, "cmp_heatmap")
    heat = next(t for t in fig["data"] if t["type"] == "heatmap")
    assert np.allclose(decode(heat["z"]), M)
    assert list(heat["y"]) == meta["hooks_a"] and list(heat["x"]) == meta["hooks_b"]
    # pick a cell: the two hooks' spectra (both have pca results)
    at.selectbox(key="cmp_row").set_value(HOOKS[0]).run()
    at.selectbox(key="cmp_col").set_value(HOOKS[1]).run()
    assert not errors(at)
    sp = figure(at, "cmp_spectra")
    assert len(sp["data"]) == 2
    for tr, hook in zip(sp["data"], HOOKS):
        assert np.allclose(decode(tr["y"]), read_result(W["pca"][hook], "pca")["explained_variance_ratio"])
    i, j = meta["hooks_a"].index(HOOKS[0]), meta["hooks_b"].index(HOOKS[1])
    assert any(f"{M[i, j]:.4f}" == x.value for x in at.metric)


# ------------------------------------------------------------------ run
def _wait_job(at, timeout=120):
    from workbench.ui import jobs
    t = time.time()
    while any(j.status in ("queued", "running") for j in jobs.jobs()):
        assert time.time() - t < timeout, "the run did not finish"
        time.sleep(0.3)
    at.run()
    return at


def test_run_page_starts_a_run(ui_workspace):  # noqa: F811
    W = ui_workspace
    at = open_page(W["root"], "run", state={"run_step_name": "pca"})
    assert at.selectbox(key="run_step_name").value == "pca"
    before = len(W["ws"].runs(step="pca"))
    at.text_input(key="run_pca_hook").set_value(HOOKS[0])
    at.text_input(key="run_pca_out").set_value("results/pca-from-form")
    submit = [b for b in at.button if "Run pca" in b.label][0]
    submit.click().run()
    assert not at.exception and not errors(at), errors(at)
    _wait_job(at)
    assert not errors(at), errors(at)
    assert any("pca finished" in s.value for s in at.success)
    assert (W["root"] / "results" / "pca-from-form" / "result.json").exists()
    assert len(W["ws"].runs(step="pca")) == before + 1


def test_run_page_bad_inputs(ui_workspace):  # noqa: F811
    W = ui_workspace
    at = open_page(W["root"], "run", state={"run_step_name": "pca"})
    at.text_input(key="run_pca_hook").set_value("blocks.9.hook_nope")
    at.text_input(key="run_pca_out").set_value("results/pca-bad")
    [b for b in at.button if "Run pca" in b.label][0].click().run()
    _wait_job(at)
    errs = errors(at)
    assert errs and any("blocks.9.hook_nope" in e for e in errs), errs
    assert not at.exception


# ------------------------------------------------------------------ export
def test_export_page(ui_workspace):  # noqa: F811
    W = ui_workspace
    at = open_page(W["root"], "export")
    assert not errors(at), errors(at)
    labels = [b.proto.label for b in at.get("download_button")]
    assert "CSV" in labels and "HTML" in labels
    # every figure and table can be picked; the UI-drawn ones preview the stored numbers
    for label in at.selectbox(key="exp_fig").options:
        at.selectbox(key="exp_fig").set_value(label).run()
        assert not at.exception and not errors(at), (label, errors(at))
        if label.startswith(W["compare"].name) and "(UI)" in label:
            from workbench.results import read_tensors
            heat = next(t for t in figure(at, "exp_fig_preview")["data"] if t["type"] == "heatmap")
            assert np.allclose(decode(heat["z"]), read_tensors(W["compare"])["matrix"].numpy())
    for label in at.selectbox(key="exp_table").options:
        at.selectbox(key="exp_table").set_value(label).run()
        assert not at.exception and not errors(at), (label, errors(at))
        assert "CSV" in [b.proto.label for b in at.get("download_button")]
        if "latents" in label:
            assert len(at.dataframe[-1].value) == D_SAE
    for fmt, must in (("saelens", "cfg.json"), ("sparsify", "sae.safetensors"),
                      ("neuronpedia", None)):
        at.selectbox(key="exp_fmt").set_value(fmt).run()
        at.button(key="exp_prepare").click().run(timeout=120)
        assert not at.exception and not errors(at), (fmt, errors(at))
        dl = [b for b in at.get("download_button") if ".zip" in b.proto.label]
        assert dl, fmt
        assert f"-{fmt}.zip" in dl[0].proto.label
        if must:   # the export went to WS/exports (the one output folder of export_sae)
            assert list((Path(W["root"]) / "exports").glob(f"*-{fmt}/**/{must}")), fmt


def test_launch_refuses_a_busy_port(tmp_path):
    import socket
    from workbench.errors import WorkbenchError
    from workbench.ui import launch, streamlit_command
    cmd = streamlit_command(tmp_path, port=8999, host="127.0.0.1")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--workspace", str(tmp_path.resolve())]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(WorkbenchError, match="already in use"):
            launch(tmp_path, port=s.getsockname()[1])


def test_page_open_times(ui_workspace):  # noqa: F811
    """Each page renders in under 2 s once its data is cached (AppTest, in-process)."""
    W = ui_workspace
    times = {}
    for page in PAGES:
        at = open_page(W["root"], page)          # warms the caches
        t = time.time()
        at.run()
        assert not at.exception
        times[page] = round(time.time() - t, 2)
    print("AppTest warm page times (s):", times)
    assert max(times.values()) < 2.0 * 2, times   # margin for a loaded 2-core machine


def test_activations_page_flags_massive_rows(ui_workspace):  # noqa: F811
    """A PCA whose variance sits in a few huge-norm rows says so; one fitted without them says how
    many rows it left out."""
    import json
    import shutil
    W = ui_workspace
    src = sorted(W["pca"].values())[0]
    for name, patch, expect in (
            ("pca-zz-sinks", {"massive_rows": {"ratio": 10.0, "rows": 7, "row_fraction": 0.01,
                                               "sq_norm_share": 0.97}, "rows_dropped": 0}, "warning"),
            ("pca-zz-clean", {"massive_rows": {"ratio": 10.0, "rows": 7, "row_fraction": 0.01,
                                               "sq_norm_share": 0.97}, "rows_dropped": 7,
                              "max_norm_ratio": 10.0}, "caption")):
        dst = W["root"] / "results" / name
        shutil.copytree(src, dst)
        meta = json.loads((dst / "result.json").read_text())
        meta.update(patch)
        (dst / "result.json").write_text(json.dumps(meta))
        try:
            at = open_page(W["root"], "activations", state={"act_result": name})
            assert not at.exception and not errors(at), errors(at)
            warned = [w.value for w in at.warning if "max_norm_ratio = 10" in w.value]
            captioned = [c.value for c in at.caption if "7 rows with norms over 10x" in c.value]
            assert (warned, captioned)[expect == "caption"] and not (warned, captioned)[expect == "warning"]
        finally:
            shutil.rmtree(dst)
