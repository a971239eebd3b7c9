"""What a latent does, measured: zero-ablate it at the positions of its top-activating examples (the
stored sequences of a `features` result's store) and compare the next-token predictions.

    df = workbench.interventions.ablate_examples("ws/saes/topk6", 123, "ws/stores/smol",
                                                 fd.latent(123)["top_examples"])
    df[["seq", "pos", "token", "next_token", "activation", "d_loss_next", "d_loss_after", "kl"]]
    df.attrs["promotes"], df.attrs["suppresses"]     # tokens whose log-prob the latent raises / lowers

The ablation is exact, with the SAE's error term kept (SAELens ``use_error_term=True``; as in
workbench.interventions.attribute): x'_p = decode(f with f_i = 0) + (x_p - decode(f)) = x_p - f_i W_dec[i]
at the example's position p only, f_i recomputed from the forward's own activation. Per example, with
n the token after p:  d_loss_next = CE_ablated(p) - CE_clean(p)  (> 0: the latent helps predict n);
d_loss_after = the same summed over every prediction from p on (an edit at p reaches all later ones);
d_logit_next = logit_ablated(p, n) - logit_clean(p, n); kl = KL(clean || ablated) of the next-token
distribution at p. promotes / suppresses: mean over examples of log p_clean - log p_ablated at p, largest
/ smallest first (Neuronpedia's and SAELens' "logit effect", measured by ablation instead of W_dec W_U).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .errors import WorkbenchError
from ._interventions_io import encode_rows, resolve_model, resolve_sae


def _pairs(examples: Iterable[Any]) -> list[tuple[int, int]]:
    out = []
    for e in examples:
        if isinstance(e, dict):
            if "seq" not in e or "pos" not in e:
                raise WorkbenchError(f"an example needs 'seq' and 'pos' (a features result's Example), got {sorted(e)}")
            out.append((int(e["seq"]), int(e["pos"])))
        else:
            s, p = e
            out.append((int(s), int(p)))
    return out


def _fmt(tok, dlp: torch.Tensor, ids: list[int]) -> str:
    return " | ".join(f"{tok.decode([i])!r} {float(dlp[i]):+.3f}" for i in ids)


def ablate_examples(sae: Any, latent: int, store: Any, examples: Iterable[Any], *, model: Any = None,
                    hook: str | None = None, n_top: int = 5, batch_size: int = 4, device: str = "cpu"):
    """Zero-ablate `latent` at each example's (seq, pos) of `store` (a path or ActivationStore; the
    examples: dicts with "seq"/"pos", e.g. a features result's top_examples, or (seq, pos) pairs).
    Returns a pandas DataFrame, one row per example (see the module docstring for the columns);
    ``df.attrs``: latent, hook, model, promotes / suppresses [{token, id, value}], mean_d_loss_next,
    mean_d_loss_after, mean_kl."""
    import pandas as pd
    from .interventions import _pick_hook
    from .store import ActivationStore
    sae_obj, sae_hook = resolve_sae(sae, device)
    m = resolve_model(model, sae_obj, device)
    hook = _pick_hook(m, hook, sae_obj, sae_hook, None)
    if m.kind != "causal":
        raise WorkbenchError(f"{m.name} is an encoder; the effect on next-token predictions needs a causal LM")
    d_sae = int(sae_obj.W_dec.shape[0])
    if not 0 <= int(latent) < d_sae:
        raise WorkbenchError(f"latent {latent} is out of range: this SAE has d_sae={d_sae} (latents 0..{d_sae - 1})")
    latent = int(latent)
    st = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    if str(st.model_name) != str(m.name):
        raise WorkbenchError(f"the store {st.path} was collected with model {st.model_name!r}, not {m.name!r}: "
                             f"its token ids mean nothing to {m.name}")
    pairs = _pairs(examples)
    seqs = st.sequences()
    ids_all, mask_all = seqs["token_ids"], seqs["attention_mask"].bool()
    n_seq, L = ids_all.shape
    for s, p in pairs:
        if not (0 <= s < n_seq and 0 <= p < L) or not bool(mask_all[s, p]):
            raise WorkbenchError(f"example (seq {s}, pos {p}) is not a token of {st.path} ({n_seq} sequences of "
                                 f"{L}); was the store recollected? rerun the features step")
    w = sae_obj.W_dec.detach()[latent].float().to(m.device)
    tok = m.tokenizer
    rows, effects = [], []
    for b0 in range(0, len(pairs), max(1, int(batch_size))):
        chunk = pairs[b0:b0 + max(1, int(batch_size))]
        si = torch.tensor([s for s, _ in chunk])
        pos = torch.tensor([p for _, p in chunk], device=m.device)
        ids, mask = ids_all[si].to(m.device), mask_all[si].to(m.device)
        r = torch.arange(len(chunk), device=m.device)
        got = {}

        def ablate(a, r=r, pos=pos, got=got):
            a = a.clone()
            x = a[r, pos].float()
            fi = encode_rows(sae_obj, x)[:, latent].float()
            got["f"] = fi
            a[r, pos] = (x - fi[:, None] * w).to(a.dtype)
            return a
        lc = m.logits(ids, mask).float()
        la = m.logits(ids, mask, hook=hook, replace=ablate).float()
        lpc, lpa = torch.log_softmax(lc, -1), torch.log_softmax(la, -1)
        nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1) & mask
        ce_c = -lpc.gather(-1, nxt[..., None])[..., 0] * valid
        ce_a = -lpa.gather(-1, nxt[..., None])[..., 0] * valid
        t = torch.arange(L, device=m.device)
        for j, (s, p) in enumerate(chunk):
            has_next = bool(valid[j, p])
            n = int(nxt[j, p])
            dlp = lpc[j, p] - lpa[j, p]                         # > 0: the latent raises that token here
            effects.append(dlp.cpu())
            kl = float((lpc[j, p].exp() * (lpc[j, p] - lpa[j, p])).sum())
            up, down = torch.topk(dlp, n_top).indices.tolist(), torch.topk(-dlp, n_top).indices.tolist()
            rows.append({
                "seq": s, "pos": p, "token": tok.decode([int(ids[j, p])]),
                "next_token": tok.decode([n]) if has_next else "",
                "activation": float(got["f"][j]),
                "d_loss_next": float(ce_a[j, p] - ce_c[j, p]) if has_next else float("nan"),
                "d_loss_after": float(((ce_a[j] - ce_c[j]) * (t >= p)).sum()),
                "d_logit_next": float(la[j, p, n] - lc[j, p, n]) if has_next else float("nan"),
                "kl": kl, "promoted_here": _fmt(tok, dlp, up), "suppressed_here": _fmt(tok, dlp, down)})
    df = pd.DataFrame(rows, columns=["seq", "pos", "token", "next_token", "activation", "d_loss_next",
                                     "d_loss_after", "d_logit_next", "kl", "promoted_here", "suppressed_here"])
    promotes = suppresses = []
    if effects:
        mean = torch.stack(effects).mean(0)
        k = min(int(n_top) * 2, mean.numel())
        promotes = [{"token": tok.decode([int(i)]), "id": int(i), "value": float(mean[i])}
                    for i in torch.topk(mean, k).indices]
        suppresses = [{"token": tok.decode([int(i)]), "id": int(i), "value": float(mean[i])}
                      for i in torch.topk(-mean, k).indices]
    df.attrs.update({"latent": latent, "hook": hook, "model": m.name, "promotes": promotes,
                     "suppresses": suppresses, "mean_d_loss_next": float(df["d_loss_next"].mean()),
                     "mean_d_loss_after": float(df["d_loss_after"].mean()), "mean_kl": float(df["kl"].mean())})
    return df
