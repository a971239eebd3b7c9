"""Language-model loss with an SAE spliced in at a hook (SAELens / SAEBench definitions).

    res = splice_eval(model, "blocks.6.hook_resid_post", sae_reconstruct, ids, mask)
    res["ce_loss_recovered"], res["delta_lm_loss"], res["kl_sae"]

Three forwards per batch: clean; with the activation at the hook replaced by its reconstruction;
with it replaced by zeros. Next-token cross-entropy counts position t (predicting token t+1)
only where both t and t+1 are real tokens. KL(clean || spliced) is per token, averaged the same
way. CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); delta LM loss = CE_sae - CE_clean.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import WorkbenchError


def _next_token_stats(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      clean_logp: torch.Tensor | None):
    """-> (sum CE, sum KL(clean||this) or 0, log-probs) over the valid next-token positions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ce_sum = ce[valid].double().sum().item()
    kl_sum = 0.0
    if clean_logp is not None:
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
        kl_sum = kl[valid].double().sum().item()
    return ce_sum, kl_sum, logp


def splice_eval(model, hook: str, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                input_ids, attention_mask=None, batch_size: int = 8,
                splice_mask=None) -> dict:
    """CE clean / spliced / zero-ablated, CE loss recovered, delta LM loss and KL for one hook.

    `reconstruct` gets the activations of the spliced positions as rows [n, d] (model dtype, on the
    model's device) and returns [n, d]; by default every real token is spliced (`splice_mask`, a
    bool [n_seq, seq_len], narrows that, e.g. to skip BOS). Padding is never spliced or scored."""
    if getattr(model, "kind", "causal") != "causal":
        raise WorkbenchError(f"splice evaluation needs a causal LM; {model.name} is an {model.kind}")
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise WorkbenchError(f"input_ids must be [n_seq, seq_len] with seq_len >= 2, got {tuple(ids.shape)}")
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    if mask.shape != ids.shape:
        raise WorkbenchError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    where = mask if splice_mask is None else (torch.as_tensor(splice_mask).bool() & mask)
    if where.shape != ids.shape:
        raise WorkbenchError(f"splice_mask shape {tuple(where.shape)} does not match input_ids {tuple(ids.shape)}")
    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    hook_name = model.resolve_hooks([hook])[0]
    d = model.d(hook_name)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_tokens = 0
    for start in range(0, ids.shape[0], batch_size):
        b_ids = ids[start:start + batch_size].to(model.device)
        b_mask = mask[start:start + batch_size].to(model.device)
        b_where = where[start:start + batch_size].to(model.device)
        valid = b_mask[:, :-1] & b_mask[:, 1:]
        n = int(valid.sum())
        if n == 0:
            continue

        def splice_with(fn):
            def replace(act):
                rows = act[b_where]
                new = fn(rows)
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != (rows.shape[0], d):
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise WorkbenchError(f"reconstruct() at {hook_name} must return [{rows.shape[0]}, {d}] "
                                         f"for input [{rows.shape[0]}, {d}], got {got}")
                out = act.clone()
                out[b_where] = new.to(device=act.device, dtype=act.dtype)
                return out
            return replace

        ce, _, clean_logp = _next_token_stats(model.logits(b_ids, b_mask), b_ids, valid, None)
        totals["clean"] += ce
        ce, kl, _ = _next_token_stats(
            model.logits(b_ids, b_mask, hook=hook_name, replace=splice_with(reconstruct)),
            b_ids, valid, clean_logp)
        totals["sae"] += ce
        totals["kl_sae"] += kl
        ce, kl, _ = _next_token_stats(
            model.logits(b_ids, b_mask, hook=hook_name, replace=splice_with(torch.zeros_like)),
            b_ids, valid, clean_logp)
        totals["zero"] += ce
        totals["kl_zero"] += kl
        n_tokens += n
        del clean_logp
    if n_tokens == 0:
        raise WorkbenchError("no next-token positions to score: every sequence has fewer than 2 real tokens")
    ce_clean, ce_sae, ce_zero = (totals[k] / n_tokens for k in ("clean", "sae", "zero"))
    denom = ce_zero - ce_clean
    return {
        "hook": hook_name,
        "n_tokens": n_tokens,
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_loss_recovered": (ce_zero - ce_sae) / denom if denom != 0 else math.nan,
        "delta_lm_loss": ce_sae - ce_clean,
        "kl_sae": totals["kl_sae"] / n_tokens,
        "kl_zero": totals["kl_zero"] / n_tokens,
    }
