"""Matching-pursuit SAE (mp) and Group Bias Adaptation (gba): forward against independent computations
(a hand-written matching pursuit, SAELens' MatchingPursuitSAE), gradients against autograd on dense float64
references, GBA's bias rule by hand and its frequency control on synthetic data, training, formats, CLI."""

import json

import pytest
import torch

from test_sae_helpers import one_thread, synthetic  # noqa: F401  (one_thread: autouse fixture)


def _mp_sae(d_in=12, d_sae=40, k=5, seed=0, dtype="float64", **kw):
    from analyses.sae import make_sae
    torch.manual_seed(seed)
    sae = make_sae("mp", d_in, d_sae, k=k, dtype=dtype, **kw)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
    return sae


def _hand_mp(x, W, b_dec, k):
    """Textbook matching pursuit, one row at a time, SAELens' rules: non-negative codes, stop when the
    best positive match is zero or the support stops changing."""
    out = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
    for n in range(x.shape[0]):
        r = x[n] - b_dec
        for _ in range(k):
            c = W @ r
            j = int(torch.argmax(c))
            v = max(float(c[j]), 0.0)
            if v == 0.0 or out[n, j] != 0:
                out[n, j] += v
                break
            out[n, j] += v
            r = r - v * W[j]
    return out


def test_mp_equals_hand_written_matching_pursuit():
    sae = _mp_sae()
    x = torch.randn(30, 12, dtype=torch.float64)
    f = sae.encode(x)
    ref = _hand_mp(x, sae.W_dec.detach(), sae.b_dec.detach(), 5)
    torch.testing.assert_close(f, ref)
    assert ((f > 0).sum(1) <= 5).all() and (f > 0).sum(1).float().mean() > 3
    # the reconstruction is f W_dec + b_dec
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("thr,dup", [(0.0, True), (0.5, True), (0.0, False)])
def test_mp_equals_saelens_forward_on_the_same_weights(thr, dup):
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE as SLMP, MatchingPursuitSAEConfig
    sae = _mp_sae(k=6, mp_residual_threshold=thr, mp_stop_on_duplicate=dup)
    sl = SLMP(MatchingPursuitSAEConfig(d_in=12, d_sae=40, dtype="float64", device="cpu", max_iterations=6,
                                       residual_threshold=thr, stop_on_duplicate_support=dup))
    with torch.no_grad():
        sl.W_dec.copy_(sae.W_dec)
        sl.b_dec.copy_(sae.b_dec)
    x = torch.randn(64, 12, dtype=torch.float64) * 2
    torch.testing.assert_close(sae.encode(x), sl.encode(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(sae(x), sl(x), rtol=0, atol=1e-12)


def test_mp_float32_codes_match_saelens_on_almost_every_row():
    """The Gram-updated correlations only differ from SAELens' fresh matmul by rounding: count the rows."""
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit
    sae = _mp_sae(d_in=32, d_sae=256, k=16, dtype="float32")
    X, _ = synthetic(n=2048, d=32, n_features=64, active=3)
    f = sae.encode(X)
    ref = _encode_matching_pursuit(X - sae.b_dec.detach(), sae.W_dec.detach(), 0.0, 16, True)
    same = ((f - ref).abs().amax(1) <= 1e-4 * (1 + ref.abs().amax(1)))
    assert same.float().mean() > 0.99


def test_mp_gradients_equal_autograd_through_a_dense_reference():
    from analyses.sae.base import TrainStepInput
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit
    sae = _mp_sae(k=4)
    x = torch.randn(20, 12, dtype=torch.float64)
    denom = (x - x.mean(0)).pow(2).sum()
    out = sae.training_forward(TrainStepInput(x=x, denom=denom, n_global=20))
    out.loss.backward()
    W = sae.W_dec.detach().clone().requires_grad_(True)
    b = sae.b_dec.detach().clone().requires_grad_(True)
    f = _encode_matching_pursuit(x - b, W, 0.0, 4, True)       # SAELens' own unrolled encoder
    loss = (x - (f @ W + b)).pow(2).sum() / denom
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach())
    torch.testing.assert_close(sae.W_dec.grad, W.grad)
    torch.testing.assert_close(sae.b_dec.grad, b.grad)


def test_mp_saves_in_saelens_format_and_round_trips(tmp_path):
    from analyses.sae import load_sae
    from sae_lens import SAE as SLSAE
    sae = _mp_sae(dtype="float32", mp_residual_threshold=0.25)
    sae.save(tmp_path / "mp")
    cfg = json.loads((tmp_path / "mp" / "cfg.json").read_text())
    assert cfg["architecture"] == "matching_pursuit" and cfg["max_iterations"] == 5
    x = torch.randn(50, 12)
    sl = SLSAE.load_from_disk(str(tmp_path / "mp"), device="cpu")
    torch.testing.assert_close(sl(x), sae(x), rtol=1e-5, atol=1e-5)
    back = load_sae(tmp_path / "mp")
    assert back.arch == "mp" and back.cfg.k == 5 and back.cfg.mp_residual_threshold == 0.25
    torch.testing.assert_close(back(x), sae(x))
    # a folder written by SAELens itself loads too
    sl.save_model(str(tmp_path / "sl"))
    torch.testing.assert_close(load_sae(tmp_path / "sl")(x), sl(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- GBA

def _gba_sae(d_in=10, d_sae=30, k=4, seed=0, dtype="float64", **kw):
    from analyses.sae import make_sae
    torch.manual_seed(seed)
    sae = make_sae("gba", d_in, d_sae, k=k, dtype=dtype, **kw)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
        sae.scale.copy_(torch.rand(d_sae) + 0.5)
        sae.bias.copy_(-torch.rand(d_sae) * 0.8)
    return sae


def test_gba_gradients_equal_autograd_through_a_dense_reference():
    from analyses.sae.base import TrainStepInput
    sae = _gba_sae()
    x = torch.randn(25, 10, dtype=torch.float64)
    denom = (x - x.mean(0)).pow(2).sum()
    out = sae.training_forward(TrainStepInput(x=x, denom=denom, n_global=25))
    out.loss.backward()
    W = sae.W_dec.detach().clone().requires_grad_(True)
    a = sae.scale.detach().clone().requires_grad_(True)
    b = sae.b_dec.detach().clone().requires_grad_(True)
    z = (x - b) @ W.t()                                           # tied encoder, dense
    f = a * z * ((z + sae.bias) > 0).double()                     # JumpReLU gated by the (fixed) bias
    loss = (x - (f @ W + b)).pow(2).sum() / denom
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach())
    for mine, ref in ((sae.W_dec, W), (sae.scale, a), (sae.b_dec, b)):
        torch.testing.assert_close(mine.grad, ref.grad)
    assert not sae.bias.requires_grad                             # biases get no gradient
    # inference = the same code
    torch.testing.assert_close(sae.encode(x), f.detach())


def test_gba_bias_update_equals_a_hand_computation():
    from analyses.sae.base import TrainStepInput
    sae = _gba_sae(d_sae=12, gba_groups=3, gba_every=2, gba_gamma=0.05, k=3)
    x = torch.randn(40, 10, dtype=torch.float64)
    xs = [x[:20], x[20:]]
    y_all, sq = [], 0.0
    b0 = sae.bias.clone()
    for xb in xs:
        sae.training_forward(TrainStepInput(x=xb, denom=torch.tensor(1.0), n_global=20))
        xin = xb - sae.b_dec.detach()
        y_all.append(xin @ sae.W_dec.detach().t() + b0)
        sq += float(xin.pow(2).sum())
    stats = sae.adapt()
    y = torch.cat(y_all)
    p = (y > 0).double().mean(0)
    r = y.max(0).values.clamp_min(0)
    targets = sae.targets()
    floor = -(sq / 40) ** 0.5
    want = b0.clone()
    for g in range(3):
        idx = list(range(4 * g, 4 * g + 4))
        pos = [m for m in idx if r[m] > 0]
        s_bar = sum(float(r[m]) for m in pos) / len(pos) if pos else float(r[r > 0].mean())
        for m in idx:
            if p[m] > targets[m]:
                want[m] = max(float(b0[m]) - 0.05 * float(r[m]), floor)
            if p[m] < 1e-6:
                want[m] = min(float(b0[m]) + 0.05 * s_bar, 0.0)
    torch.testing.assert_close(stats["freq"], p)
    torch.testing.assert_close(sae.bias, want)
    assert (sae.bias != b0).any()
    # targets: geometric ladder over 3 groups scaled to sum to k=3
    t = targets.tolist()
    assert t[0] / t[4] == pytest.approx(t[4] / t[8]) and sum(t) == pytest.approx(3.0)


def test_gba_bias_rule_raises_silent_latents():
    from analyses.sae.gba import adapt_biases
    b = torch.tensor([-0.5, -0.5, -0.2])
    new = adapt_biases(b, freq=torch.tensor([0.0, 0.5, 0.01]), peak=torch.tensor([-0.3, 2.0, 1.0]),
                       targets=torch.tensor([0.1, 0.1, 0.1]), groups=torch.tensor([0, 0, 0]), gamma=0.1,
                       floor=-1.0)
    # latent 0 never fired: raised by gamma * mean positive peak of its group (1.5); 1 fires too often:
    # lowered by gamma * its peak; 2 is inside [eps, target]: unchanged
    torch.testing.assert_close(new, torch.tensor([-0.35, -0.7, -0.2], dtype=torch.float64))


def test_gba_drives_each_groups_firing_frequency_to_its_target():
    from analyses.sae import train_sae
    X, _ = synthetic(n=16384, d=24, n_features=96, active=4, seed=7)
    sae = train_sae(X, arch="gba", d_sae=96, k=6, n_tokens=16384 * 4, batch_size=512, lr=5e-3, seed=0,
                    progress=False, gba_groups=4, gba_high=0.2, gba_low=0.02, gba_every=4, gba_gamma=0.05)
    Y, _ = synthetic(n=8192, d=24, n_features=96, active=4, seed=7)   # same distribution
    freq = (sae.encode(Y) > 0).double().mean(0)
    t = sae.targets()
    from analyses.sae.gba import group_index
    g = group_index(96, 4)
    for i in range(4):
        got, want = float(freq[g == i].mean()), float(t[g == i][0])
        assert want * 0.5 < got < want * 1.3, (i, got, want)
    assert float((sae.encode(Y) > 0).double().sum(1).mean()) == pytest.approx(6, rel=0.3)


def test_gba_saves_as_saelens_jumprelu_and_round_trips(tmp_path):
    from analyses.sae import export_sae, load_sae
    from sae_lens import SAE as SLSAE
    sae = _gba_sae(dtype="float32")
    sae.save(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["workbench_arch"] == "gba"
    x = torch.randn(40, 10)
    sl = SLSAE.load_from_disk(str(tmp_path / "g"), device="cpu")
    torch.testing.assert_close(sl.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    back = load_sae(tmp_path / "g")
    assert back.arch == "gba"
    torch.testing.assert_close(back.bias, sae.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    export_sae(sae, "saelens", tmp_path / "exp")                 # inference is JumpReLU: exportable
    assert SLSAE.load_from_disk(str(tmp_path / "exp"), device="cpu") is not None


@pytest.mark.parametrize("arch", ["mp", "gba"])
def test_short_training_reduces_fvu_and_resumes_from_disk(arch, tmp_path):
    from analyses.sae import evaluate_sae, load_sae, make_sae, train_sae
    X, _ = synthetic(n=8192, d=24, n_features=64, active=3)
    untrained = make_sae(arch, 24, 64, k=4)
    with torch.no_grad():
        untrained.b_dec.copy_(X.mean(0))
    before = evaluate_sae(untrained, X)["fvu"]
    sae = train_sae(X, arch=arch, d_sae=64, k=4, n_tokens=8192 * 3, batch_size=256, lr=5e-3, progress=False,
                    gba_every=5)
    after = evaluate_sae(sae, X)["fvu"]
    assert after < 0.5 * before and after < 0.5, (before, after)
    sae.save(tmp_path / arch)
    back = load_sae(tmp_path / arch)
    torch.testing.assert_close(back(X[:100]), sae(X[:100]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mp", "gba"])
def test_cli_train_sae_arch(arch, tmp_path):
    from workbench.cli import main
    from workbench.store import write_store
    X, _ = synthetic(n=4096, d=16, n_features=32, active=3)
    n_seq, seq_len = 32, 128
    s = write_store(tmp_path / "store", {"blocks.0.hook_resid_post": X},
                    token_ids=torch.randint(0, 100, (n_seq, seq_len)),
                    attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool), doc_ids=torch.arange(n_seq),
                    seq_index=torch.arange(n_seq).repeat_interleave(seq_len),
                    position=torch.arange(seq_len).repeat(n_seq), model_name="tiny-random")
    out = tmp_path / "sae"
    rc = main(["train-sae", str(s.path), "--arch", arch, "--d-sae", "32", "--k", "3", "--batch-size", "256",
               "--lr", "0.005", "--out", str(out), "--eval-tokens", "1024", "--json"])
    assert rc in (0, None)
    from analyses.sae import load_sae
    sae = load_sae(out)
    assert sae.arch == arch and sae.cfg.k == 3
