"""Training at scale, the bad-input side (issue 12): sweeps' one-pass groups, --keep-store, a grid mixing
models, a corpus shorter than the budget, a full disk (collect and SAE checkpoints)."""

import errno
import json

import pytest
import torch

from workbench.errors import WorkbenchError

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
FROM_MODEL = ["--model", "tiny-random", "--corpus", "builtin", "--seq-len", "32", "--buffer-tokens", "512",
              "--batch-size", "64", "--device", "cpu", "--eval-tokens", "0"]


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny():
    from workbench.models import load_model
    return load_model("tiny-random", device="cpu")


# ----------------------------------------------------------------------------- sweeps: one pass

def _sweep_cfg():
    return {"sweep": {"name": "onepass"},
            "models": [{"spec": "tiny-random", "name": "t", "hooks": ["blocks.{0,1}.hook_resid_post"]}],
            "corpus": {"spec": "builtin", "max_tokens": 3000, "seq_len": 32},
            "train_sae": {"d_sae": [32, 48], "k": 4, "n_tokens": 1024, "batch_size": 64, "eval_tokens": 200}}


def test_sweep_trains_compatible_saes_in_one_pass(tmp_path, monkeypatch):
    import analyses.sae.multi as multi
    import workbench.sweep as sweep
    from analyses.sae import load_sae
    from workbench.steps import run_step
    from workbench.workspace import Workspace
    calls = []
    real = multi.train_saes
    monkeypatch.setattr(multi, "train_saes", lambda src, specs, **kw: calls.append(len(specs)) or
                        real(src, specs, **kw))
    p = sweep.plan(_sweep_cfg(), tmp_path / "ws")
    saes = [n for n in p.order() if n.step == "train_sae"]
    assert len(saes) == 4 and all(sorted(p.groups[n.key]) == sorted(s.key for s in saes) for n in saes)
    df = sweep.run(_sweep_cfg(), workspace=tmp_path / "ws", progress=False)
    assert set(df["outcome"]) == {"done"} and calls == [4]          # one pass for the four SAEs
    ws = Workspace(tmp_path / "ws")
    rows = [r for r in ws.runs(step="train_sae")]
    assert len(rows) == 4 and {r.status for r in rows} == {"done"}
    assert all(r.metrics["one_pass_saes"] == 4 and "fvu" in r.metrics for r in rows)
    # each SAE is exactly what `train-sae` gives alone with its node's config (other folder)
    n = next(s for s in saes if s.config["hook"] == HOOKS[1] and s.config["d_sae"] == 48)
    alone = run_step("train_sae", {**n.config, "out": str(tmp_path / "alone"), "progress": False})
    assert _same(load_sae(n.out), load_sae(tmp_path / "alone"))
    assert alone.metrics["fvu"] == next(r for r in rows if r.config["out"] == n.config["out"]).metrics["fvu"]
    # resumable per SAE: a lost SAE is redone alone, the others stay cached
    import shutil
    ref = load_sae(n.out)
    shutil.rmtree(n.out)
    calls.clear()
    df = sweep.run(_sweep_cfg(), workspace=tmp_path / "ws", progress=False)
    got = dict(zip(df["node"], df["outcome"]))
    assert got[n.key] == "done" and sum(v == "cached" for v in got.values()) == len(got) - 1
    assert _same(load_sae(n.out), ref)


def test_sweep_groups_only_what_shares_a_pass(tmp_path):
    import workbench.sweep as sweep
    cfg = _sweep_cfg()
    cfg["train_sae"]["seed"] = [0, 1]              # another seed = another data order: its own pass
    p = sweep.plan(cfg, tmp_path / "ws", create=False)
    groups = {tuple(sorted(g)) for g in p.groups.values()}
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    assert all(len({p.nodes[k].config["seed"] for k in g}) == 1 for g in groups)
    assert "one pass: 2 group(s)" in sweep.execute.__globals__["dry_run_text"](p)


# ----------------------------------------------------------------------------- --keep-store

def test_keep_store_writes_the_collected_store_and_resumes(tmp_path, tiny, capsys):
    from analyses.sae import load_sae
    from workbench.cli import main
    from workbench.collector import collect
    from workbench.store import ActivationStore
    common = FROM_MODEL + ["--hooks", "blocks.{0,1}.hook_resid_post", "--d-sae", "64", "--k", "4",
                           "--n-tokens", "1024"]
    assert main(["train-sae", *common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["train-sae", *common, "--keep-store", str(tmp_path / "st"), "--out", str(tmp_path / "kept"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kept_store"]["status"] == "new" and res["kept_store"]["rows"] > 1024
    for h in HOOKS:                     # writing the store changes nothing in training
        name = f"topk-{h}-64"
        assert _same(load_sae(tmp_path / "plain" / name), load_sae(tmp_path / "kept" / name))
    st = ActivationStore.open(tmp_path / "st", verify=True)
    # the same rows as `collect` of the same corpus prefix (held-out documents included, corpus order)
    ref = collect(tiny, HOOKS, "builtin", out=tmp_path / "ref", max_tokens=st.n_rows, seq_len=32,
                  dtype="float32", progress=False)
    assert torch.equal(st.sequences()["token_ids"], ref.sequences()["token_ids"])
    assert torch.equal(st.sequences()["doc_ids"], ref.sequences()["doc_ids"])
    for h in HOOKS:
        assert torch.allclose(st.read(h), ref.read(h), atol=1e-5)
    # the same store again: reused as it is; a different one: refused, saying what differs
    assert main(["train-sae", *common, "--keep-store", str(tmp_path / "st"), "--out", str(tmp_path / "k2"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept_store"]["status"] == "reused"
    rc = main(["train-sae", *[("48" if a == "32" else a) for a in common], "--keep-store", str(tmp_path / "st"),
               "--out", str(tmp_path / "k3")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a different activation store" in err and "seq_len" in err
    assert not (tmp_path / "k3").exists() or not any((tmp_path / "k3").rglob("cfg.json"))


class _Kill(Exception):
    pass


def test_keep_store_resumes_after_a_kill(tmp_path, tiny):
    from analyses.sae.multi import train_saes
    from workbench.model_stream import ModelStream
    from workbench.store import ActivationStore

    def stream(path):
        return ModelStream(tiny, HOOKS, "builtin", seq_len=32, buffer_tokens=512, seed=1, keep_store=str(path))
    specs = [dict(hook=HOOKS[0], d_sae=64, k=4, seed=0)]
    ms = stream(tmp_path / "ref")
    train_saes(ms, specs, n_tokens=64 * 40, batch_size=64, progress=False)
    ms.finish_store()

    def kill(i, step, info):
        if step == 25:
            raise _Kill
    ck = [dict(specs[0], checkpoint_dir=str(tmp_path / "ck"))]
    with pytest.raises(_Kill):
        train_saes(stream(tmp_path / "st"), ck, n_tokens=64 * 40, batch_size=64, progress=False,
                   checkpoint_every=10, callback=kill)
    assert not (tmp_path / "st" / "manifest.json").exists() and (tmp_path / "st" / "progress.json").exists()
    (tmp_path / "st" / "shards" / "shard-00001.safetensors").unlink()    # lost too: recomputed on the way
    ms = stream(tmp_path / "st")
    assert ms.kept["status"] == "resumed"
    train_saes(ms, ck, n_tokens=64 * 40, batch_size=64, progress=False, checkpoint_every=10)
    ms.finish_store()
    a, b = ActivationStore.open(tmp_path / "st", verify=True), ActivationStore.open(tmp_path / "ref")
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


# ----------------------------------------------------------------------------- bad input

def _store(path, model="synthetic"):
    from workbench.store import write_store
    n_seq, L = 40, 16
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 100, (n_seq, L), generator=g)
    si, po = torch.arange(n_seq).repeat_interleave(L), torch.arange(L).repeat(n_seq)
    acts = {h: torch.randn(n_seq * L, 16, generator=g) for h in HOOKS}
    return write_store(path, acts, tok, torch.ones(n_seq, L, dtype=torch.bool), torch.arange(n_seq) // 2, si, po,
                       model)


def test_grid_mixing_models_is_refused(tmp_path, capsys):
    from workbench.cli import main
    rc = main(["train-sae", "--model", "tiny-random", "--model", "tiny-random:layers=3", "--hooks", HOOKS[0],
               "--n-tokens", "512", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "several models" in err and "tiny-random:layers=3" in err
    rc = main(["train-sae", *FROM_MODEL, "--hooks", f"gpt2:{HOOKS[0]}", HOOKS[1], "--n-tokens", "512",
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "names models gpt2" in err
    _store(tmp_path / "st")
    rc = main(["train-sae", str(tmp_path / "st"), "--hooks", f"other:{HOOKS[0]}", f"synthetic:{HOOKS[1]}",
               "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "names models other" in err and "synthetic" in err
    # the store's own model as prefix is fine
    assert main(["train-sae", str(tmp_path / "st"), "--hooks", f"synthetic:{HOOKS[0]}", f"synthetic:{HOOKS[1]}",
                 "--d-sae", "32", "--k", "4", "--batch-size", "64", "--eval-tokens", "0",
                 "--out", str(tmp_path / "d")]) == 0


def test_corpus_shorter_than_the_budget_still_finishes(tmp_path, capsys, caplog):
    from workbench.cli import main
    (tmp_path / "c.txt").write_text("A short corpus about nothing much. " * 60)
    rc = main(["train-sae", *[str(tmp_path / "c.txt") if a == "builtin" else a for a in FROM_MODEL],
               "--hooks", HOOKS[0], "--d-sae", "64", "--k", "4", "--n-tokens", "1000000", "--holdout", "0",
               "--out", str(tmp_path / "s"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    ex = res["data_exhausted"]
    assert 0 < ex["tokens"] < ex["budget_tokens"] == 1_000_000 // 64 * 64
    assert res["saes"][0]["n_tokens"] == ex["tokens"]
    assert (tmp_path / "s" / f"topk-{HOOKS[0]}-64" / "cfg.json").exists()
    assert f"{ex['tokens']} of {ex['budget_tokens']} tokens" in caplog.text


# ----------------------------------------------------------------------------- disk full

def _enospc_after(n):
    seen = {"n": 0}

    def fail(*a, **k):
        seen["n"] += 1
        if seen["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fail.real(*a, **k)
    return fail


def test_collect_out_of_disk_is_clear_and_resumes(tmp_path, tiny, monkeypatch):
    import workbench.store as store_mod
    from workbench.collector import collect
    kw = dict(max_tokens=2000, seq_len=32, batch_size=4, dtype="float32", progress=False, shard_mb=0.05)
    ref = collect(tiny, HOOKS, "builtin", out=tmp_path / "ref", **kw)
    assert len(ref.shard_files()) >= 4
    fail = _enospc_after(2)
    fail.real = store_mod.atomic_write_bytes
    monkeypatch.setattr(store_mod, "atomic_write_bytes", fail)
    with pytest.raises(WorkbenchError, match=r"no space left on the disk of .*st .* free; the next shard needs"):
        collect(tiny, HOOKS, "builtin", out=tmp_path / "st", **kw)
    monkeypatch.undo()
    prog = json.loads((tmp_path / "st" / "progress.json").read_text())
    assert len(prog["shards"]) == 2                      # the complete shards are kept, no half one listed
    st = collect(tiny, HOOKS, "builtin", out=tmp_path / "st", **kw)     # rerun: resumes
    for h in HOOKS:
        assert torch.equal(st.read(h), ref.read(h))
    st.verify()


def test_sae_checkpoint_out_of_disk_keeps_the_last_one_and_resumes(tmp_path, monkeypatch, capsys):
    import analyses.sae.train as train_mod
    from analyses.sae import load_sae
    from workbench.cli import main
    _store(tmp_path / "st")
    args = ["train-sae", str(tmp_path / "st"), "--hooks", "blocks.{0,1}.hook_resid_post", "--d-sae", "32",
            "--k", "4", "--batch-size", "64", "--n-tokens", "1280", "--checkpoint-every", "5", "--eval-tokens", "0"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    fail = _enospc_after(2)                   # both SAEs' first checkpoints are written, the next ones fail
    fail.real = train_mod._atomic_save
    monkeypatch.setattr(train_mod, "_atomic_save", fail)
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk of" in err and str(tmp_path / "x") in err and "checkpoints" in err
    monkeypatch.undo()
    for h in HOOKS:
        ck = torch.load(tmp_path / "x" / f"topk-{h}-32" / ".checkpoints" / "checkpoint.pt", weights_only=False)
        assert ck["step"] == 5                  # intact: the last complete one
    assert main([*args, "--out", str(tmp_path / "x")]) == 0           # rerun resumes
    for h in HOOKS:
        assert _same(load_sae(tmp_path / "x" / f"topk-{h}-32"), load_sae(tmp_path / "ref" / f"topk-{h}-32"))
