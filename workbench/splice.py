"""Language-model loss with an SAE spliced in at a hook, in two labelled conventions.

    res = splice_eval(model, "blocks.6.hook_resid_post", sae_reconstruct, ids, mask, splice_mask=rows)
    res["ce_loss_recovered"], res["ce_loss_recovered_se"], res["ce_loss_recovered_saelens"], ...

CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); delta LM loss = CE_sae - CE_clean;
KL(clean || spliced) per token. Next-token CE at position t (predicting t+1) counts only where both
t and t+1 are real (non-padding) tokens; every mean is over tokens (token-weighted).

* ours (``ce_*``, ``ce_loss_recovered``): the reconstruction AND the zero ablation replace the
  activation only at ``splice_mask`` (the eval step passes the tokens that are rows of the store,
  i.e. what the SAE was trained on; excluded specials such as the prepended BOS keep theirs);
  every valid position is scored.
* SAELens (``*_saelens``; ``sae_lens.evals.get_recons_loss`` + ``get_downstream_reconstruction_metrics``,
  the numbers of SAELens / SAEBench tables): the reconstruction replaces every position whose token
  is not special (``get_special_token_ids``: bos/eos/pad/sep/decoder_start of the tokenizer); the
  zero ablation replaces EVERY position (BOS included); predictions made FROM special-token
  positions are dropped from CE (``mask[:, :-1]``) and KL (which SAELens takes at every position,
  the last one included); score = (abl - sae) / (abl - clean). Padding (SAELens packs contexts and
  has none) is never spliced or scored.

Standard errors (``*_se``): sequences are the independent units. Both scores are ratios of sums
over sequences, R = sum_i a_i / sum_i b_i (CE loss recovered: a_i = Z_i - S_i, b_i = Z_i - C_i with
Z_i, S_i, C_i the summed token CEs of sequence i; delta LM loss: a_i = S_i - C_i, b_i = n_i tokens),
whose delta-method (linearised ratio estimator) standard error is
    SE(R) = sqrt( m / (m - 1) * sum_i (a_i - R b_i)^2 ) / |sum_i b_i|        (m sequences)
(Cochran, Sampling Techniques, 3rd ed., eq. 6.13, with the finite-population correction dropped).
The per-sequence sums are returned (``per_sequence``) so the SE can be recomputed or bootstrapped.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import WorkbenchError

SAELENS_SPECIAL_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                         "decoder_start_token_id")   # sae_lens.util._SPECIAL_TOKEN_ATTRS
SE_METHOD = ("delta method over sequences: SE(R) = sqrt(m/(m-1) * sum_i (a_i - R b_i)^2) / |sum_i b_i| "
             "for R = sum_i a_i / sum_i b_i over m sequences")


def saelens_special_ids(tokenizer) -> list[int]:
    """sae_lens.util.get_special_token_ids: the tokenizer's structural special-token ids."""
    return sorted({int(t) for t in (getattr(tokenizer, a, None) for a in SAELENS_SPECIAL_ATTRS)
                   if t is not None})


def ratio_se(a, b) -> float:
    """Delta-method standard error of R = sum(a) / sum(b) with (a_i, b_i) iid pairs (see module doc)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    m = a.numel()
    sb = float(b.sum())
    if m < 2 or sb == 0:
        return math.nan
    r = float(a.sum()) / sb
    return math.sqrt(m / (m - 1) * float((a - r * b).pow(2).sum())) / abs(sb)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _seq_stats(logits, ids, score, clean_logp, kl_score):
    """Per-sequence sums: (CE over ``score`` [b, s-1] positions, KL(clean||this) over ``kl_score``
    [b, s] positions or None, full-length log-probs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ce_sum = (ce.double() * score).sum(1).cpu()
    kl_sum = None if clean_logp is None else _kl_sum(clean_logp, logp, kl_score)
    return ce_sum, kl_sum, logp


def _kl_sum(clean_logp, logp, kl_score):
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return (kl.double() * kl_score).sum(1).cpu()


def _ce_sum(logp, ids, score):
    return (-(logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)).double() * score).sum(1).cpu()


def _scores(sums: dict[str, torch.Tensor], n: torch.Tensor, suffix: str,
            n_kl: torch.Tensor | None = None) -> dict[str, float]:
    n_kl = float((n if n_kl is None else n_kl).sum())
    keep = n > 0                                   # sequences with nothing to score are not units
    n = n[keep]
    c, s, z = sums["clean"][keep], sums["sae"][keep], sums["zero"][keep]
    N = float(n.sum())
    if N == 0:
        return {}
    ce_c, ce_s, ce_z = float(c.sum()) / N, float(s.sum()) / N, float(z.sum()) / N
    return {f"n_tokens{suffix}": int(N), f"ce_clean{suffix}": ce_c, f"ce_sae{suffix}": ce_s,
            f"ce_zero{suffix}": ce_z,
            f"ce_loss_recovered{suffix}": _ratio(ce_z - ce_s, ce_z - ce_c),
            f"ce_loss_recovered{suffix}_se": ratio_se(z - s, z - c),
            f"delta_lm_loss{suffix}": ce_s - ce_c,
            f"delta_lm_loss{suffix}_se": ratio_se(s - c, n),
            f"kl_sae{suffix}": float(sums["kl_sae"].sum()) / n_kl,
            f"kl_zero{suffix}": float(sums["kl_zero"].sum()) / n_kl,
            f"n_sequences{suffix}": int(keep.sum())}


def splice_eval(model, hook: str, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                input_ids, attention_mask=None, batch_size: int = 8,
                splice_mask=None, saelens: bool = True, special_ids: list[int] | None = None) -> dict:
    """CE clean / spliced / zero-ablated, CE loss recovered, delta LM loss and KL for one hook, with
    standard errors; ``saelens=True`` adds the SAELens-convention numbers (``*_saelens``).

    `reconstruct` gets the activations of the spliced positions as rows [n, d] (model dtype, on the
    model's device) and returns [n, d]; by default every real token is spliced (`splice_mask`, a
    bool [n_seq, seq_len], narrows that, e.g. to skip BOS). Padding is never spliced or scored.
    `special_ids` (SAELens convention): default :func:`saelens_special_ids` of the model's tokenizer."""
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
    if saelens and special_ids is None:
        special_ids = saelens_special_ids(model.tokenizer)
    special = torch.isin(ids, torch.tensor(list(special_ids or []), dtype=ids.dtype))
    where_sl = mask & ~special

    keys = ("clean", "sae", "zero", "kl_sae", "kl_zero")
    ours = {k: [] for k in keys}
    sl = {k: [] for k in keys}
    n_ours, n_sl, n_kl_sl = [], [], []

    def splice_with(fn, at):
        def replace(act):
            rows = act[at]
            new = fn(rows)
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != (rows.shape[0], d):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise WorkbenchError(f"reconstruct() at {hook_name} must return [{rows.shape[0]}, {d}] "
                                     f"for input [{rows.shape[0]}, {d}], got {got}")
            out = act.clone()
            out[at] = new.to(device=act.device, dtype=act.dtype)
            return out
        return replace

    for start in range(0, ids.shape[0], batch_size):
        b_ids = ids[start:start + batch_size].to(model.device)
        b_mask = mask[start:start + batch_size].to(model.device)
        b_where = where[start:start + batch_size].to(model.device)
        valid = (b_mask[:, :-1] & b_mask[:, 1:]).double()
        kl_valid = torch.nn.functional.pad(valid, (0, 1))      # ours: KL where CE is scored
        n_ours.append(valid.sum(1).cpu())

        def run(fn, at, score, clean, kl_score, b_ids=b_ids, b_mask=b_mask):
            return _seq_stats(model.logits(b_ids, b_mask, hook=hook_name, replace=splice_with(fn, at)),
                              b_ids, score, clean, kl_score)

        c, _, clean_logp = _seq_stats(model.logits(b_ids, b_mask), b_ids, valid, None, None)
        s, kls, logp_sae = run(reconstruct, b_where, valid, clean_logp, kl_valid)
        z, klz, _ = run(torch.zeros_like, b_where, valid, clean_logp, kl_valid)
        for k, v in zip(keys, (c, s, z, kls, klz)):
            ours[k].append(v)
        if saelens:
            b_sl = where_sl[start:start + batch_size].to(model.device)
            score = valid * b_sl[:, :-1].double()     # predictions FROM special tokens dropped
            kl_score = b_sl.double()                  # SAELens' KL: every real non-special position
            n_sl.append(score.sum(1).cpu())
            n_kl_sl.append(kl_score.sum(1).cpu())
            if torch.equal(b_sl, b_where):            # same positions spliced: reuse that forward
                s2, kls2 = _ce_sum(logp_sae, b_ids, score), _kl_sum(clean_logp, logp_sae, kl_score)
            else:
                s2, kls2, _ = run(reconstruct, b_sl, score, clean_logp, kl_score)
            del logp_sae
            z2, klz2, _ = run(torch.zeros_like, torch.ones_like(b_mask), score, clean_logp, kl_score)
            for k, v in zip(keys, (_ce_sum(clean_logp, b_ids, score), s2, z2, kls2, klz2)):
                sl[k].append(v)
        del clean_logp

    n = torch.cat(n_ours)
    if float(n.sum()) == 0:
        raise WorkbenchError("no next-token positions to score: every sequence has fewer than 2 real tokens")
    sums = {k: torch.cat(v) for k, v in ours.items()}
    res: dict = {"hook": hook_name, "se_method": SE_METHOD, **_scores(sums, n, "")}
    per_seq = {"n_tokens": n, **{f"{k}_sum": v for k, v in sums.items()}}
    if saelens:
        sums_sl = {k: torch.cat(v) for k, v in sl.items()}
        n2 = torch.cat(n_sl)
        res.update(_scores(sums_sl, n2, "_saelens", torch.cat(n_kl_sl)))
        res["saelens_special_ids"] = list(special_ids or [])
        per_seq.update({"n_tokens_saelens": n2, **{f"{k}_sum_saelens": v for k, v in sums_sl.items()}})
    res["per_sequence"] = per_seq
    return res
