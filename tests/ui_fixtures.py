"""A small, complete workspace for the UI tests (AppTest and browser), built once per test process
with the real public functions: tiny-random model -> collect -> pca (two hooks) -> train_sae ->
features -> compare. Import the `ui_workspace` fixture from here."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
MODEL = "tiny-random"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
SAE_HOOK = HOOKS[1]
D_SAE = 64

_LOCK = threading.Lock()
_BUILT: dict[str, dict] = {}


def build_workspace(root: Path) -> dict:
    """Fill `root` with one store, two PCA results, one SAE, its features and a CKA comparison.
    Returns the paths (and a few numbers) the tests check against."""
    import workbench
    from workbench.steps import STEPS, run_step
    from workbench.workspace import Workspace

    t0 = time.time()
    ws = Workspace(root)
    store = root / "stores" / "tiny"
    model = workbench.load_model(MODEL, device="cpu")
    workbench.collect(model, hooks=HOOKS, corpus="builtin", out=store, max_tokens=1536,
                      seq_len=32, batch_size=16, device="cpu", progress=False)
    pcas = {}
    for h in HOOKS if "pca" in STEPS else []:
        out = root / "results" / f"pca-{h.split('.')[1]}"
        run_step("pca", {"store": str(store), "hook": h, "k": 8, "out": str(out),
                         "device": "cpu", "sample": 1000}, workspace=ws)
        pcas[h] = out
    sae = root / "saes" / "sae-b1"
    run_step("train_sae", {"store": str(store), "hook": SAE_HOOK, "arch": "topk", "d_sae": D_SAE,
                           "k": 4, "out": str(sae), "device": "cpu", "batch_size": 256,
                           "n_tokens": 3072, "eval_tokens": 512, "progress": False}, workspace=ws)
    feats = root / "results" / "features-b1"
    run_step("features", {"sae": str(sae), "store": str(store), "out": str(feats), "device": "cpu",
                          "n_top": 8, "per_bucket": 3, "n_buckets": 4}, workspace=ws)
    cmp = root / "results" / "compare-cka"
    if "compare" in STEPS:
        run_step("compare", {"store_a": str(store), "metric": "linear_cka", "hooks_a": HOOKS,
                             "out": str(cmp), "device": "cpu"},
                 workspace=ws)
    return {"root": root, "ws": ws, "store": store, "pca": pcas, "sae": sae, "features": feats,
            "compare": cmp, "seconds": time.time() - t0}


def get_workspace(base: Path) -> dict:
    """Build once per process (both test modules share it; a failed build is not retried)."""
    with _LOCK:
        if "error" in _BUILT:
            raise RuntimeError(f"building the UI test workspace failed earlier: {_BUILT['error']}")
        if "ws" not in _BUILT:
            root = base / "ui-ws"
            if root.exists():
                shutil.rmtree(root)
            try:
                _BUILT["ws"] = build_workspace(root)
            except Exception as e:
                _BUILT["error"] = f"{type(e).__name__}: {e}"
                raise
        return _BUILT["ws"]


@pytest.fixture(scope="session")
def ui_workspace(tmp_path_factory) -> dict:
    return get_workspace(tmp_path_factory.getbasetemp())
