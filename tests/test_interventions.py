"""Interventions (workbench.interventions): SAE splice with error term, clamp/add steering, seeded
generation, exact ablation and the attribution-patching estimate — each checked against an
independent computation (hand formulas, SAELens' own SAE forward, a separately loaded HF model)."""

import json

import pytest
import torch
import torch.nn.functional as F

from workbench import interventions as iv
from workbench.errors import WorkbenchError
from workbench.models import load_model

HOOK = "blocks.0.hook_resid_post"
TEXT = "the quick brown fox jumps over the lazy dog and runs away"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny):
    from analyses.sae import make_sae
    torch.manual_seed(0)
    sae = make_sae("topk", d_in=tiny.d_model, d_sae=256, k=8,
                   metadata={"model_name": "tiny-random", "hook_name": HOOK})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.1)
    return sae.save(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture(scope="module")
def sae(sae_dir):
    return iv.resolve_sae(sae_dir)[0]


@pytest.fixture(scope="module")
def ids(tiny):
    return iv.tokenize(tiny, TEXT)[0]


def _acts(tiny, ids):
    return tiny.run(ids, None, [HOOK])[HOOK][0]          # [s, d]


@pytest.fixture(autouse=True)
def _no_grad_by_default():
    with torch.no_grad():
        yield


def test_splice_with_error_term_reproduces_logits(tiny, sae, ids):
    clean = tiny.logits(ids)
    spliced = tiny.logits(ids, hook=HOOK, replace=lambda a: iv.Intervention([], sae, splice=True).apply(a))
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    # the splice really goes through the SAE: dropping the error term changes the logits a lot
    no_err = tiny.logits(ids, hook=HOOK, replace=lambda a: sae.decode(sae.encode(a[0]))[None])
    assert (no_err - clean).abs().max() > 1e-2


def test_clamp_to_own_activation_reproduces_output(tiny, sae, ids):
    f = sae.encode(_acts(tiny, ids))
    p = 3
    i = int(f[p].argmax())
    assert f[p, i] > 0
    edit = iv.Edit(float(f[p, i]), "clamp", latent=i, positions=(p,))
    inter = iv.Intervention([edit], sae)
    torch.testing.assert_close(tiny.logits(ids, hook=HOOK, replace=inter.apply), tiny.logits(ids),
                               rtol=1e-5, atol=1e-5)
    assert iv.generate(tiny, ids, HOOK, inter, 6) == iv.generate(tiny, ids, HOOK, None, 6)
    # a different value at the same place does change the output
    big = iv.Intervention([iv.Edit(float(f[p, i]) + 50, "clamp", latent=i, positions=(p,))], sae)
    assert (tiny.logits(ids, hook=HOOK, replace=big.apply) - tiny.logits(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["clamp", "add"])
def test_clamp_add_semantics_by_hand_and_saelens(tiny, sae, sae_dir, ids, mode):
    x = _acts(tiny, ids)
    f = sae.encode(x)
    i, v = int(f[2].argmax()), 7.5
    W = sae.W_dec.detach()
    if mode == "clamp":
        want = x + (v - f[:, i])[:, None] * W[i]          # x' = x + (v - f_i) W_dec[i]
    else:
        want = x + v * W[i]                               # x' = x + v W_dec[i]
    skip = iv.tokenize(tiny, TEXT)[1]
    want[:skip] = x[:skip]                                # a prepended BOS (when there is one) is untouched
    inter = iv.Intervention(iv.latent_edits([i], [v], mode, 256), sae, skip=skip)
    got = inter.apply(x[None])[0]
    rows = slice(skip, None)
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    # SAELens' own splice: SAE.forward with use_error_term and the latent edited at hook_sae_acts_post
    from sae_lens import SAE as SLSAE
    import warnings
    sl = SLSAE.load_from_disk(str(sae_dir), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl.use_error_term = True

    def edit(acts, hook):
        acts = acts.clone()
        acts[..., i] = v if mode == "clamp" else acts[..., i] + v
        return acts
    sl.hook_sae_acts_post.add_hook(edit)
    with torch.no_grad():
        ref = sl(x)
    sl.reset_hooks()
    torch.testing.assert_close(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
    # and the logits with the edit spliced in equal the logits with the hand-computed activation
    torch.testing.assert_close(tiny.logits(ids, hook=HOOK, replace=inter.apply),
                               tiny.logits(ids, hook=HOOK, replace=lambda a: got[None]), rtol=1e-5, atol=1e-5)


def test_generation_seeded_and_steered(tiny, sae, sae_dir, ids):
    a = iv.generate(tiny, ids, HOOK, None, 8, temperature=1.0, seed=3)
    assert a == iv.generate(tiny, ids, HOOK, None, 8, temperature=1.0, seed=3)
    assert len(a) == 8
    # KV-cached greedy generation equals argmax of full forwards
    g = iv.generate(tiny, ids, HOOK, None, 4)
    seq = ids
    for t in g:
        assert int(tiny.logits(seq)[0, -1].argmax()) == t
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
    # the full-forward fallback (used when the KV cache does not work through the bridge) agrees
    steer_add = iv.Intervention(iv.latent_edits([5], [200.0], "add", 256), sae)
    cached = [iv.generate(tiny, ids, HOOK, x, 5, temperature=0.7, seed=1) for x in (None, steer_add)]
    saved = iv._KV_OK.get(tiny)
    iv._KV_OK[tiny] = False
    try:
        assert [iv.generate(tiny, ids, HOOK, x, 5, temperature=0.7, seed=1, path="bridge")
                for x in (None, steer_add)] == cached
    finally:
        iv._KV_OK[tiny] = saved
    df = iv.steer(TEXT, sae=sae_dir, model=tiny, latents=[5, 9], values=[200], mode="add", max_new_tokens=6)
    assert df.attrs["unsteered_ids"] == iv.generate(tiny, ids, HOOK, None, 6)
    assert df.attrs["steered_ids"] != df.attrs["unsteered_ids"]
    assert len(df) == ids.shape[1] + 6
    assert (df["kl"].iloc[1:] > 0).all() and df["p_clean"].iloc[:-1].between(0, 1).all()
    # p_clean / p_steered are the probabilities of the next token under clean / steered forwards
    seq = torch.cat([ids[0], torch.tensor(df.attrs["unsteered_ids"])])[None]
    pc = torch.softmax(tiny.logits(seq)[0].float(), -1)
    t = 4
    assert df["p_clean"][t] == pytest.approx(float(pc[t, seq[0, t + 1]]), rel=1e-5)


def _hf_forward(tiny, ids, replace):
    """Independent forward: a separately loaded HF model, activation replaced at layer 0's output."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny.source).eval()

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h2 = replace(h)
        return (h2,) + tuple(out[1:]) if isinstance(out, tuple) else h2
    handle = hf.model.layers[0].register_forward_hook(hook)
    try:
        return hf(ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("metric", ["loss", "logit"])
def test_attribution_exact_and_linear(tiny, sae, sae_dir, ids, metric):
    kw = {"metric": metric}
    if metric == "logit":
        kw.update(target=7, position=-2)
    df = iv.attribute(TEXT, sae=sae_dir, model=tiny, n_exact=5, **kw)
    s = ids.shape[1]

    def m(logits):
        if metric == "loss":
            return F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum")
        return logits[0, s - 2, 7].double()

    x = _acts(tiny, ids)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    with torch.no_grad():
        base = m(_hf_forward(tiny, ids, lambda h: h))
    assert float(base) == pytest.approx(df.attrs["metric_value"], rel=1e-5, abs=1e-5)
    measured = df.dropna(subset=["exact"])
    assert len(measured) == 5
    for r in measured.itertuples():
        f2 = f.clone()
        f2[r.position, r.latent] = 0
        x2 = sae.decode(f2) + (x - x_hat)                   # SAE splice with error term, latent zeroed
        with torch.no_grad():
            abl = m(_hf_forward(tiny, ids, lambda h, x2=x2: x2[None].to(h.dtype)))
        assert r.exact == pytest.approx(float(abl - base), rel=1e-3, abs=1e-5)
    # gradient x activation with autograd on the latents themselves (error term held fixed)
    leaf = f.detach().clone().requires_grad_(True)
    err = (x - x_hat).detach()
    with torch.enable_grad():
        m(_hf_forward(tiny, ids, lambda h: (sae.decode(leaf) + err)[None])).backward()
    want = (-leaf * leaf.grad).detach()
    got = torch.tensor(df["attribution"].values, dtype=torch.float64)
    torch.testing.assert_close(got, want[df["position"].values, df["latent"].values].double(),
                               rtol=1e-3, atol=1e-6)
    # every active (non-BOS) latent is in the table, and agreement is reported
    skip = iv.tokenize(tiny, TEXT)[1]
    assert len(df) == int((f[skip:] != 0).sum())
    ag = df.attrs["agreement"]
    assert ag["n"] == 5 and 0 <= ag["sign_agreement"] <= 1


@pytest.fixture(scope="module")
def pca_dir(tmp_path_factory, tiny):
    """A complete `pca` result made by the pca step on a small synthetic store of tiny-random's hook."""
    from workbench.steps import run_step
    from workbench.store import write_store
    root = tmp_path_factory.mktemp("pca")
    g = torch.Generator().manual_seed(0)
    n_seq, L = 8, 16
    acts = torch.randn(n_seq * L, tiny.d_model, generator=g) * torch.linspace(3, 0.1, tiny.d_model) + 0.5
    write_store(root / "store", {HOOK: acts}, torch.randint(1, 100, (n_seq, L), generator=g),
                torch.ones(n_seq, L, dtype=torch.bool), torch.arange(n_seq),
                torch.arange(n_seq).repeat_interleave(L), torch.arange(L).repeat(n_seq), "tiny-random")
    run_step("pca", {"store": str(root / "store"), "hook": HOOK, "k": 3, "out": str(root / "pca"),
                     "device": "cpu", "sample": 32})
    return root / "pca"


def test_pca_direction(tiny, pca_dir, tmp_path, ids):
    from workbench.results import read_tensors
    x = _acts(tiny, ids)
    t = read_tensors(pca_dir)                             # raw tensors, read independently of the reader
    C, mean = t["components"].float(), t["mean"].float()
    assert C.shape == (3, tiny.d_model)
    torch.testing.assert_close(C @ C.T, torch.eye(3), rtol=1e-4, atol=1e-4)
    (e,) = iv.pca_edits(str(pca_dir), [1], [2.0], "clamp", tiny, HOOK)
    got = iv.Intervention([e]).apply(x[None])[0]
    torch.testing.assert_close((got - mean) @ C[1], torch.full((x.shape[0],), 2.0), rtol=1e-4, atol=1e-4)
    (e,) = iv.pca_edits(str(pca_dir), [2], [3.0], "add", tiny, HOOK)
    torch.testing.assert_close(iv.Intervention([e]).apply(x[None])[0], x + 3.0 * C[2], rtol=1e-5, atol=1e-5)
    df = iv.steer(TEXT, model=tiny, hook=HOOK, pca=str(pca_dir), components=[0], coefs=[30.0],
                  max_new_tokens=3)
    assert df.attrs["edits"] == ["PC0 add 30"]
    with pytest.raises(WorkbenchError, match="out of range"):
        iv.pca_edits(str(pca_dir), [3], [1.0], "add", tiny, HOOK)
    with pytest.raises(WorkbenchError, match="not 'blocks.1.hook_resid_post'"):
        iv.pca_edits(str(pca_dir), [0], [1.0], "add", tiny, "blocks.1.hook_resid_post")
    with pytest.raises(WorkbenchError, match="fitted on model 'tiny-random', not 'other'"):
        iv.pca_edits(str(pca_dir), [0], [1.0], "add", type("M", (), {"name": "other"})(), HOOK)
    # read through the typed reader: a cut-down folder of kind pca is refused, naming what is missing
    from workbench.results import write_result
    write_result(tmp_path / "cut", "pca", {"model": "tiny-random", "hook": HOOK}, tensors={"components": C})
    with pytest.raises(WorkbenchError, match="has no 'store'"):
        iv.pca_edits(str(tmp_path / "cut"), [0], [1.0], "add", tiny, HOOK)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny):
    import workbench
    out = tmp_path_factory.mktemp("store") / "s"
    workbench.collect(tiny, hooks=[HOOK], corpus="builtin", out=out, max_tokens=192, seq_len=24,
                      batch_size=8, device="cpu", dtype="float32", progress=False)
    return out


def test_ablate_examples_two_forward_passes(tiny, sae, sae_dir, store_dir):
    """Zero-ablating a latent at its examples' positions equals two independent forwards (a separately
    loaded HF model, the SAE-with-error-term activation written in by hand); the recomputed activation
    equals the SAE code of the stored row."""
    from workbench.store import ActivationStore
    st = ActivationStore.open(store_dir)
    f_rows = sae.encode(st.read(HOOK))                                   # [n_rows, d_sae]
    latent = int((f_rows > 0).sum(0).argmax())
    rows = (f_rows[:, latent] > 0).nonzero()[:, 0][:5].tolist()
    rinfo, seqs = st.rows(), st.sequences()
    examples = [{"seq": int(rinfo["seq_index"][r]), "pos": int(rinfo["position"][r])} for r in rows]
    df = iv.ablate_examples(sae_dir, latent, store_dir, examples, model=tiny, n_top=3, batch_size=2)
    assert list(df["seq"]) == [e["seq"] for e in examples] and len(df) == 5
    torch.testing.assert_close(torch.tensor(df["activation"].values), f_rows[rows, latent].double(),
                               rtol=1e-4, atol=1e-5)
    W = sae.W_dec.detach()
    for e, r in zip(examples, df.itertuples()):
        ids = seqs["token_ids"][e["seq"]][None]
        n_valid = int(seqs["attention_mask"][e["seq"]].sum())
        ids = ids[:, :n_valid]
        p = e["pos"]

        def edit(h, p=p):
            x = h[0].clone()
            f = sae.encode(x)
            f2 = f.clone()
            f2[p, latent] = 0
            x[p] = sae.decode(f2)[p] + (x[p] - sae.decode(f)[p])         # splice with error term, latent zeroed
            return x[None].to(h.dtype)
        with torch.no_grad():
            lc = _hf_forward(tiny, ids, lambda h: h)[0].double()
            la = _hf_forward(tiny, ids, edit)[0].double()
        ce_c = F.cross_entropy(lc[:-1], ids[0, 1:], reduction="none")
        ce_a = F.cross_entropy(la[:-1], ids[0, 1:], reduction="none")
        if p + 1 < n_valid:
            assert r.d_loss_next == pytest.approx(float(ce_a[p] - ce_c[p]), rel=1e-3, abs=1e-5)
            nxt = int(ids[0, p + 1])
            assert r.d_logit_next == pytest.approx(float(la[p, nxt] - lc[p, nxt]), rel=1e-3, abs=1e-5)
        assert r.d_loss_after == pytest.approx(float((ce_a[p:] - ce_c[p:]).sum()), rel=1e-3, abs=1e-5)
        lpc, lpa = torch.log_softmax(lc[p], -1), torch.log_softmax(la[p], -1)
        assert r.kl == pytest.approx(float((lpc.exp() * (lpc - lpa)).sum()), rel=1e-3, abs=1e-7)
        assert float((lc[:p] - la[:p]).abs().sum()) < 1e-4    # causal: nothing before p moves
    assert abs(float(W[latent].norm())) > 0 and df["kl"].gt(0).all()
    assert len(df.attrs["promotes"]) == 6 and df.attrs["promotes"][0]["value"] >= df.attrs["promotes"][-1]["value"]
    with pytest.raises(WorkbenchError, match="latent 256 is out of range"):
        iv.ablate_examples(sae_dir, 256, store_dir, examples, model=tiny)
    with pytest.raises(WorkbenchError, match=r"example \(seq 9999"):
        iv.ablate_examples(sae_dir, latent, store_dir, [(9999, 0)], model=tiny)


def test_steer_and_attribute_results_read_back(tiny, sae_dir, tmp_path):
    """--out results come back through their typed readers as the DataFrames the API returned."""
    import pandas as pd
    from workbench.steps import run_step
    from workbench.steps.interventions import read_attribute_result, read_steer_result
    kw = dict(model="tiny-random", latents=[3], values=[80.0], mode="add", max_new_tokens=4)
    run_step("steer", {"prompt": TEXT, "sae": str(sae_dir), "latent": [3], "value": [80.0], "mode": "add",
                       "model": "tiny-random", "max_new_tokens": 4, "out": str(tmp_path / "st")})
    r = read_steer_result(tmp_path / "st")
    want = iv.steer(TEXT, sae=sae_dir, **kw)
    assert (r.unsteered, r.steered, r.edits) == (want.attrs["unsteered"], want.attrs["steered"], want.attrs["edits"])
    pd.testing.assert_frame_equal(r.table[list(want.columns)], want, check_dtype=False, rtol=1e-6)
    run_step("attribute", {"text": TEXT, "sae": str(sae_dir), "n_exact": 3, "out": str(tmp_path / "at")})
    a = read_attribute_result(tmp_path / "at")
    want = iv.attribute(TEXT, sae=sae_dir, n_exact=3)
    assert a.tokens == want.attrs["tokens"] and a.agreement["n"] == 3
    pd.testing.assert_frame_equal(a.table[list(want.columns)], want, check_dtype=False, rtol=1e-6)
    # text columns stay text: tokens that pandas would read as NaN / numbers survive
    tricky = want.head(4).assign(token=["NA", "nan", "", "12"])
    tricky.to_csv(tmp_path / "at" / "table.csv", index=False)
    assert list(read_attribute_result(tmp_path / "at").table["token"]) == ["NA", "nan", "", "12"]
    with pytest.raises(WorkbenchError, match="holds a 'attribute' result, expected 'steer'"):
        read_steer_result(tmp_path / "at")


def test_bad_input(tiny, sae_dir, tmp_path):
    with pytest.raises(WorkbenchError, match=r"latent 256 is out of range.*d_sae=256"):
        iv.steer(TEXT, sae=sae_dir, model=tiny, latents=[256], values=[1.0])
    with pytest.raises(WorkbenchError, match="trained on hook 'blocks.0.hook_resid_post'"):
        iv.steer(TEXT, sae=sae_dir, model=tiny, hook="blocks.1.hook_resid_post", latents=[1], values=[1.0])
    with pytest.raises(WorkbenchError, match="trained on hook"):
        iv.attribute(TEXT, sae=sae_dir, model=tiny, hook="blocks.1.hook_resid_post")
    other = json.loads((sae_dir / "cfg.json").read_text())
    other["metadata"]["model_name"] = "smollm2-135m"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text(json.dumps(other))
    (tmp_path / "other" / "sae_weights.safetensors").write_bytes((sae_dir / "sae_weights.safetensors").read_bytes())
    with pytest.raises(WorkbenchError, match="trained on model 'smollm2-135m', not 'tiny-random'"):
        iv.steer(TEXT, sae=tmp_path / "other", model=tiny, latents=[1], values=[1.0])
    with pytest.raises(WorkbenchError, match="context is 2048 tokens"):
        iv.steer("word " * 2100, sae=sae_dir, model=tiny, latents=[1], values=[1.0])
    with pytest.raises(WorkbenchError, match="context is 2048 tokens"):
        iv.steer(TEXT, sae=sae_dir, model=tiny, latents=[1], values=[1.0], max_new_tokens=2040)
    with pytest.raises(WorkbenchError, match="not a complete result"):
        iv.steer(TEXT, model=tiny, hook=HOOK, pca=str(tmp_path / "nope"), components=[0], coefs=[1.0])
    with pytest.raises(WorkbenchError, match="2 latents but 3 values"):
        iv.steer(TEXT, sae=sae_dir, model=tiny, latents=[1, 2], values=[1, 2, 3])
    with pytest.raises(WorkbenchError, match="mode must be one of"):
        iv.steer(TEXT, sae=sae_dir, model=tiny, latents=[1], values=[1.0], mode="set")
    with pytest.raises(WorkbenchError, match="single token"):
        iv.attribute(TEXT, sae=sae_dir, model=tiny, metric="logit", target="quick brown fox")
    with pytest.raises(WorkbenchError, match="not an SAE folder"):
        iv.attribute(TEXT, sae=tmp_path, model=tiny)


def test_cli_steer_and_attribute(tiny, sae_dir, capsys):
    from workbench.cli import main
    import workbench
    assert main(["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--latent", "3", "--latent", "4",
                 "--value", "80", "--mode", "add", "--prompt", TEXT, "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edits"] == ["latent 3 add 80", "latent 4 add 80"] and "steered" in out and "unsteered" in out
    assert out["decode_path"] in ("fast", "bridge")
    assert main(["attribute", "--sae", str(sae_dir), "--text", TEXT, "--n-exact", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agreement"]["n"] == 3 and out["metric"] == "loss"
    assert main(["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--latent", "999",
                 "--value", "1", "--prompt", "x"]) == 2
    df = workbench.attribute(TEXT, sae=sae_dir, n_exact=0)
    assert df["exact"].isna().all() and df.attrs["agreement"] == {"n": 0}


@pytest.mark.slow
def test_smollm2_splice_and_clamp_reproduce(tmp_path):
    """On the real embedded model: the SAE spliced with its error term changes nothing (fp32), a clamp
    to the latent's own activation gives the same greedy generation, and a prepended BOS is untouched."""
    from analyses.sae import make_sae
    m = load_model("smollm2-135m", device="cpu")
    hook = "blocks.6.hook_resid_post"
    torch.manual_seed(0)
    sae = make_sae("topk", d_in=m.d_model, d_sae=1024, k=16, metadata={"model_name": "smollm2-135m", "hook_name": hook})
    ids, skip = iv.tokenize(m, "The capital of France is")
    assert skip == 1 and int(ids[0, 0]) == m.text_bos_id
    clean = m.logits(ids)
    spliced = m.logits(ids, hook=hook, replace=lambda a: iv.Intervention([], sae, skip=skip, splice=True).apply(a))
    torch.testing.assert_close(spliced, clean, rtol=1e-4, atol=1e-3 * float(clean.abs().max()))
    x = m.run(ids, None, [hook])[hook][0]
    f = sae.encode(x)
    p = ids.shape[1] - 1
    i = int(f[p].argmax())
    own = iv.Intervention([iv.Edit(float(f[p, i]), "clamp", latent=i, positions=(p,))], sae, skip=skip)
    assert iv.generate(m, ids, hook, own, 8) == iv.generate(m, ids, hook, None, 8)
    every = iv.Intervention([iv.Edit(100.0, "add", latent=i)], sae, skip=skip)
    y = every.apply(x[None])[0]
    assert torch.equal(y[0], x[0]) and not torch.equal(y[1], x[1])


def test_ui_page(tmp_path, sae_dir):
    """The Interventions page on a workspace with a tiny-random SAE: per-token attribution table with
    links to the dashboards, and the steering panel's two generations; a bad latent is an st.error."""
    import shutil
    from streamlit.testing.v1 import AppTest
    from workbench.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(sae_dir, ws.saes / "tiny-sae")
    from pathlib import Path
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.session_state["workspace"] = str(ws.root)
    at.session_state["iv_text"] = TEXT
    at.session_state["iv_nexact"] = 3
    at.session_state["iv_value"] = 300.0
    at.session_state["iv_mode"] = "add"
    at.session_state["iv_new"] = 4
    at.run()
    at.switch_page("workbench/ui/pages/interventions.py").run()
    assert not at.exception, [e.value for e in at.exception]
    html_out = " ".join(m.value for m in at.markdown)
    assert 'href="features?latent=' in html_out and "exact" in html_out
    at.button(key="iv_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert len(at.code) == 2 and at.code[0].value.startswith("The weather today is")
    assert any("decoded on the fast path" in c.value for c in at.caption)     # workbench/_fast_decode.py
