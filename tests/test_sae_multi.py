"""Many SAEs from one pass (analyses.sae.multi) and the from-the-model stream (workbench.model_stream)."""

import shutil

import pytest
import torch

from analyses.sae import SAETrainingError, train_sae
from analyses.sae.multi import train_saes


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2000, 16, generator=g), torch.randn(2000, 24, generator=g) * 2 + 1


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


SPECS = [dict(hook="a", arch="topk", d_sae=32, k=4, seed=3), dict(hook="b", arch="batchtopk", d_sae=48, k=6, seed=3),
         dict(hook="a", arch="relu", d_sae=40, seed=3, lr=1e-3)]
N = 256 * 24


def test_one_pass_equals_separate_runs():
    A, B = _data()
    multi = train_saes({"a": A, "b": B}, SPECS, n_tokens=N, batch_size=256, progress=False)
    alone = [train_sae(A if s["hook"] == "a" else B, **{k: v for k, v in s.items() if k != "hook"},
                       n_tokens=N, batch_size=256, progress=False) for s in SPECS]
    for m, s in zip(multi, alone):
        assert _same(m, s)
    assert multi[1].cfg.metadata["workbench"]["threshold_calibration"]["threshold"] == \
        alone[1].cfg.metadata["workbench"]["threshold_calibration"]["threshold"]


def test_callable_dict_source_equals_separate():
    A, B = _data()

    def src(e):
        p = torch.randperm(2000, generator=torch.Generator().manual_seed(e))
        for i in range(0, 2000, 300):
            yield {"a": A[p[i:i + 300]], "b": B[p[i:i + 300]]}

    multi = train_saes(src, SPECS[:2], n_tokens=N, batch_size=256, progress=False)
    for m, s in zip(multi, SPECS[:2]):
        h = s["hook"]
        alone = train_sae(lambda e, h=h: (b[h] for b in src(e)), **{k: v for k, v in s.items() if k != "hook"},
                          n_tokens=N, batch_size=256, progress=False)
        assert _same(m, alone)


class _Kill(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    A, B = _data()
    specs = [dict(s, checkpoint_dir=str(tmp_path / f"c{i}")) for i, s in enumerate(SPECS)]
    ref = train_saes({"a": A, "b": B}, SPECS, n_tokens=N, batch_size=256, progress=False)

    def kill(i, step, info):
        if i == 1 and step == 17:
            raise _Kill

    with pytest.raises(_Kill):
        train_saes({"a": A, "b": B}, specs, n_tokens=N, batch_size=256, progress=False, checkpoint_every=5,
                   callback=kill)
    shutil.rmtree(tmp_path / "c2")      # SAE 2 starts over while 0 and 1 resume from step 15
    out = train_saes({"a": A, "b": B}, specs, n_tokens=N, batch_size=256, progress=False, checkpoint_every=5)
    for m, r in zip(out, ref):
        assert _same(m, r)


def test_bad_inputs():
    A, B = _data()
    with pytest.raises(ValueError, match="hook 'c'"):
        train_saes({"a": A, "b": B}, [dict(hook="c", d_sae=8, k=2)], n_tokens=512, batch_size=256, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        train_saes({"a": A}, [], progress=False)


def test_divergent_sae_does_not_stop_the_others():
    A, B = _data()
    specs = [dict(hook="a", arch="topk", d_sae=32, k=4, lr=1e6), dict(hook="b", arch="topk", d_sae=32, k=4)]
    out = train_saes({"a": A, "b": B * 1e3}, specs, n_tokens=N, batch_size=256, progress=False, on_error="keep")
    assert isinstance(out[0], SAETrainingError) and not isinstance(out[1], Exception)


# ----------------------------------------------------------------------------- from the model

@pytest.fixture(scope="module")
def tiny():
    from workbench.models import load_model
    return load_model("tiny-random", device="cpu")


HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _stream(tiny, **kw):
    from workbench.model_stream import ModelStream
    return ModelStream(tiny, HOOKS, "builtin", seq_len=32, buffer_tokens=kw.pop("buffer_tokens", 512),
                       seed=kw.pop("seed", 1), **kw)


def test_stream_deterministic_resumable_and_mixes(tiny):
    ms = _stream(tiny)
    r = ms.open(64, ms.start)
    ref = [r.next() for _ in range(12)]
    again = ms.open(64, ms.start)
    assert all(torch.equal(again.next()[h], ref[i][h]) for i in range(12) for h in HOOKS[:1])
    r2 = ms.open(64, ms.start)
    [r2.next() for _ in range(5)]
    r3 = ms.open(64, r2.state())             # a fresh reader at the saved position (after a kill)
    for i in range(5, 12):
        b = r3.next()
        assert all(torch.equal(b[h], ref[i][h]) for h in HOOKS)
    # mixing: one batch holds rows of many windows, and another seed gives another order
    import itertools
    wins = list(itertools.islice(ms._windows(False), 16))       # chunks 0 and 1 (8 windows each)
    per = [ms._forward([w])[HOOKS[0]] for w in wins]
    owner = {tuple(r.tolist()): i for i, rows in enumerate(per) for r in rows}

    def windows_of(batch):
        return [owner[tuple(r.tolist())] for r in batch[HOOKS[0]] if tuple(r.tolist()) in owner]

    first = windows_of(ref[0])
    assert len(first) == 64 and len(set(first)) >= 6 and first != sorted(first)   # many windows, shuffled
    n0 = sum(int(p.shape[0]) for p in per[:8]) // 2                 # cycle 0 serves half of chunk 0
    r4 = ms.open(64, (1, 0))                                        # cycle 1: the rest of chunk 0 + half of 1
    w1 = [w for _ in range(3) for w in windows_of(r4.next())]
    assert min(w1) < 8 <= max(w1) and n0 > 64
    other = _stream(tiny, seed=2).open(64, (0, 0)).next()
    assert not torch.equal(other[HOOKS[0]], ref[0][HOOKS[0]])


def test_stream_holds_out_documents(tiny):
    from workbench.model_stream import is_heldout
    ms = _stream(tiny, holdout=0.2)
    train_docs = {w.doc_id for w in __import__("itertools").islice(ms._windows(False), 200)}
    held_docs = {w.doc_id for w in __import__("itertools").islice(ms._windows(True), 50)}
    assert train_docs and held_docs and not (train_docs & held_docs)
    assert all(is_heldout(d, 0.2, 0) for d in held_docs)


def test_from_model_resume_equals_uninterrupted(tiny, tmp_path):
    specs = [dict(hook=HOOKS[0], d_sae=64, k=4, seed=0), dict(hook=HOOKS[1], d_sae=128, k=8, seed=1)]
    ref = train_saes(_stream(tiny), specs, n_tokens=64 * 12, batch_size=64, progress=False)
    ck = [dict(s, checkpoint_dir=str(tmp_path / f"c{i}")) for i, s in enumerate(specs)]

    def kill(i, step, info):
        if step == 9:
            raise _Kill

    with pytest.raises(_Kill):
        train_saes(_stream(tiny), ck, n_tokens=64 * 12, batch_size=64, progress=False, checkpoint_every=4,
                   callback=kill)
    out = train_saes(_stream(tiny), ck, n_tokens=64 * 12, batch_size=64, progress=False, checkpoint_every=4)
    for m, r in zip(out, ref):
        assert _same(m, r)


def test_buffer_smaller_than_batch(tiny):
    from workbench.errors import WorkbenchError
    with pytest.raises(WorkbenchError, match="smaller than one batch"):
        train_saes(_stream(tiny, buffer_tokens=256), [dict(hook=HOOKS[0], d_sae=64, k=4)], n_tokens=4096,
                   batch_size=512, progress=False)


def test_corpus_ends_before_budget(tiny, tmp_path):
    from workbench.model_stream import ModelStream
    (tmp_path / "c.txt").write_text("A short corpus. " * 40)
    ms = ModelStream(tiny, HOOKS[:1], str(tmp_path / "c.txt"), seq_len=32, buffer_tokens=256, holdout=0)
    sae, = train_saes(ms, [dict(hook=HOOKS[0], d_sae=64, k=4)], n_tokens=10 ** 6, batch_size=32, progress=False)
    ex = sae.cfg.metadata["workbench"]["data_exhausted"]
    assert 0 < ex["tokens"] < 10 ** 6 and sae.cfg.metadata["workbench"]["n_tokens"] == ex["tokens"]


# ----------------------------------------------------------------------------- CLI

def _store(path, hooks=("blocks.3.hook_resid_post", "blocks.6.hook_resid_post")):
    from workbench.store import write_store
    n_seq, L = 40, 16
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 100, (n_seq, L), generator=g)
    mask = torch.ones(n_seq, L, dtype=torch.bool)
    si, po = torch.arange(n_seq).repeat_interleave(L), torch.arange(L).repeat(n_seq)
    acts = {h: torch.randn(n_seq * L, 16, generator=g) for h in hooks}
    return write_store(path, acts, tok, mask, torch.arange(n_seq) // 2, si, po, "synthetic")


def test_cli_grid_makes_every_combination(tmp_path, capsys):
    import json
    from analyses.sae import load_sae
    from workbench.cli import main
    _store(tmp_path / "st")
    rc = main(["train-sae", str(tmp_path / "st"), "--hooks", "blocks.{3,6}.hook_resid_post", "--d-sae", "32", "64",
               "--k", "4", "8", "--batch-size", "64", "--eval-tokens", "200", "--out", str(tmp_path / "saes"),
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    got = {(r["hook"], r["d_sae"], r["k"]) for r in res["saes"]}
    assert got == {(h, d, k) for h in ("blocks.3.hook_resid_post", "blocks.6.hook_resid_post") for d in (32, 64)
                   for k in (4, 8)}
    for r in res["saes"]:
        sae = load_sae(r["sae"])
        assert (sae.cfg.d_sae, sae.cfg.k, sae.cfg.metadata["hook_name"]) == (r["d_sae"], r["k"], r["hook"])
        assert "eval" in sae.cfg.metadata["workbench"]
    # the one-value form still trains one SAE into --out itself
    rc = main(["train-sae", str(tmp_path / "st"), "--hook", "blocks.3.hook_resid_post", "--d-sae", "32", "--k", "4",
               "--batch-size", "64", "--eval-tokens", "0", "--out", str(tmp_path / "one"), "--json"])
    assert rc == 0 and (tmp_path / "one" / "cfg.json").exists()


def test_cli_grid_equals_single_runs(tmp_path, capsys):
    """A grid SAE has the weights of `train-sae` run alone with the same settings and seed."""
    from analyses.sae import load_sae
    from workbench.cli import main
    _store(tmp_path / "st")
    common = ["--batch-size", "64", "--eval-tokens", "0", "--k", "4", "--seed", "2"]
    assert main(["train-sae", str(tmp_path / "st"), "--hooks", "blocks.*.hook_resid_post", "--d-sae", "32", "48",
                 "--out", str(tmp_path / "g"), *common]) == 0
    assert main(["train-sae", str(tmp_path / "st"), "--hook", "blocks.6.hook_resid_post", "--d-sae", "48",
                 "--out", str(tmp_path / "one"), *common]) == 0
    a = load_sae(tmp_path / "g" / "topk-blocks.6.hook_resid_post-48")
    assert _same(a, load_sae(tmp_path / "one"))


def test_cli_from_model(tmp_path, capsys):
    import json
    from workbench.cli import main
    rc = main(["train-sae", "--model", "tiny-random", "--corpus", "builtin",
               "--hooks", "blocks.{0,1}.hook_resid_post",
               "--d-sae", "128", "--k", "8", "--n-tokens", "1024", "--batch-size", "128", "--seq-len", "32",
               "--buffer-tokens", "1024", "--eval-tokens", "256", "--device", "cpu", "--out", str(tmp_path / "m"),
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["saes"]) == 2 and all(r["metrics"]["fvu"] > 0 for r in res["saes"])
    rc = main(["train-sae", "--model", "tiny-random", "--hooks", "blocks.0.hook_resid_post", "--n-tokens", "1024",
               "--batch-size", "512", "--buffer-tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "x")])
    assert rc == 2 and "smaller than one batch" in capsys.readouterr().err
