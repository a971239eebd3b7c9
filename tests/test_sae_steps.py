"""SAE steps through run_step: train-sae on a synthetic store, eval-sae, export-sae, errors."""

import json
from pathlib import Path

import pytest
import torch

from test_sae_helpers import mmcs, synthetic


from test_sae_helpers import one_thread  # noqa: E402,F401  (autouse: 1 torch thread)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from workbench.store import write_store
    X, F = synthetic(n=8192, d=32, n_features=64, active=3)
    n_seq, seq_len = 64, 128
    path = tmp_path_factory.mktemp("sae_store") / "store"
    s = write_store(path, {"blocks.0.hook_resid_post": X, "blocks.1.hook_resid_post": X * 2.0},
                    token_ids=torch.randint(0, 100, (n_seq, seq_len)),
                    attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool),
                    doc_ids=torch.arange(n_seq), seq_index=torch.arange(n_seq).repeat_interleave(seq_len),
                    position=torch.arange(seq_len).repeat(n_seq), model_name="tiny-random")
    return s, F


def test_train_eval_export_steps(store, tmp_path):
    from workbench.steps import run_step
    s, F = store
    out = tmp_path / "sae"
    r = run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_post", "arch": "topk",
                               "d_sae": 64, "k": 3, "n_tokens": 8192 * 8, "batch_size": 256, "lr": 1e-2,
                               "out": str(out), "eval_tokens": 4096, "progress": False})
    assert (out / "cfg.json").exists() and (out / "sparsity.safetensors").exists()
    assert not (out / ".checkpoints").exists()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-random"
    assert r.metrics["fvu"] < 0.3 and r.metrics["l0"] == pytest.approx(3, abs=0.5)
    from analyses.sae import load_sae
    assert mmcs(load_sae(out), F) > 0.9
    # refuses to clobber
    from workbench.errors import WorkbenchError
    with pytest.raises(WorkbenchError, match="already holds an SAE"):
        run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_post", "out": str(out),
                               "progress": False})
    # eval (CE skipped: tiny-random store model is not what produced these synthetic rows, ce_sequences=0)
    ev = tmp_path / "eval"
    r2 = run_step("eval_sae", {"sae": str(out), "store": str(s.path), "max_tokens": 4096, "ce_sequences": 0,
                               "out": str(ev), "device": "cpu"})
    from workbench.results import read_result, read_tensors
    meta = read_result(ev, "sae_eval")
    assert meta["hook"] == "blocks.0.hook_resid_post"      # taken from the SAE's metadata
    assert meta["metrics"]["fvu"] == pytest.approx(r2.metrics["fvu"])
    assert (ev / "density_histogram.html").exists()
    assert read_tensors(ev)["log10_density"].shape == (64,)
    # export
    r3 = run_step("export_sae", {"sae": str(out), "format": "sparsify", "out": str(tmp_path / "sp")})
    assert list((tmp_path / "sp").glob("*/sae.safetensors"))     # folder: the sparsify hookpoint
    assert r3.summary["format"] == "sparsify"


def test_train_sae_default_batch_size_is_the_trainers_rule(store, tmp_path):
    """The CLI default is the good path: no --batch-size means the trainer's rule (enough steps for a
    short run), not a fixed 4096 that gives a 40k-row run ten optimiser steps."""
    from analyses.sae.train import default_batch_size
    from workbench.steps import run_step
    s, _ = store
    r = run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_post", "d_sae": 32, "k": 3,
                               "n_tokens": 300_000, "out": str(tmp_path / "sae"), "eval_tokens": 0,
                               "progress": False, "holdout": 0.0})
    assert r.summary["batch_size"] == default_batch_size(300_000) == 300
    from workbench.errors import WorkbenchError
    with pytest.raises(WorkbenchError, match="batch-size"):
        run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_post", "batch_size": -5,
                               "out": str(tmp_path / "sae2"), "progress": False})


def test_autocast_on_cpu_is_opt_in_and_recorded(store, tmp_path, monkeypatch):
    """--autocast on runs the step's matmuls in bf16 on CPU too (before, autocast was silently dropped off
    CUDA); the default stays float32 there; the SAE records which it was; the one-pass grid path takes it."""
    import analyses.sae.topk as topk
    from workbench.errors import WorkbenchError
    from workbench.steps import run_step
    seen = []
    orig = topk.preacts

    def spy(*a, **k):
        out = orig(*a, **k)
        seen.append(out.dtype)
        return out
    monkeypatch.setattr(topk, "preacts", spy)
    s, _ = store
    base = {"store": str(s.path), "arch": "topk", "d_sae": 64, "k": 3, "n_tokens": 8192, "batch_size": 256,
            "lr": 1e-2, "eval_tokens": 2048, "progress": False, "device": "cpu"}
    fvu = {}
    for mode in ("auto", "on"):
        seen.clear()
        r = run_step("train_sae", {**base, "hook": "blocks.0.hook_resid_post", "autocast": mode,
                                   "out": str(tmp_path / mode)})
        cfg = json.loads((tmp_path / mode / "cfg.json").read_text())
        assert cfg["metadata"]["workbench"]["autocast"] == (None if mode == "auto" else "bf16")
        assert set(seen) == {torch.float32 if mode == "auto" else torch.bfloat16}
        fvu[mode] = r.metrics["fvu"]
    assert abs(fvu["on"] - fvu["auto"]) < 0.05, fvu          # same SAE up to bf16 rounding of the encoder
    seen.clear()                                              # a grid (one pass) takes it too
    run_step("train_sae", {**base, "hook": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                           "autocast": "on", "out": str(tmp_path / "grid")})
    assert seen and set(seen) == {torch.bfloat16}
    with pytest.raises(WorkbenchError, match="autocast must be auto, on or off"):
        run_step("train_sae", {**base, "hook": "blocks.0.hook_resid_post", "autocast": "bf16",
                               "out": str(tmp_path / "bad")})


def test_step_errors(store, tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.steps import STEPS, run_step
    assert {"train_sae", "eval_sae", "export_sae"} <= set(STEPS)
    s, _ = store
    with pytest.raises(WorkbenchError, match="several hooks"):
        run_step("train_sae", {"store": str(s.path), "out": str(tmp_path / "a"), "progress": False})
    with pytest.raises(WorkbenchError, match="closest"):
        run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_pst",
                               "out": str(tmp_path / "a"), "progress": False})
    with pytest.raises(WorkbenchError, match="k=999 must be between 1 and d_sae=64"):
        run_step("train_sae", {"store": str(s.path), "hook": "blocks.0.hook_resid_post", "d_sae": 64,
                               "k": 999, "out": str(tmp_path / "a"), "progress": False})
    from analyses.sae import make_sae
    make_sae("topk", 16, 32, k=2).save(tmp_path / "wrong_d")
    with pytest.raises(WorkbenchError, match=r"d=32.*d_in=16.*\(16, 32\)"):
        run_step("eval_sae", {"sae": str(tmp_path / "wrong_d"), "store": str(s.path),
                              "hook": "blocks.0.hook_resid_post", "out": str(tmp_path / "e"), "ce_sequences": 0})


def test_ce_splices_only_where_the_store_has_rows(tmp_path):
    """CE loss recovered replaces activations only at tokens that are rows of the store (what the
    SAE saw): special tokens the collector excluded (BOS, here [CLS]/[SEP]) keep their own, as
    SAELens' exclude_special_tokens_from_reconstruction."""
    from workbench.collector import collect
    from workbench.models import load_model
    from workbench.splice import splice_eval
    from workbench.steps._sae_eval import ce_metrics

    tiny = load_model("tiny-random", device="cpu")
    hook = "blocks.0.hook_resid_post"
    st = collect(tiny, [hook], out=tmp_path / "s", max_tokens=400, seq_len=24, batch_size=4, progress=False)

    class Zero(torch.nn.Module):          # an "SAE" that reconstructs nothing
        dtype = torch.float32

        def forward(self, x):
            return torch.zeros_like(x)

    got, why, _ = ce_metrics(Zero(), st, hook, n_seq=6, device="cpu")
    assert why == "" and got is not None
    seqs = st.sequences()
    ids, mask = seqs["token_ids"][:6], seqs["attention_mask"][:6]
    sp = tiny.special_ids
    rows = mask & ~torch.isin(ids, torch.tensor([sp["cls"], sp["sep"]]))
    ref = splice_eval(tiny, hook, torch.zeros_like, ids, mask, splice_mask=rows)
    everywhere = splice_eval(tiny, hook, torch.zeros_like, ids, mask)
    assert got["ce_sae"] == pytest.approx(ref["ce_sae"], rel=1e-9)
    assert abs(got["ce_sae"] - everywhere["ce_sae"]) > 1e-4
    r = st.rows()
    assert got["n_spliced"] == int((r["seq_index"] < 6).sum()) == int(rows.sum())


# ------------------------------------------------------------------ held-out split, density, labels

@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory):
    """A store whose held-out documents (5%, seed 0) are shifted by +50 in dimension 0: any held-out
    row seen in training, or any training row seen in the evaluation, shows."""
    from workbench.store import write_store
    from workbench.store_split import heldout_units
    X, _ = synthetic(n=4096, d=16, n_features=32, active=3, seed=3)
    n_seq, seq_len = 64, 64
    docs = torch.arange(n_seq) // 2                         # 32 documents of 2 windows
    held = heldout_units(docs.tolist(), 0.05, 0)
    assert len(held) == 2                                   # round(0.05 * 32)
    seq_index = torch.arange(n_seq).repeat_interleave(seq_len)
    is_held = torch.isin(docs[seq_index], torch.tensor(sorted(held)))
    X[is_held, 0] += 50.0
    path = tmp_path_factory.mktemp("shifted") / "store"
    s = write_store(path, {"h": X}, token_ids=torch.randint(0, 100, (n_seq, seq_len)),
                    attention_mask=torch.ones(n_seq, seq_len, dtype=torch.bool), doc_ids=docs,
                    seq_index=seq_index, position=torch.arange(seq_len).repeat(n_seq), model_name="tiny-random",
                    shard_rows=1000)
    return s, X, is_held


def _total_var(X):
    X = X.double()
    return float(((X - X.mean(0)) ** 2).sum(1).mean())


def test_train_sae_trains_on_train_documents_and_evaluates_held_out(shifted_store, tmp_path, monkeypatch):
    import analyses.sae as sae_pkg
    from workbench.steps import run_step
    s, X, is_held = shifted_store
    seen = []
    real = sae_pkg.train_sae

    def spy(source, **kw):
        seen.extend(source(0))
        return real(source, **kw)

    monkeypatch.setattr(sae_pkg, "train_sae", spy)
    out = tmp_path / "sae"
    r = run_step("train_sae", {"store": str(s.path), "arch": "topk", "d_sae": 32, "k": 3, "batch_size": 256,
                               "lr": 1e-2, "out": str(out), "progress": False})
    rows = torch.cat(seen)
    assert rows.shape[0] == int((~is_held).sum()) and float(rows[:, 0].max()) < 25   # no held-out row
    cfg = json.loads((out / "cfg.json").read_text())
    sp = cfg["metadata"]["workbench"]["split"]
    assert (sp["holdout"], sp["seed"], sp["unit"]) == (0.05, 0, "document") and "blake2b" in sp["rule"]
    assert sp["n_heldout_rows"] == int(is_held.sum()) == r.summary["n_heldout_rows"]
    from workbench.results import read_result
    ev = read_result(out / "eval", "sae_eval")
    assert ev["split"] == ev["metrics"]["split"] == r.summary["split"] == "held_out"
    assert ev["metrics"]["n_tokens"] == int(is_held.sum())
    assert ev["metrics"]["total_variance"] == pytest.approx(_total_var(X[is_held]), rel=1e-6)
    assert "around the per-dimension mean" in ev["explained_variance_convention"]
    assert cfg["metadata"]["workbench"]["eval"]["split"] == "held_out"
    # --holdout 0: trains on everything, evaluation labelled in-sample
    r0 = run_step("train_sae", {"store": str(s.path), "arch": "topk", "d_sae": 32, "k": 3, "batch_size": 256,
                                "n_tokens": 512, "holdout": 0, "out": str(tmp_path / "s0"), "progress": False})
    assert r0.summary["split"] == "in_sample" and r0.metrics["eval_tokens"] == s.n_rows


def test_eval_sae_defaults_to_held_out_rows(shifted_store, tmp_path):
    from analyses.sae import make_sae
    from workbench.results import read_result
    from workbench.steps import run_step
    from workbench.steps._sae_eval import split_meta
    from workbench.store import write_store
    s, X, is_held = shifted_store
    sae = make_sae("topk", 16, 32, k=3, metadata={"hook_name": "h", "store": "/moved/elsewhere",
                                                  "workbench": {"split": split_meta(s, s.split(0.05, 0))}})
    sae.save(tmp_path / "sae")

    def ev(split, store=s.path):
        out = tmp_path / f"e-{split}-{Path(store).name}"
        r = run_step("eval_sae", {"sae": str(tmp_path / "sae"), "store": str(store), "split": split,
                                  "ce_sequences": 0, "device": "cpu", "out": str(out)})
        return r, read_result(out, "sae_eval")

    r, m = ev("auto")                        # own store (by fingerprint, although the path moved)
    assert r.summary["split"] == m["split"] == "held_out"
    assert m["metrics"]["n_tokens"] == int(is_held.sum())
    assert m["metrics"]["total_variance"] == pytest.approx(_total_var(X[is_held]), rel=1e-6)
    assert m["density"]["this_evaluation"]["n_tokens"] == int(is_held.sum())
    from workbench.steps._sae_eval import read_sae_eval_result
    from workbench.ui.pages.workspace import _sae_eval_summary       # what the UI shows of it
    shown = _sae_eval_summary(read_sae_eval_result(tmp_path / f"e-auto-{Path(s.path).name}"))
    assert shown.startswith(f"held_out, {int(is_held.sum()):,} tokens")
    assert "explained var. (around mean)" in shown
    r, m = ev("train")
    assert m["split"] == "in_sample" and m["metrics"]["n_tokens"] == int((~is_held).sum())
    assert m["metrics"]["total_variance"] == pytest.approx(_total_var(X[~is_held]), rel=1e-6)
    other = write_store(tmp_path / "other", {"h": X[:1000] * 2}, token_ids=torch.zeros(10, 100, dtype=torch.long),
                        attention_mask=torch.ones(10, 100, dtype=torch.bool), doc_ids=torch.arange(10),
                        seq_index=torch.arange(10).repeat_interleave(100), position=torch.arange(100).repeat(10),
                        model_name="tiny-random")
    r, m = ev("auto", other.path)            # another store: all rows, held out by construction
    assert m["split"] == "held_out" and m["metrics"]["n_tokens"] == 1000 and "another store" in m["split_note"]
    from workbench.errors import WorkbenchError
    with pytest.raises(WorkbenchError, match="another store"):
        ev("train", other.path)


def test_train_sae_keeps_the_density_measured_on_more_tokens(shifted_store, tmp_path, monkeypatch):
    """The trainer's firing counts (many tokens) are not replaced by the smaller eval estimate; they are
    what sparsity.safetensors (and so the Neuronpedia export's -6 filter) gets."""
    import analyses.sae as sae_pkg
    from safetensors.torch import load_file
    from workbench.steps import run_step
    s, _, is_held = shifted_store
    real = sae_pkg.train_sae
    hand = torch.full((32,), -3.0)
    hand[:4] = -10.0                          # 4 latents never fired in training
    hand[4:8] = -7.5                          # rare ones: below Neuronpedia's -6 only if mis-estimated

    def with_counts(n_tokens):
        def f(source, **kw):
            sae = real(source, **kw)
            sae.sparsity = hand.clone()
            sae.cfg.metadata.setdefault("workbench", {})["density_tokens"] = n_tokens
            return sae
        return f

    base = {"store": str(s.path), "arch": "topk", "d_sae": 32, "k": 3, "batch_size": 256, "n_tokens": 512,
            "progress": False}
    monkeypatch.setattr(sae_pkg, "train_sae", with_counts(10 ** 8))
    r = run_step("train_sae", {**base, "out": str(tmp_path / "a")})
    assert torch.equal(load_file(tmp_path / "a" / "sparsity.safetensors")["sparsity"], hand)
    assert r.metrics["dead_fraction"] == 4 / 32 and r.metrics["dead_fraction_tokens"] == 10 ** 8
    assert r.summary["density"]["split"] == "in_sample" and r.summary["density"]["n_tokens"] == 10 ** 8
    run_step("export_sae", {"sae": str(tmp_path / "a"), "format": "neuronpedia", "out": str(tmp_path / "np")})
    assert torch.equal(load_file(tmp_path / "np" / "sparsity.safetensors")["sparsity"], hand)
    # fewer training tokens than the evaluation saw: the evaluation's estimate wins, labelled held-out
    monkeypatch.setattr(sae_pkg, "train_sae", with_counts(10))
    r = run_step("train_sae", {**base, "out": str(tmp_path / "b")})
    assert r.metrics["dead_fraction_tokens"] == int(is_held.sum()) and r.summary["density"]["split"] == "held_out"
    assert not torch.equal(load_file(tmp_path / "b" / "sparsity.safetensors")["sparsity"], hand)


def test_explained_variance_around_zero_is_labelled():
    from analyses.sae import evaluate_sae, make_sae
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g) + 5.0          # large mean: the two conventions differ
    X[250:] += 3.0                                        # batches with different means
    sae = make_sae("topk", 16, 32, k=4)
    ev = evaluate_sae(sae, [X[:250], X[250:]])
    Xh = sae.decode(sae.encode(X)).detach().double()
    err = ((X.double() - Xh) ** 2).sum(1).mean()
    assert ev["explained_variance"] == pytest.approx(float(1 - err / _total_var(X)), rel=1e-6)
    assert ev["explained_variance_around_zero"] == pytest.approx(float(1 - err / (X.double() ** 2).sum(1).mean()),
                                                                 rel=1e-6)


def test_eval_sae_ce_uses_held_out_sequences(tmp_path):
    from analyses.sae import make_sae
    from workbench.collector import collect
    from workbench.models import load_model
    from workbench.results import read_result, read_tensors
    from workbench.steps import run_step
    from workbench.steps._sae_eval import split_meta
    hook = "blocks.0.hook_resid_post"
    st = collect(load_model("tiny-random", device="cpu"), [hook], out=tmp_path / "s", max_tokens=600,
                 seq_len=16, batch_size=4, progress=False)
    sp = st.split(0.25, 0)
    assert sp.heldout_seqs.numel() >= 2
    torch.manual_seed(0)
    make_sae("topk", 64, 128, k=8, metadata={"hook_name": hook, "workbench": {"split": split_meta(st, sp)}}
             ).save(tmp_path / "sae")
    r = run_step("eval_sae", {"sae": str(tmp_path / "sae"), "store": str(st.path), "ce_sequences": 100,
                              "device": "cpu", "out": str(tmp_path / "e")})
    m = read_result(tmp_path / "e", "sae_eval")
    used = read_tensors(tmp_path / "e")["ce_sequence_index"]
    assert torch.equal(used, sp.heldout_seqs) and m["ce"]["split"] == "held_out"
    # SAELens' special set (tokenizer pad/sep) plus the store's own specials ([CLS] here)
    assert {0, 101, 102} <= set(m["ce"]["saelens_special_ids"])
    for key in ("ce_loss_recovered", "ce_loss_recovered_se", "ce_loss_recovered_saelens",
                "ce_loss_recovered_saelens_se"):
        assert key in m["ce"] and key in r.metrics
