"""Benchmark: peak memory of the store-reading stages against the number of rows, without the hours a real
collect of millions of tokens takes here. Writes synthetic stores (random float16 activations, d 576, one
document per 128-token sequence; ``workbench.store.write_store``) of each size, then runs the CLI a user runs,
each stage its own process: ``train-sae`` (TopK, the defaults), ``eval-sae --split held_out`` (a fixed
number of rows, so only the store size changes) and ``features``. Prints wall time and the peak anonymous
and file-backed resident memory of each (``/proc/PID/status``; the store is memory-mapped, its pages are
file-backed and the kernel drops them at will). The baseline is the smaller store: what is flat does not grow.

    .venv/bin/python benchmarks/bench_memory.py [--rows 1000000 2000000] [--d-sae 4096] [--workdir DIR] [--keep]
        [--stages train-sae eval-sae features] [--n-tokens N]

``--stages train-sae --n-tokens 8192`` measures the training stage alone in seconds: its memory is the
split plus the first shuffle window (~256 MiB of shards, in the seeded shard order). Compare sizes whose
first window is equally full: one holding the short last shard reads less (600,064 rows does; 680,064 and
1,500,032 do not). ``--workdir`` keeps the stores for a rerun.

``benchmarks/bench_scale.py`` runs the same stages on real activations of smollm2 (and collects them).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from _args import parse
from bench_scale import stage

from workbench.store import write_store

HOOK = "blocks.6.hook_resid_post"
SEQ = 128


def synthetic_store(path: Path, n_rows: int) -> None:
    n_seq = n_rows // SEQ
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(n_seq * SEQ, 576, generator=g).to(torch.float16)
    tok = torch.randint(0, 49_000, (n_seq, SEQ), generator=g)
    write_store(path, {HOOK: acts}, tok, torch.ones(n_seq, SEQ, dtype=torch.bool), torch.arange(n_seq),
                torch.arange(n_seq).repeat_interleave(SEQ), torch.arange(SEQ).repeat(n_seq), "smollm2-135m")


def main() -> None:
    a = parse(__doc__, rows=[1_000_000, 2_000_000], d_sae=4096, k=32, eval_rows=50_000, workdir="", keep=False,
              stages=["train-sae", "eval-sae", "features"], n_tokens=0)
    root = Path(a.workdir or tempfile.mkdtemp(prefix="wb-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"device: cpu ({torch.get_num_threads()} threads); synthetic stores in {root}; TopK d_sae {a.d_sae}, "
          f"k {a.k}; eval-sae on {a.eval_rows} held-out rows")
    print(f"{'rows':>10}  {'stage':<10} {'wall s':>7} {'anon MB':>8} {'file MB':>8}")
    try:
        for n in a.rows:
            store, sae = root / f"store-{n}", root / f"sae-{n}"
            if not (store / "manifest.json").exists():
                shutil.rmtree(store, ignore_errors=True)
                synthetic_store(store, n)
            shutil.rmtree(sae, ignore_errors=True)
            stages = [
                ("train-sae", ["train-sae", str(store), "--hook", HOOK, "--arch", "topk", "--d-sae", str(a.d_sae),
                               "--k", str(a.k), "--out", str(sae), "--device", "cpu", "--eval-tokens", "0",
                               *(["--n-tokens", str(a.n_tokens)] if a.n_tokens else [])]),
                ("eval-sae", ["eval-sae", str(sae), str(store), "--split", "held_out", "--max-tokens",
                              str(a.eval_rows), "--ce-sequences", "0", "--device", "cpu", "--out",
                              str(root / f"eval-{n}")]),
                ("features", ["features", str(sae), str(store), "--device", "cpu", "--no-logits", "--out",
                              str(root / f"features-{n}")])]
            for name, argv in stages:
                if name not in a.stages:
                    continue
                if name != "train-sae":
                    shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
                r = stage(name, argv, root / f"{name}-{n}.log")
                print(f"{n:>10,}  {name:<10} {r['wall_s']:7.0f} {r['peak_anon_mb']:8.0f} {r['peak_file_mb']:8.0f}",
                      flush=True)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
