"""Every sweep file in examples/ runs to completion on the real embedded models (at reduced size)
and gives numbers that mean something; refusals of too-small comparisons happen at plan time."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# examples/demo.toml is workbench/demo.toml, which tests/test_demo.py runs whole (`workbench demo --quick`)
DEMO = (ROOT / "workbench" / "demo.toml").resolve()
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.toml") if p.resolve() != DEMO)
SMOL_HOOKS = ["blocks.{0,3,6,9,12}.hook_resid_post"]


def _reduced(path: Path) -> dict:
    """The example as a dict, shrunk: fewer tokens (still >= 50 documents where documents are
    compared), a few smollm2 layers, small SAEs."""
    import tomllib
    raw = tomllib.loads(path.read_text())
    raw["sweep"].pop("workspace", None)
    corpus = raw.setdefault("corpus", {})
    wpd = raw.get("collect", {}).get("windows_per_doc", 0)
    corpus["max_tokens"] = 64 * 128 if wpd else 4096          # 64 documents / 4096 rows
    for m in raw["models"]:
        if m["spec"] == "smollm2-135m":
            m["hooks"] = SMOL_HOOKS
        else:
            m["hooks"] = ["blocks.{0,2,5}.hook_resid_post"]
    for table in ("compare",):
        for t in (raw[table] if isinstance(raw.get(table), list) else [raw.get(table)] if table in raw else []):
            if "hooks" in t:
                t["hooks"] = ["blocks.*.hook_resid_post"]
    if "train_sae" in raw:
        sae = raw["train_sae"]
        widths = sae.get("d_sae")
        sae.update(d_sae=1152, n_tokens=8192, batch_size=512)
        sae.pop("hooks", None)
        sae["hooks"] = ["blocks.6.hook_resid_post"]
        if isinstance(sae.get("k"), list):
            sae["k"] = sae["k"][:1]
        if isinstance(widths, list) and len(widths) > 1 and "match_saes" not in raw:   # one pass: keep a grid
            sae["d_sae"], sae["hooks"] = [256, 512], ["blocks.{6,9}.hook_resid_post"]
        if "match_saes" in raw:      # pairs need what they pair: two widths (small), two layers, seeds
            sae["d_sae"] = [256, 512] if isinstance(widths, list) else 256
            sae["hooks"] = ["blocks.{6,9}.hook_resid_post"]
            raw["match_saes"]["n_shuffles"] = 5
    for t in ("eval_sae",):
        if t in raw:
            raw[t]["ce_sequences"] = 4
    raw.pop("features", None)        # dashboards: covered by their own tests, slow at full width
    raw.pop("export_sae", None)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_means_something(path, tmp_path):
    import workbench.sweep as sweep
    from workbench.results import read_result

    df = sweep.run(_reduced(path), workspace=tmp_path / "ws")
    assert set(df["status"]) == {"done"}, df[["step", "status", "error"]].to_string() \
        if "error" in df else df.to_string()
    if path.stem == "one-pass":      # the SAEs of the grid were trained together, each its own run
        from workbench.workspace import Workspace
        runs = Workspace(tmp_path / "ws").runs(step="train_sae")
        assert len(runs) == 4 and all(r.metrics.get("one_pass_saes") == 4 for r in runs), runs
    results = tmp_path / "ws" / "results"
    for r in results.iterdir():
        if not (r / "result.json").exists():
            continue
        import json
        kind = json.loads((r / "result.json").read_text())["kind"]
        if kind == "pca":
            meta = read_result(r, "pca")
            # not sink-dominated: the first component is not most of the variance, unless it is a
            # rogue dimension of the text itself (smollm2 layer 3: dim 507, ~56%), which the result reports
            evr1, rogue = meta["explained_variance_ratio"][0], meta["rogue_dims"]["top1_share"]
            assert evr1 < 0.5 or rogue > 0.8 * evr1, (r.name, meta["explained_variance_ratio"][:3], rogue)
            assert meta["max_norm_ratio"] == 10
        if kind == "compare":
            meta = read_result(r, "compare")
            M = meta["matrix"]
            if meta["align"] == "document":
                assert meta["n_rows"] >= 50
            if meta["store_a"] == meta["store_b"] and meta["metric"] in ("linear_cka", "svcca") \
                    and len(M) >= 4 and meta.get("standardize"):
                # adjacent layers are more alike than distant ones (standardised: no rogue dims)
                assert M[0][1] > M[0][-1] and M[-1][-2] > M[-1][0], M
        if kind == "match_saes":
            # matched latents fire together far more than random pairs of latents do
            meta = read_result(r, "match_saes")
            assert meta["matched_corr"]["median"] > meta["random_corr"]["p90"] + 0.1, (r.name, meta["matched_corr"])
        if kind == "match_layers":
            meta = read_result(r, "match_layers")
            assert len(meta["hooks"]) == 2 and 0 <= meta["fraction"][0][1] <= 1


def test_every_example_is_run_by_a_test():
    """A new example file is picked up here; the demo is run by test_demo.py."""
    names = {p.name for p in (ROOT / "examples").glob("*.toml")}
    assert names == {p.name for p in EXAMPLES} | {"demo.toml"}
    assert (ROOT / "examples" / "demo.toml").resolve() == DEMO


def test_dry_run_refuses_too_few_documents(tmp_path):
    """Before anything runs: a document-level comparison without windows_per_doc (documents
    unknown) or with too few documents, and mutual_knn with k >= rows, are refused with the reason."""
    import workbench.sweep as sweep
    from workbench.sweep import SweepError

    def cfg(**collect):
        hooks = ["blocks.0.hook_resid_post"]
        return {"sweep": {"name": "t"},
                "models": [{"spec": "tiny-random:layers=2,d_model=16", "name": "a", "hooks": hooks},
                           {"spec": "tiny-random:layers=2,d_model=32", "name": "b", "hooks": hooks}],
                "corpus": {"spec": "builtin", "max_tokens": 20000, "seq_len": 128},
                "collect": collect,
                "compare": {"within": False, "across": [["a", "b"]], "metric": "mutual_knn", "align": "document"}}
    with pytest.raises(SweepError, match="windows_per_doc = 0"):
        sweep.plan(cfg(), tmp_path / "w1", create=False)
    with pytest.raises(SweepError, match=r"at most ~40 documents .* at least 50"):
        sweep.plan(cfg(windows_per_doc=4), tmp_path / "w2", create=False)
    c = cfg(windows_per_doc=1)
    c["compare"]["k"] = 200
    with pytest.raises(SweepError, match="k = 200 needs more than k rows"):
        sweep.plan(c, tmp_path / "w3", create=False)
    p = sweep.plan(cfg(windows_per_doc=1), tmp_path / "w4", create=False)     # 157 documents: fine
    assert any(n.step == "compare" for n in p.order())
