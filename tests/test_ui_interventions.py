"""The interventions in the UI (AppTest on the small real workspace of tests/ui_fixtures.py): the
steering panel and the ablation section of a latent's dashboard, steering along a principal component
on the Activations page, and the dashboard <-> Interventions links. What the pages show is checked
against the same computation made directly through workbench.interventions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ui_fixtures import APP, SAE_HOOK, ui_workspace  # noqa: F401  (fixture)

from streamlit.testing.v1 import AppTest  # noqa: E402

PROMPT = "the quick brown fox"


def _open(root, page: str | None, state: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["workspace"] = str(root)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(f"workbench/ui/pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _ok(at) -> None:
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]


def _frames(at, column: str) -> list[pd.DataFrame]:
    """The dataframes on the page that have `column` (plain st.dataframe elements carry no key)."""
    return [d.value for d in at.dataframe if column in list(d.value.columns)]


def _alive_latent(W) -> int:
    from workbench.steps.features import load_features
    t = load_features(W["features"]).table()
    return int(t[t["count"] > 0].sort_values("max", ascending=False)["latent"].iloc[0])


def test_dashboard_steering_panel(ui_workspace):  # noqa: F811
    import workbench
    W = ui_workspace
    latent = _alive_latent(W)
    at = _open(W["root"], "features", {"feat_st_prompt": PROMPT, "feat_st_new": 6})
    assert at.number_input(key="feat_latent").value == latent
    assert len(at.code) == 0                                  # nothing generated before the button
    links = " ".join(m.value for m in at.markdown)
    assert f'href="interventions?latent={latent}&sae={W["sae"].name}"' in links
    at.number_input(key="feat_st_value").set_value(40.0)
    at.selectbox(key="feat_st_mode").set_value("add")
    at.button(key="feat_st_go").click().run()
    _ok(at)
    assert len(at.code) == 2
    want = workbench.steer(PROMPT, sae=W["sae"], latents=[latent], values=[40.0], mode="add", max_new_tokens=6)
    assert at.code[0].value == PROMPT + want.attrs["unsteered"]
    assert at.code[1].value == PROMPT + want.attrs["steered"]
    assert any(f"latent {latent} add 40" in m.value for m in at.markdown)
    # the answer stays while the inputs stay; another rerun does not drop it
    at.run()
    assert len(at.code) == 2
    # a changed value hides the stale answer until the button is pressed again
    at.number_input(key="feat_st_value").set_value(-40.0).run()
    assert len(at.code) == 0


def test_dashboard_ablation_section(ui_workspace):  # noqa: F811
    from workbench.interventions import ablate_examples
    from workbench.steps.features import load_features
    W = ui_workspace
    latent = _alive_latent(W)
    at = _open(W["root"], "features")
    assert not _frames(at, "d_loss_next")                     # nothing measured before the button
    at.button(key="feat_abl_go").click().run()
    _ok(at)
    (shown,) = _frames(at, "d_loss_next")
    top = load_features(W["features"]).latent(latent)["top_examples"]
    want = ablate_examples(W["sae"], latent, W["store"], top)
    assert len(shown) == len(top) > 0
    assert list(shown["seq"]) == [e["seq"] for e in top] and list(shown["pos"]) == [e["pos"] for e in top]
    for col in ("activation", "d_loss_next", "d_loss_after", "kl"):
        assert np.allclose(shown[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-5, atol=1e-7,
                           equal_nan=True), col
    # the recomputed activation is the one the features step stored for that example
    assert np.allclose(shown["activation"].to_numpy(float), [e["value"] for e in top], rtol=1e-3, atol=1e-4)
    up, down = _frames(at, "Δ log p")
    assert np.allclose(up["Δ log p"].to_numpy(float), [r["value"] for r in want.attrs["promotes"]], rtol=1e-5)
    assert up["Δ log p"].is_monotonic_decreasing and down["Δ log p"].is_monotonic_increasing
    assert np.allclose(down["Δ log p"].to_numpy(float), [r["value"] for r in want.attrs["suppresses"]], rtol=1e-5)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["mean Δ loss (next token)"] == f"{want.attrs['mean_d_loss_next']:+.4g}"


def test_activations_pca_steer(ui_workspace):  # noqa: F811
    import workbench
    W = ui_workspace
    pca = W["pca"][SAE_HOOK]
    at = _open(W["root"], "activations", {"act_result": pca.name, "act_st_prompt": PROMPT, "act_st_new": 5})
    at.segmented_control(key="act_view").set_value("Steer").run()
    _ok(at)
    assert len(at.code) == 0
    at.selectbox(key="act_st_pc").set_value("PC2")
    at.number_input(key="act_st_coef").set_value(25.0)
    at.selectbox(key="act_st_mode").set_value("add")
    at.button(key="act_st_go").click().run()
    _ok(at)
    assert len(at.code) == 2
    # PC2 on the page is component 1 (0-based) of the API
    want = workbench.steer(PROMPT, model="tiny-random", hook=SAE_HOOK, pca=str(pca), components=[1],
                           coefs=[25.0], pca_mode="add", max_new_tokens=5)
    assert at.code[0].value == PROMPT + want.attrs["unsteered"]
    assert at.code[1].value == PROMPT + want.attrs["steered"]
    other = workbench.steer(PROMPT, model="tiny-random", hook=SAE_HOOK, pca=str(pca), components=[0],
                            coefs=[25.0], pca_mode="add", max_new_tokens=5)
    if other.attrs["steered"] != want.attrs["steered"]:
        assert at.code[1].value != PROMPT + other.attrs["steered"]
    assert any("PC2 add 25" in m.value for m in at.markdown)


@pytest.mark.parametrize("latent", [3, 10_000])
def test_interventions_page_deep_link(ui_workspace, latent):  # noqa: F811
    """The dashboard's link (?latent=N&sae=NAME) opens the steering panel on that SAE and latent; a
    latent out of range is ignored, not an exception."""
    W = ui_workspace
    page = AppTest.from_file(str(APP.parent / "workbench/ui/pages/interventions.py"), default_timeout=120)
    page.session_state["workspace"] = str(W["root"])
    page.session_state["iv_text"] = ""
    page.query_params["latent"] = str(latent)
    page.query_params["sae"] = W["sae"].name
    page.run()
    _ok(page)
    assert page.selectbox(key="iv_sae").value == W["sae"].name
    assert page.number_input(key="iv_latent").value == (latent if latent < 64 else 0)
