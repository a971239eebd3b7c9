"""Multi-dimensional features (Engels et al. 2024): the indices against hand-written computations, and the
`multid` step on synthetic data with a planted circle (8 latents tiling a ring whose angle is a hidden
variable) next to two independent 1-D features and some lone latents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError

D = 16
HOOK = "blocks.0.hook_resid_post"


# ------------------------------------------------------------------------------ hand references
def _mi_bits_by_hand(counts) -> float:
    tot = sum(sum(r) for r in counts)
    px = [sum(r) / tot for r in counts]
    py = [sum(counts[i][j] for i in range(len(counts))) / tot for j in range(len(counts[0]))]
    mi = 0.0
    for i, r in enumerate(counts):
        for j, c in enumerate(r):
            if c:
                p = c / tot
                mi += p * math.log(p / (px[i] * py[j]))
    return mi / math.log(2)


def _fraction_by_hand(x, v, c, eps):
    p = [v[0] * a + v[1] * b + c for a, b in x]
    rms = math.sqrt(sum(q * q for q in p) / len(p))
    return sum(abs(q) < eps * rms for q in p) / len(p)


def _brute_mixture(x: np.ndarray, eps: float = 0.1, n_dir: int = 360) -> float:
    """max over directions (grid) and every offset where the window's edge meets a point (exact per
    direction): |p - t| < eps sqrt(var + (mean - t)^2), solved for t with an edge at each p_j."""
    best = 0.0
    for th in np.linspace(0, np.pi, n_dir, endpoint=False):
        p = np.sort(x @ np.array([np.cos(th), np.sin(th)]))
        mu, var = p.mean(), p.var()
        # t -/+ eps sqrt(var + (mu - t)^2) = p_j  ->  (1 - e2) t^2 - 2 (p_j - e2 mu) t + p_j^2 - e2 (var + mu^2) = 0
        e2 = eps * eps
        A, B, C = 1 - e2, -2 * (p - e2 * mu), p * p - e2 * (var + mu * mu)
        disc = np.sqrt(np.maximum(B * B - 4 * A * C, 0))
        ts = np.concatenate([(-B + disc) / (2 * A), (-B - disc) / (2 * A)])
        for shift in (-1e-9, 1e-9):
            t = ts + shift
            h = eps * np.sqrt(var + (mu - t) ** 2)
            cnt = np.searchsorted(p, t + h, side="left") - np.searchsorted(p, t - h, side="right")
            best = max(best, cnt.max() / len(p))
    return best


def _ring(n, g, radius=3.0, noise=0.05):
    th = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([th.cos(), th.sin()], 1) * radius + noise * torch.randn(n, 2, generator=g)


def _sparse_independent(n, g, basis=((1.0, 0.0), (0.0, 1.0))):
    a = (1 + torch.rand(n, generator=g)) * (torch.rand(n, generator=g) < 0.3)
    b = (1 + torch.rand(n, generator=g)) * (torch.rand(n, generator=g) < 0.3)
    x = torch.stack([a, b], 1) @ torch.tensor(basis)
    return x[(a > 0) | (b > 0)]                     # tokens where either latent fires


# ------------------------------------------------------------------------------ the indices
def test_mutual_information_and_separability_equal_hand_computation():
    from analyses.multid import mutual_information_bits, separability_index
    assert float(mutual_information_bits(torch.tensor([[2.0, 0], [0, 2]]))) == pytest.approx(1.0, abs=1e-8)
    assert float(mutual_information_bits(torch.tensor([[1.0, 1], [1, 1]]))) == pytest.approx(0.0, abs=1e-9)
    counts = [[3, 0, 1], [1, 4, 0], [0, 2, 5]]
    assert float(mutual_information_bits(torch.tensor(counts, dtype=torch.float64))) == \
        pytest.approx(_mi_bits_by_hand(counts), abs=1e-8)
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(60, 2)) * [2.0, 0.5]
    S, per_angle = separability_index(xy, bins=4, n_angles=7)
    for k, th in enumerate(np.linspace(0, 2 * np.pi, 7)):
        rot = xy @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        h, _, _ = np.histogram2d(rot[:, 0], rot[:, 1], bins=4)
        assert float(per_angle[k]) == pytest.approx(_mi_bits_by_hand(h.tolist()), abs=1e-7), k
    assert S == pytest.approx(float(per_angle.min()))


def test_mixture_fraction_and_relaxed_gradient():
    from analyses.multid import _relaxed, mixture_fraction
    x = [(0.0, 1.0), (1.0, 1.0), (2.0, -1.0), (0.5, 0.2), (-1.0, 0.0)]
    for v, c in (((1.0, 0.0), 0.0), ((0.3, -1.0), 0.4), ((1.0, 1.0), -0.5)):
        for eps in (0.1, 0.5):
            assert mixture_fraction(x, v, c, eps) == pytest.approx(_fraction_by_hand(x, v, c, eps))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 40, 2, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 40, dtype=torch.float64)
    mask[1, 30:] = 0
    a = torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    value, ga, gb, _ = _relaxed(X, mask, a.detach(), b.detach(), 0.3, 0.7)
    s = torch.einsum("pnk,pk->pn", X, a) + b[:, None]
    n = mask.sum(1)
    z = s / ((mask * s * s).sum(1) / n).sqrt()[:, None]
    ref = (mask * torch.sigmoid((0.3 - z.abs()) / 0.7)).sum(1) / n
    ref.sum().backward()
    assert torch.allclose(value, ref.detach()) and torch.allclose(ga, a.grad) and torch.allclose(gb, b.grad)


def test_mixture_index_finds_the_brute_force_maximum():
    from analyses.multid import mixture_fraction, mixture_index
    g = torch.Generator().manual_seed(0)
    data = {"ring": _ring(300, g), "gauss": torch.randn(300, 2, generator=g) @ torch.tensor([[2.0, 0.5], [0, 1]]),
            "sparse": _sparse_independent(500, g, ((1.0, 0.3), (-0.2, 1.0)))}
    res = mixture_index(list(data.values()), steps=500, seed=0)
    for (name, x), r in zip(data.items(), res):
        brute = _brute_mixture(x.numpy())
        assert r["M"] == pytest.approx(mixture_fraction(x, r["v"], r["c"]), abs=1e-12)   # exact at its (v, c)
        assert brute - 0.03 <= r["M"] <= brute + 0.01, (name, r["M"], brute)
    assert res[0]["M"] < 0.3 and res[2]["M"] > 0.4         # a ring is no mixture; sparse independent features are


def test_circle_is_irreducible_and_independent_features_are_not():
    from analyses.multid import irreducibility, score_pairs
    g = torch.Generator().manual_seed(2)
    ring = _ring(3000, g)
    dense = torch.rand(3000, 2, generator=g) * torch.tensor([3.0, 1.0])     # independent, dense
    sparse = _sparse_independent(3000, g)                                     # independent, sparse
    out = score_pairs([ring, dense, sparse], steps=300)
    (r,), (d,), (s,) = out
    assert r["separability_index"] > 1.0 and r["mixture_index"] < 0.3
    assert d["separability_index"] < 0.1                  # a rotation makes the coordinates independent
    assert s["mixture_index"] > 0.4                       # half the points on the axes: a mixture
    scores = [irreducibility(p) for p in out]
    assert scores[0] > 0.8 and max(scores[1:]) < 0.3 * scores[0], scores


def test_cluster_pca_equals_pca_of_explicit_reconstructions():
    from sklearn.decomposition import PCA
    from analyses.multid import cluster_pca
    g = torch.Generator().manual_seed(3)
    F = torch.relu(torch.randn(200, 6, generator=g, dtype=torch.float64))
    W = torch.randn(6, 20, generator=g, dtype=torch.float64)
    ours = cluster_pca(F, W, 4)
    sk = PCA(4).fit(F.numpy() @ W.numpy())
    assert np.allclose(ours["explained_variance_ratio"].numpy(), sk.explained_variance_ratio_, atol=1e-10)
    assert np.allclose(np.abs(ours["scores"].numpy()), np.abs(sk.transform(F.numpy() @ W.numpy())), atol=1e-8)
    assert np.allclose(np.abs(ours["components"].numpy()), np.abs(sk.components_), atol=1e-8)
    flat = cluster_pca(F, torch.cat([W[:1], W[:1] * 2, W[1:2]]).repeat(2, 1), 5)   # rank 2 reconstructions
    assert flat["scores"].shape[1] == 2
    with pytest.raises(ValueError, match="columns but W_rows has"):
        cluster_pca(F, W[:5])
    with pytest.raises(ValueError, match="at least 3 rows"):
        cluster_pca(F[:2], W)


def test_clustering_recovers_planted_groups():
    from analyses.multid import cluster_latents
    g = torch.Generator().manual_seed(4)
    centres = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T                 # 4 orthogonal directions
    W = centres.repeat_interleave(6, 0) + 0.06 * torch.randn(24, 32, generator=g)
    groups = sorted(sorted(c) for c in cluster_latents(W, "spectral", n_clusters=4))
    assert groups == [list(range(i, i + 6)) for i in range(0, 24, 6)]
    W_dec, circle, pair = _decoder()
    found = sorted(sorted(c) for c in cluster_latents(W_dec, "graph", cutoff=0.5))
    assert found == sorted([circle, pair])                  # lone latents (no neighbour over 0.5) dropped
    for bad in ({"method": "kmeans"}, {"method": "spectral", "n_clusters": 99}, {"method": "graph", "cutoff": 1.5}):
        with pytest.raises(ValueError):
            cluster_latents(W_dec, **bad)
    with pytest.raises(ValueError, match="2 columns"):
        from analyses.multid import separability_index
        separability_index(torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least 3 rows"):
        from analyses.multid import mixture_index
        mixture_index([torch.randn(2, 2)])


# ------------------------------------------------------------------------------ the step
def _decoder():
    """Decoder rows: 8 latents tiling a ring in the (e0, e1) plane, a pair at cosine 0.6 in (e2, e3), and
    6 lone latents e4..e9. The ring's gaps shrink (52, 50, ..., 38 degrees) so that nearest neighbours chain
    all 8 (equal gaps make the nearest-neighbour graph pick one of two ties per latent and split the ring)."""
    phi = torch.deg2rad(torch.tensor([0.0, 52, 102, 150, 196, 240, 282, 322]))
    W = torch.zeros(16, D)
    W[:8, 0], W[:8, 1] = phi.cos(), phi.sin()
    W[8, 2] = 1.0
    W[9, 2], W[9, 3] = 0.6, 0.8
    W[10:, 4:10] = torch.eye(6)
    return W, list(range(8)), [8, 9]


def _synthetic(tmp_path, n_seq=60, seq_len=50, d_store=D):
    """A store whose rows hold a ring (angle = hidden variable, token = weekday bucket of the angle), two
    independent sparse features, lone sparse features; and a ReLU SAE that reads them off exactly."""
    from analyses.sae import SAEConfig
    from analyses.sae.relu import ReLUSAE
    from workbench.store import write_store
    g = torch.Generator().manual_seed(0)
    n = n_seq * seq_len
    W, circle, pair = _decoder()
    on = torch.rand(n, generator=g) < 0.5
    th = torch.rand(n, generator=g) * 2 * math.pi
    x = torch.zeros(n, D)
    x[:, :2] = on[:, None] * 4.0 * torch.stack([th.cos(), th.sin()], 1)
    s = (1 + torch.rand(n, 8, generator=g)) * (torch.rand(n, 8, generator=g) < 0.25)
    x += s[:, :2] @ W[8:10] + s[:, 2:] @ W[10:]
    tokens = torch.where(on, 10 + (th / (2 * math.pi) * 7).long(), 40 + (s[:, 0] > 0).long())
    sae = ReLUSAE(SAEConfig(arch="relu", d_in=D, d_sae=16, metadata={"hook_name": HOOK}))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        enc = W.clone()
        enc[8:10, 2:4] = torch.linalg.inv(W[8:10, 2:4]).T                  # dual basis: reads s_a, s_b exactly
        sae.W_enc.copy_(enc.T)
        sae.b_enc.copy_(torch.tensor([-4.0 * math.cos(math.radians(50))] * 8 + [0.0] * 8))
        sae.b_dec.zero_()
    sae.save(tmp_path / "sae")
    acts = {HOOK: (x + 0.01 * torch.randn(n, D, generator=g))[:, :d_store]}
    write_store(tmp_path / "store", acts, token_ids=tokens.view(n_seq, seq_len),
                attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool), doc_ids=torch.arange(n_seq),
                seq_index=torch.arange(n_seq).repeat_interleave(seq_len), position=torch.arange(seq_len).repeat(n_seq),
                model_name="tiny-random")
    return circle, pair


def test_multid_step_ranks_the_planted_circle_first(tmp_path):
    from workbench.steps import run_step
    from workbench.steps.multid import cluster_figure, read_multid_result
    circle, pair = _synthetic(tmp_path)
    res = run_step("multid", {"sae": str(tmp_path / "sae"), "store": str(tmp_path / "store"), "method": "graph",
                              "out": str(tmp_path / "r"), "mixture_steps": 300, "n_plots": 2, "plot_rows": 500})
    r = read_multid_result(tmp_path / "r")
    assert [c["latents"] for c in r.clusters] == [circle, pair]
    top, second = r.clusters
    assert top["irreducibility"] > 0.8 and len(top["pairs"]) == 1          # the ring spans 2 PCs
    assert second["irreducibility"] < 0.5 * top["irreducibility"] and second["pairs"][0]["mixture_index"] > 0.3
    assert r.meta["n_clusters"] == 2 and r.meta["deviations"]                 # graph: lone latents pruned
    assert res.metrics["top_irreducibility"] == pytest.approx(top["irreducibility"])
    pts = r.points(0)
    assert len(pts) == 500 and {"pc1", "pc2", "token", "context", "row"} <= set(pts.columns)
    radius = np.hypot(pts["pc1"], pts["pc2"])
    assert radius.min() > 0.5 * radius.max()                                 # a ring, not a blob
    from workbench.store import ActivationStore
    st = ActivationStore.open(tmp_path / "store")
    tok = st.sequences()["token_ids"].view(-1)[torch.as_tensor(pts["row"].to_numpy().copy())]
    assert all(t in c for t, c in zip((r.tok(i) for i in tok.tolist()), pts["context"]))
    fig = cluster_figure(r, 0, dims=2)
    assert sum(len(t.x) for t in fig.data) == 500
    assert json.loads((tmp_path / "r" / "result.json").read_text())["figures"]["cluster0"] == "cluster0.html"
    with pytest.raises(WorkbenchError, match="no cluster of rank"):
        r.points(7)
    # a 3-D view: the same points with a third PC, through the reader's in-memory form
    from workbench.steps.multid import MultidResult
    t = dict(r.tensors)
    t["c0.scores"] = torch.cat([t["c0.scores"], torch.arange(500.0)[:, None]], 1)
    fig3 = cluster_figure(MultidResult(r.path, r.meta, t), 0, dims=3)
    assert {tr.type for tr in fig3.data} == {"scatter3d"}
    assert sorted(z for tr in fig3.data for z in tr.z) == list(range(500))


def test_multid_step_errors(tmp_path):
    from workbench.steps import run_step
    _synthetic(tmp_path / "a")
    _synthetic(tmp_path / "b", n_seq=2, seq_len=5, d_store=12)
    base = {"sae": str(tmp_path / "a" / "sae"), "store": str(tmp_path / "a" / "store"), "method": "graph"}
    with pytest.raises(WorkbenchError, match="d_in=16 but hook .* d=12"):
        run_step("multid", {**base, "store": str(tmp_path / "b" / "store"), "out": str(tmp_path / "x")})
    with pytest.raises(WorkbenchError, match="has 10 usable rows; multid needs at least 20"):
        run_step("multid", {**base, "max_tokens": 10, "out": str(tmp_path / "y")})
    with pytest.raises(WorkbenchError, match="--epsilon"):
        run_step("multid", {**base, "epsilon": 2.0, "out": str(tmp_path / "z")})
    with pytest.raises(WorkbenchError, match="n_clusters must be between"):
        run_step("multid", {**base, "method": "spectral", "n_clusters": 50, "out": str(tmp_path / "w")})


def test_multid_cli(tmp_path, capsys):
    from workbench.cli import main
    _synthetic(tmp_path)
    rc = main(["multid", str(tmp_path / "sae"), str(tmp_path / "store"), "--method", "graph", "--mixture-steps",
               "100", "--out", str(tmp_path / "r"), "--json"])
    assert rc in (0, None)
    payload = json.loads(capsys.readouterr().out)
    assert payload["table"][0]["size"] == 8 and payload["metrics"]["scored"] == 2


# ------------------------------------------------------------------------------ the UI view
def test_geometry_page_shows_multid_and_subspace_results(tmp_path):
    from streamlit.testing.v1 import AppTest
    from ui_fixtures import APP
    from workbench.steps import run_step
    from workbench.steps.multid import read_multid_result
    from workbench.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    _synthetic(tmp_path / "data")
    run_step("multid", {"sae": str(tmp_path / "data" / "sae"), "store": str(tmp_path / "data" / "store"),
                        "method": "graph", "mixture_steps": 100, "plot_rows": 400, "out": str(ws.results / "md")},
             workspace=ws)
    run_step("subspace", {"store": str(tmp_path / "data" / "store"), "twonn_rows": 300,
                          "out": str(ws.results / "sub")}, workspace=ws)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["workspace"] = str(ws.root)
    at.run()
    at.switch_page("workbench/ui/pages/geometry.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    r = read_multid_result(ws.results / "md")
    table = next(d.value for d in at.dataframe if "irreducibility" in d.value.columns)
    assert list(table["irreducibility"]) == pytest.approx([c["irreducibility"] for c in r.clusters])
    spec = json.loads(next(c for c in at.get("plotly_chart") if "md_scatter" in c.proto.id).proto.spec)
    assert sum(len(t["x"]["bdata"]) if isinstance(t["x"], dict) else len(t["x"]) for t in spec["data"]) > 0
    assert spec["data"][0]["type"] == "scatter"                  # 2-D by default
    texts = [t for tr in spec["data"] for t in tr["text"]]
    assert len(texts) == 400 and all("[" in t for t in texts)    # hover: the token in its context
    assert at.radio(key="md_dims").options == ["PC1-PC2"]        # the ring is planar: no 3-D view offered
    sub = next(d.value for d in at.dataframe if "dirs 99%" in d.value.columns)
    assert list(sub["hook"]) == [HOOK] and int(sub["dirs 99%"].iloc[0]) >= 2
    assert any("sub_spectrum" in c.proto.id for c in at.get("plotly_chart"))


def test_multid_table_in_a_sweep(tmp_path):
    """`[multid]` goes through the generic step machinery: one node per SAE, fed by its store."""
    import workbench.sweep as sweep
    from workbench.steps.multid import read_multid_result
    spec = {"sweep": {"name": "md"},
            "models": [{"spec": "tiny-random", "name": "tiny", "hooks": ["blocks.1.hook_resid_post"]}],
            "corpus": {"spec": "calendar", "max_tokens": 1024, "seq_len": 32},
            "collect": {"batch_size": 8, "progress": False},
            "train_sae": {"arch": "topk", "d_sae": 64, "k": 4, "progress": False},
            "multid": {"n_clusters": 4, "mixture_steps": 50, "min_rows": 5}}
    df = sweep.run(spec, workspace=tmp_path / "ws", progress=False)
    rows = df[df["step"] == "multid"]
    assert len(rows) == 1 and set(rows["outcome"]) == {"done"}, df[["step", "outcome"]]
    (res,) = [p for p in (tmp_path / "ws" / "results").iterdir() if p.name.startswith("multid")]
    r = read_multid_result(res)
    assert r.meta["params"]["n_clusters"] == 4 and r.meta["hook"] == "blocks.1.hook_resid_post"
