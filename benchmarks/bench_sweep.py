"""Overhead of the sweep machinery (validation, hook resolution, hashing, planning, the runs
index, scheduling, progress) as a fraction of the steps' own compute, on a tiny-model sweep.

    .venv/bin/python benchmarks/bench_sweep.py [--executor local|ray] [--keep DIR]

Baseline = the time spent inside the step functions themselves (each registered step function is
wrapped with a timer in this process). Overhead = wall time of `workbench.sweep.run` minus that.
Reported for a first run (empty workspace) and a rerun where everything is cached (pure
machinery). Target: first-run overhead under 5% of the steps' compute.

Imports (torch, transformers) are paid once before timing starts, as any real session does; the
hook cache is private and empty so the first plan resolves hooks by loading the model ("cold") and a second
first run on a new workspace shows the usual case ("warm", cache hit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sweep_config(name: str) -> dict:
    return {
        "sweep": {"name": name},
        "models": [{"spec": "tiny-random:layers=4", "name": "tiny", "hooks": ["blocks.*.hook_resid_post"]}],
        "corpus": {"spec": "builtin", "max_tokens": 4096, "seq_len": 64},
        "collect": {"batch_size": 16, "progress": False},
        "pca": {"k": 16},
        "train_sae": {"arch": ["topk", "batchtopk"], "d_sae": 128, "k": [8, 16],
                      "hooks": ["blocks.{1,3}.hook_resid_post"], "progress": False},
        "eval_sae": {"ce_sequences": 4},
        "features": {"logits": False},
        "compare": {"metrics": ["linear_cka", "svcca"]},
    }


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--keep", default=None, help="keep the workspaces under this folder")
    args = ap.parse_args()

    import workbench.steps as steps
    import workbench.sweep as sweep
    from workbench.sweep import dag

    # pay the heavy imports before timing (a real session has them too)
    import workbench.models  # noqa: F401
    import workbench.collector  # noqa: F401
    import transformers  # noqa: F401
    import transformer_lens  # noqa: F401

    spent: dict[str, float] = {"fn": 0.0}
    for st in steps.STEPS.values():
        fn = st.fn

        def timed(cfg, _fn=fn):
            t0 = time.perf_counter()
            try:
                return _fn(cfg)
            finally:
                spent["fn"] += time.perf_counter() - t0
        st.fn = timed

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "sweep-hooks.json"                    # a private hook cache, empty: the first
    dag._cache_file = lambda: cache                      # plan resolves hooks by loading the model
    if args.executor == "ray":
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    def timed_run(ws: Path, name: str):
        spent["fn"] = 0.0
        t0 = time.perf_counter()
        df = sweep.run(sweep_config(name), workspace=ws, executor=args.executor, progress=False)
        return time.perf_counter() - t0, spent["fn"], df

    rows = []
    for label, ws in (("first run, cold hook cache", root / "ws1"),
                      ("first run, warm hook cache", root / "ws2"),
                      ("rerun, all cached", root / "ws2")):
        wall, fn, df = timed_run(ws, "bench")
        n = len(df)
        outcomes = df["outcome"].value_counts().to_dict()
        rows.append((label, n, outcomes, wall, fn))
    base_fn = rows[1][4]
    print(f"device: {device_name()}   executor: {args.executor}")
    print(f"{'case':30} {'steps':>5} {'wall s':>8} {'steps s':>8} {'overhead s':>10} {'overhead':>9}")
    for label, n, outcomes, wall, fn in rows:
        over = wall - fn
        ref = fn if fn > 0 else base_fn
        extra = "" if fn > 0 else "  (vs the first run's step time)"
        print(f"{label:30} {n:5d} {wall:8.2f} {fn:8.2f} {over:10.2f} {over / ref:9.1%}{extra}   {outcomes}")
    if args.executor == "local":
        # the machinery alone: validate + plan (hashing, index lookups) of the done sweep
        t0 = time.perf_counter()
        for _ in range(5):
            sweep.plan(sweep.load(sweep_config("bench")), root / "ws2", create=False)
        print(f"validate + plan ({rows[2][1]} steps, cached hooks): "
              f"{(time.perf_counter() - t0) / 5 * 1000:.0f} ms")
    if args.executor == "ray" and args.keep is None:
        import ray
        ray.shutdown()
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
