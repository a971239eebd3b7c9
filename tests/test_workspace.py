import json
import sqlite3
from dataclasses import dataclass, field

import pytest

from workbench import steps
from workbench.errors import WorkbenchError
from workbench.workspace import Workspace, config_hash


def test_workspace_layout_and_index(tmp_path):
    ws = Workspace(tmp_path / "w")
    for sub in ("stores", "saes", "results"):
        assert (ws.root / sub).is_dir()
    run = ws.start_run("pca", {"k": 3, "store": "stores/a"})
    assert ws.runs()[0].status == "running"
    ws.finish_run(run, "done", metrics={"evr": 0.5}, artifacts={"result": ws.results / "x"})
    got = ws.get_run(run.id[:6])
    assert got.status == "done" and got.metrics == {"evr": 0.5}
    assert got.artifacts == {"result": "results/x"}   # relative: the workspace can move
    assert got.seconds is not None and got.seconds >= 0
    assert Workspace.find(ws.results / "x" / "deeper").root == ws.root
    ws.delete_run(run.id)
    assert ws.runs() == []


def test_open_missing_workspace_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a workspace"):
        Workspace(tmp_path / "nope", create=False)


def test_config_hash_is_order_independent():
    assert config_hash("a", {"x": 1, "y": 2}) == config_hash("a", {"y": 2, "x": 1})
    assert config_hash("a", {"x": 1}) != config_hash("b", {"x": 1})
    assert config_hash("a", {"x": 1}) != config_hash("a", {"x": 2})


@dataclass
class _EchoConfig:
    value: int = field(default=1, metadata=steps.arg("a number"))
    out: str = field(default="", metadata=steps.arg("output", role="out"))
    fail: bool = field(default=False, metadata=steps.arg("raise"))


if "xtest_echo" not in steps.STEPS:
    @steps.register("xtest_echo", _EchoConfig, help="test step")
    def _echo(cfg):
        if cfg.fail:
            raise WorkbenchError("asked to fail")
        return steps.StepResult(summary={"v": cfg.value}, metrics={"double": 2.0 * cfg.value},
                                artifacts={"out": cfg.out})


def test_run_step_records_done_and_failed(tmp_path):
    ws = Workspace(tmp_path / "w")
    res = steps.run_step("xtest_echo", {"value": 3, "out": str(ws.results / "e")}, workspace=ws)
    assert res.summary == {"v": 3} and res.metrics["double"] == 6.0
    with pytest.raises(WorkbenchError, match="asked to fail"):
        steps.run_step("xtest_echo", fail=True, workspace=ws)
    runs = {r.status: r for r in ws.runs()}
    assert runs["done"].metrics["double"] == 6.0 and runs["done"].artifacts == {"out": "results/e"}
    assert "asked to fail" in runs["failed"].error
    # the index is plain SQLite that other tools can read
    con = sqlite3.connect(ws.root / "workbench.db")
    assert con.execute("select count(*) from runs").fetchone()[0] == 2


def test_run_step_finds_workspace_from_out(tmp_path):
    ws = Workspace(tmp_path / "w")
    steps.run_step("xtest_echo", out=str(ws.results / "new"))
    assert len(ws.runs()) == 1


def test_unknown_step_and_option_are_clear():
    with pytest.raises(WorkbenchError, match="xtest_echo"):
        steps.run_step("xtest_ecko")
    with pytest.raises(WorkbenchError, match="valid options: fail, out, value"):
        steps.run_step("xtest_echo", vlaue=2)


def test_cli_generated_from_config(tmp_path, capsys):
    from workbench.cli import main
    ws = Workspace(tmp_path / "w")
    rc = main(["xtest-echo", "--value", "5", "--out",
               str(ws.results / "e"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["v"] == 5 and out["metrics"]["double"] == 10.0 and out["run_id"]
    rc = main(["xtest-echo", "--fail", "--workspace", str(ws.root)])
    assert rc == 2
    assert "asked to fail" in capsys.readouterr().err
    rc = main(["runs", "list", "--workspace", str(ws.root), "--json"])
    assert rc == 0
    assert {r["status"] for r in json.loads(capsys.readouterr().out)["runs"]} == {"done", "failed"}


def test_public_api_names_survive_submodule_imports():
    import workbench
    import workbench.steps  # imports every step module (and through them the data layer)
    assert callable(workbench.collect) and callable(workbench.load_model)
    assert workbench.ActivationStore.__name__ == "ActivationStore"


def test_prepare_out_never_deletes_foreign_folders(tmp_path):
    from workbench.results import PARTIAL_MARKER, prepare_out, write_result
    mine = tmp_path / "user-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_out(mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    out = prepare_out(tmp_path / "r", overwrite=False)          # new: marked partial until complete
    (out / "half.bin").write_bytes(b"x")
    assert (out / PARTIAL_MARKER).exists()
    prepare_out(out, overwrite=False)                           # half-written by us: cleared
    assert not (out / "half.bin").exists()
    write_result(out, "pca", {"k": 1})
    assert not (out / PARTIAL_MARKER).exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out(out, overwrite=False)                       # complete: kept unless asked
