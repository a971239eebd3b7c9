"""workbench.splice.splice_eval against a hand computation with a plain HF forward."""

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models import load_model
from workbench.splice import splice_eval

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def batch(tiny):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0          # right padding
    mask[3, 2:] = 0
    mask[4, 1:] = 0          # a single real token: nothing to score
    ids[mask == 0] = tiny.tokenizer.pad_token_id
    return ids, mask


def test_identity_recovers_everything(tiny, batch):
    ids, mask = batch
    r = splice_eval(tiny, HOOK, lambda x: x, ids, mask, batch_size=2)
    assert r["n_tokens"] == 11 + 6 + 11 + 1
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert abs(r["kl_sae"]) < 1e-6 and abs(r["delta_lm_loss"]) < 1e-6
    # zeroing the residual of a bias-free Llama leaves it zero: uniform logits, CE = ln(vocab)
    assert r["ce_zero"] == pytest.approx(math.log(tiny.vocab_size), abs=1e-4)
    assert abs(r["ce_zero"] - r["ce_clean"]) > 0.05 and r["kl_zero"] > 0


def test_zero_recovers_nothing(tiny, batch):
    ids, mask = batch
    r = splice_eval(tiny, HOOK, torch.zeros_like, ids, mask, batch_size=3)
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_sae"] == pytest.approx(r["kl_zero"], rel=1e-6)


def _hand(hf, ids, mask, layer, fn):
    """Plain HF forward; optionally replace decoder layer `layer`'s output by fn(output)."""
    h = None
    if fn is not None:
        def hook(mod, inp, out):
            hs = out[0] if isinstance(out, tuple) else out
            new = fn(hs)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        h = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        if h is not None:
            h.remove()
    return torch.log_softmax(logits[:, :-1].double(), -1)


def test_matches_hand_computation(tiny, batch):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny.source, attn_implementation="eager").eval()
    ids, mask = batch
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    recon = lambda x: x + x @ W          # noqa: E731  a lossy "SAE"
    r = splice_eval(tiny, HOOK, recon, ids, mask, batch_size=4)

    valid = (mask[:, :-1] & mask[:, 1:]).bool()
    tgt = ids[:, 1:].unsqueeze(-1)
    lp_clean = _hand(hf, ids, mask, 0, None)
    lp_sae = _hand(hf, ids, mask, 0, lambda hs: hs + hs @ W)
    lp_zero = _hand(hf, ids, mask, 0, torch.zeros_like)
    ce = {k: -(lp.gather(-1, tgt).squeeze(-1))[valid].mean().item()
          for k, lp in (("clean", lp_clean), ("sae", lp_sae), ("zero", lp_zero))}
    kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)[valid].mean().item()
    assert r["ce_clean"] == pytest.approx(ce["clean"], abs=1e-4)
    assert r["ce_sae"] == pytest.approx(ce["sae"], abs=1e-4)
    assert r["ce_zero"] == pytest.approx(ce["zero"], abs=1e-4)
    assert r["kl_sae"] == pytest.approx(kl, abs=1e-5)
    rec = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert r["ce_loss_recovered"] == pytest.approx(rec, abs=1e-3)
    assert r["delta_lm_loss"] == pytest.approx(ce["sae"] - ce["clean"], abs=1e-4)
    assert 0 < r["kl_sae"] and not math.isnan(r["ce_loss_recovered"])


def test_rows_given_to_reconstruct_and_errors(tiny, batch):
    ids, mask = batch
    shapes = []
    splice_eval(tiny, HOOK, lambda x: shapes.append(tuple(x.shape)) or x, ids, mask, batch_size=8)
    assert shapes == [(int(mask.sum()), 64)]     # only real tokens, as rows
    skip_first = torch.ones_like(mask, dtype=torch.bool)
    skip_first[:, 0] = False
    shapes.clear()
    splice_eval(tiny, HOOK, lambda x: shapes.append(tuple(x.shape)) or x, ids, mask, splice_mask=skip_first)
    assert shapes == [(int(mask.sum()) - 5, 64)]
    with pytest.raises(WorkbenchError, match="must return"):
        splice_eval(tiny, HOOK, lambda x: x[:, :10], ids, mask)
    with pytest.raises(WorkbenchError, match="closest"):
        splice_eval(tiny, "blocks.0.hook_resid_pots", lambda x: x, ids, mask)
    with pytest.raises(WorkbenchError, match="encoder"):
        splice_eval(load_model("minilm-l6", device="cpu"), HOOK, lambda x: x, ids[:, :5], mask[:, :5])
