"""The step protocol: declared field roles wire sweeps and the UI (not field names), one hook
resolver, one output-folder rule, per-thread logging, and bugs told apart from bad input."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pytest

from workbench import steps
from workbench.errors import WorkbenchError
from workbench.hooks import select_hooks
from workbench.steps import STEPS, StepResult, arg, register


# ------------------------------------------------------------ a step whose inputs are renamed
@dataclass
class _RenamedConfig:
    src: str = field(metadata=arg("activations", positional=True, role="store"))
    layer: str = field(default="", metadata=arg("which hook", role="hook"))
    dest: str = field(default="", metadata=arg("where to write", role="out"))
    store: str = field(default="", metadata=arg("a plain option that happens to be called store"))


@dataclass
class _BuggyConfig:
    mode: str = field(default="bug", metadata=arg("bug | user"))


@pytest.fixture(scope="module", autouse=True)
def _test_steps():
    if "xproto_renamed" not in STEPS:
        register("xproto_renamed", _RenamedConfig, help="test only")(lambda cfg: StepResult())

        def _buggy(cfg):
            if cfg.mode == "user":
                raise WorkbenchError("bad input")
            return {}["missing"]          # an internal KeyError: a bug
        register("xproto_buggy", _BuggyConfig, help="test only")(_buggy)
    yield
    for name in ("xproto_renamed", "xproto_buggy"):
        STEPS.pop(name, None)


def test_roles_are_read_from_metadata_not_names():
    assert steps.inputs_of(_RenamedConfig, "store") == ["src"]
    assert steps.field_for(_RenamedConfig, "hook") == "layer"
    assert steps.field_for(_RenamedConfig, "out") == "dest"
    with pytest.raises(ValueError, match="unknown field role"):
        arg("x", role="stor")


def test_renamed_step_wires_in_a_sweep(tmp_path):
    import workbench.sweep as sweep
    from workbench.sweep.spec import part_of, wired_fields
    assert part_of("xproto_renamed") == "per_hook"
    assert wired_fields("xproto_renamed") == {"src", "layer", "dest"}
    d = {"sweep": {"name": "roles"},
         "models": [{"spec": "tiny-random", "name": "tiny", "hooks": ["blocks.{0..1}.hook_resid_post"]}],
         "corpus": {"spec": "builtin", "max_tokens": 256, "seq_len": 32},
         "xproto_renamed": {"store": "just an option", "hooks": ["blocks.1.*"]}}
    p = sweep.plan(d, tmp_path / "ws", create=False)
    nodes = [n for n in p.order() if n.step == "xproto_renamed"]
    src = p.nodes["collect/tiny"]
    assert src.config["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert len(nodes) == 1 and nodes[0].deps == ["collect/tiny"]
    cfg = nodes[0].config
    assert cfg["src"] == src.out and cfg["layer"] == "blocks.1.hook_resid_post"
    assert cfg["dest"].startswith(str(tmp_path / "ws" / "results"))
    assert cfg["store"] == "just an option"           # a field's name means nothing
    with pytest.raises(sweep.SweepError, match="set by the sweep"):
        sweep.load({**d, "xproto_renamed": {"src": "x"}})


def test_renamed_step_in_the_ui_run_page(tmp_path):
    pytest.importorskip("streamlit")
    import dataclasses

    from workbench.store import write_store
    from workbench.ui.pages import run as run_page
    from workbench.workspace import Workspace
    import torch
    ws = Workspace(tmp_path / "w")
    n = 4
    write_store(ws.stores / "s", {"h": torch.zeros(n, 3)}, torch.zeros(1, n, dtype=torch.long),
                torch.ones(1, n, dtype=torch.bool), torch.zeros(1, dtype=torch.long),
                torch.zeros(n, dtype=torch.long), torch.arange(n), "tiny-random")
    f = {x.name: x for x in dataclasses.fields(_RenamedConfig)}
    assert run_page._options_for(steps.role_of(f["src"]), ws) == ["stores/s"]
    assert run_page._options_for(steps.role_of(f["store"]), ws) == []
    assert run_page._suggest_out("xproto_renamed").startswith("results/")
    assert run_page._suggest_out("export_sae").startswith("exports/")
    # an output path is made absolute inside the workspace through the role, not the name
    assert run_page._parse("dest", "results/x", "path", ws, "out") == str(ws.root / "results/x")
    assert run_page._parse("dest", "results/x", "path", ws, None) == "results/x"


def test_one_output_folder_rule():
    assert steps.output_dir("collect") == "stores" and steps.output_dir("train_sae") == "saes"
    assert steps.output_dir("pca") == "results" and steps.output_dir("export_sae") == "exports"
    with pytest.raises(ValueError, match="produces"):
        register("xproto_bad", _BuggyConfig, help="", produces="thing")


def test_one_hook_resolver():
    names = [f"blocks.{i}.hook_resid_post" for i in range(4)] + ["blocks.0.hook_mlp_out"]
    assert select_hooks(names, ["blocks.{1..2}.hook_resid_post"]) == names[1:3]
    assert select_hooks(names, "blocks.3.hook_resid_post,blocks.0.hook_mlp_out") == [names[3], names[4]]
    assert select_hooks(names, ["blocks.*.hook_resid_post"]) == names[:4]
    assert select_hooks(names, ["blocks.{0,2}.*"], keep_order=True) == [names[0], names[2], names[4]]
    assert select_hooks(names, ["blocks.9.x"], strict=False) == []
    with pytest.raises(WorkbenchError, match="closest"):
        select_hooks(names, ["blocks.9.hook_resid_post"])
    from workbench.sweep.dag import match_hooks
    assert match_hooks(names, ["blocks.{0..1}.hook_resid_post"]) == names[:2]


def test_internal_error_is_a_bug_not_user_error(capsys):
    from workbench.cli import main
    assert main(["xproto-buggy", "--mode", "user"]) == 2
    err = capsys.readouterr().err
    assert "error: bad input" in err and "Traceback" not in err
    assert main(["xproto-buggy"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "bug in workbench" in err


def test_log_capture_is_per_thread():
    import io

    from workbench.logs import capture, progress_stream
    lg = logging.getLogger("workbench.steps.xproto")
    mine, theirs = io.StringIO(), io.StringIO()

    def job(buf, msg):
        with capture(buf):
            lg.info(msg)
            progress_stream().write(f"bar {msg}\n")
    t1 = threading.Thread(target=job, args=(mine, "one"))
    t1.start()
    t1.join()
    t2 = threading.Thread(target=job, args=(theirs, "two"))
    t2.start()
    t2.join()
    assert "xproto: one" in mine.getvalue() and "bar one" in mine.getvalue()
    assert "two" not in mine.getvalue() and "one" not in theirs.getvalue()
    import sys
    assert progress_stream() is sys.stderr


def test_overlapping_single_thread_scopes_restore_torch_threads():
    """Two overlapping users (UI jobs in threads) must not leave torch at one thread."""
    import torch

    from analyses._util import torch_single_thread
    before = torch.get_num_threads()
    if before == 1:
        torch.set_num_threads(2)
        before = 2
    a, b = torch_single_thread(), torch_single_thread()
    a.__enter__()
    b.__enter__()            # b sees 1 thread already
    assert torch.get_num_threads() == 1
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == 1     # b still inside
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------ one dtype map, one device rule, one atomic write
def test_one_dtype_map():
    import torch

    import analyses.sae.base as sae_base
    from analyses import _util
    from workbench import store
    from workbench.models import resolve_dtype
    assert sae_base.DTYPES is _util.DTYPES                      # SAEs: the map itself
    assert all(_util.DTYPES[k] is v for k, v in store.DTYPES.items())   # stores: a subset of it
    for spelling in ("bf16", "torch.bfloat16", "BFloat16", torch.bfloat16):
        assert resolve_dtype(spelling) is torch.bfloat16
        assert store.dtype_name(spelling) == "bfloat16"
    assert resolve_dtype("double") is torch.float64            # the alias table is shared too
    with pytest.raises(WorkbenchError, match="storage dtype must be one of float32, float16, bfloat16"):
        store.dtype_name("float64")                             # not a storage dtype
    with pytest.raises(WorkbenchError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


def test_one_device_rule(monkeypatch):
    import torch

    import analyses.similarity as sim
    from analyses._util import resolve_device
    meta = torch.empty(2, 2, device="meta")                      # stands in for data on an accelerator
    cpu = torch.zeros(2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", like=meta) == meta.device      # data already on a device stays there
    assert resolve_device("auto", like=cpu) == torch.device("cuda")
    assert resolve_device(None, like=cpu) == torch.device("cpu")  # None + data: no move
    assert resolve_device("cpu", like=meta) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    monkeypatch.setattr(sim, "resolve_device", lambda d, like=None: seen.append(d) or torch.device("cpu"))
    x = torch.randn(20, 3, dtype=torch.float64)
    sim.similarity_matrix([x, 2 * x], metric="linear_cka", device="auto")
    assert seen == ["auto"]                                       # the similarity matrix asks the one rule


def test_one_atomic_write(tmp_path, monkeypatch):
    """Every file writer (stores, PCA saves, results, the model cache marker) goes through
    analyses._util.atomic_write: a uniquely named temp file, fsynced, then renamed."""
    import os
    import re

    import torch

    from analyses.pca import PCA
    from workbench import _model_cache
    from workbench.results import atomic_write_bytes
    from workbench.store import write_store
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
                        or real(fd))
    PCA(2).fit(torch.randn(30, 4, dtype=torch.float64)).save(tmp_path / "pca")
    write_store(tmp_path / "s", {"h": torch.zeros(4, 3)}, torch.zeros(1, 4, dtype=torch.long),
                torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, dtype=torch.long),
                torch.zeros(4, dtype=torch.long), torch.arange(4), "tiny-random")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    _model_cache.cached_folder("m", lambda d: (d / "w").write_text("w"))

    def tmp_of(name):
        return any(re.fullmatch(rf"\.{re.escape(name)}\.[a-z0-9_]+\.tmp", s) for s in synced)
    for name in ("pca.json", "manifest.json", "shard-00000.safetensors", "b.bin", _model_cache.MARKER):
        assert tmp_of(name), (name, synced)
    left = [p for p in tmp_path.rglob("*.tmp")]
    assert not left, left


def test_every_command_help_prints(capsys):
    """`workbench --help` and each command's --help render (argparse %-formats help text: a literal
    "99%" in a step's help once crashed the top-level help)."""
    import pytest
    from workbench.cli import build_parser, main
    names = ["", *[c for c in build_parser()._subparsers._group_actions[0].choices]]
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"] if name else ["--help"])
        assert e.value.code == 0, name
        assert "usage: workbench" in capsys.readouterr().out
