"""Step `subspace` and `train-sae --init active-subspace` on synthetic data whose subspaces are known."""

import json

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError


def _store(path, n_seq=40, seq_len=25, seed=0):
    """Three hooks: attention outputs living in an 6-d subspace of 32 (layers 0 and 1), a full-rank
    residual stream (layer 0) with 5 massive-norm rows (100x the others)."""
    from workbench.store import write_store
    g = torch.Generator().manual_seed(seed)
    n, d = n_seq * seq_len, 32
    Q, _ = torch.linalg.qr(torch.randn(d, 6, generator=g))
    attn0 = torch.randn(n, 6, generator=g) @ Q.T + 1e-3 * torch.randn(n, d, generator=g)
    attn1 = (torch.randn(n, 6, generator=g) * torch.tensor([3.0, 2, 1, 1, 1, 1])) @ Q.T
    resid = torch.randn(n, d, generator=g)
    resid[[0, 100, 200, 300, 400]] *= 100.0
    acts = {"blocks.0.hook_attn_out": attn0, "blocks.1.hook_attn_out": attn1, "blocks.0.hook_resid_post": resid}
    store = write_store(path, acts, token_ids=torch.randint(0, 50, (n_seq, seq_len), generator=g),
                        attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool),
                        doc_ids=torch.arange(n_seq) // 4, seq_index=torch.arange(n_seq).repeat_interleave(seq_len),
                        position=torch.arange(seq_len).repeat(n_seq), model_name="synthetic-test", shard_rows=300)
    return store, acts


def _n_dirs(X, frac):
    ev = np.sort(np.linalg.eigvalsh(np.cov(np.asarray(X, dtype=np.float64), rowvar=False)))[::-1]
    return int(np.searchsorted(np.cumsum(ev) / ev.sum(), frac - 1e-12) + 1)


def test_component_and_layer_names():
    from workbench.steps.subspace import component_of, layer_of
    assert component_of("blocks.3.hook_attn_out") == "attn_out"
    assert component_of("blocks.3.attn.o.hook_out") == "attn_out"          # BERT (minilm)
    assert component_of("blocks.3.hook_mlp_out") == "mlp_out"
    assert component_of("blocks.3.hook_resid_post") == "resid_post"
    assert layer_of("blocks.12.hook_resid_post") == 12 and layer_of("hook_embed") == -1


def test_subspace_step(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.subspace import read_subspace_result
    _, acts = _store(tmp_path / "s")
    res = run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "r"), "twonn_rows": 600})
    r = read_subspace_result(tmp_path / "r")
    assert r.hook_names == list(acts)
    a0 = r.record("blocks.0.hook_attn_out")
    assert a0["component"] == "attn_out" and a0["layer"] == 0 and a0["d"] == 32
    # independent numpy count of directions; the attention hooks live in 6 of 32 dimensions
    for h in ("blocks.0.hook_attn_out", "blocks.1.hook_attn_out"):
        for f in (0.9, 0.99):
            assert r.record(h)["dropped"][f"n_dirs_{round(f * 100)}"] == _n_dirs(acts[h], f)
    assert a0["dropped"]["n_dirs_99"] == 6
    assert abs(a0["dropped"]["twonn_id"] - 6) < 1.2                       # TwoNN on the 600-row sample
    # massive rows: dropped in "dropped", present in "all" (one direction then owns the variance)
    res_rec = r.record("blocks.0.hook_resid_post")
    keep = torch.ones(1000, dtype=torch.bool)
    keep[[0, 100, 200, 300, 400]] = False
    assert res_rec["rows_dropped"] == 5 and res_rec["dropped"]["n_rows"] == 995 and res_rec["all"]["n_rows"] == 1000
    assert res_rec["dropped"]["n_dirs_99"] == _n_dirs(acts["blocks.0.hook_resid_post"][keep], 0.99)
    assert res_rec["all"]["n_dirs_99"] == _n_dirs(acts["blocks.0.hook_resid_post"], 0.99)
    assert res_rec["dropped"]["pc_spread"] > 0.8 > res_rec["all"]["pc_spread"]
    ev = r.eigenvalues("blocks.0.hook_resid_post", "dropped")
    kept = acts["blocks.0.hook_resid_post"][keep].double().numpy()
    ref = np.sort(np.linalg.eigvalsh(np.cov(kept, rowvar=False)))[::-1]
    np.testing.assert_allclose(ev.numpy(), ref, rtol=1e-4, atol=1e-6)
    # curves and figures
    layers, vals = r.curve("attn_out", "frac_dirs_99")
    assert layers == [0, 1] and vals[0] == pytest.approx(6 / 32)
    for name in ("attn_out", "resid_post", "overview"):
        assert (tmp_path / "r" / f"{name}.html").exists()
    assert {"unreliable_avg_cosine", "unreliable_partition_ratio", "eee", "eigen_entropy"} <= set(a0["dropped"])
    assert res.metrics["attn_out.frac_dirs_99_mean"] < res.metrics["resid_post.frac_dirs_99_mean"]
    meta = json.loads((tmp_path / "r" / "result.json").read_text())
    assert meta["kind"] == "subspace"


def test_subspace_step_options_and_errors(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.subspace import read_subspace_result
    _store(tmp_path / "s")
    run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "r"), "hooks": ["blocks.*.hook_attn_out"],
                          "max_norm_ratio": 0, "twonn_rows": 50})
    r = read_subspace_result(tmp_path / "r")
    assert r.hook_names == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"] and r.twonn_rows == 50
    with pytest.raises(WorkbenchError, match="closest"):
        run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "x"),
                              "hooks": ["blocks.0.hook_mlp_ot"]})
    with pytest.raises(WorkbenchError, match="twonn-rows"):
        run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "x"), "twonn_rows": 2})
    with pytest.raises(WorkbenchError, match="max-norm-ratio"):
        run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "x"), "max_norm_ratio": 0.5})
    with pytest.raises(WorkbenchError, match="already|exists|overwrite"):
        run_step("subspace", {"store": str(tmp_path / "s"), "out": str(tmp_path / "r")})
    with pytest.raises(WorkbenchError, match="no component"):
        r.curve("mlp_out", "frac_dirs_99")
    from workbench.steps.pca import read_pca_result
    with pytest.raises(WorkbenchError):
        read_pca_result(tmp_path / "r")                     # another kind


# ------------------------------------------------------------------------- active-subspace init

def _lowdim(d=256, m=8, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, m, generator=g))
    Z = torch.randn(n, m, generator=g) * torch.linspace(1, 0.3, m)
    X = Z @ Q.T + 1e-3 * torch.randn(n, d, generator=g) + 2.0 * torch.randn(d, generator=g) / d ** 0.5
    return X, Q.T.contiguous()


def test_active_subspace_basis_and_init():
    from analyses.sae.subspace_init import active_subspace, init_in_subspace, subspace_fraction
    from analyses.sae.train import make_sae
    X, B = _lowdim(d=64, m=5, n=2000)
    basis = active_subspace(X)                           # 0.99 of the variance: the 5 true directions
    assert basis.shape == (5, 64)
    assert torch.allclose(basis @ basis.T, torch.eye(5, dtype=basis.dtype), atol=1e-10)
    assert float(subspace_fraction(basis, B).min()) > 0.999
    assert active_subspace(X, 3).shape[0] == 3 and active_subspace(X, 0.5).shape[0] < 5
    assert active_subspace(X, B[:2]).shape == (2, 64)
    sae = make_sae("topk", 64, 300, k=4)
    assert float(subspace_fraction(sae.W_dec, B).mean()) < 0.5           # default: uniform directions
    init_in_subspace(sae, basis, torch.Generator().manual_seed(0))
    frac = subspace_fraction(sae.W_dec, B)
    assert float(frac.min()) > 0.999
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(300), atol=1e-5)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    for bad in (0.0, 1.5, 65, "x", torch.zeros(3, 7)):
        with pytest.raises(ValueError):
            active_subspace(X, bad)


def test_train_with_active_subspace_init_and_keep():
    from analyses.sae import train_sae
    from analyses.sae.subspace_init import subspace_fraction
    X, B = _lowdim(d=64, m=5, n=1024)
    sae = train_sae(X, arch="topk", d_sae=128, k=4, n_tokens=2048, batch_size=512, device="cpu", progress=False,
                    init="active-subspace", keep_subspace=True)
    assert float(subspace_fraction(sae.W_dec, B).min()) > 0.999          # kept inside for the whole run
    assert sae.cfg.metadata["workbench"]["init"] == {"method": "active-subspace", "subspace_dim": 5,
                                                      "keep": True, "subspace": None}
    with pytest.raises(ValueError, match="init must be"):
        train_sae(X, arch="topk", d_sae=128, k=4, n_tokens=512, batch_size=512, device="cpu", progress=False,
                  init="pca")
    with pytest.raises(ValueError, match="need init"):
        train_sae(X, arch="topk", d_sae=128, k=4, n_tokens=512, batch_size=512, device="cpu", progress=False,
                  keep_subspace=True)


def test_active_subspace_init_prevents_dead_latents():
    """Data in a 6-d subspace of 128 (Wang et al.'s situation, shrunk): uniformly drawn decoder rows are
    mostly outside it and ~80% of the latents never fire; drawn inside it, ~3% (measured: 0.80 vs 0.035)."""
    from analyses.sae import train_sae
    X, _ = _lowdim(d=128, m=6, n=2048)
    dead = {}
    for init in ("random", "active-subspace"):
        sae = train_sae(X, arch="topk", d_sae=256, k=4, n_tokens=12 * 256, batch_size=256, seed=0, device="cpu",
                        progress=False, init=init)
        with torch.no_grad():
            dead[init] = float(((sae.encode(X) > 0).sum(0) == 0).float().mean())
    assert dead["random"] > 0.5 and dead["active-subspace"] < 0.1, dead


def test_train_sae_step_init_options(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.sae import _init_options, TrainSAEConfig
    _store(tmp_path / "s")
    cfg = dict(store=str(tmp_path / "s"), hook="blocks.0.hook_attn_out", d_sae=64, k=4, batch_size=200,
               eval_tokens=0, progress=False)
    run_step("train_sae", {**cfg, "out": str(tmp_path / "a"), "init": "active-subspace", "subspace": 6,
                           "keep_subspace": True})
    meta = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]["workbench"]
    assert meta["init"] == {"method": "active-subspace", "subspace_dim": 6, "keep": True, "subspace": 6}
    assert _init_options(TrainSAEConfig(store="x", init="active-subspace", subspace=0.9))["subspace"] == 0.9
    with pytest.raises(WorkbenchError, match="need --init"):
        run_step("train_sae", {**cfg, "out": str(tmp_path / "b"), "keep_subspace": True})
    with pytest.raises(WorkbenchError, match="--subspace"):
        run_step("train_sae", {**cfg, "out": str(tmp_path / "c"), "init": "active-subspace", "subspace": 2.5})


def test_checkpoint_of_another_init_is_not_resumed(tmp_path):
    from analyses.sae import SAETrainingError, train_sae
    X, _ = _lowdim(d=32, m=4, n=512)
    kw = dict(arch="topk", d_sae=64, k=4, n_tokens=512, batch_size=256, device="cpu", progress=False,
              checkpoint_dir=tmp_path / "ck")
    train_sae(X, **kw)
    with pytest.raises(SAETrainingError, match="init"):
        train_sae(X, init="active-subspace", **kw)


# ------------------------------------------------------------------------- sweeps

SUBSPACE_SWEEP = """
[sweep]
name = "geo"

[[models]]
spec = "tiny-random"
name = "tiny"
hooks = ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"]

[corpus]
spec = "builtin"
max_tokens = 512
seq_len = 32

[collect]
batch_size = 8
progress = false

[subspace]
hooks = ["blocks.*.hook_attn_out"]
max_norm_ratio = [0.0, 10.0]
twonn_rows = 200
"""


def test_subspace_from_a_sweep_file(tmp_path):
    """`[subspace]` in a TOML sweep: one node per model and grid point, fed by the model's store, limited
    to the selected hooks; numbers checked against numpy on the collected store; a rerun is cached."""
    import workbench.sweep as sweep
    from workbench.steps.subspace import read_subspace_result
    from workbench.store import ActivationStore
    f = tmp_path / "geo.toml"
    f.write_text(SUBSPACE_SWEEP)
    df = sweep.run(f, workspace=tmp_path / "ws", progress=False)
    rows = df[df["step"] == "subspace"]
    assert len(rows) == 2 and set(rows["outcome"]) == {"done"}, df[["step", "outcome"]]
    results = sorted(p for p in (tmp_path / "ws" / "results").iterdir() if p.name.startswith("subspace"))
    assert len(results) == 2
    ratios = set()
    for p in results:
        r = read_subspace_result(p)
        ratios.add(r.max_norm_ratio)
        assert r.hook_names == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"] and r.twonn_rows == 200
        store = ActivationStore.open(r.store)
        assert set(store.hooks) >= {"blocks.0.hook_resid_post", "blocks.1.hook_attn_out"}
        for h in r.hook_names:
            X = torch.cat(list(store.batches(h, 4096, shuffle=False)))
            assert r.record(h)["all"]["n_rows"] == X.shape[0] == store.n_rows
            for frac in (0.9, 0.99):
                assert r.record(h)["all"][f"n_dirs_{round(frac * 100)}"] == _n_dirs(X, frac)
    assert ratios == {0.0, 10.0}
    again = sweep.run(f, workspace=tmp_path / "ws", progress=False)
    assert set(again[again["step"] == "subspace"]["outcome"]) == {"cached"}
