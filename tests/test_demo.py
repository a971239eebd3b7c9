"""The Quickstart's main job, end to end on the real embedded models (smaller sizes: --quick)."""

import json

import pytest

from workbench.cli import main
from workbench.workspace import Workspace

pytestmark = pytest.mark.slow


def test_demo_quick_builds_a_complete_workspace(tmp_path, capsys):
    ws_dir = tmp_path / "demo"
    assert main(["demo", "--workspace", str(ws_dir), "--no-app", "--quick", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outcomes"].get("failed", 0) == 0 and summary["outcomes"].get("skipped", 0) == 0
    ws = Workspace(ws_dir, create=False)
    runs = ws.runs()
    assert runs and all(r.status == "done" for r in runs)
    steps = {r.step for r in runs}
    assert {"collect", "pca", "compare", "train_sae", "eval_sae", "features", "export_sae"} <= steps
    ev = next(r for r in runs if r.step == "eval_sae")
    # CE loss recovered on the real model: the SAE must do much better than zero-ablation
    assert 0.0 < ev.metrics["ce_loss_recovered"] <= 1.05, ev.metrics
    assert ev.metrics["ce_sae"] < ev.metrics["ce_zero"]
    cross = [r for r in runs if r.step == "compare" and r.config.get("store_b")]
    assert cross, "smollm2 vs minilm comparison missing"
    res = json.loads((ws.abs(cross[0].artifacts["result"]) / "result.json").read_text())
    assert res.get("align", res.get("alignment")) == "document"
    # rerunning is a no-op: every step is recognised as complete
    assert main(["demo", "--workspace", str(ws_dir), "--no-app", "--quick", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert set(again["outcomes"]) == {"cached"}
    assert len(Workspace(ws_dir, create=False).runs()) == len(runs)
