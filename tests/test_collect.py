"""Collecting activations: equality with a plain HF forward, padding, determinism, resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from workbench.collector import collect
from workbench.errors import WorkbenchError
from workbench.store import ActivationStore

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    from workbench.models import load_model
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny.source, dtype=torch.float32).eval()


def _shard_bytes(store):
    return [p.read_bytes() for p in store.shard_files()]


def _hf_layer_outputs(hf, ids, layers):
    """Residual stream after each decoder layer, by forward hooks on a plain HF model."""
    got = {}
    handles = [hf.model.layers[i].register_forward_hook(
        lambda m, a, out, i=i: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i in layers]
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


def test_rows_equal_plain_hf_forward(tiny, hf_tiny, tmp_path):
    s = collect(tiny, HOOKS, out=tmp_path / "s", max_tokens=700, seq_len=48, batch_size=4,
                progress=False)
    assert s.n_rows == 700 and s.hooks == HOOKS and s.model_name == "tiny-random"
    rows, seqs = s.rows(), s.sequences()
    acts = {h: s.read(h) for h in HOOKS}
    n_checked = 0
    for q in range(s.n_seq):
        sel = (rows["seq_index"] == q).nonzero()[:, 0]
        if len(sel) == 0:
            continue
        m = seqs["attention_mask"][q]
        ids = seqs["token_ids"][q][m][None]            # the sequence alone, unpadded
        ref = _hf_layer_outputs(hf_tiny, ids, [0, 1])
        pos = rows["position"][sel]
        for li, h in enumerate(HOOKS):
            diff = (acts[h][sel] - ref[li][0, pos]).abs().max().item()
            assert diff <= 1e-4, (q, h, diff)
        n_checked += len(sel)
    assert n_checked == s.n_rows
    # sequences are padded windows of one document each; some windows are short
    assert seqs["token_ids"].shape[1] == 48
    assert bool((~seqs["attention_mask"]).any())
    assert torch.equal(seqs["doc_ids"], torch.sort(seqs["doc_ids"]).values)
    docs = s.documents()
    assert docs and docs[0].startswith("stdlib:") and len(docs) == int(seqs["doc_ids"].max()) + 1


def test_padding_and_special_tokens(tiny, tmp_path):
    sp = tiny.special_ids
    ex = collect(tiny, HOOKS[:1], out=tmp_path / "ex", max_tokens=400, seq_len=40, batch_size=3,
                 progress=False)
    rows, seqs = ex.rows(), ex.sequences()
    tok_at = seqs["token_ids"][rows["seq_index"], rows["position"]]
    assert bool(seqs["attention_mask"][rows["seq_index"], rows["position"]].all())   # never padding
    assert not bool(torch.isin(tok_at, torch.tensor([sp["cls"], sp["sep"], sp["pad"]])).any())
    assert int(rows["position"].min()) == 1                      # [CLS] at 0 is not a row
    assert ex.manifest["special_tokens"]["mode"] == "exclude"
    assert sp["cls"] in ex.manifest["special_tokens"]["excluded_ids"]
    # every non-special real token of the complete sequences is a row, in (seq, pos) order
    full = seqs["attention_mask"] & ~torch.isin(seqs["token_ids"], torch.tensor([sp["cls"], sp["sep"]]))
    si, po = full.nonzero(as_tuple=True)
    assert torch.equal(rows["seq_index"], si[:ex.n_rows]) and torch.equal(rows["position"], po[:ex.n_rows])

    inc = collect(tiny, HOOKS[:1], out=tmp_path / "inc", max_tokens=400, seq_len=40, batch_size=3,
                  special_tokens="include", progress=False)
    r2, s2 = inc.rows(), inc.sequences()
    tok2 = s2["token_ids"][r2["seq_index"], r2["position"]]
    assert int((tok2 == sp["cls"]).sum()) >= 2 and int((tok2 == sp["sep"]).sum()) >= 1
    assert bool(s2["attention_mask"][r2["seq_index"], r2["position"]].all())
    assert inc.manifest["special_tokens"]["mode"] == "include"
    cls = collect(tiny, HOOKS[:1], out=tmp_path / "cls", max_tokens=200, seq_len=40, batch_size=3,
                  special_tokens="cls", progress=False)
    r3, s3 = cls.rows(), cls.sequences()
    tok3 = s3["token_ids"][r3["seq_index"], r3["position"]]
    assert int((tok3 == sp["cls"]).sum()) >= 1 and int((tok3 == sp["sep"]).sum()) == 0
    with pytest.raises(WorkbenchError, match="special_tokens"):
        collect(tiny, HOOKS[:1], out=tmp_path / "bad", max_tokens=10, special_tokens="bogus", progress=False)


def test_deterministic_byte_identical(tiny, tmp_path):
    kw = dict(max_tokens=600, seq_len=32, batch_size=4, progress=False, shard_mb=0.05)
    a = collect(tiny, HOOKS, out=tmp_path / "a", **kw)
    b = collect(tiny, HOOKS, out=tmp_path / "b", **kw)
    assert len(a.shard_files()) >= 3
    assert _shard_bytes(a) == _shard_bytes(b)
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
    b.verify()
    # float16 storage: same rows within half precision
    h = collect(tiny, HOOKS, out=tmp_path / "h", dtype="float16", **kw)
    assert h.dtype == torch.float16
    ref = a.read(HOOKS[1])
    assert torch.allclose(h.read(HOOKS[1]).float(), ref, rtol=2e-3, atol=2e-3)


def test_resume_after_ctrl_c(tiny, tmp_path, monkeypatch):
    kw = dict(max_tokens=900, seq_len=32, batch_size=4, progress=False, shard_mb=0.05)
    ref = collect(tiny, HOOKS, out=tmp_path / "ref", **kw)
    calls = [0]
    orig = tiny.run

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(tiny, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny, HOOKS, out=tmp_path / "x", **kw)
    monkeypatch.setattr(tiny, "run", orig)
    with pytest.raises(WorkbenchError, match="incomplete.*resume"):
        ActivationStore.open(tmp_path / "x")
    assert len(list((tmp_path / "x" / "shards").glob("shard-*.safetensors"))) >= 1
    seen = [0]

    def counting(*a, **k):
        seen[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(tiny, "run", counting)
    x = collect(tiny, HOOKS, out=tmp_path / "x", **kw)
    assert _shard_bytes(x) == _shard_bytes(ref)
    assert x.n_rows == ref.n_rows
    assert seen[0] < calls[0] + 100 and seen[0] <= len(ref.shard_files()) - 1   # did not start over


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from workbench.models import load_model
    from workbench.collector import collect
    m = load_model("tiny-random")
    orig = m.run
    def slow(*a, **k):
        time.sleep(0.15)
        return orig(*a, **k)
    m.run = slow
    print("READY", flush=True)
    collect(m, {hooks!r}, out=sys.argv[1], max_tokens=900, seq_len=32, batch_size=4,
            progress=False, shard_mb=0.05)
    print("FINISHED", flush=True)
""")


def test_resume_after_sigkill(tiny, tmp_path):
    kw = dict(max_tokens=900, seq_len=32, batch_size=4, progress=False, shard_mb=0.05)
    ref = collect(tiny, HOOKS, out=tmp_path / "ref", **kw)
    n_ref = len(ref.shard_files())
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(hooks=HOOKS))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            done = list((out / "shards").glob("shard-*.safetensors")) if (out / "shards").exists() else []
            if len(done) >= 2 or p.poll() is not None:
                break
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
        p.stderr.close()
    assert not (out / "manifest.json").exists()
    n_before = len(list((out / "shards").glob("shard-*.safetensors")))
    assert 2 <= n_before < n_ref
    with pytest.raises(WorkbenchError, match="incomplete"):
        ActivationStore.open(out)
    first = out / "shards" / "shard-00000.safetensors"
    kept = first.stat().st_mtime_ns
    resumed = collect(tiny, HOOKS, out=out, **kw)
    assert first.stat().st_mtime_ns == kept          # resumed, not started over
    assert _shard_bytes(resumed) == _shard_bytes(ref)
    resumed.verify()


def test_refuses_store_with_other_settings(tiny, tmp_path):
    kw = dict(seq_len=32, batch_size=4, progress=False)
    s = collect(tiny, HOOKS[:1], out=tmp_path / "s", max_tokens=100, **kw)
    mtime = s.shard_files()[0].stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="different settings.*max_tokens.*overwrite"):
        collect(tiny, HOOKS[:1], out=tmp_path / "s", max_tokens=200, **kw)
    with pytest.raises(FileExistsError, match="different settings.*hooks"):
        collect(tiny, HOOKS, out=tmp_path / "s", max_tokens=100, **kw)
    again = collect(tiny, HOOKS[:1], out=tmp_path / "s", max_tokens=100, **kw)   # same: a no-op
    assert again.n_rows == 100 and again.shard_files()[0].stat().st_mtime_ns == mtime
    new = collect(tiny, HOOKS[:1], out=tmp_path / "s", max_tokens=200, overwrite=True, **kw)
    assert new.n_rows == 200
    # a folder that is not a store is never touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an activation store"):
        collect(tiny, HOOKS[:1], out=other, max_tokens=50, **kw)
    with pytest.raises(FileExistsError, match="not an activation store"):
        collect(tiny, HOOKS[:1], out=other, max_tokens=50, overwrite=True, **kw)
    assert (other / "precious.txt").read_text() == "keep"
    # a partial store with other settings is refused too
    part = tmp_path / "part"
    (part / "shards").mkdir(parents=True)
    (part / "progress.json").write_text(json.dumps({"model": "tiny-random", "hooks": [], "dtype": "float32",
                                                    "seq_len": 64, "settings": {}, "shards": []}))
    with pytest.raises(FileExistsError, match="partial store.*different settings"):
        collect(tiny, HOOKS[:1], out=part, max_tokens=50, **kw)


def test_small_max_tokens_and_bad_input(tiny, tmp_path):
    s = collect(tiny, HOOKS[:1], out=tmp_path / "one", max_tokens=10, seq_len=64, batch_size=16,
                progress=False)
    assert s.n_rows == 10 and s.n_seq == 1          # one smaller batch, cut at exactly 10 rows
    assert s.rows()["position"].tolist() == list(range(1, 11))
    for bad in (0, -5):
        with pytest.raises(WorkbenchError, match="max_tokens"):
            collect(tiny, HOOKS[:1], out=tmp_path / "bad", max_tokens=bad, progress=False)
    with pytest.raises(WorkbenchError, match="unknown hook|closest"):
        collect(tiny, ["blocks.0.hook_resid_pots"], out=tmp_path / "bad", max_tokens=10, progress=False)
    with pytest.raises(WorkbenchError, match="out of range"):
        collect(tiny, ["blocks.9.hook_resid_post"], out=tmp_path / "bad", max_tokens=10, progress=False)
    assert not (tmp_path / "bad").exists()


def test_empty_and_missing_corpus(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    with pytest.raises(WorkbenchError, match="no text"):
        collect(tiny, HOOKS[:1], corpus=str(empty), out=tmp_path / "e", max_tokens=10, progress=False)
    t = time.time()
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        collect("no-such-model-should-not-load", HOOKS[:1], corpus=str(tmp_path / "missing.txt"),
                out=tmp_path / "m", max_tokens=10, progress=False)
    assert time.time() - t < 5                       # fails before loading any model


def test_small_corpus_runs_out(tiny, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    with pytest.warns(UserWarning, match="ran out"):
        s = collect(tiny, HOOKS[:1], corpus=str(f), out=tmp_path / "s", max_tokens=10_000,
                    seq_len=16, batch_size=2, progress=False)
    assert 0 < s.n_rows < 10_000 and s.manifest["collect"]["exhausted"] is True
    assert s.documents() == ["small.txt"] and set(s.sequences()["doc_ids"].tolist()) == {0}


def test_collect_step_and_cli(tmp_path, capsys):
    from workbench.cli import main
    from workbench.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    out = ws.stores / "tiny"
    rc = main(["collect", "--model", "tiny-random", "--hooks", "blocks.{0,1}.hook_resid_post",
               "--max-tokens", "300", "--seq-len", "32", "--batch-size", "4", "--out", str(out),
               "--dtype", "bfloat16", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_rows"] == 300 and res["hooks"] == HOOKS and res["artifacts"]["store"] == str(out)
    assert res["metrics"]["tokens"] == 300 and res["metrics"]["tokens_per_s"] > 0
    assert ActivationStore.open(out).dtype == torch.bfloat16
    run = ws.runs(step="collect")[0]
    assert run.status == "done" and run.artifacts["store"] == "stores/tiny"
    rc = main(["collect", "--model", "tiny-random", "--hooks", "blocks.0.hook_resid_post",
               "--max-tokens", "300", "--out", str(out)])
    assert rc == 2 and "different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_rows_equal_hf(tmp_path):
    from transformers import AutoModel
    from workbench.models import load_model, minilm_dir
    m = load_model("minilm-l6")
    s = collect(m, ["blocks.2.hook_resid_post", "blocks.5.hook_resid_post"], out=tmp_path / "s",
                max_tokens=600, seq_len=64, batch_size=4, progress=False)
    hf = AutoModel.from_pretrained(str(minilm_dir())).eval()
    rows, seqs = s.rows(), s.sequences()
    for q in range(s.n_seq):
        sel = (rows["seq_index"] == q).nonzero()[:, 0]
        mask = seqs["attention_mask"][q]
        with torch.no_grad():
            hs = hf(input_ids=seqs["token_ids"][q][mask][None], output_hidden_states=True).hidden_states
        pos = rows["position"][sel]
        for layer, h in ((2, "blocks.2.hook_resid_post"), (5, "blocks.5.hook_resid_post")):
            diff = (s.read(h)[sel] - hs[layer + 1][0, pos]).abs().max().item()
            assert diff <= 1e-4, (q, h, diff)


def test_prepend_bos_needs_a_bos(tiny, tmp_path):
    with pytest.raises(WorkbenchError, match="no BOS token"):
        collect(tiny, HOOKS[:1], out=tmp_path / "b", max_tokens=50, prepend_bos=True, progress=False)
    s = collect(tiny, HOOKS[:1], out=tmp_path / "a", max_tokens=50, progress=False)   # auto: no BOS here
    assert s.prepend_bos is False and s.manifest["extra"]["prepend_bos"] is False


@pytest.mark.slow
def test_smollm2_windows_start_with_bos_and_its_row_is_dropped(tmp_path):
    """SmolLM2's tokenizer adds no BOS, so the first text token of every window became an attention
    sink (row norms ~100x the median). As TransformerLens does, the collector prepends BOS for causal
    models and excludes its row; only windows whose first text token is a delimiter keep a sink."""
    from workbench.models import load_model

    smol = load_model("smollm2-135m", device="cpu")
    bos = smol.text_bos_id                 # ChatML tokenizer: <|endoftext|>, not <|im_start|>
    assert smol.tokenizer.convert_ids_to_tokens(bos) == "<|endoftext|>"
    hook = "blocks.15.hook_resid_post"
    kw = dict(max_tokens=1500, seq_len=40, batch_size=8, progress=False)
    s = collect(smol, [hook], out=tmp_path / "bos", **kw)
    rows, seqs = s.rows(), s.sequences()
    assert s.prepend_bos is True and s.manifest["special_tokens"]["special_ids"]["bos"] == bos
    assert bool((seqs["token_ids"][:, 0] == bos).all()) and s.n_seq >= 30
    assert int(rows["position"].min()) == 1                       # the BOS row is not stored
    X = s.read(hook)
    # what is left of the sink: a delimiter ("\n", ".") right after BOS, in a few windows only
    n0 = collect(smol, [hook], out=tmp_path / "nobos", prepend_bos=False, **kw)
    for store, at_most in ((s, 0.4), (n0, 1.0)):
        r, Y = store.rows(), store.read(hook)
        norms = Y.norm(dim=1)
        first = (norms > 10 * norms.median())[r["position"] == int(r["position"].min())]
        assert float(first.float().mean()) <= at_most, (store.prepend_bos, float(first.float().mean()))
    r0 = n0.rows()
    assert n0.prepend_bos is False and int(r0["position"].min()) == 0
    n0n = n0.read(hook).norm(dim=1)
    assert float(n0n[r0["position"] == 0].min() / n0n.median()) > 30   # every window's first row: a sink
    # a row is the model's activation on [BOS] + text at that position
    q = int(rows["seq_index"][0])
    ids = seqs["token_ids"][q][seqs["attention_mask"][q]][None]
    ref = smol.run(ids, torch.ones_like(ids, dtype=torch.bool), [hook])[hook][0]
    sel = (rows["seq_index"] == q).nonzero()[:, 0]
    assert (X[sel] - ref[rows["position"][sel]]).abs().max().item() < 1e-3

