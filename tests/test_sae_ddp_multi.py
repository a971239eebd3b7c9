"""Data-parallel (2 gloo processes, as torchrun starts them) grid and from-the-model train-sae: the SAEs equal
the one-process run's, rank 0 alone writes, and the model's forward passes are split between the ranks."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from test_sae_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)
from test_sae_train import _free_ports, _join_or_fail

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
GRID = ["--hooks", "blocks.{0,1}.hook_resid_post", "--d-sae", "32", "48", "--k", "4", "--batch-size", "64",
        "--n-tokens", "768", "--holdout", "0.25", "--eval-tokens", "128", "--seed", "3"]
MODEL = ["--model", "tiny-random", "--corpus", "builtin", "--hooks", "blocks.{0,1}.hook_resid_post",
         "--d-sae", "64", "--k", "4", "--n-tokens", "1024", "--batch-size", "128", "--seq-len", "32",
         "--buffer-tokens", "512", "--eval-tokens", "256", "--device", "cpu", "--seed", "1"]


def _cli(argv: list[str], json_out: Path) -> None:
    """``workbench train-sae ... --json`` in this process, its summary written to ``json_out``."""
    from workbench.cli import main
    with open(json_out, "w") as f, contextlib.redirect_stdout(f):
        rc = main(["train-sae", *argv, "--json"])
    if rc:
        raise SystemExit(rc)


def _worker(rank, world, port, argv, tmp):
    """One rank, with the environment torchrun gives it."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _cli(argv, Path(tmp) / f"rank{rank}.json")


def _ddp(argv: list[str], tmp: Path, what: str) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_worker, args=(2, _free_ports(1)[0], argv, str(tmp)), nprocs=2, join=False,
                             start_method="spawn")
    _join_or_fail(ctx, what, limit=180)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def _sae_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("cfg.json"))


def _assert_same_saes(got: Path, ref: Path, n: int) -> None:
    from analyses.sae import load_sae
    a, b = _sae_folders(got), _sae_folders(ref)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == n, (a, b)
    for pa, pb in zip(a, b):
        ga, gb = load_sae(pa), load_sae(pb)
        assert (ga.cfg.metadata["workbench"]["world_size"], gb.cfg.metadata["workbench"]["world_size"]) == (2, 1)
        sa, sb = ga.state_dict(), gb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=1e-4), (pa.name, k, float((sa[k] - sb[k]).abs().max()))


def _store(ws_root: Path) -> Path:
    from workbench.store import write_store
    n_seq, L = 32, 32                        # 1024 tokens, 2 hooks of d 16
    g = torch.Generator().manual_seed(0)
    acts = {h: torch.randn(n_seq * L, 16, generator=g) * torch.linspace(0.5, 2, 16) + 1 for h in HOOKS}
    s = write_store(ws_root / "stores" / "s", acts, torch.randint(0, 100, (n_seq, L), generator=g),
                    torch.ones(n_seq, L, dtype=torch.bool), torch.arange(n_seq),
                    torch.arange(n_seq).repeat_interleave(L), torch.arange(L).repeat(n_seq), "tiny-random")
    return s.path


@pytest.mark.slow
def test_grid_from_store_two_ranks_equal_one(tmp_path):
    """2 hooks x 2 widths from a store under 2 ranks: the one-process SAEs (same seeds), and only rank 0 wrote
    (the same SAE folders and index rows as one process; rank 1's summary names rank 0)."""
    from workbench.workspace import Workspace
    ws_ref, ws_dp = Workspace(tmp_path / "ref"), Workspace(tmp_path / "dp")
    _cli([str(_store(ws_ref.root)), *GRID, "--out", str(ws_ref.root / "saes" / "g"), "--workspace",
          str(ws_ref.root)], tmp_path / "ref.json")
    r0, r1 = _ddp([str(_store(ws_dp.root)), *GRID, "--out", str(ws_dp.root / "saes" / "g"), "--workspace",
                   str(ws_dp.root)], tmp_path, "2-rank grid train-sae")
    _assert_same_saes(ws_dp.root / "saes" / "g", ws_ref.root / "saes" / "g", 4)
    assert len(ws_dp.runs(step="train_sae")) == len(ws_ref.runs(step="train_sae")) == 5   # the grid + 4 SAEs
    assert r1["rank"] == 1 and r1["written_by"] == "rank 0"
    assert r0["world_size"] == 2 and len(r0["saes"]) == 4
    ref = json.loads((tmp_path / "ref.json").read_text())["saes"]
    for a, b in zip(r0["saes"], ref):       # rank 0 evaluated on the store's held-out rows
        assert a["metrics"]["fvu"] == pytest.approx(b["metrics"]["fvu"], abs=1e-4)
    assert not list((ws_dp.root / "saes").rglob("checkpoint.pt"))


@pytest.mark.slow
def test_from_model_two_ranks_equal_one_and_split_the_forward(tmp_path):
    """--model under 2 ranks: each rank ran the model on about half the windows, the gathered rows give the
    one-process SAEs and held-out eval, and --keep-store (rank 0 alone) holds the one-process store."""
    from workbench.model_stream import is_heldout
    from workbench.store import ActivationStore
    _cli([*MODEL, "--out", str(tmp_path / "ref"), "--keep-store", str(tmp_path / "ref_store")],
         tmp_path / "ref.json")
    r0, r1 = _ddp([*MODEL, "--out", str(tmp_path / "dp"), "--keep-store", str(tmp_path / "dp_store")], tmp_path,
                  "2-rank train-sae --model")
    ref = json.loads((tmp_path / "ref.json").read_text())
    _assert_same_saes(tmp_path / "dp", tmp_path / "ref", 2)
    assert r1["written_by"] == "rank 0" and r0["world_size"] == 2
    # the forward was split: rank 1 computed about half the rows of the training chunks and the held-out eval;
    # rank 0 the other half plus the held-out windows it alone forwards for --keep-store (counted in the store)
    a, b = ActivationStore.open(tmp_path / "dp_store", verify=True), ActivationStore.open(tmp_path / "ref_store")
    held = torch.tensor([is_heldout(int(d), 0.05, 0) for d in b.sequences()["doc_ids"]])
    kept_heldout = int(held[b.rows()["seq_index"]].sum())
    n_one, n0, n1 = ref["n_forward_tokens"], r0["n_forward_tokens"], r1["n_forward_tokens"]
    shared = n_one - kept_heldout
    assert 0 < kept_heldout < n_one and n0 + n1 == n_one, (n_one, n0, n1, kept_heldout)
    assert 0.4 * shared < n1 < 0.6 * shared, (shared, n0, n1)
    for x, y in zip(r0["saes"], ref["saes"]):     # held-out eval on the gathered held-out rows
        assert x["metrics"]["fvu"] == pytest.approx(y["metrics"]["fvu"], abs=1e-4)
    assert a.n_rows == b.n_rows > 0
    for h in HOOKS:
        assert torch.allclose(a.read(h), b.read(h), atol=1e-5)
    ra, rb = a.rows(), b.rows()
    assert all(torch.equal(ra[k], rb[k]) for k in rb)
