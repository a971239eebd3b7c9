"""Benchmark: interventions on smollm2-135m at blocks.6.hook_resid_post with a 16k-latent TopK SAE
(random weights, k=32), against the unmodified model in the same process.

    .venv/bin/python benchmarks/bench_interventions.py [--new-tokens 40] [--ui-tokens 32] [--text-tokens 128] \
        [--d-sae 16384]

0. Decode paths and the UI: --ui-tokens greedy tokens, unsteered, on the fast path (the HF model run
   directly with one torch hook, workbench/_fast_decode.py), through the TransformerBridge, and with
   bare Hugging Face ``model.generate`` on a separately loaded model (the floor); then unsteered +
   steered together (``generate_pair``: one batch of 2 on the fast path). Then what the
   Streamlit steering panel calls (``workbench.steer``, via workbench/ui/steering.py): both
   generations + the two scoring forwards, fast path vs bridge path. Target < 3 s.
1. Steering (on the path ``workbench.steer`` takes): greedy generation of --new-tokens tokens with one
   latent clamped (SAE spliced with its error term at every position) vs the same generation without
   the intervention. Target < 1.5x.
2. Attribution: workbench.attribute over a --text-tokens text, linear estimate for every active
   latent (n_exact=0), vs ONE forward + backward of the same loss to the hook activation (the
   gradient attribution needs, without the SAE). Target <= 3x. The exact zero-ablations of the
   top 16 (one batched forward each) are timed separately: they cost ~one forward per ablation.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

from _args import parse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.sae import make_sae  # noqa: E402
from workbench import interventions as iv  # noqa: E402
from workbench.models import load_model  # noqa: E402

HOOK = "blocks.6.hook_resid_post"
PROMPT = "The history of the city begins in the twelfth century, when"
TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key "
        "function can be supplied to customize the sort order, and the reverse flag can be set to "
        "request the result in descending order. The sort is guaranteed to be stable: it does not change "
        "the relative order of elements that compare equal, which is helpful for sorting in multiple "
        "passes, for example sort by department, then by salary grade. ") * 3


def best_of(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    a = parse(__doc__, new_tokens=40, ui_tokens=32, text_tokens=128, d_sae=16384, repeats=2, device="cpu")
    dev = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {dev} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
          f"{', ' + torch.cuda.get_device_name() if dev.type == 'cuda' else ''})")
    m = load_model("smollm2-135m", device=dev)
    torch.manual_seed(0)
    sae = make_sae("topk", d_in=m.d_model, d_sae=a.d_sae, k=32, device=str(dev),
                   metadata={"model_name": "smollm2-135m", "hook_name": HOOK}).eval()
    print(f"KV cache through the bridge works: {iv.kv_cache_works(m)} (else one full forward per token)")
    ids, skip = iv.tokenize(m, PROMPT)
    decode_paths(m, sae, ids, a)

    # ---- 1. steering
    steer = iv.Intervention(iv.latent_edits([123], [40.0], "clamp", a.d_sae), sae, skip=skip)
    iv.generate(m, ids, HOOK, None, 4)          # warm-up
    t_plain = best_of(lambda: iv.generate(m, ids, HOOK, None, a.new_tokens), a.repeats)
    t_steer = best_of(lambda: iv.generate(m, ids, HOOK, steer, a.new_tokens), a.repeats)
    print(f"steering ({iv.decode_path(m, HOOK)} path): {a.new_tokens} new tokens after a {ids.shape[1]}-token "
          f"prompt: unsteered {t_plain:.3f} s, "
          f"steered (clamp, SAE + error term) {t_steer:.3f} s, ratio {t_steer / t_plain:.2f}x (target < 1.5x)")

    # ---- 2. attribution
    tok_ids = m.tokenizer(TEXT, add_special_tokens=False)["input_ids"][: a.text_tokens - 1]
    text = m.tokenizer.decode(tok_ids)
    tids, _ = iv.tokenize(m, text)
    tids = tids.to(dev)

    def fwd_bwd():
        cap = {}

        def grab(act):
            cap["x"] = act.detach().float().requires_grad_(True)
            return cap["x"]
        with torch.enable_grad(), iv._hooked(m, HOOK, grab):
            logits = m.bridge(tids, attention_mask=torch.ones_like(tids), return_type="logits", use_cache=False)
            loss = iv._metric(logits, tids, "loss", None, -1)[0]
            torch.autograd.grad(loss, cap["x"])

    fwd_bwd()
    t_fb = best_of(fwd_bwd, a.repeats)
    t_att = best_of(lambda: iv.attribute(text, sae=sae, model=m, n_exact=0, device=str(dev)), a.repeats)
    t0 = time.perf_counter()
    df = iv.attribute(text, sae=sae, model=m, n_exact=16, device=str(dev))
    t_ex = time.perf_counter() - t0
    print(f"attribution: {tids.shape[1]} tokens, d_sae={a.d_sae}, {len(df)} active (token, latent) pairs: "
          f"one forward+backward {t_fb:.3f} s, attribute (linear, all) {t_att:.3f} s, ratio {t_att / t_fb:.2f}x "
          f"(target <= 3x); with 16 exact ablations {t_ex:.3f} s ({t_ex / t_fb:.2f}x); agreement "
          f"{ {k: round(v, 4) if isinstance(v, float) else v for k, v in df.attrs['agreement'].items()} }")


def decode_paths(m, sae, ids, a) -> None:
    """Section 0 (see the module doc)."""
    from transformers import AutoModelForCausalLM
    n = a.ui_tokens
    bare = AutoModelForCausalLM.from_pretrained(str(m.source), dtype=m.dtype).to(m.device).eval()
    eos = m.special_ids.get("eos")

    def hf_generate():
        with torch.inference_mode():
            return bare.generate(ids.to(m.device), attention_mask=torch.ones_like(ids).to(m.device), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=eos)

    hf_generate()
    steer = iv.Intervention(iv.latent_edits([123], [40.0], "clamp", a.d_sae), sae, skip=1)
    for path in ("fast", "bridge"):
        iv.generate(m, ids, HOOK, None, 4, path=path)      # warm-up (builds and checks the fast decoder)
    t_hf = best_of(hf_generate, a.repeats)
    got = {p: [] for p in ("fast", "bridge")}
    t = {p: best_of(lambda p=p: got[p].append(iv.generate(m, ids, HOOK, None, n, path=p)), a.repeats)
         for p in got}
    same = got["fast"][-1] == got["bridge"][-1] == hf_generate()[0, ids.shape[1]:].tolist()
    print(f"decode, {n} new tokens unsteered: bare HF generate {t_hf:.3f} s, fast path {t['fast']:.3f} s "
          f"({t['fast'] / t_hf:.2f}x bare HF), bridge path {t['bridge']:.3f} s ({t['bridge'] / t_hf:.2f}x); "
          f"fast / bridge {t['fast'] / t['bridge']:.2f}; same tokens on all three: {same}")
    pair = {p: best_of(lambda p=p: iv.generate_pair(m, ids, HOOK, steer, n, path=p), a.repeats)
            for p in ("fast", "bridge")}
    print(f"decode, unsteered + steered (clamp, SAE + error term), {n} tokens each: fast path (one batch of 2) "
          f"{pair['fast']:.3f} s, bridge path (one after the other) {pair['bridge']:.3f} s, ratio "
          f"{pair['fast'] / pair['bridge']:.2f}; 2 x bare HF generate {2 * t_hf:.3f} s")
    kw = dict(sae=sae, model=m, hook=HOOK, latents=[123], values=[40.0], mode="clamp", max_new_tokens=n,
              device=str(m.device))
    ui = {p: best_of(lambda p=p: iv.steer(PROMPT, path=p, **kw), a.repeats) for p in ("auto", "bridge")}
    print(f"UI steering panel (workbench.steer: 2 generations of {n} tokens + 2 scoring forwards, d_sae="
          f"{a.d_sae}): {iv.decode_path(m, HOOK)} path {ui['auto']:.3f} s (target < 3 s), bridge path "
          f"{ui['bridge']:.3f} s, ratio {ui['auto'] / ui['bridge']:.2f}")


if __name__ == "__main__":
    main()
