"""Benchmark: 4 SAEs (2 hooks x 2 widths) trained straight from the model in ONE pass
(analyses.sae.multi.train_saes over a workbench.model_stream.ModelStream) vs 4 separate from-the-model
runs (each its own forward passes), same seeds, same batches. Prints wall times, the ratio, each SAE's
held-out FVU both ways, and the device.

    .venv/bin/python benchmarks/bench_sae_multi.py [--model smollm2-135m] [--tokens 16384] [--device auto] [--cli]
        [--autocast]

Goal: one pass >= 2.5x faster than the 4 separate runs, FVU equal within noise (same seed: the
same data order, so the SAEs should in fact be identical up to float rounding).

In process (the default), the model is loaded once and shared: the ratio counts the forwards and the SAE
steps only. ``--cli`` also times what a user runs: one ``workbench train-sae --model`` command with the 2 x 2
grid against 4 single commands (each loads the model, trains, evaluates on held-out documents and saves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _args import parse

from analyses.sae import evaluate_sae
from analyses.sae.multi import train_saes
from workbench.model_stream import ModelStream
from workbench.models import load_model


def main() -> None:
    a = parse(__doc__, model="smollm2-135m", hooks=["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"],
              widths=[2304, 4608], k=32, tokens=16384, batch_size=1024, buffer_tokens=8192, eval_tokens=4096,
              device="auto", cli=False, autocast=False)
    model = load_model(a.model, device=a.device)
    specs = [dict(hook=h, d_sae=w, k=a.k, seed=0) for h in a.hooks for w in a.widths]

    def stream():
        return ModelStream(model, a.hooks, "builtin", seq_len=128, buffer_tokens=a.buffer_tokens, seed=0)

    held = {h: [] for h in a.hooks}
    for b in stream().heldout_batches(1024, a.eval_tokens):
        for h in a.hooks:
            held[h].append(b[h])

    def fvu(sae, h):
        return float(evaluate_sae(sae, held[h], device=sae.device)["fvu"])

    ac = True if a.autocast else None      # --autocast: bf16 steps on CPU too (analyses.sae.train.resolve_autocast)
    # warm-up outside the timings (first-call costs of the SAE steps), which would land on whichever side runs
    # first; the model is already warm from the held-out rows above
    train_saes(stream(), specs, n_tokens=2 * a.batch_size, batch_size=a.batch_size, device=a.device,
               progress=False, autocast=ac)
    t = time.perf_counter()
    ms = stream()
    one = train_saes(ms, specs, n_tokens=a.tokens, batch_size=a.batch_size, device=a.device, progress=False,
                     autocast=ac)
    t_one = time.perf_counter() - t
    fw_one = ms.n_forward_tokens
    t = time.perf_counter()
    sep, fw_sep = [], 0
    for s in specs:
        ms = ModelStream(model, [s["hook"]], "builtin", seq_len=128, buffer_tokens=a.buffer_tokens, seed=0)
        sep += train_saes(ms, [s], n_tokens=a.tokens, batch_size=a.batch_size, device=a.device, progress=False,
                          autocast=ac)
        fw_sep += ms.n_forward_tokens
    t_sep = time.perf_counter() - t
    dev = next(iter(one[0].parameters())).device
    print(f"device: {dev} ({torch.get_num_threads()} threads); model {a.model}; {a.tokens} tokens; batch "
          f"{a.batch_size}; buffer {a.buffer_tokens}; SAE steps {'bf16 autocast' if a.autocast else 'default'}")
    print(f"one pass:      {t_one:8.1f} s  ({fw_one} rows forwarded, {len(specs) * a.tokens / t_one:,.0f} SAE-tok/s)")
    print(f"4 separate:    {t_sep:8.1f} s  ({fw_sep} rows forwarded)")
    print(f"ratio separate / one pass: {t_sep / t_one:.2f}x (goal >= 2.5x)")
    for s, o, p in zip(specs, one, sep):
        same = all(torch.equal(x, y) for x, y in zip(o.state_dict().values(), p.state_dict().values()))
        print(f"  {s['hook']:28} d_sae={s['d_sae']:5}  FVU one pass {fvu(o, s['hook']):.4f}  separate "
              f"{fvu(p, s['hook']):.4f}  identical weights: {same}")


    if a.cli:
        cli(a)


def cli(a) -> None:
    """The same grid as CLI commands, each its own process: 1 grid command vs 4 single ones."""
    exe = str(Path(sys.executable).with_name("workbench"))
    common = ["--model", a.model, "--corpus", "builtin", "--k", str(a.k), "--n-tokens", str(a.tokens),
              "--batch-size", str(a.batch_size), "--buffer-tokens", str(a.buffer_tokens), "--eval-tokens",
              str(a.eval_tokens), "--device", a.device, "--seed", "0", "--json"]
    with tempfile.TemporaryDirectory() as tmp:
        def run(out: str, hooks: list[str], widths: list[int]) -> float:
            cmd = [exe, "train-sae", *common, "--hooks", *hooks, "--d-sae", *map(str, widths),
                   "--out", os.path.join(tmp, out), "--workspace", os.path.join(tmp, "ws")]
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
            json.loads(r.stdout)
            return time.perf_counter() - t
        t_one = run("grid", a.hooks, a.widths)
        t_sep = [run(f"sep{i}", [h], [w]) for i, (h, w) in enumerate((h, w) for h in a.hooks for w in a.widths)]
    print(f"CLI, each command its own process (model load, training, held-out eval of {a.eval_tokens} rows, save):")
    print(f"one grid command: {t_one:8.1f} s")
    print(f"4 commands:       {sum(t_sep):8.1f} s  ({' + '.join(f'{t:.1f}' for t in t_sep)})")
    print(f"ratio CLI: {sum(t_sep) / t_one:.2f}x")


if __name__ == "__main__":
    main()
