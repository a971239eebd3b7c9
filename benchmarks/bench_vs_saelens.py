"""Benchmark: a TopK SAE trained straight from the model, ours (analyses.sae.multi.train_saes over a
workbench.model_stream.ModelStream) vs SAELens' LanguageModelSAETrainingRunner, in the same process on the
same SmolLM2 weights: SAELens gets our model's TransformerLens bridge (``Model.bridge``, a
``TransformerBridge``: it has the ``run_with_cache(..., names_filter, stop_at_layer, prepend_bos)``,
``tokenizer`` and ``cfg.device`` SAELens' ActivationsStore uses, so it serves as ``override_model``) and
the builtin corpus pre-tokenised into 128-token rows (``override_dataset``, an ``input_ids`` column; held-out
documents left out). Same SAE shape (d_in 576, d_sae, k), batch, token count, float32, device; no wandb, no
checkpoints, no output. Prints wall time and tokens/s each, the ratio ours / SAELens, and both SAEs' FVU on
the same held-out rows (ModelStream.heldout_batches). Before timing it checks that the activations SAELens'
store computes (its own ``get_activations``) equal ours on the same tokens.

    .venv/bin/python benchmarks/bench_vs_saelens.py [--tokens 32768] [--d-sae 4608] [--batch-size 4096]
        [--saelens-sdpa] [--saelens-first] [--saelens-default-lr]

Goal: ours >= 2x SAELens' tokens/s, held-out FVU comparable. ``--saelens-sdpa`` runs SAELens with our fused
(SDPA) attention patched into the bridge too, to show how much of the ratio is attention alone. SAELens
trains at our learning rate (so the FVUs compare SAEs, not learning rates) unless ``--saelens-default-lr``.

Buffers: SAELens 6.54's mixing buffer holds ``n_batches_in_buffer * context_size`` rows (its
activations_store.get_data_loader; not times store_batch_size_prompts), so ``n_batches_in_buffer`` is set to
``buffer_tokens / 128`` and both hold ``buffer_tokens`` rows, serving half per refill.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings

import torch

from _args import parse

from analyses.sae.multi import train_saes
from analyses.sae.train import default_lr
from workbench.corpus import iter_documents
from workbench.model_stream import ModelStream, is_heldout
from workbench.models import load_model

SEQ = 128


def saelens_rows(model, ms: ModelStream, n_rows: int) -> list[list[int]]:
    """SAELens-style pre-tokenised rows: the training (not held-out) documents concatenated, separated by
    the document-start token ours prepends (``text_bos_id``), cut into rows of SEQ starting with it."""
    tok, bos = model.tokenizer, int(ms.plan.bos)
    rows, cur = [], [bos]
    for d in iter_documents("builtin"):
        if is_heldout(d.id, ms.holdout, ms.holdout_seed):
            continue
        for t in tok(d.text, add_special_tokens=False)["input_ids"] + [bos]:
            cur.append(t)
            if len(cur) == SEQ:
                rows.append(cur)
                cur = [bos]
                if len(rows) == n_rows:
                    return rows
    return rows


def fvu(sae, rows: list[torch.Tensor]) -> float:
    """Fraction of variance unexplained, sum |x - sae(x)|^2 / sum |x - mean|^2, over all rows."""
    x = torch.cat(rows)
    with torch.no_grad():
        xh = torch.cat([sae(x[i:i + 2048].to(next(sae.parameters()).device)).float().cpu()
                        for i in range(0, len(x), 2048)])
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def main() -> None:
    a = parse(__doc__, model="smollm2-135m", hook="blocks.6.hook_resid_post", d_sae=4608, k=32, tokens=32768,
              batch_size=4096, buffer_tokens=8192, forward_batch=16, eval_tokens=4096, device="auto",
              saelens_sdpa=False, saelens_first=False, saelens_default_lr=False)
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    model = load_model(a.model, device=a.device)
    dev = str(model.device)

    def stream():
        return ModelStream(model, [a.hook], "builtin", seq_len=SEQ, forward_batch=a.forward_batch,
                           buffer_tokens=a.buffer_tokens, seed=0)

    held = [b[a.hook] for b in stream().heldout_batches(2048, a.eval_tokens)]
    ms0 = stream()
    # rows enough for the training tokens plus the buffer, with room for dropped special tokens
    n_rows = (a.tokens + 2 * a.buffer_tokens) // (SEQ - 4) + 2 * a.forward_batch
    rows = saelens_rows(model, ms0, n_rows)
    dataset = Dataset.from_dict({"input_ids": rows})

    def saelens_runner():
        cfg = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=model.d(a.hook), d_sae=a.d_sae, k=a.k, dtype="float32", device=dev),
            model_name=a.model, hook_name=a.hook, dataset_path="", is_dataset_tokenized=True, streaming=False,
            context_size=SEQ, prepend_bos=True, training_tokens=a.tokens, train_batch_size_tokens=a.batch_size,
            store_batch_size_prompts=a.forward_batch, n_batches_in_buffer=a.buffer_tokens // SEQ,
            exclude_special_tokens=list(ms0.plan.excluded), device=dev, dtype="float32", seed=0,
            logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None, output_path=None,
            save_final_checkpoint=False, verbose=False,
            **({} if a.saelens_default_lr else {"lr": default_lr(a.d_sae, model.d(a.hook))}))
        return LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model.bridge)

    # the forward SAELens runs (its store's get_activations on the bridge) vs ours, on the same tokens
    store = saelens_runner().activations_store
    toks = store.get_batch_tokens()
    with model._sdpa() if a.saelens_sdpa else contextlib.nullcontext():
        theirs = store.get_activations(toks).float().cpu()
    ours = model.run(toks, None, [a.hook])[a.hook].float().cpu()
    diff, scale = float((theirs - ours).abs().max()), float(ours.abs().max())

    our_forwarded = [0]

    def run_ours():
        ms = stream()
        t, c = time.perf_counter(), time.process_time()
        sae = train_saes(ms, [dict(hook=a.hook, arch="topk", d_sae=a.d_sae, k=a.k, seed=0)], n_tokens=a.tokens,
                         batch_size=a.batch_size, device=a.device, progress=False)[0]
        our_forwarded[0] = ms.n_forward_tokens
        return sae, time.perf_counter() - t, time.process_time() - c

    sl_forwarded, sl_sae_lr = [0], [0.0]

    def run_saelens():
        t, c = time.perf_counter(), time.process_time()
        runner = saelens_runner()
        get = runner.activations_store.get_activations

        def counted(tokens):                # rows SAELens forwards (ours: ms.n_forward_tokens)
            sl_forwarded[0] += tokens.numel()
            return get(tokens)
        runner.activations_store.get_activations = counted
        with model._sdpa() if a.saelens_sdpa else contextlib.nullcontext(), \
                open(os.devnull, "w") as null, contextlib.redirect_stderr(null):   # its tqdm bar
            sae = runner.run()
        sl_sae_lr[0] = runner.cfg.lr
        return sae, time.perf_counter() - t, time.process_time() - c

    if a.saelens_first:
        sl_sae, t_sl, c_sl = run_saelens()
        our_sae, t_ours, c_ours = run_ours()
    else:
        our_sae, t_ours, c_ours = run_ours()
        sl_sae, t_sl, c_sl = run_saelens()

    print(f"device: {model.device} ({torch.get_num_threads()} threads); model {a.model}; hook {a.hook}; "
          f"d_sae {a.d_sae}, k {a.k}; {a.tokens} tokens; batch {a.batch_size}; buffer {a.buffer_tokens} rows; "
          f"forward batch {a.forward_batch} x {SEQ}")
    print(f"SAELens' forward (bridge run_with_cache{', sdpa' if a.saelens_sdpa else ', eager attention'}) vs "
          f"ours on one batch {tuple(toks.shape)}: max abs diff {diff:.3g} (max |act| {scale:.3g})")
    print(f"ours:    {t_ours:8.1f} s  {a.tokens / t_ours:10,.0f} tok/s  CPU {c_ours:7.1f} s  lr "
          f"{default_lr(a.d_sae, model.d(a.hook)):.2g}  ({our_forwarded[0]} rows kept of the "
          f"windows forwarded)")
    print(f"SAELens: {t_sl:8.1f} s  {a.tokens / t_sl:10,.0f} tok/s  CPU {c_sl:7.1f} s  lr "
          f"{sl_sae_lr[0]:.2g}  ({sl_forwarded[0]} tokens forwarded; "
          f"LanguageModelSAETrainingRunner, run {'first' if a.saelens_first else 'second'})")
    print(f"ratio ours / SAELens: {t_sl / t_ours:.2f}x wall, {c_sl / c_ours:.2f}x process CPU time (goal >= 2x; "
          f"CPU time is the steadier of the two on a shared machine)")
    n_held = sum(len(h) for h in held)
    print(f"held-out FVU ({n_held} rows of held-out documents): ours {fvu(our_sae, held):.4f}  "
          f"SAELens {fvu(sl_sae, held):.4f}")


if __name__ == "__main__":
    main()
