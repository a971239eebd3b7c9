"""Benchmark: `workbench.collect` throughput (including disk writes) against two baselines run in
the same process on the same token batches:

  (a) the model's own forward (plain Hugging Face, layers truncated after the deepest hooked
      layer), no hooks, no writes — the compute floor;
  (b) TransformerLens `run_with_cache` on the full model (every hook cached, as a naive script
      does), then selecting the hooks' non-padding rows and moving them to the CPU (no writes).

Also prints the peak resident memory (RSS) of a fresh `collect` process at two max_tokens values,
which must not grow with max_tokens (rows stream to shards).

    .venv/bin/python benchmarks/bench_collect.py [--tokens 20480] [--device auto] \
        [--hooks blocks.6.hook_resid_post] [--skip-b] [--skip-rss]

Target: collect >= 0.95x of (a) at layer 6 alone and at 6+15, and faster than (b). Collect runs
attention through SDPA (as HF does by default) unless a hook needs the attention pattern, skips
the bridge's duplicate norm statistics, tokenises ahead and writes shards in background threads.
(a) stops exactly where collect does: after the deepest hooked block, without the final norm.

The machine may be shared: (a) and collect are timed in alternating rounds (A C, C A, A C, ...)
in this process and the summary reports the median of the per-round ratios (and of the
per-batch ratios of (a) against Model.run alone), not a ratio of two separately-taken bests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workbench.collector import _excluded_ids, collect  # noqa: E402
from workbench.corpus import iter_documents, pack  # noqa: E402
from workbench.models import load_model  # noqa: E402


class RSSPeak:
    """Peak resident set size of this process while the block runs (sampled)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        gc.collect()
        self.start = self.now()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def make_batches(model, n_tokens, seq_len, batch_size):
    """The same windows collect uses (BOS first for causal models, as collect's default), as
    padded batches, cut after n_tokens rows: the baselines run exactly collect's batches."""
    special = dict(model.special_ids)
    bos = getattr(model, "text_bos_id", None) if model.kind == "causal" else None
    if bos is not None:
        special["bos"] = int(bos)
    _, excluded = _excluded_ids("exclude", special)
    excl = torch.tensor(excluded, dtype=torch.long)
    pad = model.special_ids.get("pad") or 0
    batches, rows, cur = [], 0, []
    for w in pack(iter_documents("builtin"), model.tokenizer, seq_len, bos_id=bos):
        cur.append(w)
        if len(cur) == batch_size:
            L = max(len(x.ids) for x in cur)
            ids = torch.full((len(cur), L), pad, dtype=torch.long)
            mask = torch.zeros((len(cur), L), dtype=torch.long)
            for i, x in enumerate(cur):
                ids[i, :len(x.ids)] = torch.tensor(x.ids)
                mask[i, :len(x.ids)] = 1
            keep = mask.bool() & ~torch.isin(ids, excl)
            batches.append((ids, mask, keep))
            rows += int(keep.sum())
            cur = []
            if rows >= n_tokens:
                break
    return batches, rows


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20_480, help="rows to collect (>= 20k for the report)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hooks", nargs="+", default=["blocks.6.hook_resid_post", "blocks.15.hook_resid_post"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-mb", type=float, default=8,
                    help="shard size of collect (small, so that both RSS runs span several shards)")
    ap.add_argument("--skip-b", action="store_true", help="skip the TransformerLens baseline")
    ap.add_argument("--skip-rss", action="store_true", help="skip the fresh-process peak-RSS runs")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of (a) and collect (order alternating per round); the summary "
                         "reports the median of the per-round ratios")
    args = ap.parse_args(argv)

    model = load_model(args.model, device=args.device)
    dev = torch.device(model.device)
    hooks = model.resolve_hooks(args.hooks)
    deepest = max(model.layer_of(h) for h in hooks)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"device: {dev} ({where}); model {args.model}; hooks {hooks}; "
          f"seq_len {args.seq_len}, batch {args.batch_size}; attention {model.attention_for(hooks)}",
          flush=True)

    batches, n_rows = make_batches(model, args.tokens, args.seq_len, args.batch_size)
    print(f"{len(batches)} batches, {n_rows} rows", flush=True)

    # ---------------------------------------------------------- (a) plain HF forward, truncated
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=model.dtype).to(dev).eval()
    base = hf.model
    base.layers = base.layers[:deepest + 1]
    hf.config.num_hidden_layers = deepest + 1
    base.norm = torch.nn.Identity()      # collect stops at the block's output: no final norm either
    print(f"(a) uses Hugging Face attn_implementation={hf.config._attn_implementation!r}", flush=True)
    with torch.inference_mode():     # warm-up
        ids, mask, _ = batches[0]
        base(input_ids=ids[:2].to(dev), attention_mask=mask[:2].to(dev))
    sync(dev)

    def run_a():
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids, mask, _ in batches:
                base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        sync(dev)
        return time.perf_counter() - t, time.process_time() - c

    # ------------- (a) vs Model.run alone, alternated batch by batch (A B, B A, ...: robust to load drift)
    t_ai = t_ri = 0.0
    per_batch = []
    for i, (ids, mask, _) in enumerate(batches):
        t = {}
        for which in (("a", "run") if i % 2 == 0 else ("run", "a")):
            t0 = time.perf_counter()
            if which == "a":
                with torch.inference_mode():
                    base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            else:
                model.run(ids.to(dev), mask.to(dev), hooks)
            sync(dev)
            t[which] = time.perf_counter() - t0
        t_ai, t_ri = t_ai + t["a"], t_ri + t["run"]
        per_batch.append(t["a"] / t["run"])
    r_run = statistics.median(per_batch)
    print(f"(a) vs Model.run ({model.attention_for(hooks)}), batch by batch: {n_rows / t_ai:.1f} vs "
          f"{n_rows / t_ri:.1f} tok/s, median per-batch ratio {r_run:.3f}", flush=True)

    # ---------------------------------------------------------- (b) TL run_with_cache, full model
    t_b = c_b = None
    if not args.skip_b:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids, mask, keep in batches:
                _, cache = model.bridge.run_with_cache(ids.to(dev), attention_mask=mask.to(dev))
                kd = keep.to(dev)
                got = [cache[h][kd].to("cpu") for h in hooks]
                del cache, got
        sync(dev)
        t_b, c_b = time.perf_counter() - t, time.process_time() - c
        gc.collect()
        print(f"(b) TL run_with_cache full model + select:   {n_rows / t_b:9.1f} tok/s ({t_b:.1f}s wall, "
              f"{c_b:.1f}s CPU)", flush=True)

    # ------------------------------------- (a) and collect alternated, `--repeats` rounds each
    tmp = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    try:
        def run_collect(r):
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            store = collect(model, hooks, corpus="builtin", out=tmp / f"s{r}", max_tokens=n_rows,
                            seq_len=args.seq_len, batch_size=args.batch_size, progress=False,
                            shard_mb=args.shard_mb)
            sync(dev)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            n_shards = len(store.shard_files())
            disk = sum(p.stat().st_size for p in store.shard_files())
            print(f"round {r + 1}: collect max_tokens={n_rows}: {n_rows / dt:9.1f} tok/s ({dt:.1f}s wall, "
                  f"{dc:.1f}s CPU), {n_shards} shards, {disk / 2**20:.0f} MiB on disk", flush=True)
            shutil.rmtree(tmp / f"s{r}", ignore_errors=True)
            return dt, dc

        collect(model, hooks, corpus="builtin", out=tmp / "warm", max_tokens=64, seq_len=args.seq_len,
                batch_size=args.batch_size, progress=False, shard_mb=args.shard_mb)   # warm-up
        a_runs, c_runs = [], []
        for r in range(args.repeats):
            for which in (("a", "c") if r % 2 == 0 else ("c", "a")):
                if which == "c":
                    c_runs.append(run_collect(r))
                    continue
                gc.collect()
                t_a, c_a = run_a()
                a_runs.append((t_a, c_a))
                print(f"round {r + 1}: (a) HF forward to layer {deepest}, no hooks/writes: {n_rows / t_a:9.1f} "
                      f"tok/s ({t_a:.1f}s wall, {c_a:.1f}s CPU)", flush=True)
        hf = base = None          # free the HF copy before the RSS runs
        gc.collect()
        t_a, c_a = statistics.median(x[0] for x in a_runs), statistics.median(x[1] for x in a_runs)
        dt, dc = statistics.median(x[0] for x in c_runs), statistics.median(x[1] for x in c_runs)
        per_round = [a[0] / c_[0] for a, c_ in zip(a_runs, c_runs)]
        per_round_cpu = [a[1] / c_[1] for a, c_ in zip(a_runs, c_runs)]

        # ------------------------------------------------------ peak RSS, fresh processes
        rss = {}
        for n in () if args.skip_rss else (n_rows // 2, n_rows):
            cmd = [sys.executable, __file__, "--child", str(n), str(tmp / f"c{n}"), "--model", args.model,
                   "--device", args.device, "--seq-len", str(args.seq_len), "--batch-size",
                   str(args.batch_size), "--shard-mb", str(args.shard_mb), "--hooks", *args.hooks]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss[n] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"collect max_tokens={n} in a fresh process: peak RSS {rss[n]['peak_mib']:.0f} MiB "
                  f"(after loading the model {rss[n]['loaded_mib']:.0f} MiB; collect adds "
                  f"{rss[n]['peak_mib'] - rss[n]['loaded_mib']:.0f} MiB), store {rss[n]['disk_mib']:.0f} MiB",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    speed = n_rows / dt
    print("\n== summary ==")
    print(f"device: {dev} ({where})")
    print(f"collect (incl. tokenising + disk writes): {speed:.1f} tok/s")
    print(f"ratio collect / (a) plain forward:        {statistics.median(per_round):.3f} wall, "
          f"{statistics.median(per_round_cpu):.3f} CPU-time  (median of {args.repeats} alternating rounds; "
          "target >= 0.95)")
    print("ratio per round (wall):                   " + ", ".join(f"{x:.3f}" for x in per_round))
    print(f"ratio of the median times:                {t_a / dt:.3f} wall, {c_a / dc:.3f} CPU-time")
    print(f"ratio Model.run / (a), batch by batch:    {r_run:.3f} wall (median per batch; the forward alone)")
    if t_b is not None:
        print(f"ratio collect / (b) TL run_with_cache:    {t_b / dt:.3f} wall, {c_b / dc:.3f} CPU-time  "
              "(target > 1)")
    if dev.type == "cpu":
        print("(on a shared CPU, wall-clock ratios move with the other load; CPU-time ratios count "
              "the work done by this process, collect's writer thread included)")
    if not rss:
        return
    (n1, r1), (n2, r2) = sorted(rss.items())
    print(f"peak RSS of a collect process: max_tokens={n1}: {r1['peak_mib']:.0f} MiB; max_tokens={n2}: "
          f"{r2['peak_mib']:.0f} MiB (growth {r2['peak_mib'] - r1['peak_mib']:+.0f} MiB while the store "
          f"grew {r2['disk_mib'] - r1['disk_mib']:+.0f} MiB)")


def child(argv):
    """--child N OUT [options]: collect N rows in this fresh process, print peak RSS as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--model")
    ap.add_argument("--device")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--shard-mb", type=float)
    ap.add_argument("--hooks", nargs="+")
    a = ap.parse_args(argv)
    n, out = int(a.child[0]), a.child[1]
    model = load_model(a.model, device=a.device)
    list(iter_documents("builtin"))          # the corpus text cache, same in both runs
    gc.collect()
    loaded = RSSPeak.now()
    try:   # reset the kernel's peak-RSS counter (VmHWM), so model loading does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    store = collect(model, a.hooks, corpus="builtin", out=out, max_tokens=n, seq_len=a.seq_len,
                    batch_size=a.batch_size, progress=False, shard_mb=a.shard_mb)
    disk = sum(p.stat().st_size for p in store.shard_files())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    print(json.dumps({"peak_mib": peak / 2**20,
                      "loaded_mib": loaded / 2**20, "disk_mib": disk / 2**20}))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[1:])
    else:
        main()
