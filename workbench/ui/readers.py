"""Result folders for the pages, read ONLY through each kind's typed reader next to its writer
(`workbench.steps.pca.read_pca_result`, `...compare.read_compare_result`, `..._sae_eval.read_sae_eval_result`,
`...sae.read_export_result`, `...features.load_features`, `...multid.read_multid_result`,
`...subspace.read_subspace_result`), cached per folder version (the mtime of
result.json), so a rerun step is read afresh."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import streamlit as st

from workbench.ui import common

GEOMETRY_LABELS = {
    "participation_ratio": "participation ratio",
    "n_dirs_90": "directions for 90% var.",
    "n_dirs_99": "directions for 99% var.",
    "effective_rank": "effective rank",
    "anisotropy": "anisotropy",
    "top1_variance_ratio": "top-1 variance ratio",
}


def _key(path: str | os.PathLike) -> int:
    return common.stamp(Path(path), "result.json", "tensors.safetensors")


@st.cache_resource(show_spinner=False, max_entries=64)
def _pca(path: str, key: int):
    from workbench.steps.pca import read_pca_result
    return read_pca_result(path)


@st.cache_resource(show_spinner=False, max_entries=64)
def _compare(path: str, key: int):
    from workbench.steps.compare import read_compare_result
    return read_compare_result(path)


@st.cache_resource(show_spinner=False, max_entries=64)
def _sae_eval(path: str, key: int):
    from workbench.steps._sae_eval import read_sae_eval_result
    return read_sae_eval_result(path)


@st.cache_resource(show_spinner=False, max_entries=4)
def _pca_model(path: str, key: int):
    return pca(path).pca()


@st.cache_resource(show_spinner=False, max_entries=16)
def _multid(path: str, key: int):
    from workbench.steps.multid import read_multid_result
    return read_multid_result(path)


@st.cache_resource(show_spinner=False, max_entries=16)
def _subspace(path: str, key: int):
    from workbench.steps.subspace import read_subspace_result
    return read_subspace_result(path)


def multid(path: str | os.PathLike):
    """The `MultidResult` of a multid folder (WorkbenchError when missing or of another kind)."""
    return _multid(str(path), common.stamp(Path(path), "result.json", "tensors.safetensors", "tokens.json"))


def subspace(path: str | os.PathLike):
    """The `SubspaceResult` of a subspace folder (WorkbenchError when missing or of another kind)."""
    return _subspace(str(path), _key(path))


def pca(path: str | os.PathLike):
    """The `PCAResult` of a pca folder (WorkbenchError when missing or of another kind)."""
    return _pca(str(path), _key(path))


def compare(path: str | os.PathLike):
    """The `CompareResult` of a compare folder (WorkbenchError when missing or of another kind)."""
    return _compare(str(path), _key(path))


def sae_eval(path: str | os.PathLike):
    """The `SAEEvalResult` of an sae_eval folder (WorkbenchError when missing or of another kind)."""
    return _sae_eval(str(path), _key(path))


def pca_model(path: str | os.PathLike):
    """The fitted analyses.pca.PCA of a pca result (for components beyond the stored two)."""
    return _pca_model(str(path), _key(path))


def pca_geometry(r) -> dict[str, float]:
    """The geometry numbers of a `PCAResult` the pages show, in GEOMETRY_LABELS order, plus d."""
    out = {k: r.geometry[k] for k in GEOMETRY_LABELS if r.geometry.get(k) is not None}
    out["d"] = r.d
    return out


def pca_projection(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [m, 2] of the sampled rows, their store rows [m]) as numpy."""
    coords, rows = pca(path).projection()
    return coords.float().numpy(), rows.numpy().astype(np.int64)
