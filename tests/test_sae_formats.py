"""SAE formats: SAELens round-trip for every architecture, sparsify round-trip, folders written by SAELens
itself, neuronpedia bundle, metrics, and clear errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from analyses.sae import (ARCHS, SAEMetrics, evaluate_sae, export_sae, load_sae, load_sparsify, make_sae,
                          train_sae, uses_k)

sae_lens = pytest.importorskip("sae_lens")
SAELENS_ARCHS = set(__import__("sae_lens.registry", fromlist=["x"]).SAE_CLASS_REGISTRY)


def _random_sae(arch, d_in=12, d_sae=40, seed=0):
    torch.manual_seed(seed)
    kw = {"k": 4} if uses_k(arch) else {}
    sae = make_sae(arch, d_in, d_sae, metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}, **kw)
    with torch.no_grad():
        if isinstance(sae.W_enc, torch.nn.Parameter):     # tied archs (mp, gba) derive W_enc from W_dec
            sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
            sae.b_enc.normal_(0, 0.2)
        else:
            sae.W_dec.add_(0.2 * torch.randn_like(sae.W_dec))
            sae.normalize_decoder()                       # their decoder rows are unit norm
        sae.b_dec.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.set_thresholds(torch.rand(d_sae) * 0.5 + 0.05)
        if isinstance(getattr(sae, "threshold", None), torch.Tensor) and arch != "jumprelu":
            sae.threshold.fill_(0.37)
    return sae


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saelens_round_trip(arch, tmp_path):
    sae = _random_sae(arch)
    sae.save(tmp_path / "s", sparsity=torch.full((40,), -2.0))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    want = ARCHS[arch].saelens_arch
    assert cfg["architecture"] == want
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0"
    assert cfg["metadata"]["workbench_arch"] == arch
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path"):
        assert key in cfg["metadata"]
    if arch == "topk":
        assert cfg["k"] == 4
    assert set(load_file(tmp_path / "s" / "sparsity.safetensors")) == {"sparsity"}
    if want not in SAELENS_ARCHS:              # a documented native format (top-AFA): ours loads it back
        assert torch.allclose(load_sae(tmp_path / "s")(x := torch.randn(64, 12)), sae(x), atol=1e-6)
        return
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
    x = torch.randn(64, 12)
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        assert (f_ours != 0).sum() > 0
        assert torch.allclose(f_ours, f_theirs, atol=1e-5)
        assert torch.allclose(sae.decode(f_ours), theirs.decode(f_theirs), atol=1e-5)
        assert torch.allclose(sae(x), theirs(x), atol=1e-5)
    again = load_sae(tmp_path / "s")
    assert type(again) is type(sae)
    assert torch.allclose(again.encode(x), f_ours, atol=1e-6)
    assert again.sparsity is not None


def test_trained_batchtopk_saved_as_jumprelu_with_global_threshold(tmp_path):
    X = torch.randn(4096, 12)
    sae = train_sae(X, arch="batchtopk", d_sae=40, k=4, n_tokens=4096, batch_size=512, progress=False)
    sae.save(tmp_path / "b")
    t = load_file(tmp_path / "b" / "sae_weights.safetensors")
    assert torch.allclose(t["threshold"], torch.full((40,), float(sae.threshold)))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "b"), device="cpu")
    assert type(theirs).__name__ == "JumpReLUSAE"
    with torch.no_grad():
        assert torch.allclose(theirs.encode(X[:100]), sae.encode(X[:100]), atol=1e-5)
    # the inference L0 of the global threshold is close to k
    assert 1.5 < float((sae.encode(X) != 0).sum(1).float().mean()) < 8


def test_load_folders_written_by_saelens_itself(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    made = {
        # Gemma Scope style: jumprelu, b_dec NOT subtracted from the input
        "gemma": JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=48, apply_b_dec_to_input=False)),
        "standard": StandardSAE(StandardSAEConfig(d_in=16, d_sae=48)),
        "topk": TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5)),
    }
    for name, s in made.items():
        with torch.no_grad():
            for p in s.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if hasattr(s, "threshold"):
                s.threshold.copy_(torch.rand(48) * 0.3)
        s.save_model(tmp_path / name)
        ours = load_sae(tmp_path / name)
        with torch.no_grad():
            assert torch.allclose(ours.encode(x), s.encode(x), atol=1e-5), name
            assert torch.allclose(ours(x), s(x), atol=1e-5), name
    assert load_sae(tmp_path / "gemma").cfg.apply_b_dec_to_input is False
    assert load_sae(tmp_path / "topk").arch == "topk"


def _sparsify_forward(folder, x):
    """EleutherAI sparsify's SparseCoder forward, re-implemented here from its source (sparse_coder.py
    ``encode``/``decode``, fused_encoder.py): pre = relu(linear(x - b_dec, encoder.weight, encoder.bias)),
    keep the top k (activation "topk"), decode = embedding_bag(indices, W_dec, per_sample_weights=values,
    mode="sum") + b_dec. Returns (dense latents, reconstruction)."""
    import torch.nn.functional as F
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(folder / "sae.safetensors")
    assert cfg.get("activation", "topk") == "topk" and not cfg.get("transcode")
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    out = F.embedding_bag(idx, t["W_dec"], per_sample_weights=vals, mode="sum") + t["b_dec"]
    return torch.zeros_like(pre).scatter_(-1, idx, vals), out


def test_sparsify_round_trip_and_semantics(tmp_path):
    sae = _random_sae("topk", d_in=12, d_sae=40)
    export_sae(sae, "sparsify", tmp_path / "sp")
    folder = tmp_path / "sp" / "layers.1"           # the HF module sparsify hooks for blocks.1.hook_resid_post
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["num_latents"] == 40 and cfg["k"] == 4 and cfg["d_in"] == 12 and cfg["activation"] == "topk"
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["hookpoint"] == "layers.1"
    t = load_file(folder / "sae.safetensors")
    assert t["encoder.weight"].shape == (40, 12) and t["W_dec"].shape == (40, 12)
    x = torch.randn(30, 12)
    f_ref, x_ref = _sparsify_forward(folder, x)
    assert torch.allclose(sae.encode(x), f_ref, atol=1e-5)
    assert torch.allclose(sae(x), x_ref, atol=1e-5)
    back = load_sparsify(tmp_path / "sp")
    assert back.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-6)
    assert torch.allclose(load_sae(tmp_path / "sp", hook="blocks.1.hook_resid_post")(x), sae(x), atol=1e-5)
    with pytest.raises(ValueError, match="TopK"):
        export_sae(_random_sae("jumprelu"), "sparsify", tmp_path / "nope")


def test_sparsify_export_folds_b_dec_when_not_subtracted(tmp_path):
    """A SAELens TopK SAE with apply_b_dec_to_input=False: sparsify always encodes x - b_dec, so the
    export must carry b_enc + b_dec @ W_enc. Checked against SAELens itself and sparsify's forward."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    torch.manual_seed(3)
    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5, apply_b_dec_to_input=False))
    theirs.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        theirs.b_dec.mul_(4)                              # large b_dec: a missing fold changes the codes
    theirs.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    assert ours.cfg.apply_b_dec_to_input is False
    export_sae(ours, "sparsify", tmp_path / "sp")
    folder = tmp_path / "sp" / "layers.2.mlp"
    assert json.loads((folder / "cfg.json").read_text())["hook_name"] == "blocks.2.hook_mlp_out"
    x = torch.randn(200, 16) * 2
    f_ref, x_ref = _sparsify_forward(folder, x)
    with torch.no_grad():
        f_sl, x_sl = theirs.encode(x), theirs(x)
    assert (f_sl != 0).sum(1).float().mean() > 4
    assert torch.allclose(f_ref, f_sl, atol=1e-4)
    assert torch.allclose(x_ref, x_sl, atol=1e-4)
    back = load_sae(tmp_path / "sp")                       # sparsify semantics: b_dec subtracted again
    assert back.cfg.apply_b_dec_to_input is True
    assert torch.allclose(back(x), x_sl, atol=1e-4)


@pytest.mark.parametrize("folder,hook", [("layers.3", "blocks.3.hook_resid_post"),
                                         ("layers.3.mlp", "blocks.3.hook_mlp_out"),
                                         ("layers.0.self_attn", "blocks.0.hook_attn_out"),
                                         ("h.2.attn", "blocks.2.hook_attn_out"),
                                         ("embed_tokens", "hook_embed"),
                                         ("model.custom.thing", "model.custom.thing")])
def test_sparsify_import_maps_hookpoints_back(tmp_path, folder, hook):
    """A folder written by sparsify itself (its cfg has no hook_name): the hookpoint maps back."""
    sae = _random_sae("topk", d_in=12, d_sae=40)
    export_sae(sae, "sparsify", tmp_path / "sp")
    (tmp_path / "sp" / "layers.1").rename(tmp_path / "sp" / folder)
    cfg_file = tmp_path / "sp" / folder / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("hook_name", "hookpoint", "model_name", "model_type", "module_layout"):
        del cfg[key]
    cfg_file.write_text(json.dumps(cfg))
    back = load_sae(tmp_path / "sp")
    assert back.cfg.metadata["hook_name"] == hook
    assert back.cfg.metadata["sparsify_hookpoint"] == folder


def test_sparsify_import_rejects_groupmax(tmp_path):
    sae = _random_sae("topk", d_in=12, d_sae=40)
    folder = export_sae(sae, "sparsify", tmp_path / "sp") / "layers.1"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["activation"] = "groupmax"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation='groupmax' is not supported"):
        load_sae(tmp_path / "sp")


# modules under base_model whose output each hook is; checked against plain HF modules below
_FAMILY_CASES = {
    "llama": {"blocks.1.hook_resid_post": "layers.1", "blocks.1.hook_resid_pre": "layers.0",
              "blocks.0.hook_resid_pre": "embed_tokens", "blocks.1.hook_attn_out": "layers.1.self_attn",
              "blocks.1.hook_mlp_out": "layers.1.mlp", "hook_embed": "embed_tokens",
              "blocks.0.ln1.hook_out": "layers.0.input_layernorm",
              "blocks.1.ln2.hook_out": "layers.1.post_attention_layernorm", "ln_final.hook_out": "norm"},
    "gpt2": {"blocks.1.hook_resid_post": "h.1", "blocks.1.hook_resid_pre": "h.0", "blocks.1.hook_attn_out": "h.1.attn",
             "blocks.0.hook_mlp_out": "h.0.mlp", "hook_embed": "wte", "blocks.1.ln1.hook_out": "h.1.ln_1",
             "blocks.0.ln2.hook_out": "h.0.ln_2", "ln_final.hook_out": "ln_f"},
    "gpt_neox": {"blocks.1.hook_resid_post": "layers.1", "blocks.0.hook_resid_pre": "embed_in",
                 "blocks.1.hook_attn_out": "layers.1.attention", "blocks.1.hook_mlp_out": "layers.1.mlp",
                 "hook_embed": "embed_in", "blocks.0.ln1.hook_out": "layers.0.input_layernorm",
                 "ln_final.hook_out": "final_layer_norm"},
}


@pytest.mark.parametrize("family", list(_FAMILY_CASES))
def test_sparsify_hookpoints_are_the_hf_modules_outputs(tmp_path, family):
    """For each family: the module sparsify would hook (on AutoModel, as sparsify loads it) outputs
    exactly what workbench collects at the TransformerLens hook; unrepresentable hooks give None."""
    from transformers import AutoModel

    from analyses.sae.sparsify import hook_from_hookpoint, sparsify_hookpoint
    from tiny_hf_folders import make_folder
    from workbench import load_model
    folder = make_folder(family, tmp_path / family)
    model = load_model(str(folder), device="cpu")
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    hf = AutoModel.from_pretrained(str(folder)).eval()
    cases = _FAMILY_CASES[family]
    got: dict[str, torch.Tensor] = {}

    def grab(hp):          # a forward hook returning None leaves the module's output alone
        def fn(mod, inp, out):
            got.setdefault(hp, (out[0] if isinstance(out, tuple) else out).clone())
        return fn
    handles = [hf.get_submodule(hp).register_forward_hook(grab(hp)) for hp in set(cases.values())]
    ids = torch.randint(200, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in handles:
        h.remove()
    ours = model.run(ids, torch.ones_like(ids), list(cases))
    for hook, hp in cases.items():
        assert sparsify_hookpoint(hook, model_type) == hp, hook
        assert torch.allclose(ours[hook], got[hp].reshape(ours[hook].shape), atol=1e-5), (hook, hp)
        back = hook_from_hookpoint(hp, model_type)
        assert torch.allclose(ours[hook], model.run(ids, None, [back])[back], atol=1e-5), (hp, back)
    for hook in ("blocks.0.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.ln1.hook_normalized"):
        assert sparsify_hookpoint(hook, model_type) is None
    assert sparsify_hookpoint("blocks.1.hook_resid_post", "some_new_arch") is None


def test_export_step_names_folder_by_module_or_falls_back(tmp_path):
    from workbench.steps import run_step
    for hook, folder in (("blocks.0.hook_resid_post", "layers.0"), ("blocks.0.attn.hook_z", "blocks.0.attn.hook_z")):
        sae = _random_sae("topk")
        sae.cfg.metadata = {"model_name": "tiny-random", "hook_name": hook}
        sae.save(tmp_path / hook / "sae")
        r = run_step("export_sae", {"sae": str(tmp_path / hook / "sae"), "format": "sparsify",
                                    "out": str(tmp_path / hook / "sp")})
        assert (tmp_path / hook / "sp" / folder / "sae.safetensors").exists()
        assert r.summary["model_type"] == "llama" and r.summary["hook_name"] == hook
        assert ("note" in r.summary) == (folder == hook)
        assert load_sae(tmp_path / hook / "sp").cfg.metadata["hook_name"] == hook


@pytest.mark.parametrize("written", ["torch.float32", "torch.bfloat16", "torch.float64", "float16"])
def test_saelens_dtype_strings_as_saelens_writes_them(tmp_path, written):
    """SAELens writes cfg.json dtype verbatim ("torch.float32" when its config got that) and reads both."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    torch.manual_seed(0)
    theirs = TopKSAE(TopKSAEConfig(d_in=8, d_sae=24, k=3, dtype=written))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_model(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["dtype"] == written
    ours = load_sae(tmp_path / "s")
    assert ours.cfg.dtype == written.replace("torch.", "") and ours.W_enc.dtype == theirs.W_enc.dtype
    x = torch.randn(20, 8)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x).float(), theirs.encode(x.to(theirs.W_enc.dtype)).float(), atol=1e-2)
    ours.save(tmp_path / "again")                                  # written back as SAELens reads it
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["dtype"] == written.replace("torch.", "")
    sae_lens.SAE.load_from_disk(str(tmp_path / "again"), device="cpu")
    assert load_sae(tmp_path / "s", dtype="torch.float32").W_enc.dtype == torch.float32



def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_saelens_unknown_dtype_is_named(tmp_path):
    sae = _random_sae("topk")
    sae.save(tmp_path / "s")
    _edit_cfg(tmp_path / "s", dtype="torch.int8")
    with pytest.raises(ValueError, match=r"dtype 'torch.int8' not supported; use one of float32"):
        load_sae(tmp_path / "s")


def test_neuronpedia_bundle(tmp_path):
    sae = _random_sae("topk")
    sae.sparsity = torch.full((40,), -3.0)
    out = export_sae(sae, "neuronpedia", tmp_path / "np")
    info = json.loads((out / "neuronpedia.json").read_text())
    assert info["modelId"] == "tiny" and info["layer"] == 1 and info["hookName"] == "blocks.1.hook_resid_post"
    assert "library_name: saelens" in (out / "README.md").read_text()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["neuronpedia_id"] == info["neuronpediaId"]
    assert (out / "sparsity.safetensors").exists()
    sae_lens.SAE.load_from_disk(str(out), device="cpu")
    with pytest.raises(FileExistsError):
        export_sae(sae, "neuronpedia", tmp_path / "np")
    with pytest.raises(ValueError, match="saelens, sparsify, neuronpedia"):
        export_sae(sae, "onnx", tmp_path / "x")


# ------------------------------------------------------------------------------------ bad input

def test_cfg_missing_required_keys_are_named(tmp_path):
    sae = _random_sae("topk")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["d_sae"], cfg["dtype"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing required key\(s\) d_sae, dtype"):
        load_sae(tmp_path / "s")


def test_unknown_architecture_lists_known(tmp_path):
    sae = _random_sae("relu")
    sae.save(tmp_path / "s")
    _edit_cfg(tmp_path / "s", architecture="gated")
    with pytest.raises(ValueError, match="unknown or unsupported SAE architecture 'gated'.*standard, topk, jumprelu"):
        load_sae(tmp_path / "s")
    with pytest.raises(ValueError, match="known: relu, topk, batchtopk, jumprelu, matryoshka"):
        train_sae(torch.randn(64, 4), arch="gatedd", progress=False)


def test_k_larger_than_d_sae():
    with pytest.raises(ValueError, match="k=50 is larger than d_sae=40"):
        make_sae("topk", 12, 40, k=50)
    with pytest.raises(ValueError, match="k=50 is larger than d_sae=40"):
        train_sae(torch.randn(64, 12), arch="topk", d_sae=40, k=50, progress=False)
    with pytest.raises(ValueError, match="needs k"):
        make_sae("batchtopk", 12, 40)


def test_d_in_mismatch_names_both_shapes(tmp_path):
    sae = _random_sae("topk")
    with pytest.raises(ValueError, match=r"\(100, 7\).*d_in=12.*\(12, 40\)"):
        evaluate_sae(sae, torch.randn(100, 7))
    sae.save(tmp_path / "s")
    t = load_file(tmp_path / "s" / "sae_weights.safetensors")
    t["W_enc"] = torch.randn(11, 40)
    save_file(t, tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"W_enc has shape \(11, 40\).*needs \(12, 40\)"):
        load_sae(tmp_path / "s")


def test_not_an_sae_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        load_sae(tmp_path / "empty")


# ------------------------------------------------------------------------------------ metrics

def test_metrics_definitions_and_streaming():
    torch.manual_seed(0)
    x = torch.randn(500, 6) * torch.tensor([1, 2, 3, 1, 1, 1.0]) + 10.0    # large mean: centring matters
    x_hat = x + 0.5 * torch.randn(500, 6)
    f = (torch.rand(500, 20) < 0.2).float() * torch.rand(500, 20)
    f[:, 0] = 0                                                              # dead latent
    m = SAEMetrics(6, 20)
    for a, b, c in zip(x.split(128), x_hat.split(128), f.split(128)):
        m.update(a, b, c)
    r = m.compute()
    xd, xhd = x.double(), x_hat.double()
    ev = 1 - (xd - xhd).pow(2).sum(1).mean() / xd.var(0, unbiased=False).sum()
    assert r["explained_variance"] == pytest.approx(float(ev), rel=1e-9)
    assert r["fvu"] == pytest.approx(1 - float(ev), rel=1e-9)
    # the old around-zero formula would give almost 1 here; ours must not
    assert r["explained_variance"] < 0.99
    assert r["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()))
    assert r["mse"] == pytest.approx(float((xd - xhd).pow(2).mean()), rel=1e-9)
    assert r["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(xd, xhd).mean()), rel=1e-9)
    assert r["shrinkage"] == pytest.approx(float(xhd.pow(2).sum() / (xd * xhd).sum()), rel=1e-9)
    assert r["dead_fraction"] == pytest.approx(1 / 20)
    dens = (f != 0).double().mean(0)
    assert r["dense_1pct_fraction"] == pytest.approx(float((dens > 0.01).double().mean()))
    assert r["dense_10pct_fraction"] == pytest.approx(float((dens > 0.1).double().mean()))
    ld = m.log10_density()
    assert float(ld[0]) == pytest.approx(-10.0)
