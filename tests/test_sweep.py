"""Sweeps on tiny-random models: complete, resume after SIGKILL, isolate failures, validate files
up front, dry-run, results table. (The Ray executor: tests/test_sweep_ray.py.)"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import workbench.sweep as sweep
from workbench.results import prepare_out, write_result
from workbench.steps import STEPS, StepResult, arg, register
from workbench.sweep import SweepError
from workbench.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---------------------------------------------------------------- a test-only step that can hang
@dataclass
class HangConfig:
    store: str = field(metadata=arg("store", positional=True, role="store"))
    out: str = field(default="", metadata=arg("output folder", role="out"))


if "sweeptest_hang" not in STEPS:
    @register("sweeptest_hang", HangConfig, help="test only: writes part of a result, then hangs "
              "while $SWEEPTEST_HANG is set")
    def _hang(cfg: HangConfig) -> StepResult:
        out = prepare_out(cfg.out, overwrite=False)
        (out / "partial.bin").write_bytes(b"half")
        if os.environ.get("SWEEPTEST_HANG"):
            time.sleep(600)
        write_result(out, "sweeptest", {"store": Path(cfg.store).name})
        return StepResult(metrics={"ok": 1.0}, artifacts={"result": cfg.out})


@pytest.fixture(scope="module", autouse=True)
def _unregister_test_step():
    yield
    STEPS.pop("sweeptest_hang", None)     # keep the CLI of later tests free of it


def tiny_sweep(name="tiny", hang=False, **extra) -> dict:
    d = {
        "sweep": {"name": name, "imports": ["test_sweep"] if hang else []},
        "models": [{"spec": "tiny-random", "name": "tiny", "hooks": ["blocks.*.hook_resid_post"]}],
        "corpus": {"spec": "builtin", "max_tokens": 1024, "seq_len": 32},
        "collect": {"batch_size": 8, "progress": False},
        "pca": {"k": 8},
    }
    if hang:
        d["sweeptest_hang"] = {}
    d.update({
        "train_sae": {"arch": ["topk"], "d_sae": [64], "k": [4, 8], "hooks": ["blocks.1.*"],
                      "progress": False},
        "eval_sae": {},
        "compare": {"metrics": ["linear_cka"]},
    })
    d.update(extra)
    return {k: v for k, v in d.items() if k in ("sweep", "models", "corpus") or k in STEPS}


def _toml(d: dict) -> str:
    """Tiny TOML writer for the dicts above (tables of scalars / lists / list-of-tables)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        return "[" + ", ".join(val(x) for x in v) + "]"
    lines = []
    for table, body in d.items():
        items = body if isinstance(body, list) else [body]
        for b in items:
            lines.append(f"[[{table}]]" if isinstance(body, list) else f"[{table}]")
            lines += [f"{k} = {val(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


def _done_counts(ws: Path) -> dict[str, int]:
    """(step, config_hash) -> number of `done` runs in the index."""
    con = sqlite3.connect(ws / "workbench.db")
    rows = con.execute("SELECT step, config, status FROM runs").fetchall()
    con.close()
    counts: dict[str, int] = {}
    for step, cfg, status in rows:
        if status == "done":
            key = step + " " + json.loads(cfg).get("out", "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def _n_runs(ws: Path) -> int:
    if not (ws / "workbench.db").exists():
        return 0
    con = sqlite3.connect(ws / "workbench.db")
    n = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    con.close()
    return n


def _results_by_identity(df) -> dict[str, dict]:
    """identity -> metrics (without timings) of each node that completed."""
    out = {}
    for r in df.to_dict("records"):
        if r["outcome"] in ("done", "cached"):
            out[r["identity"]] = {k: v for k, v in r.items() if k.startswith("metrics.")
                                  and "second" not in k and "per_s" not in k and v == v}
    return out


def _tensor_files(ws: Path) -> dict[str, "object"]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(ws.rglob("*.safetensors")):
        # folder names end in the node identity, which does not depend on the workspace
        out[str(f.relative_to(ws))] = load_file(f)
    return out


def _assert_same_results(ws_a: Path, df_a, ws_b: Path, df_b):
    import torch
    ra, rb = _results_by_identity(df_a), _results_by_identity(df_b)
    assert ra.keys() == rb.keys()
    for ident in ra:
        for k in ra[ident]:
            assert ra[ident][k] == pytest.approx(rb[ident][k], rel=1e-4, abs=1e-6), (ident, k)
    ta, tb = _tensor_files(ws_a), _tensor_files(ws_b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        for t in ta[name]:
            if ta[name][t].is_floating_point():
                assert torch.allclose(ta[name][t].float(), tb[name][t].float(), atol=1e-5), (name, t)
            else:
                assert torch.equal(ta[name][t], tb[name][t]), (name, t)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run of the tiny sweep (with the hang step, not hanging)."""
    ws = tmp_path_factory.mktemp("base") / "ws"
    df = sweep.run(tiny_sweep(hang=True), workspace=ws, progress=False)
    return ws, df


# ---------------------------------------------------------------- tests
def test_sweep_completes_and_rerun_skips(baseline):
    ws, df = baseline
    assert set(df["outcome"]) == {"done"}, df[["node", "outcome", "error"]]
    steps = set(df["step"])
    assert {"collect", "pca", "train_sae", "eval_sae", "compare", "sweeptest_hang"} <= steps
    assert (df["step"] == "train_sae").sum() == 2          # grid: k in (4, 8) on one hook
    assert (df["step"] == "pca").sum() == 2                # one per hook (2 layers)
    # artefacts live in the workspace under folders named by identity
    for r in df.to_dict("records"):
        assert r["sweep"] == "tiny"
    before = _n_runs(ws)
    df2 = sweep.run(tiny_sweep(hang=True), workspace=ws, progress=False)
    assert set(df2["outcome"]) == {"cached"}
    assert _n_runs(ws) == before                            # nothing ran again
    assert list(df2["id"]) == list(df["id"])


def test_killed_sweep_resumes_without_redoing(baseline, tmp_path):
    ws = tmp_path / "ws"
    f = tmp_path / "tiny.toml"
    f.write_text(_toml(tiny_sweep(hang=True)))
    env = dict(os.environ, SWEEPTEST_HANG="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([PY, "-m", "workbench.cli", "sweep", str(f), "--workspace", str(ws)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            if (ws / "workbench.db").exists():
                con = sqlite3.connect(ws / "workbench.db")
                try:
                    hung = con.execute("SELECT COUNT(*) FROM runs WHERE step='sweeptest_hang' "
                                       "AND status='running'").fetchone()[0]
                except sqlite3.OperationalError:      # index being created
                    hung = 0
                finally:
                    con.close()
                if hung:
                    break
            if proc.poll() is not None:
                pytest.fail("sweep ended before it was killed: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        else:
            pytest.fail("the hang step never started")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = _done_counts(ws)
    assert done_before and all(v == 1 for v in done_before.values())
    hang_dirs = list((ws / "results").glob("sweeptest_hang*"))
    assert hang_dirs and (hang_dirs[0] / "partial.bin").exists()       # half-written
    assert not (hang_dirs[0] / "result.json").exists()
    # dry run knows what is done and what is not
    out = subprocess.run([PY, "-m", "workbench.cli", "sweep", str(f), "--workspace", str(ws),
                          "--dry-run", "--json"], env=env, capture_output=True, text=True, check=True)
    plan = {s["key"]: s["status"] for s in json.loads(out.stdout)["steps"]}
    assert plan["collect/tiny"] == "done"
    assert plan["sweeptest_hang/tiny"] == "redo"
    assert "pending" in plan.values()

    df = sweep.run(tiny_sweep(hang=True), workspace=ws, progress=False)   # not hanging now
    assert set(df["outcome"]) == {"done", "cached"}
    cached = set(df.loc[df["outcome"] == "cached", "step"] + " " +
                 df.loc[df["outcome"] == "cached", "config.out"])
    assert cached == set(done_before)                       # everything completed is reused ...
    after = _done_counts(ws)
    assert all(v == 1 for v in after.values())              # ... and each step ran once
    assert len(after) == len(df)
    # the interrupted run is recorded as such
    wsx = Workspace(ws, create=False)
    interrupted = [r for r in wsx.runs(step="sweeptest_hang") if r.status == "failed"]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0].error
    _assert_same_results(baseline[0], baseline[1], ws, df)


def test_failing_step_is_reported_and_the_rest_completes(tmp_path, capsys):
    from workbench.cli import main
    d = tiny_sweep(name="fails")
    d["train_sae"] = {"arch": "topk", "d_sae": 16, "k": [4, 64], "hooks": ["blocks.1.*"]}
    f = tmp_path / "f.toml"
    f.write_text(_toml(d))
    rc = main(["sweep", str(f), "--workspace", str(tmp_path / "ws")])
    out = capsys.readouterr()
    assert rc == 1
    df = sweep.results_table(tmp_path / "ws")
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and failed["step"].iloc[0] == "train_sae"
    assert failed["config.k"].iloc[0] == 64 and failed["error"].iloc[0]
    assert "failed" in out.out and "skipped" in out.out        # summary table
    # its eval is skipped, everything else done
    df2 = sweep.run(d, workspace=tmp_path / "ws", progress=False)
    outcome = dict(zip(df2["node"], df2["outcome"]))
    assert outcome["train_sae/tiny/blocks.1.hook_resid_post/k=64"] == "failed"
    assert outcome["eval_sae/tiny/blocks.1.hook_resid_post/k=64"] == "skipped"
    assert outcome["eval_sae/tiny/blocks.1.hook_resid_post/k=4"] == "cached"
    assert sum(v == "cached" for v in outcome.values()) == len(outcome) - 2


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["pca"].update(kk=3), ["[pca].kk", "(did you mean k?)"]),
    (lambda d: d["pca"].update(k="many"), ["[pca].k", "expected int"]),
    (lambda d: d["train_sae"].update(arch=["topk", "nope"]), ["[train_sae].arch", "'nope'", "batchtopk"]),
    (lambda d: d["compare"].update(metrics=["cka2"]), ["[compare].metrics", "'cka2'", "linear_cka"]),
    (lambda d: d["pca"].update(hook="blocks.0.hook_resid_post"), ["[pca].hook", "set by the sweep"]),
    (lambda d: d.update(tables={"x": 1}), ["[tables]", "unknown table"]),
    (lambda d: d["sweep"].update(executor="dask"), ["[sweep].executor", "local, ray"]),
    (lambda d: d["compare"].update(across=[["tiny", "other"]]), ["[compare].across", "'other'"]),
    (lambda d: d["models"][0].update(hooks=["blocks.*.hook_nope"]), ["[[models]] #1", "hook_nope"]),
    (lambda d: d["models"][0].update(hooks=["blocks.7.hook_resid_post"]), ["[[models]] #1"]),
    (lambda d: d["corpus"].update(seq=4), ["[corpus].seq", "seq_len"]),
    (lambda d: d.pop("models"), ["[[models]]"]),
])
def test_invalid_sweeps_fail_up_front(tmp_path, baseline, mutate, expect):
    d = tiny_sweep()
    mutate(d)
    f = tmp_path / "bad.toml"
    f.write_text(_toml(d))
    ws = baseline[0]
    n = _n_runs(ws)
    with pytest.raises(SweepError) as e:
        sweep.run(f, workspace=ws, progress=False)
    for s in expect:
        assert s in str(e.value), str(e.value)
    assert _n_runs(ws) == n                                  # index untouched
    fresh = tmp_path / "fresh"
    with pytest.raises(SweepError):
        sweep.run(f, workspace=fresh, progress=False)
    assert not fresh.exists()                                # nothing created


def test_error_messages_carry_line_numbers_and_cli_exits_2(tmp_path, capsys):
    from workbench.cli import main
    f = tmp_path / "bad.toml"
    f.write_text('[sweep]\nname = "x"\n\n[[models]]\nspec = "tiny-random"\nhooks = ["blocks.0.hook_resid_post"]\n'
                 '[corpus]\nspec = "builtin"\n[pca]\nk = 4\nwidth = 3\n')
    assert main(["sweep", str(f), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert f"{f}:11: [pca].width" in err
    f.write_text("[sweep\n")
    assert main(["sweep", str(f), "--workspace", str(tmp_path / "ws")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_dry_run_shows_pending_and_done(tmp_path, capsys, baseline):
    from workbench.cli import main
    f = tmp_path / "s.toml"
    f.write_text(_toml(tiny_sweep(hang=True)))
    assert main(["sweep", str(f), "--workspace", str(tmp_path / "new"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pending  collect/tiny" in out and "done " not in out
    assert not (tmp_path / "new").exists()
    assert main(["sweep", str(f), "--workspace", str(baseline[0]), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in plan["steps"]} == {"done"}
    deps = {s["key"]: s["deps"] for s in plan["steps"]}
    assert deps["pca/tiny/blocks.0.hook_resid_post"] == ["collect/tiny"]
    assert deps["eval_sae/tiny/blocks.1.hook_resid_post/k=4"] == [
        "train_sae/tiny/blocks.1.hook_resid_post/k=4", "collect/tiny"]


def test_results_table_and_export(baseline, tmp_path):
    import pandas as pd
    from workbench.cli import main
    ws, df = baseline
    t = sweep.results_table(ws)
    assert len(t) == len(df) and set(t["status"]) == {"done"}
    for col in ("id", "step", "status", "config_hash", "started", "seconds", "sweep",
                "config.k", "metrics.seconds", "artifacts.result"):
        assert col in t.columns, col
    assert t["seconds"].notna().all()
    for out in ("x.csv", "x.parquet"):
        assert main(["runs", "export", "--workspace", str(ws), "--out", str(tmp_path / out)]) == 0
    back = pd.read_parquet(tmp_path / "x.parquet")
    assert list(back["id"]) == list(t["id"])
    assert len(pd.read_csv(tmp_path / "x.csv")) == len(t)


def test_examples_validate():
    """Every example sweep file passes validation (no model is loaded)."""
    for f in sorted((ROOT / "examples").glob("*.toml")):
        spec = sweep.load(f)
        assert spec.models and spec.steps, f


# ---------------------------------------------------------------- [match_saes]: pairs of SAEs
def match_sweep(**over) -> dict:
    d = {"sweep": {"name": "pairs"},
         "models": [{"spec": "tiny-random", "name": "tiny", "hooks": ["blocks.*.hook_resid_post"]}],
         "corpus": {"spec": "builtin", "max_tokens": 512, "seq_len": 32},
         "collect": {"batch_size": 8, "progress": False},
         "train_sae": {"d_sae": 16, "k": 4, "seed": [0, 1], "eval_tokens": 0, "progress": False},
         "match_saes": {"pairs": ["seed", "layer"], "n_shuffles": 3, "threshold": 0.25}}
    d.update(over)
    return d


def test_match_saes_pairs_seeds_and_layers_and_writes_the_layer_matrix(tmp_path):
    from workbench.steps.match import read_match_result
    from workbench.steps.match_layers import read_match_layers_result
    ws = tmp_path / "ws"
    df = sweep.run(match_sweep(), workspace=ws, progress=False)
    assert set(df["outcome"]) == {"done"}, df[["node", "outcome", "error"]]
    nodes = {n.key: n for n in sweep.plan(match_sweep(), ws).order()}
    saes = {(n.labels["hook"], n.labels["seed"]): n for n in nodes.values() if n.step == "train_sae"}
    h0, h1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    matches = [n for n in nodes.values() if n.step == "match_saes"]
    # seed pairs: same hook, seeds 0 and 1; layer pairs: hooks 0 and 1 AND different seeds (one
    # seed is one initial dictionary: a same-seed pair would match partly by its initialisation)
    want = {(saes[(h, 0)].key, saes[(h, 1)].key) for h in (h0, h1)} | \
           {(saes[(h0, s)].key, saes[(h1, 1 - s)].key) for s in (0, 1)}
    assert {(n.labels["sae"], n.labels["sae_b"]) for n in matches} == want
    for n in matches:
        r = read_match_result(n.out)
        assert Path(n.out).parent == ws.resolve() / "results"          # the one output rule
        assert (r.sae_a, r.sae_b) == (nodes[n.labels["sae"]].out, nodes[n.labels["sae_b"]].out)
        assert r.align == "same" and r.meta["hook_a"] == n.labels["hook"] and r.meta["hook_b"] == n.labels["hook_b"]
        assert set(n.deps) == {n.labels["sae"], n.labels["sae_b"], "collect/tiny"}
    layers = [n for n in nodes.values() if n.step == "match_layers"]
    assert len(layers) == 2                                           # one per seed
    for n in layers:
        lr = read_match_layers_result(n.out)
        (m,) = [x for x in matches if x.key in n.deps]
        r = read_match_result(m.out)
        assert lr.hooks == [h0, h1] and lr.threshold == r.threshold == 0.25
        assert lr.fraction[0][0] is None and lr.fraction[1][1] is None
        # the cell is the match's own number (computed there from its correlations)
        assert 0 < r.fraction_mutual_above_threshold < 1
        assert lr.fraction[0][1] == lr.fraction[1][0] == pytest.approx(r.fraction_mutual_above_threshold)
        assert lr.svcca[0][1] == pytest.approx(r.scores["svcca"]["score"])
    df2 = sweep.run(match_sweep(), workspace=ws, progress=False)     # identities stable: all cached
    assert set(df2["outcome"]) == {"cached"}


def test_match_saes_width_and_model_pairs_are_planned(tmp_path):
    d = match_sweep(train_sae={"d_sae": [16, 32], "k": 4}, match_saes={"pairs": "width"})
    nodes = sweep.plan(d, tmp_path / "w", create=False).order()
    m = [n for n in nodes if n.step == "match_saes"]
    assert len(m) == 2 and all(n.labels["hook"] == n.labels["hook_b"] for n in m)
    assert {(n.config["sae_a"].split("d_sae_")[1][:2], n.config["sae_b"].split("d_sae_")[1][:2]) for n in m} \
        == {("16", "32")}
    assert not any(n.step == "match_layers" for n in nodes)
    # one seed in the sweep: a layer pair has to share it
    one = match_sweep(train_sae={"d_sae": 16, "k": 4}, match_saes={"pairs": "layer"})
    (n,) = [n for n in sweep.plan(one, tmp_path / "o", create=False).order() if n.step == "match_saes"]
    assert (n.labels["hook"], n.labels["hook_b"]) == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    two = match_sweep(models=[{"spec": "tiny-random", "name": "a", "hooks": ["blocks.1.hook_resid_post"]},
                              {"spec": "tiny-random:layers=2,d_model=32", "name": "b",
                               "hooks": ["blocks.{0,1}.hook_resid_post"]}],
                      train_sae={"d_sae": 16, "k": 4}, match_saes={"pairs": "model", "models": ["a", "b"]})
    m = [n for n in sweep.plan(two, tmp_path / "m", create=False).order() if n.step == "match_saes"]
    assert sorted((n.labels["model"], n.labels["hook"], n.labels["model_b"], n.labels["hook_b"]) for n in m) == [
        ("a", "blocks.1.hook_resid_post", "b", "blocks.0.hook_resid_post"),
        ("a", "blocks.1.hook_resid_post", "b", "blocks.1.hook_resid_post")]
    plan = {n.key: n for n in sweep.plan(two, tmp_path / "m", create=False).order()}
    assert all({"collect/a", "collect/b"} <= set(n.deps) for n in m)
    assert all((n.config["store"], n.config["store_b"]) == (plan["collect/a"].out, plan["collect/b"].out)
               for n in m)


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["match_saes"].pop("pairs"), ["[match_saes].pairs", "missing", "seed"]),
    (lambda d: d["match_saes"].update(pairs=["seed", "colour"]), ["[match_saes].pairs", "'colour'", "width"]),
    (lambda d: d["match_saes"].update(store="x"), ["[match_saes].store", "set by the sweep"]),
    (lambda d: d["match_saes"].update(sae_b="x"), ["[match_saes].sae_b", "set by the sweep"]),
    (lambda d: d.pop("train_sae"), ["[match_saes]", "trains none"]),
    (lambda d: d.update(match_layers={"threshold": 0.5}), ["[match_layers]", "no input the sweep can wire",
                                                           "pairs = \"layer\" adds it"]),
    (lambda d: d["train_sae"].update(seed=0), ["[match_saes].pairs", "differ only in 'seed'", "seed = [0, 1]"]),
    (lambda d: d["match_saes"].update(pairs="model"), ["[match_saes].pairs", "differ only in 'model'"]),
])
def test_invalid_match_saes_tables_fail_up_front(tmp_path, mutate, expect):
    d = match_sweep()
    mutate(d)
    with pytest.raises(SweepError) as e:
        sweep.plan(d, tmp_path / "ws", create=False)
    for s in expect:
        assert s in str(e.value), str(e.value)
    assert not (tmp_path / "ws").exists()
