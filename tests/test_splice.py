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
    splice_eval(tiny, HOOK, lambda x: shapes.append(tuple(x.shape)) or x, ids, mask, splice_mask=skip_first,
                saelens=False)
    assert shapes == [(int(mask.sum()) - 5, 64)]
    shapes.clear()      # SAELens convention splices every non-special token: one more forward
    splice_eval(tiny, HOOK, lambda x: shapes.append(tuple(x.shape)) or x, ids, mask, splice_mask=skip_first)
    assert shapes == [(int(mask.sum()) - 5, 64), (int(mask.sum()), 64)]
    with pytest.raises(WorkbenchError, match="must return"):
        splice_eval(tiny, HOOK, lambda x: x[:, :10], ids, mask)
    with pytest.raises(WorkbenchError, match="closest"):
        splice_eval(tiny, "blocks.0.hook_resid_pots", lambda x: x, ids, mask)
    with pytest.raises(WorkbenchError, match="encoder"):
        splice_eval(load_model("minilm-l6", device="cpu"), HOOK, lambda x: x, ids[:, :5], mask[:, :5])


def test_saelens_convention_matches_saelens_itself(tiny, tmp_path):
    """`*_saelens` numbers equal sae_lens.evals.get_downstream_reconstruction_metrics run on the same
    bridge, SAE (saved by us, loaded by SAELens) and token batches, with SAELens' special-token ids."""
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    from analyses.sae import make_sae
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (6, 12), generator=g)
    ids[:, 0] = 101                 # [CLS]: not special for SAELens (no cls attr in its list)
    ids[2, 5] = 102                 # [SEP] and [PAD] inside the text: special
    ids[4, 3] = 0
    torch.manual_seed(0)
    sae = make_sae("topk", 64, 128, k=8, metadata={"hook_name": HOOK, "model_name": "tiny-random"})
    sae.save(tmp_path / "sae")
    theirs = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")

    class Batches:                  # the one method of an ActivationsStore that the function uses
        i = 0

        def get_batch_tokens(self, n):
            self.i += n
            return ids[self.i - n:self.i]

    ign = get_special_token_ids(tiny.tokenizer)
    ref = get_downstream_reconstruction_metrics(theirs, tiny.bridge, Batches(), ActivationScaler(),
                                                compute_kl=True, compute_ce_loss=True, n_batches=3,
                                                eval_batch_size_prompts=2, ignore_tokens=ign)
    with torch.no_grad():
        r = splice_eval(tiny, HOOK, lambda x: sae(x), ids, None, batch_size=4, splice_mask=ids != 101)
    assert r["saelens_special_ids"] == sorted(ign)
    assert r["ce_clean_saelens"] == pytest.approx(ref["ce_loss_without_sae"], abs=1e-5)
    assert r["ce_sae_saelens"] == pytest.approx(ref["ce_loss_with_sae"], abs=1e-5)
    assert r["ce_zero_saelens"] == pytest.approx(ref["ce_loss_with_ablation"], abs=1e-5)
    assert r["ce_loss_recovered_saelens"] == pytest.approx(ref["ce_loss_score"], abs=1e-4)
    assert r["kl_sae_saelens"] == pytest.approx(ref["kl_div_with_sae"], abs=1e-5)
    assert r["kl_zero_saelens"] == pytest.approx(ref["kl_div_with_ablation"], abs=1e-5)
    # ours differs: the zero ablation spares the unspliced [CLS] positions
    assert abs(r["ce_zero"] - r["ce_zero_saelens"]) > 1e-3


def test_standard_errors_match_numpy_per_sequence(tiny, batch):
    """Per-sequence CE sums from a plain HF forward, then the delta-method SE written out in numpy."""
    import numpy as np
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny.source, attn_implementation="eager").eval()
    ids, mask = batch
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 0.3
    r = splice_eval(tiny, HOOK, lambda x: x + x @ W, ids, mask, batch_size=2, saelens=False)
    valid = (mask[:, :-1] & mask[:, 1:]).double().numpy()
    tgt = ids[:, 1:].unsqueeze(-1)

    def per_seq(fn):
        lp = _hand(hf, ids, mask, 0, fn)
        return (-(lp.gather(-1, tgt).squeeze(-1)).numpy() * valid).sum(1)

    C, S, Z = per_seq(None), per_seq(lambda hs: hs + hs @ W), per_seq(torch.zeros_like)
    n = valid.sum(1)
    keep = n > 0                         # the 1-token sequence has nothing to score
    C, S, Z, n = C[keep], S[keep], Z[keep], n[keep]
    m = len(n)
    a, b = Z - S, Z - C
    R = a.sum() / b.sum()
    se = np.sqrt(np.sum((a - R * b) ** 2) / (m * (m - 1))) / abs(b.mean())
    d = S - C
    D = d.sum() / n.sum()
    se_d = np.sqrt(np.sum((d - D * n) ** 2) / (m * (m - 1))) / n.mean()
    assert r["n_sequences"] == m == 4
    assert r["ce_loss_recovered"] == pytest.approx(R, abs=1e-4)
    assert r["ce_loss_recovered_se"] == pytest.approx(se, rel=1e-3)
    assert r["delta_lm_loss_se"] == pytest.approx(se_d, rel=1e-3)
    assert np.allclose(r["per_sequence"]["clean_sum"].numpy()[keep], C, atol=1e-3)


def test_ratio_se_agrees_with_bootstrap():
    """With many sequences the delta-method SE equals the bootstrap SE over sequences."""
    import numpy as np
    from workbench.splice import ratio_se
    rng = np.random.default_rng(0)
    m = 300
    b = rng.gamma(4.0, 1.0, m) * 30            # per-sequence CE gap sums, ~ tokens x nats
    a = 0.9 * b + rng.normal(0, 8, m)
    boot = [a[i].sum() / b[i].sum() for i in (rng.integers(0, m, m) for _ in range(3000))]
    assert ratio_se(a, b) == pytest.approx(np.std(boot), rel=0.1)
    assert math.isnan(ratio_se([1.0], [2.0]))
