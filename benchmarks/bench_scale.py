"""Benchmark: the whole pipeline at scale, stage by stage, through the CLI a user runs:
collect smollm2-135m ``blocks.6.hook_resid_post`` -> train a 16,384-latent TopK SAE -> evaluate it on the
held-out documents (FVU, L0, CE loss recovered) -> build the feature dashboards over every stored row.
Each stage is its own process; the table gives its wall time, tokens/s and peak RSS (``wait4`` ru_maxrss),
split into anonymous and file-backed memory (the store is memory-mapped: its pages count in RSS but are the
kernel's page cache), at each ``--tokens`` value, so memory growth with tokens shows directly (the goal:
anonymous memory flat).

    .venv/bin/python benchmarks/bench_scale.py --tokens 200000 2000000 [--work /tmp/wb-scale] [--d-sae 16384]

The builtin corpus holds about 0.5M tokens: larger runs read it as ``builtin*N`` (N epochs, the same
documents with the same ids each epoch, so a held-out document is held out of every epoch); the
epochs used are printed. Rows then repeat: FVU at 2M measures the pipeline, not a 2M-token-corpus SAE.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _args import parse  # noqa: E402

HOOK = "blocks.6.hook_resid_post"


def builtin_rows(model_spec: str, seq_len: int) -> int:
    """Rows one epoch of the builtin corpus gives (tokens without the BOS row), by packing it."""
    from workbench.corpus import iter_documents, pack
    from workbench.models import load_model
    m = load_model(model_spec, device="cpu")
    bos = m.special_ids.get("bos")
    return sum(len(w.ids) - (bos is not None) for w in pack(iter_documents("builtin"), m.tokenizer, seq_len,
                                                            bos_id=bos))


def stage(name: str, argv: list[str], log: Path) -> dict:
    """Run one CLI stage as its own process; wall time, peak RSS and its --json summary."""
    cmd = [sys.executable, "-m", "workbench.cli", *argv, "--json"]
    t = time.perf_counter()
    peak = {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        sampler = threading.Thread(target=_sample, args=(p.pid, peak), daemon=True)
        sampler.start()
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"stage {name} failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    try:
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    except json.JSONDecodeError:
        summary = {"stdout": out[-500:]}
    return {"stage": name, "wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "peak_anon_mb": peak["RssAnon"] / 1024,
            "peak_file_mb": peak["RssFile"] / 1024, "summary": summary}


def _sample(pid: int, peak: dict) -> None:
    """Peak anonymous and file-backed resident memory of a process (``/proc/PID/status``, every 0.2 s): the
    store is memory-mapped, so its pages count in ru_maxrss although the kernel can drop them at will."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    k = line.split(":", 1)[0]
                    if k in peak:
                        peak[k] = max(peak[k], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.2)


def run_scale(a, n: int, per_epoch: int) -> list[dict]:
    epochs = max(1, math.ceil(n / (per_epoch * 0.97)))   # 0.97: slack for the store's row accounting
    corpus = "builtin" if epochs == 1 else f"builtin*{epochs}"
    w = Path(a.work) / str(n)
    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    store, sae = w / "store", w / "sae"
    rows = []
    r = stage("collect", ["collect", "--model", a.model, "--hooks", HOOK, "--corpus", corpus,
                          "--max-tokens", str(n), "--out", str(store), "--device", a.device], w / "collect.log")
    n_rows = int(json.loads((store / "manifest.json").read_text()).get("n_rows", n))
    r.update(tokens=n_rows, corpus=corpus)
    rows.append(r)
    r = stage("train-sae", ["train-sae", str(store), "--hook", HOOK, "--arch", "topk", "--d-sae", str(a.d_sae),
                            "--k", str(a.k), "--out", str(sae), "--device", a.device, "--eval-tokens", "0"],
              w / "train.log")
    cfg = json.loads((sae / "cfg.json").read_text())
    r.update(tokens=int(cfg["metadata"]["workbench"]["n_tokens"]) if "metadata" in cfg else n_rows)
    rows.append(r)
    r = stage("eval-sae (held-out)", ["eval-sae", str(sae), str(store), "--split", "held_out", "--max-tokens",
                                      str(a.eval_tokens), "--ce-sequences", str(a.ce_sequences), "--device",
                                      a.device, "--out", str(w / "eval")], w / "eval.log")
    res = json.loads((w / "eval" / "result.json").read_text())
    m, ce = res["metrics"], res.get("ce") or {}
    keys = ("fvu", "l0", "dead_fraction"), ("ce_loss_recovered", "ce_loss_recovered_se", "delta_lm_loss", "n_sequences")
    r.update(tokens=int(m["n_tokens"]), metrics={"split": res["split"], "heldout_rows": m["n_tokens"],
                                                 **{k: m.get(k) for k in keys[0]}, **{k: ce.get(k) for k in keys[1]}})
    rows.append(r)
    r = stage("features", ["features", str(sae), str(store), "--device", a.device, "--out", str(w / "features"),
                           "--no-logits"], w / "features.log")
    r.update(tokens=n_rows)
    rows.append(r)
    for r in rows:
        r["tok_per_s"] = r["tokens"] / r["wall_s"] if r.get("tokens") else None
        r["scale"] = n
    if not a.keep:
        shutil.rmtree(store, ignore_errors=True)
    return rows


def main() -> None:
    a = parse(__doc__, tokens=[200_000, 2_000_000], work="/tmp/wb-scale", model="smollm2-135m", d_sae=16384,
              k=32, eval_tokens=100_000, ce_sequences=64, device="auto", keep=False, seq_len=128)
    per_epoch = builtin_rows(a.model, a.seq_len)
    print(f"builtin corpus: {per_epoch:,} rows per epoch (seq_len {a.seq_len}, BOS not stored)", flush=True)
    allrows = []
    for n in a.tokens:
        rows = run_scale(a, int(n), per_epoch)
        allrows += rows
        for r in rows:
            print(f"  [{n:,}] {r['stage']:20} {r['wall_s']:8.1f} s  {r['tokens']:>10,} tok  "
                  f"{(r['tok_per_s'] or 0):>9,.0f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB (anonymous "
                  f"{r['peak_anon_mb']:.0f}, file-backed {r['peak_file_mb']:.0f})", flush=True)
    dev = "cuda: " + torch.cuda.get_device_name() if a.device != "cpu" and torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"
    print(f"\ndevice: {dev}; model {a.model}; hook {HOOK}; TopK d_sae {a.d_sae} k {a.k}")
    print("| stage | tokens requested | corpus | tokens | wall s | tokens/s | peak RSS MB | anonymous MB | file MB |\n"
          + "|---" * 9 + "|")
    corpus = {r["scale"]: r.get("corpus") for r in allrows if r["stage"] == "collect"}
    for r in allrows:
        print(f"| {r['stage']} | {r['scale']:,} | {corpus[r['scale']]} | {r['tokens']:,} | {r['wall_s']:.1f} | "
              f"{(r['tok_per_s'] or 0):,.0f} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
              f"{r['peak_file_mb']:.0f} |")
    for r in allrows:
        if "metrics" in r:
            print(f"held-out eval at {r['scale']:,}: {json.dumps(r['metrics'])}")
    scales = sorted({r["scale"] for r in allrows})
    if len(scales) > 1:
        for st in dict.fromkeys(r["stage"] for r in allrows):
            lo = next(r for r in allrows if r["stage"] == st and r["scale"] == scales[0])
            hi = next(r for r in allrows if r["stage"] == st and r["scale"] == scales[-1])
            grow = hi["peak_anon_mb"] / max(lo["peak_anon_mb"], 1)
            print(f"peak anonymous memory {st}: {lo['peak_anon_mb']:.0f} MB at {scales[0]:,} -> "
                  f"{hi['peak_anon_mb']:.0f} MB at {scales[-1]:,} ({grow:.2f}x for {scales[-1] // scales[0]}x tokens)")
    (Path(a.work) / "bench_scale.json").write_text(json.dumps(allrows, indent=1, default=str))


if __name__ == "__main__":
    main()
