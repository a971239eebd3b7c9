"""Each result kind has one typed reader next to its writer; the UI reads through it. Checked
against the raw files (result.json / tensors.safetensors read here directly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.errors import WorkbenchError

H = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from workbench.steps import run_step
    from workbench.store import write_store
    tmp = tmp_path_factory.mktemp("readers")
    g = torch.Generator().manual_seed(0)
    n_seq, L = 8, 16
    x = torch.randn(n_seq * L, 6, generator=g) * torch.linspace(3, 0.5, 6)
    store = write_store(tmp / "s", {H[0]: x, H[1]: x @ torch.randn(6, 6, generator=g)},
                        torch.zeros(n_seq, L, dtype=torch.long), torch.ones(n_seq, L, dtype=torch.bool),
                        torch.arange(n_seq), torch.arange(n_seq).repeat_interleave(L), torch.arange(L).repeat(n_seq),
                        "synthetic-test")
    run_step("pca", {"store": str(store.path), "hook": H[0], "k": 3, "out": str(tmp / "pca"), "device": "cpu"})
    run_step("compare", {"store_a": str(store.path), "metric": "linear_cka", "out": str(tmp / "cmp"),
                         "device": "cpu", "max_norm_ratio": 0})
    return tmp


def _raw(path):
    return json.loads((path / "result.json").read_text()), load_file(path / "tensors.safetensors")


def test_pca_reader(results):
    from workbench.steps.pca import PCAResult, read_pca_result
    meta, t = _raw(results / "pca")
    r = read_pca_result(results / "pca")
    assert isinstance(r, PCAResult) and r.hook == H[0] and r.k == 3 and r.d == 6
    np.testing.assert_allclose(r.explained_variance_ratio, t["explained_variance_ratio"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.cumulative_variance_ratio, np.cumsum(meta["explained_variance_ratio"]))
    assert r.geometry == meta["geometry"] and r.store == meta["store"]
    coords, rows = r.projection()
    assert torch.equal(coords, t["projection"]) and torch.equal(rows, t["sample_rows"])
    np.testing.assert_allclose(r.pca().components_.numpy(), t["components"].numpy(), atol=1e-6)


def test_compare_reader(results):
    from workbench.steps.compare import read_compare_result
    meta, t = _raw(results / "cmp")
    r = read_compare_result(results / "cmp")
    assert r.metric == "linear_cka" and r.hooks_a == r.hooks_b == H and r.symmetric
    assert torch.equal(r.matrix, t["matrix"].double()) and r.matrix.shape == (2, 2)
    assert r.n_rows == meta["n_rows"] and r.higher_is_similar


def test_readers_refuse_another_kind(results):
    from workbench.steps.compare import read_compare_result
    from workbench.steps.pca import read_pca_result
    from workbench.steps.sae import read_export_result
    from workbench.steps._sae_eval import read_sae_eval_result
    with pytest.raises(WorkbenchError, match="holds a 'compare' result, expected 'pca'"):
        read_pca_result(results / "cmp")
    with pytest.raises(WorkbenchError, match="holds a 'pca' result, expected 'compare'"):
        read_compare_result(results / "pca")
    for reader in (read_sae_eval_result, read_export_result):
        with pytest.raises(WorkbenchError, match="expected"):
            reader(results / "pca")
    with pytest.raises(WorkbenchError, match="not a complete result"):
        read_pca_result(results / "nothing-here")


def test_reader_names_a_missing_key(tmp_path, results):
    """A result.json without a required field -> a WorkbenchError naming it (not a KeyError bug)."""
    import shutil
    from workbench.steps.pca import read_pca_result
    shutil.copytree(results / "pca", tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "result.json").read_text())
    del meta["explained_variance_ratio"], meta["rows_dropped"], meta["rogue_dims"]
    (tmp_path / "p" / "result.json").write_text(json.dumps(meta))
    with pytest.raises(WorkbenchError, match="no 'explained_variance_ratio'; rerun the pca step"):
        read_pca_result(tmp_path / "p")


def test_ui_reads_through_the_typed_readers(results):
    pytest.importorskip("streamlit")
    from workbench.ui import readers
    assert readers.pca(results / "pca").explained_variance_ratio == \
        json.loads((results / "pca" / "result.json").read_text())["explained_variance_ratio"]
    assert readers.compare(results / "cmp").hooks_a == H
    with pytest.raises(WorkbenchError, match="expected 'compare'"):
        readers.compare(results / "pca")
    with pytest.raises(WorkbenchError, match="expected 'pca'"):
        readers.pca(results / "cmp")
    assert not hasattr(readers, "pca_spectrum") and not hasattr(readers, "compare_matrices")


def test_export_reader(tmp_path):
    from analyses.sae import make_sae
    from workbench.steps import run_step
    from workbench.steps.sae import read_export_result
    make_sae("relu", 6, 12, metadata={"hook_name": H[0]}).save(tmp_path / "sae")
    run_step("export_sae", {"sae": str(tmp_path / "sae"), "format": "saelens", "out": str(tmp_path / "e")})
    meta = json.loads((tmp_path / "e" / "result.json").read_text())
    r = read_export_result(tmp_path / "e")
    assert (r.format, r.arch, r.files) == ("saelens", "relu", meta["files"]) and "cfg.json" in r.files
