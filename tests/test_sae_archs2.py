"""Mutual Choice / Feature Choice SAEs with aux_zipf_loss (Ayonrinde 2024) and top-AFA (Lee et al. 2025):
gradients of training_forward against autograd on dense float64 references written here from the papers'
rules, each one's defining property, aux_zipf_loss by hand, training, save / load, the CLI."""

import copy
import json
import math

import pytest
import torch

from analyses.sae import ARCHS, TrainStepInput, evaluate_sae, export_sae, load_sae, make_sae, train_sae, uses_k
from analyses.sae.feature_choice import zipf_targets
from analyses.sae.topafa import afa_mask

from test_sae_helpers import synthetic
from test_sae_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

CHOICE = ("mutual_choice", "feature_choice")


def _sae(arch, d_in=6, d_sae=10, k=2, seed=0, dtype="float64", **kw):
    torch.manual_seed(seed)
    sae = make_sae(arch, d_in, d_sae, k=None if arch == "topafa" else k, dtype=dtype, **kw)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    return sae


def _inp(x, **kw):
    return TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=x.shape[0], **kw)


# ------------------------------------------------------------------- dense references (from the papers)

def ref_zipf_mask(pre, main, freq, k, alpha, cap):
    """aux_zipf_loss selection by loops: rank latents by freq (desc, ties by index), target(rank r) =
    k n r^-alpha / H, capped; each latent under target takes its top round(target - freq n) positive free
    tokens."""
    n, d = pre.shape
    order = sorted(range(d), key=lambda i: (-float(freq[i]), i))
    H = sum((r + 1) ** -alpha for r in range(d))
    out = torch.zeros(n, d, dtype=torch.bool)
    for r, i in enumerate(order):
        target = min(k * n * (r + 1) ** -alpha / H, cap)
        q = max(0, min(n, round(target - float(freq[i]) * n)))
        free = [t for t in range(n) if not main[t, i]]
        free.sort(key=lambda t: -float(pre[t, i]))
        for t in free[:q]:
            if pre[t, i] > 0:
                out[t, i] = True
    return out


def ref_choice_loss(sae, x):
    """Dense loss of a mutual / feature choice SAE with autograd through every parameter."""
    c = sae.cfg
    n = x.shape[0]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    p = pre.detach()
    if sae.arch == "mutual_choice":
        kk = c.k * n
        thr = p.flatten().sort(descending=True).values[kk - 1]
        main = (p >= thr) & (p > 0)
        cap = n
    else:
        m = c.fc_capacity or round(c.k * n / c.d_sae)
        main = torch.zeros_like(p, dtype=torch.bool)
        for i in range(c.d_sae):
            main[p[:, i].argsort(descending=True)[:m], i] = True
        main &= p > 0
        cap = m
    f = pre.relu() * main
    x_hat = f @ sae.W_dec + sae.b_dec
    denom = (x - x.mean(0)).pow(2).sum()
    mse = (x - x_hat).pow(2).sum() / denom
    aux_mask = ref_zipf_mask(p, main, sae.freq, c.k, c.zipf_alpha, cap)
    e = (x - x_hat).detach()
    e_hat = (pre.relu() * aux_mask) @ sae.W_dec
    aux = c.aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return mse + aux, main, aux_mask


def ref_afa_keep(acts, dec_norms, target):
    """top-AFA selection by loops (Lee et al. 2025 / reference TopAFASAE.forward)."""
    n, d = acts.shape
    out = torch.zeros(n, d, dtype=torch.bool)
    for t in range(n):
        s = [(float(acts[t, i] * dec_norms[i]) ** 2, i) for i in range(d)]
        order = sorted(range(d), key=lambda i: -s[i][0])
        run, best, k = 0.0, math.inf, 1
        for j, i in enumerate(order):
            run += s[i][0]
            val = math.inf if j == d - 1 else math.sqrt(run)
            if abs(val - float(target[t])) < best:
                best, k = abs(val - float(target[t])), j + 1
        for i in order[:k]:
            out[t, i] = bool(acts[t, i] > 0)
    return out


def ref_afa_loss(sae, x):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = (x - sae.b_dec).detach()
    keep = ref_afa_keep(pre.detach().relu(), sae.W_dec.detach().norm(dim=1), z.norm(dim=1))
    f = pre.relu() * keep
    x_hat = f @ sae.W_dec + sae.b_dec
    denom = (x - x.mean(0)).pow(2).sum()
    mse = (x - x_hat).pow(2).sum() / denom
    afa = (f.norm(dim=1) - z.norm(dim=1)).pow(2).sum() * sae.cfg.d_in / denom
    return mse + sae.cfg.afa_coef * afa, keep


def _grads_match(sae, ref_loss_fn, x, **inp_kw):
    ref = copy.deepcopy(sae)
    out = sae.training_forward(_inp(x, **inp_kw))
    out.loss.backward()
    want = ref_loss_fn(ref, x)[0]
    want.backward()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(sae, name).grad, getattr(ref, name).grad
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


# ---------------------------------------------------------------------------------------------- tests

def test_registered_everywhere():
    from workbench.steps.sae import ARCH_CHOICES, TOPK_FAMILY
    for a in (*CHOICE, "topafa"):
        assert a in ARCHS and a in ARCH_CHOICES
    assert uses_k("mutual_choice") and uses_k("feature_choice") and not uses_k("topafa")
    assert "feature_choice" in TOPK_FAMILY and "topafa" not in TOPK_FAMILY
    with pytest.raises(ValueError, match="fc_capacity"):
        make_sae("feature_choice", 4, 8, k=2, fc_capacity=0)
    with pytest.raises(ValueError, match="afa_coef"):
        make_sae("topafa", 4, 8, afa_coef=-1.0)


@pytest.mark.parametrize("arch", CHOICE)
def test_choice_gradients_match_dense_autograd(arch):
    sae = _sae(arch, aux_coef=0.7)
    x = torch.randn(12, 6, dtype=torch.float64)
    with torch.no_grad():        # tracked frequencies: some latents far below their Zipf target
        sae.freq.copy_(torch.tensor([0.5, 0.3, 0.0, 0.2, 0.1, 0.0, 0.05, 0.4, 0.0, 0.15], dtype=torch.float64))
        sae.freq_steps.fill_(3)
    _, _, aux_mask = ref_choice_loss(copy.deepcopy(sae), x)
    assert aux_mask.sum() > 3                     # the aux term is exercised
    _grads_match(sae, ref_choice_loss, x)


def test_topafa_gradients_match_dense_autograd():
    sae = _sae("topafa", afa_coef=0.3)
    x = torch.randn(12, 6, dtype=torch.float64)
    _grads_match(sae, ref_afa_loss, x)


def test_feature_choice_never_gives_a_latent_more_than_m_tokens():
    sae = _sae("feature_choice", d_in=8, d_sae=16, k=4, dtype="float32")
    with torch.no_grad():
        sae.b_enc.add_(5.0)                       # every pre-activation positive
        sae.b_enc[3] += 50.0                      # latent 3 would win every token under any other rule
    for B in (16, 64, 100):
        x = torch.randn(B, 8)
        m = round(4 * B / 16)
        out = sae.training_forward(_inp(x))
        assert out.counts.max() == m and (out.counts == m).all()   # all positive: exactly m each
        assert int(out.l0_sum) == m * 16
        l0 = (sae._main_mask.sum(1)).float()
        assert l0.max() > l0.min()                # tokens get a variable number of latents
    sae.cfg.fc_capacity = 3
    out = sae.training_forward(_inp(torch.randn(50, 8)))
    assert out.counts.max() == 3


def test_mutual_choice_keeps_exactly_k_times_B():
    sae = _sae("mutual_choice", d_in=8, d_sae=16, k=3, dtype="float32")
    with torch.no_grad():
        sae.b_enc.add_(5.0)
        sae.b_enc[3] += 50.0
    for B in (7, 32, 64):
        out = sae.training_forward(_inp(torch.randn(B, 8)))
        assert int(out.l0_sum) == 3 * B
        assert int(sae._main_mask.sum()) == 3 * B
        assert out.counts[3] == B                 # no per-latent cap: the strong latent takes every token
    with torch.no_grad():                         # fewer positive entries than k*B: only those
        sae.b_enc.fill_(-4.0)
    out = sae.training_forward(_inp(torch.randn(32, 8)))
    assert int(out.l0_sum) <= 3 * 32


def test_aux_zipf_loss_by_hand():
    """d_sae=4, k=1, n=4 rows, alpha=1: H = 1 + 1/2 + 1/3 + 1/4 = 25/12, budget k*n = 4, targets by rank
    48/25, 24/25, 16/25, 12/25. freq = [0.5, 0, 0.25, 0] -> ranks latent0:1, latent2:2, latent1:3,
    latent3:4 -> deficits (target - freq*n): 1.92-2 = -0.08, 0.64-0 = 0.64, 0.96-1 = -0.04, 0.48 -> q
    = [0, 1, 0, 0]: only latent 1 takes a token, its largest free positive pre-activation."""
    freq = torch.tensor([0.5, 0.0, 0.25, 0.0], dtype=torch.float64)
    t = zipf_targets(freq, 4.0, 1.0)
    assert torch.allclose(t, torch.tensor([48 / 25, 16 / 25, 24 / 25, 12 / 25], dtype=torch.float64))
    sae = make_sae("mutual_choice", 3, 4, k=1, dtype="float64", aux_coef=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3, 4, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(4, 3, dtype=torch.float64))
        sae.W_dec[3] = torch.tensor([0.6, 0.8, 0.0])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.freq.copy_(freq)
        sae.freq_steps.fill_(1)
    x = torch.tensor([[3.0, 0.2, 0.0], [0.0, 0.9, 0.1], [2.0, 0.5, 0.0], [0.0, 0.3, 2.5]], dtype=torch.float64)
    # main selection: the 4 largest pre-activations are 3.0, 2.5, 2.0, 0.9 -> (0,0), (3,2), (2,0), (1,1);
    # latent 1's free tokens are rows 0, 2, 3 with pre 0.2, 0.5, 0.3 -> it takes row 2 (0.5)
    pre = (x @ sae.W_enc).detach()
    sae._select(pre, _inp(x))
    mask = sae.zipf_selection(pre, sae._main_mask)
    assert mask.nonzero().tolist() == [[2, 1]]
    x_hat = torch.tensor([[3.0, 0, 0], [0, 0.9, 0], [2.0, 0, 0], [0, 0, 2.5]], dtype=torch.float64)
    e = x - x_hat
    e_hat = torch.zeros_like(e)
    e_hat[2] = 0.5 * sae.W_dec[1].detach()
    want = 0.5 * float((e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum())
    out = sae.training_forward(_inp(x))
    assert float(out.losses["aux"]) == pytest.approx(want, rel=1e-12)
    # frequencies then move towards this batch's rates (EMA)
    r = sae.cfg.zipf_ema
    assert float(sae.freq[0]) == pytest.approx((1 - r) * 0.5 + r * 0.5)
    assert float(sae.freq[1]) == pytest.approx(r * 0.25)
    assert float(sae.freq[3]) == 0.0


def test_afa_rule_matches_the_reference_worked_example():
    """etc/afa_step_by_step.ipynb of github.com/SewoongLee/top-afa-sae: decoder rows not unit-norm,
    targets = ||acts @ W_dec||; the published answer keeps the last two latents of every row."""
    acts = torch.tensor([[5.0, 4, 3], [1, 1, 1], [1, 10, 2]])
    W_dec = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    got = afa_mask(acts, W_dec.norm(dim=1), (acts @ W_dec).norm(dim=1))
    assert (acts * got).tolist() == [[0, 4, 3], [0, 1, 1], [0, 10, 2]]
    g = torch.Generator().manual_seed(3)
    a = torch.randn(20, 9, generator=g).relu()
    nrm, tgt = torch.rand(9, generator=g) + 0.5, torch.rand(20, generator=g) * 3
    assert torch.equal(afa_mask(a, nrm, tgt), ref_afa_keep(a, nrm, tgt))


def test_topafa_l0_varies_with_input_norm():
    sae = _sae("topafa", d_in=16, d_sae=64, dtype="float32", seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
    u = torch.randn(16, generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    xs = sae.b_dec.detach() + torch.stack([c * u for c in (0.3, 1.0, 3.0, 10.0)])
    f = sae.encode(xs)
    l0 = (f != 0).sum(1).tolist()
    assert len(set(l0)) > 1, l0                   # same direction, another norm: another L0
    pre = sae.pre_acts(xs).detach()
    keep = ref_afa_keep(pre.relu(), sae.W_dec.detach().norm(dim=1), (xs - sae.b_dec.detach()).norm(dim=1))
    assert torch.equal(f != 0, keep)
    # and across tokens of real-looking data L0 is not one constant k
    X, _ = synthetic(n=256, d=16, n_features=40)
    assert (sae.encode(X) != 0).sum(1).unique().numel() > 3


@pytest.fixture(scope="module")
def data():
    X, F = synthetic(n=8192, d=32, n_features=64, active=3)
    return X, F


@pytest.mark.parametrize("arch", (*CHOICE, "topafa"))
def test_train_save_load(arch, data, tmp_path):
    X, _ = data
    kw = {} if arch == "topafa" else {"k": 3}
    before = evaluate_sae(make_sae(arch, 32, 64, **kw), X)["fvu"]
    sae = train_sae(X, arch=arch, d_sae=64, n_tokens=8192 * 3, batch_size=256, progress=False, **kw)
    m = evaluate_sae(sae, X)
    assert m["fvu"] < 0.3 and m["fvu"] < 0.5 * before
    if arch != "topafa":                          # calibrated threshold: mean L0 near k
        assert 1.5 < m["l0"] < 6
        assert "inference" in sae.cfg.metadata["workbench"]["threshold_calibration"]
    sae.save(tmp_path / "s")
    again = load_sae(tmp_path / "s")
    assert type(again) is type(sae) and again.arch == arch
    with torch.no_grad():
        assert torch.equal(again.encode(X[:500]), sae.encode(X[:500]))
        assert torch.equal(again(X[:500]), sae(X[:500]))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["metadata"]["workbench_arch"] == arch
    if arch == "topafa":
        assert cfg["architecture"] == "topafa"
        with pytest.raises(ValueError, match="SAELens has no 'topafa'"):
            export_sae(sae, "saelens", tmp_path / "e")
    else:                                         # SAELens jumprelu: loads there with the same codes
        sae_lens = pytest.importorskip("sae_lens")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
        with torch.no_grad():
            assert torch.allclose(theirs.encode(X[:500]), sae.encode(X[:500]), atol=1e-5)
        if arch == "feature_choice":              # one threshold per latent, kept
            assert again.threshold.shape == (64,) and torch.equal(again.threshold.float(), sae.threshold.float())
            assert sae.threshold.std() > 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from workbench.store import write_store
    X, _ = synthetic(n=4096, d=16, n_features=32, active=3)
    n_seq, seq_len = 32, 128
    path = tmp_path_factory.mktemp("archs2_store") / "store"
    return write_store(path, {"blocks.0.hook_resid_post": X}, token_ids=torch.randint(0, 100, (n_seq, seq_len)),
                       attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool), doc_ids=torch.arange(n_seq),
                       seq_index=torch.arange(n_seq).repeat_interleave(seq_len),
                       position=torch.arange(seq_len).repeat(n_seq), model_name="tiny-random")


@pytest.mark.parametrize("arch", (*CHOICE, "topafa"))
def test_cli_train_sae(arch, store, tmp_path, capsys):
    from workbench.cli import main
    out = tmp_path / arch
    rc = main(["train-sae", str(store.path), "--arch", arch, "--d-sae", "32", "--k", "3", "--batch-size", "128",
               "--eval-tokens", "512", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    sae = load_sae(out)
    assert sae.arch == arch and res["arch"] == arch
    assert sae.cfg.k == (None if arch == "topafa" else 3)
    assert 0 < res["metrics"]["fvu"] < 1
    if arch == "topafa":                          # export to SAELens: one clear line, exit 2
        rc = main(["export-sae", str(out), "--format", "saelens", "--out", str(tmp_path / "ex")])
        assert rc == 2
        assert "SAELens has no 'topafa'" in capsys.readouterr().err
