"""`workbench demo`: the whole pipeline on the embedded defaults, expressed as the sweep file
`workbench/demo.toml` (collect smollm2-135m and minilm-l6 on the builtin corpus, PCA of every hook,
layer x layer CKA within smollm2 and smollm2 vs minilm at document level, a TopK SAE with its
evaluation (CE loss recovered on the real model), feature dashboards and exports). Being a sweep,
it is resumable: run it again after an interruption and completed steps are skipped."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import WorkbenchError

DEMO_FILE = Path(__file__).with_name("demo.toml")


def demo_config(workspace: str, quick: bool = False) -> dict[str, Any]:
    cfg = tomllib.loads(DEMO_FILE.read_text())
    cfg["sweep"]["workspace"] = str(workspace)
    if quick:   # same pipeline, smaller: for tests and slow machines
        cfg = copy.deepcopy(cfg)
        cfg["corpus"]["max_tokens"] = 64 * 128   # 64 documents: the floor for a document-level comparison is 50
        for m in cfg["models"]:
            if m["name"] == "smol":
                m["hooks"] = ["blocks.{3,6}.hook_resid_post"]
            else:
                m["hooks"] = ["blocks.{1,4}.hook_resid_post"]
        cfg["train_sae"].update(d_sae=1152, k=16, n_tokens=8192)
        cfg["eval_sae"]["ce_sequences"] = 4
    return cfg


def run_demo(workspace: str = "demo-workspace", quick: bool = False) -> dict[str, Any]:
    from .sweep import run as run_sweep

    print(f"workbench demo: building {workspace} (resumable; rerun to continue)", file=sys.stderr)
    frame = run_sweep(demo_config(workspace, quick), workspace, summary=True)
    bad = frame[frame["outcome"].isin(["failed", "skipped"])]
    if len(bad):
        raise WorkbenchError(
            f"demo: {len(bad)} step(s) did not complete ({', '.join(map(str, bad['node']))}); "
            f"`workbench runs list --workspace {workspace} --status failed` shows why")
    return {"workspace": str(Path(workspace).resolve()), "steps": int(len(frame)),
            "outcomes": frame["outcome"].value_counts().to_dict()}
