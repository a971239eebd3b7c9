"""SAE architectures: synthetic ground-truth recovery, hand-checked gradients, decoder norms, sparse decode."""

import pytest
import torch

from analyses.sae import (ARCHS, BatchTopKSAE, SparseActs, TrainStepInput, evaluate_sae, make_sae, sparse_decode,
                          train_sae)
from analyses.sae.base import JumpReLUFn, StepFn
from test_sae_helpers import mmcs, synthetic


from test_sae_helpers import one_thread  # noqa: E402,F401  (autouse: 1 torch thread)


@pytest.fixture(scope="module")
def data():
    return synthetic()


# 160k tokens (8 epochs of the synthetic data) at lr 1e-2; the dense-penalty architectures get smaller
# batches (more steps): at 312 steps of 512 rows ReLU/JumpReLU were still at L0 ~ 15-40 (MMCS ~ 0.5).
# JumpReLU: bandwidth 0.5 (pre-activations of the normalised data are ~1-5, so the default 0.05 window
# sees too few tokens near the threshold for a 1250-step run). Honest MMCS (data seeds 1234 / 7, train
# seeds 0 / 1): topk ~0.985, batchtopk ~0.96, matryoshka ~0.92-0.93, jumprelu ~0.97-0.985, relu ~0.98-0.99.
RECOVERY = {
    "topk": dict(k=3, batch_size=256),
    "batchtopk": dict(k=3, batch_size=256),
    "matryoshka": dict(k=3, matryoshka_widths=[32, 64, 128], batch_size=256),
    "jumprelu": dict(l0_coef=1e-2, bandwidth=0.5, batch_size=128),
    "relu": dict(l1_coef=0.1, batch_size=128),
}


@pytest.mark.parametrize("arch", list(RECOVERY))
def test_recovers_ground_truth_features(arch, data):
    X, F = data
    sae = train_sae(X, arch=arch, d_sae=128, n_tokens=160_000, lr=1e-2, progress=False,
                    **RECOVERY[arch])
    score = mmcs(sae, F)
    m = evaluate_sae(sae, X)
    assert score >= (0.95 if arch == "topk" else 0.9), (arch, score, m["l0"])
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert m["l0"] == pytest.approx(3, abs=0.6)
        assert m["fvu"] < 0.25
    # decoder rows stay unit norm
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_untrained_sae_does_not_recover(data):
    X, F = data
    sae = make_sae("topk", 48, 128, k=3)
    assert mmcs(sae, F) < 0.6


def test_jumprelu_gradients_match_hand_computed():
    z = torch.tensor([[0.50, 0.98, 1.00], [0.10, 1.03, 2.00]], requires_grad=True)
    theta = torch.tensor([0.4, 1.0, 1.5], requires_grad=True)
    eps = 0.1
    f = JumpReLUFn.apply(z, theta, eps)
    assert torch.equal(f.detach(), torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.03, 2.0]]))
    f.sum().backward()
    # d f / d z = H(z - theta)
    assert torch.equal(z.grad, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    # d f / d theta = -(theta/eps) * sum_b 1[|z - theta| < eps/2]
    # latent 0: |0.5-0.4|=0.1 no, |0.1-0.4| no -> 0; latent 1: 0.02 and 0.03 both in -> -2*1.0/0.1 = -20
    # latent 2: |1-1.5|, |2-1.5| no -> 0
    assert torch.allclose(theta.grad, torch.tensor([0.0, -20.0, 0.0]))
    theta.grad = None
    StepFn.apply(z, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -20.0, 0.0]))


def test_jumprelu_threshold_learns_through_log_param():
    sae = make_sae("jumprelu", 4, 3, init_threshold=0.5, bandwidth=0.5)
    x = torch.randn(8, 4)
    inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=8, coefficients={"l0": 1.0})
    out = sae.training_forward(inp)
    out.loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


def _dense_reference_grads(sae, x, mask):
    """Gradient of the reconstruction loss with the active set fixed, by plain dense autograd."""
    W_enc = sae.W_enc.detach().clone().requires_grad_()
    b_enc = sae.b_enc.detach().clone().requires_grad_()
    W_dec = sae.W_dec.detach().clone().requires_grad_()
    b_dec = sae.b_dec.detach().clone().requires_grad_()
    pre = (x - b_dec) @ W_enc + b_enc
    f = pre.relu() * mask
    x_hat = f @ W_dec + b_dec
    denom = (x - x.mean(0)).pow(2).sum()
    ((x - x_hat).pow(2).sum() / denom).backward()
    return {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad, "b_dec": b_dec.grad}


def _perturbed(arch, d_in, d_sae, **kw):
    torch.manual_seed(1)
    sae = make_sae(arch, d_in, d_sae, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def test_batchtopk_selection_and_gradients():
    d_in, d_sae, k, B = 6, 10, 2, 5
    sae = _perturbed("batchtopk", d_in, d_sae, k=k)
    x = torch.randn(B, d_in)
    inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=B)
    out = sae.training_forward(inp)
    # hand selection: the k*B largest positive pre-activations of the whole batch
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    flat = pre.relu().flatten()
    tau = flat.sort(descending=True).values[k * B - 1]
    mask = ((pre >= tau) & (pre > 0)).float()
    assert int(out.l0_sum) == int(mask.sum()) == k * B
    assert mask.sum(1).tolist() != [k] * B or True   # per-row counts may differ (that is the point)
    out.loss.backward()
    ref = _dense_reference_grads(sae, x, mask)
    for name, g in ref.items():
        assert torch.allclose(getattr(sae, name).grad, g, atol=1e-5), name
    # the EMA threshold starts at the smallest kept activation
    assert float(sae.threshold) == pytest.approx(float(tau), rel=1e-6)


def test_topk_sparse_backward_equals_dense():
    d_in, d_sae, k, B = 8, 20, 3, 7
    sae = _perturbed("topk", d_in, d_sae, k=k)
    x = torch.randn(B, d_in)
    inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=B)
    sae.training_forward(inp).loss.backward()
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    mask = torch.zeros_like(pre).scatter_(1, pre.topk(k, dim=1).indices, 1.0)
    ref = _dense_reference_grads(sae, x, mask)
    for name, g in ref.items():
        assert torch.allclose(getattr(sae, name).grad, g, atol=1e-5), name


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_sparse_weight_gradients_equal_dense_at_width(arch):
    """The weight gradients are embedding_bag sums over the entries sorted by latent (base._latent_sum):
    at a width where many latents fire several times in the batch and many never (empty runs), they equal
    dense autograd, and land in each parameter's own layout (W_enc column-major: no transposing copy)."""
    d_in, d_sae, k, B = 24, 300, 8, 64
    kw = dict(k=k, matryoshka_widths=[100, 300]) if arch == "matryoshka" else dict(k=k)
    sae = _perturbed(arch, d_in, d_sae, **kw)
    x = torch.randn(B, d_in) * 2
    inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=B)
    out = sae.training_forward(inp)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    if arch == "matryoshka":                       # BatchTopK's selection: the k * B largest of the batch
        tau = pre.relu().flatten().sort(descending=True).values[k * B - 1]
        mask = ((pre >= tau) & (pre > 0)).float()
    else:
        mask = torch.zeros_like(pre).scatter_(1, pre.topk(k, dim=1).indices, 1.0)
    counts = mask.sum(0)
    assert int((counts == 0).sum()) > 20 and int((counts >= 3).sum()) > 20     # both cases are exercised
    if arch == "matryoshka":                       # the inner prefix's loss, by dense autograd too
        out.loss.backward()
        W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().clone().requires_grad_() for n in
                                      ("W_enc", "b_enc", "W_dec", "b_dec"))
        f = ((x - b_dec) @ W_enc + b_enc).relu() * mask
        denom = (x - x.mean(0)).pow(2).sum()
        loss = sum((x - (f * (torch.arange(d_sae) < m)) @ W_dec - b_dec).pow(2).sum() / denom for m in (100, 300))
        loss.backward()
        ref = {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad, "b_dec": b_dec.grad}
    else:
        out.loss.backward()
        ref = _dense_reference_grads(sae, x, mask)
    for name, g in ref.items():
        p = getattr(sae, name)
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)
        assert p.grad.stride() == p.stride(), name
    assert sae.W_enc.stride() == (1, d_in)


def test_a_train_step_leaves_no_reference_cycle():
    """The sparse backward's saved state must not point back at the graph (SparseActs.values does): a cycle
    through autograd nodes keeps each step's [n, d_sae] tensors alive until a full gc."""
    import gc
    import weakref
    sae = _perturbed("topk", 16, 64, k=4)
    x = torch.randn(32, 16)
    refs, orig = [], SparseActs.from_topk

    def spy(*a, **k):
        r = orig(*a, **k)
        refs.append(weakref.ref(r))
        return r
    gc.disable()
    try:
        SparseActs.from_topk = staticmethod(spy)
        for _ in range(3):
            out = sae.training_forward(TrainStepInput(x=x, denom=x.var(0).sum() * 32, n_global=32))
            out.loss.backward()
            del out
        assert refs and all(r() is None for r in refs)
    finally:
        SparseActs.from_topk = staticmethod(orig)
        gc.enable()


def test_sparse_decode_equals_dense_decode():
    sae = _perturbed("topk", 16, 64, k=5)
    x = torch.randn(33, 16)
    acts = sae.encode_sparse(x)
    dense = sae.decode(sae.encode(x))
    assert torch.allclose(sae.decode_sparse(acts), dense, atol=1e-5)
    assert torch.allclose(sae(x), dense, atol=1e-5)
    assert torch.allclose(acts.to_dense(), sae.encode(x))
    # variable-length bags (BatchTopK style) too
    f = sae.encode(x)
    f[0] = 0
    sp = SparseActs.from_mask(f, f != 0)
    assert torch.allclose(sparse_decode(sp, sae.W_dec, sae.b_dec), sae.decode(f), atol=1e-5)
    # 3-D input
    x3 = torch.randn(2, 5, 16)
    assert torch.allclose(sae(x3), sae.decode(sae.encode(x3)), atol=1e-5)


def test_parallel_gradient_removed_and_norms_restored():
    sae = make_sae("topk", 8, 16, k=2)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_encoder_is_decoder_transpose_at_init_and_b_dec_from_data():
    sae = make_sae("relu", 8, 16)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    X = torch.randn(2000, 8) + 5.0
    t = train_sae(X, arch="topk", d_sae=16, k=2, n_tokens=512, batch_size=512, lr=1e-12, progress=False)
    # with a negligible lr, b_dec is the geometric median of the (raw-unit) data
    assert torch.allclose(t.b_dec, torch.full((8,), 5.0), atol=0.15)


def test_input_scale_is_folded_into_weights(data):
    X, _ = data
    a = train_sae(X, arch="topk", d_sae=128, k=3, n_tokens=20_000, batch_size=512, lr=3e-3, progress=False)
    b = train_sae(X * 100.0, arch="topk", d_sae=128, k=3, n_tokens=20_000, batch_size=512, lr=3e-3,
                  progress=False)
    ma, mb = evaluate_sae(a, X), evaluate_sae(b, X * 100.0)
    assert mb["fvu"] == pytest.approx(ma["fvu"], rel=1e-3, abs=1e-4)
    assert torch.allclose(b.encode(X[:50] * 100.0), 100.0 * a.encode(X[:50]), rtol=1e-3, atol=1e-3)


def test_registry_has_every_architecture():
    from analyses.sae import KNOWN_ARCHS, uses_k
    from workbench.steps.sae import ARCH_CHOICES, TOPK_FAMILY
    assert list(ARCHS) == ["relu", "topk", "batchtopk", "jumprelu", "matryoshka", "mutual_choice",
                           "feature_choice", "topafa", "mp", "gba"]
    assert issubclass(ARCHS["batchtopk"], BatchTopKSAE)
    # every other list is the registry
    assert list(KNOWN_ARCHS) == list(ARCHS) == list(ARCH_CHOICES)
    with_k = ["topk", "batchtopk", "matryoshka", "mutual_choice", "feature_choice", "mp", "gba"]
    assert [a for a in ARCHS if uses_k(a)] == with_k
    assert [a for a in ARCHS if a in TOPK_FAMILY] == with_k


@pytest.fixture
def tiny_arch():
    """An architecture defined and registered here only (one class + one registration)."""
    from analyses.sae import TopKSAE, register_arch, unregister_arch

    @register_arch
    class TinyTopK(TopKSAE):
        arch = "tinytopk"
    yield TinyTopK
    unregister_arch("tinytopk")


def test_an_architecture_registered_elsewhere_is_everywhere(tiny_arch, tmp_path):
    import dataclasses
    from analyses.sae import load_sae
    from workbench.cli import build_parser
    from workbench.sweep.spec import step_fields
    assert ARCHS["tinytopk"] is tiny_arch
    # CLI choices (parser built now or earlier: the choices are a live view of the registry)
    ns = build_parser().parse_args(["train-sae", "STORE", "--arch", "tinytopk"])
    assert ns.arch == "tinytopk"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-sae", "STORE", "--arch", "nope"])
    # sweep schema and the UI form read the same field metadata
    fields, _ = step_fields("train_sae")
    assert "tinytopk" in fields["arch"].metadata["choices"]
    assert "tinytopk" in list(fields["arch"].metadata["choices"])
    from workbench.steps.sae import TOPK_FAMILY, TrainSAEConfig
    assert "tinytopk" in TOPK_FAMILY     # uses_k inherited from TopK: train-sae passes --k
    assert any(f.name == "arch" for f in dataclasses.fields(TrainSAEConfig))
    # the trainer, the config checks and the SAELens round trip know it too
    sae = train_sae(torch.randn(512, 8), arch="tinytopk", d_sae=16, k=2, batch_size=128, progress=False)
    assert type(sae) is tiny_arch
    with pytest.raises(ValueError, match="needs k"):
        make_sae("tinytopk", 8, 16)
    sae.save(tmp_path / "t")
    assert type(load_sae(tmp_path / "t")) is tiny_arch
    # unknown names list the registry
    with pytest.raises(ValueError, match="known: " + ", ".join(ARCHS)):
        make_sae("nope", 8, 16)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_auxk_loss_and_gradients_equal_a_dense_reference(path, monkeypatch):
    """AuxK by hand (Gao et al. 2024 sec. A.2): the top k_aux pre-activations among the dead latents (ReLU'd)
    reconstruct the detached residual; coefficient aux_coef * min(n_dead / k_aux, 1), normalised by the
    residual's total variance. Both of our paths (dense GEMMs over the dead columns, sparse gathers) must
    give its loss and gradients."""
    import analyses.sae.base as base
    monkeypatch.setattr(base, "AUX_DENSE_RATIO", 1e9 if path == "dense" else 0)
    d_in, d_sae, k, B, k_aux = 6, 24, 2, 9, 3
    sae = _perturbed("topk", d_in, d_sae, k=k, aux_k=k_aux, aux_coef=0.5, dtype="float64")
    x = torch.randn(B, d_in, dtype=torch.float64)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13, 20, 23]] = True
    denom = (x - x.mean(0)).pow(2).sum()
    out = sae.training_forward(TrainStepInput(x=x, denom=denom, n_global=B, dead_mask=dead, workspace={}))
    out.loss.backward()

    P = {n: getattr(sae, n).detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    main = torch.zeros(B, d_sae, dtype=torch.bool)
    aux_sel = torch.zeros(B, d_sae, dtype=torch.bool)
    dead_cols = dead.nonzero().flatten().tolist()
    for r in range(B):                                   # selections by sorting each row
        main[r, pre[r].detach().argsort(descending=True)[:k]] = True
        order = sorted(dead_cols, key=lambda c: -float(pre[r, c].detach()))
        aux_sel[r, order[:k_aux]] = True
    x_hat = (pre.relu() * main) @ P["W_dec"] + P["b_dec"]
    mse = (x - x_hat).pow(2).sum() / denom
    e = (x - x_hat).detach()
    e_hat = (pre.relu() * aux_sel) @ P["W_dec"]
    aux = 0.5 * min(len(dead_cols) / k_aux, 1.0) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (mse + aux).backward()
    assert float(out.losses["aux"]) == pytest.approx(float(aux.detach()), rel=1e-10)
    assert float(out.loss.detach()) == pytest.approx(float((mse + aux).detach()), rel=1e-10)
    for name, p in P.items():
        assert torch.allclose(getattr(sae, name).grad, p.grad, atol=1e-10), name


def test_preacts_buffer_is_reused_and_changes_nothing():
    """The CPU step buffer: the same numbers and gradients as a fresh tensor, the same storage every step."""
    torch.manual_seed(0)
    sae = _perturbed("topk", 8, 32, k=3)
    x = torch.randn(16, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    grads = []
    ws = {}
    for workspace in (None, ws, ws):
        sae.zero_grad(set_to_none=True)
        inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=16, dead_mask=dead,
                             workspace=workspace)
        sae.training_forward(inp).loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    assert len(ws) == 1
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)
    for a, b in zip(grads[0], grads[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,k", [((64, 2048), 8), ((33, 4608), 32), ((5, 1024), 16), ((7, 1000), 3)])
def test_topk_rows_is_torch_topk(shape, k):
    """The grouped CPU top-k returns each row's k largest values (as torch.topk), at their own columns, no
    column twice — also with heavy ties (values rounded to a few levels) and when it falls back."""
    from analyses.sae.base import topk_rows
    torch.manual_seed(0)
    for pre in (torch.randn(shape), torch.randn(shape).mul(2).round()):
        v, i = topk_rows(pre, k)
        ref = pre.topk(k, dim=-1).values
        assert torch.equal(v.sort(dim=-1, descending=True).values, ref)
        assert torch.equal(pre.gather(1, i), v)
        assert all(len(set(r.tolist())) == k for r in i)
