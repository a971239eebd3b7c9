"""Step `compare` on synthetic stores: same-store matrices, same-token alignment across stores,
document pooling for different tokenisers, refusals, CLI."""

import json

import numpy as np
import pytest
import torch

from analyses import similarity as S
from workbench.errors import WorkbenchError
from workbench.results import read_result, read_tensors
from workbench.steps import run_step
from workbench.steps.compare import compare_matrix
from workbench.store import write_store

N_SEQ, SEQ_LEN, D = 24, 12, 10
H = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def _layout(drop_first=False):
    seq = torch.arange(N_SEQ).repeat_interleave(SEQ_LEN)
    pos = torch.arange(SEQ_LEN).repeat(N_SEQ)
    if drop_first:                       # e.g. a collector that does not keep BOS rows
        keep = pos != 0
        seq, pos = seq[keep], pos[keep]
    return seq, pos


def _make(path, tokens, acts, seq, pos, corpus="builtin", docs=None):
    return write_store(path, acts, token_ids=tokens, attention_mask=torch.ones(N_SEQ, SEQ_LEN, dtype=torch.bool),
                       doc_ids=torch.arange(N_SEQ) // 3 if docs is None else docs, seq_index=seq, position=pos,
                       model_name="synthetic-test", corpus=corpus, shard_rows=70)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (N_SEQ, SEQ_LEN), generator=g)
    seq, pos = _layout()
    n = seq.numel()
    # a per-token "truth" so that stores on the same tokens carry related activations
    latent = torch.randn(N_SEQ, SEQ_LEN, 4, generator=g)
    lat = latent[seq, pos]
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    a0 = lat @ torch.randn(4, D, generator=g) + 0.3 * torch.randn(n, D, generator=g)
    acts_a = {H[0]: a0, H[1]: a0 @ Q * 2 + 1, H[2]: torch.randn(n, D + 3, generator=g)}
    A = _make(tmp / "a", tokens, acts_a, seq, pos)
    # B: same tokens, no position-0 rows, different activations that depend on the same latent
    seq_b, pos_b = _layout(drop_first=True)
    lat_b = latent[seq_b, pos_b]
    nb = seq_b.numel()
    acts_b = {"x": lat_b @ torch.randn(4, 7, generator=g) + 0.5 * torch.randn(nb, 7, generator=g),
              "y": torch.randn(nb, 6, generator=g)}
    B = _make(tmp / "b", tokens, acts_b, seq_b, pos_b)
    # C: another tokeniser on the same corpus -> different token ids, same documents
    tokens_c = torch.randint(100, 200, (N_SEQ, SEQ_LEN), generator=g)
    acts_c = {"z": torch.randn(n, 5, generator=g)}
    C = _make(tmp / "c", tokens_c, acts_c, seq, pos)
    # E: different tokens AND a different corpus -> cannot be aligned
    E = _make(tmp / "e", tokens_c, acts_c, seq, pos, corpus="other.txt")
    return {"tmp": tmp, "A": A, "B": B, "C": C, "E": E, "acts_a": acts_a, "acts_b": acts_b, "acts_c": acts_c,
            "seq": seq, "pos": pos, "seq_b": seq_b, "pos_b": pos_b}


def test_one_store_matrix(stores):
    out = stores["tmp"] / "r1"
    res = run_step("compare", {"store_a": str(stores["A"].path), "metric": "linear_cka", "out": str(out),
                               "precision": "float64"})
    meta = read_result(out, "compare")
    M = read_tensors(out)["matrix"].numpy()
    assert meta["labels_a"] == H and meta["labels_b"] == H and meta["align"] == "position"
    assert meta["n_rows"] == N_SEQ * SEQ_LEN and (out / "heatmap.html").exists()
    acts = stores["acts_a"]
    ref = np.array([[S.linear_cka(acts[a], acts[b]) for b in H] for a in H])
    np.testing.assert_allclose(M, ref, atol=1e-9)
    np.testing.assert_allclose(np.diag(M), 1.0, atol=1e-12)
    assert M[0, 1] == pytest.approx(1.0, abs=1e-9)          # rotation + scaling + shift
    np.testing.assert_allclose(M, M.T)
    assert np.array(meta["matrix"]) == pytest.approx(M)
    assert res.artifacts["heatmap"].endswith("heatmap.html")
    # hooks selection with a glob, and max_rows subsampling
    r = compare_matrix(stores["A"].path, hooks_a=["blocks.[01].*"], metric="procrustes", max_rows=100)
    assert r["hooks_a"] == H[:2] and r["n_rows"] == 100 and r["matrix"][0, 1] == pytest.approx(0.0, abs=1e-6)


def test_same_tokens_aligned_by_position(stores):
    A, B = stores["A"], stores["B"]
    r = compare_matrix(A.path, B.path, hooks_a=[H[0], H[2]], metric="linear_cka", precision="float64")
    assert r["align"] == "position" and r["n_rows"] == N_SEQ * (SEQ_LEN - 1)
    assert r["labels_b"] == ["x", "y"] and r["matrix"].shape == (2, 2)
    # independent alignment: B's row for (s, p) is A's row s * SEQ_LEN + p
    rows_a = stores["seq_b"] * SEQ_LEN + stores["pos_b"]
    for i, ha in enumerate([H[0], H[2]]):
        for j, hb in enumerate(["x", "y"]):
            ref = S.linear_cka(stores["acts_a"][ha][rows_a], stores["acts_b"][hb])
            assert r["matrix"][i, j] == pytest.approx(ref, abs=1e-9)
    assert r["matrix"][0, 0] > 0.3 > r["matrix"][1, 1]        # shared latent vs noise
    # a misaligned comparison would be near zero: make sure alignment matters
    assert S.linear_cka(stores["acts_a"][H[0]][: rows_a.numel()], stores["acts_b"]["x"]) < r["matrix"][0, 0] - 0.2
    # the step records the alignment
    out = stores["tmp"] / "r2"
    run_step("compare", {"store_a": str(A.path), "store_b": str(B.path), "hooks_a": [H[0]],
                         "metric": "svcca", "out": str(out)})
    assert read_result(out, "compare")["align"] == "position"


def test_different_tokenisers_pool_documents(stores):
    A, C = stores["A"], stores["C"]
    with pytest.raises(WorkbenchError, match="only 8 documents in common: .* at least 50"):
        compare_matrix(A.path, C.path, hooks_a=[H[0]], metric="linear_cka")
    r = compare_matrix(A.path, C.path, hooks_a=[H[0]], metric="linear_cka", precision="float64", min_docs=8)
    assert r["align"] == "document"
    docs = torch.arange(N_SEQ) // 3
    doc_of_row = docs[stores["seq"]]
    n_docs = int(docs.max()) + 1
    assert r["n_rows"] == n_docs

    def pooled(x):
        return torch.stack([x[doc_of_row == d].double().mean(0) for d in range(n_docs)])
    ref = S.linear_cka(pooled(stores["acts_a"][H[0]]), pooled(stores["acts_c"]["z"]))
    assert r["matrix"][0, 0] == pytest.approx(ref, abs=1e-9)
    # explicit document alignment on the same tokens also works (pooled)
    r2 = compare_matrix(A.path, stores["B"].path, hooks_a=[H[0]], hooks_b=["x"], align="document", min_docs=4,
                        metric="linear_cka")
    assert r2["align"] == "document" and r2["n_rows"] == n_docs


def test_refusals(stores):
    A, C, E = stores["A"], stores["C"], stores["E"]
    with pytest.raises(WorkbenchError, match="by position: token_ids differ"):
        compare_matrix(A.path, C.path, align="position")
    with pytest.raises(WorkbenchError, match="not the same tokens.*different corpora"):
        compare_matrix(A.path, E.path)
    with pytest.raises(WorkbenchError, match="by document: the stores come from different corpora"):
        compare_matrix(A.path, E.path, align="document")
    with pytest.raises(WorkbenchError, match="blocks.0.hook_resid_post"):
        compare_matrix(A.path, hooks_a=["blocks.0.hook_resid_pst"])
    with pytest.raises(WorkbenchError, match="more rows than neurons"):
        compare_matrix(A.path, metric="pwcca", max_rows=8)
    with pytest.raises(WorkbenchError, match="--k 50"):
        compare_matrix(A.path, metric="mutual_knn", k=50, max_rows=40)
    out = stores["tmp"] / "r3"
    run_step("compare", {"store_a": str(A.path), "hooks_a": [H[0]], "out": str(out)})
    with pytest.raises(FileExistsError):
        run_step("compare", {"store_a": str(A.path), "hooks_a": [H[0]], "out": str(out)})
    with pytest.raises(WorkbenchError, match="no option"):
        run_step("compare", {"store_a": str(A.path), "metrc": "cka", "out": str(out)})


@pytest.mark.parametrize("metric", ["debiased_cka", "rbf_cka", "pwcca", "mutual_knn"])
def test_other_metrics_match_functions(stores, metric):
    acts = stores["acts_a"]
    r = compare_matrix(stores["A"].path, hooks_a=H[:2], metric=metric, precision="float64", k=5)
    f = {"debiased_cka": lambda a, b: S.linear_cka(a, b, True), "rbf_cka": S.rbf_cka,
         "pwcca": S.pwcca, "mutual_knn": lambda a, b: S.mutual_knn(a, b, 5)}[metric]
    ref = np.array([[f(acts[a], acts[b]) for b in H[:2]] for a in H[:2]])
    np.testing.assert_allclose(r["matrix"].numpy(), ref, atol=1e-8)


def test_cli(stores, capsys):
    from workbench.cli import main
    out = stores["tmp"] / "r4"
    rc = main(["compare", str(stores["A"].path), str(stores["B"].path), "--hooks-a", H[0], "--metric",
               "procrustes", "--out", str(out), "--json"])
    assert rc in (0, None)
    payload = json.loads(capsys.readouterr().out)
    assert payload["align"] == "position" and payload["shape"] == [1, 2]


def test_max_norm_ratio_drops_sink_rows(tmp_path):
    """A few rows with ~100x the median norm (attention sinks) decide a plain CKA; dropping them
    (max_norm_ratio) gives the CKA of the remaining rows, computed independently here."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 100, (N_SEQ, SEQ_LEN), generator=g)
    seq, pos = _layout()
    n = seq.numel()
    x = torch.randn(n, D, generator=g)
    y = x @ torch.randn(D, D, generator=g) + 2.0 * torch.randn(n, D, generator=g)
    sink = pos == 0                                     # first position: a shared huge direction
    x[sink] += 300.0 * torch.ones(D)
    y[sink] += 300.0 * torch.ones(D)
    st = _make(tmp_path / "s", tokens, {"x": x, "y": y}, seq, pos)
    plain = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64", max_norm_ratio=0)
    clean = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64")   # default: 10
    assert clean["rows_dropped"] == int(sink.sum()) and clean["n_rows"] == n - int(sink.sum())
    ref = S.linear_cka(x[~sink].double(), y[~sink].double())
    assert abs(float(clean["matrix"][0, 1]) - ref) < 1e-9
    assert float(plain["matrix"][0, 1]) > 0.99 > ref + 0.1          # the sinks made them look alike
    assert plain["massive_sq_norm_share_max"] > 0.9 and clean["massive_sq_norm_share_max"] < 0.5
    assert clean["max_norm_ratio"] == 10 and clean["rows_dropped_by_hook"] == {"x": int(sink.sum()),
                                                                               "y": int(sink.sum())}
    res = run_step("compare", {"store_a": str(st.path), "hooks_a": ["x", "y"], "out": str(tmp_path / "w"),
                               "max_norm_ratio": 0})
    assert "--max-norm-ratio 10" in res.summary["warning"]
    res = run_step("compare", {"store_a": str(st.path), "hooks_a": ["x", "y"], "out": str(tmp_path / "w2")})
    assert f"{int(sink.sum())} rows left out" in res.summary["note"] and "warning" not in res.summary
    assert read_result(tmp_path / "w2", "compare")["rows_dropped"] == int(sink.sum())
    # document pooling leaves the dropped rows out of the means
    doc = compare_matrix(st, _make(tmp_path / "t", tokens + 100, {"z": y}, seq, pos), hooks_a=["x"],
                         hooks_b=["z"], metric="linear_cka", align="document", precision="float64", min_docs=4,
                         max_norm_ratio=10)
    docs = torch.arange(N_SEQ) // 3
    dr = docs[seq]
    mx = torch.stack([x[(dr == i) & ~sink].double().mean(0) for i in range(int(docs.max()) + 1)])
    my = torch.stack([y[(dr == i) & ~sink].double().mean(0) for i in range(int(docs.max()) + 1)])
    assert doc["rows_dropped"] == 2 * int(sink.sum())
    assert abs(float(doc["matrix"][0, 0]) - S.linear_cka(mx, my)) < 1e-9
    with pytest.raises(WorkbenchError, match="max-norm-ratio"):
        compare_matrix(st, hooks_a=["x"], metric="linear_cka", max_norm_ratio=0.5)


def _rogue_store(tmp_path, scale=60.0):
    """Two hooks that share a signal in 12 dimensions, plus one 'rogue' dimension each with a huge,
    unrelated variance (Timkey & van Schijndel 2021)."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 100, (N_SEQ, SEQ_LEN), generator=g)
    seq, pos = _layout()
    n = seq.numel()
    z = torch.randn(n, 12, generator=g)
    x = z + 0.3 * torch.randn(n, 12, generator=g)
    y = z @ torch.linalg.qr(torch.randn(12, 12, generator=g))[0] + 0.3 * torch.randn(n, 12, generator=g)
    x[:, 4] += scale * torch.randn(n, generator=g)          # rogue: independent in x and y
    y[:, 9] += scale * torch.randn(n, generator=g)
    return _make(tmp_path / "rogue", tokens, {"x": x, "y": y}, seq, pos), x.double(), y.double()


def _np_linear_cka(X, Y):
    """Independent oracle: Kornblith et al. 2019, feature-space form, in numpy."""
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def test_rogue_dimension_is_reported_and_standardize_removes_it(tmp_path):
    st, x, y = _rogue_store(tmp_path)
    raw = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64")
    # without the rogue dimensions the two hooks are near-identical; with them, CKA sees mostly noise
    clean = _np_linear_cka(np.delete(x.numpy(), 4, 1), np.delete(y.numpy(), 9, 1))
    assert clean > 0.7 and float(raw["matrix"][0, 1]) < 0.1
    assert raw["rogue_dims"]["x"]["dims"][0] == 4 and raw["rogue_dims"]["y"]["dims"][0] == 9
    assert raw["rogue_dims"]["x"]["top1_share"] > 0.9
    assert raw["rogue_check"]["done"] and raw["rogue_check"]["max_change"] > 0.5
    # --standardize equals linear CKA of the z-scored data, computed independently
    std = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64", standardize_dims=True)
    zx = (x.numpy() - x.numpy().mean(0)) / x.numpy().std(0, ddof=1)
    zy = (y.numpy() - y.numpy().mean(0)) / y.numpy().std(0, ddof=1)
    assert abs(float(std["matrix"][0, 1]) - _np_linear_cka(zx, zy)) < 1e-9
    assert float(std["matrix"][0, 1]) > 0.5 and not std["rogue_check"]["done"]
    # --drop-top-dims 1 equals the CKA without each hook's largest-variance dimension
    drop = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64", drop_top=1)
    assert abs(float(drop["matrix"][0, 1]) - clean) < 1e-9
    # the step warns and names the remedy; with it, no warning
    res = run_step("compare", {"store_a": str(st.path), "hooks_a": ["x", "y"], "out": str(tmp_path / "r")})
    assert "rogue dimensions" in res.summary["warning"] and "--standardize" in res.summary["warning"]
    meta = read_result(tmp_path / "r", "compare")
    assert meta["rogue_check"]["max_change"] > 0.5 and meta["rogue_dims"]["x"]["dims"][0] == 4
    res = run_step("compare", {"store_a": str(st.path), "hooks_a": ["x", "y"], "out": str(tmp_path / "s"),
                               "standardize": True})
    assert "warning" not in res.summary
    with pytest.raises(WorkbenchError, match="drop-top-dims"):
        compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", drop_top=12)


def test_no_rogue_warning_without_rogue_dimensions(tmp_path):
    st, _, _ = _rogue_store(tmp_path, scale=0.0)
    raw = compare_matrix(st, hooks_a=["x", "y"], metric="linear_cka", precision="float64")
    assert raw["rogue_dims"]["x"]["top1_over_median"] < 3 and not raw["rogue_check"]["done"]
