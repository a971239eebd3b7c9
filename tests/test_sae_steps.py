"""SAE steps through run_step: train-sae on a synthetic store, eval-sae, export-sae, errors."""

import json

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
    assert (tmp_path / "sp" / "blocks.0.hook_resid_post" / "sae.safetensors").exists()
    assert r3.summary["format"] == "sparsify"


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
    from workbench.steps.sae import _ce_metrics

    tiny = load_model("tiny-random", device="cpu")
    hook = "blocks.0.hook_resid_post"
    st = collect(tiny, [hook], out=tmp_path / "s", max_tokens=400, seq_len=24, batch_size=4, progress=False)

    class Zero(torch.nn.Module):          # an "SAE" that reconstructs nothing
        dtype = torch.float32

        def forward(self, x):
            return torch.zeros_like(x)

    got, why = _ce_metrics(Zero(), st, hook, n_seq=6, device="cpu")
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
