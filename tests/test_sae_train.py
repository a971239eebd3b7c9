"""SAE trainer: exact resume after an interruption or SIGKILL, NaN guard, data-parallel (gloo, 2
processes) == 1 process, callable sources."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from analyses.sae import SAETrainingError, train_sae

ROOT = Path(__file__).resolve().parents[1]


from test_sae_helpers import one_thread  # noqa: E402,F401  (autouse: 1 torch thread)


def _data(n=3000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 2, d) + 1.0


KW = dict(d_sae=64, k=4, n_tokens=12 * 256, batch_size=256, lr=3e-3, progress=False, dead_tokens=512)


class Interrupt(Exception):
    pass


def _assert_same(a, b, tol=0.0):
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, atol=tol, rtol=0), (name, float((x - y).abs().max()))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_resume_after_interruption_equals_uninterrupted(arch, tmp_path):
    X = _data()
    ref = train_sae(X, arch=arch, **KW)

    def boom(step, info):
        if step == 7:
            raise Interrupt
    with pytest.raises(Interrupt):
        train_sae(X, arch=arch, checkpoint_dir=tmp_path, checkpoint_every=3, callback=boom, **KW)
    assert (tmp_path / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = train_sae(X, arch=arch, checkpoint_dir=tmp_path, checkpoint_every=3, **KW)
    _assert_same(ref, resumed)
    if arch == "batchtopk":
        assert float(ref.threshold) == float(resumed.threshold)
    # a different setting does not silently reuse the checkpoint
    with pytest.raises(SAETrainingError, match="different settings.*lr"):
        train_sae(X, arch=arch, checkpoint_dir=tmp_path, **{**KW, "lr": 1e-3})


def test_resume_from_a_row_major_checkpoint_equals_uninterrupted(tmp_path):
    """Checkpoints written before W_enc was stored column-major hold row-major Adam state; fused Adam walks
    state and parameter as flat memory, so resuming must re-lay the state out (else a silent wrong update)."""
    X = _data()
    ref = train_sae(X, arch="topk", **KW)
    assert ref.W_enc.stride() == (1, ref.cfg.d_in)          # column-major, as the sparse gradient comes

    def boom(step, info):
        if step == 7:
            raise Interrupt
    with pytest.raises(Interrupt):
        train_sae(X, arch="topk", checkpoint_dir=tmp_path, checkpoint_every=3, callback=boom, **KW)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ck["model"] = {k: v.contiguous() for k, v in ck["model"].items()}
    st = ck["optim"]["state"]
    assert any(not v.is_contiguous() for s in st.values() for v in s.values() if torch.is_tensor(v))
    ck["optim"]["state"] = {i: {k: v.contiguous() if torch.is_tensor(v) else v for k, v in s.items()}
                            for i, s in st.items()}
    torch.save(ck, tmp_path / "checkpoint.pt")
    _assert_same(ref, train_sae(X, arch="topk", checkpoint_dir=tmp_path, checkpoint_every=3, **KW))


def test_resume_after_sigkill_with_callable_source(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(ROOT)!r})
        from analyses.sae import train_sae
        g = torch.Generator().manual_seed(0)
        X = torch.randn(2000, 16, generator=g) + 1.0
        def source(epoch):           # odd-sized batches, re-chunked by the trainer
            p = torch.randperm(2000, generator=torch.Generator().manual_seed(epoch))
            return (X[p[i:i + 300]] for i in range(0, 2000, 300))
        kill_at = int(sys.argv[2])
        def cb(step, info):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        sae = train_sae(source, arch="topk", d_sae=48, k=4, n_tokens=20 * 256, batch_size=256, lr=3e-3,
                        progress=False, checkpoint_dir=sys.argv[1], checkpoint_every=4, callback=cb)
        sae.save(sys.argv[1] + "_sae")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ck = str(tmp_path / "ck")
    p = subprocess.run([sys.executable, str(script), ck, "10"], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert torch.load(Path(ck) / "checkpoint.pt", weights_only=True)["step"] == 8
    p = subprocess.run([sys.executable, str(script), ck, "-1"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # reference: the same run, uninterrupted, in this process
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 16, generator=g) + 1.0

    def source(epoch):
        perm = torch.randperm(2000, generator=torch.Generator().manual_seed(epoch))
        return (X[perm[i:i + 300]] for i in range(0, 2000, 300))
    ref = train_sae(source, arch="topk", d_sae=48, k=4, n_tokens=20 * 256, batch_size=256, lr=3e-3,
                    progress=False)
    from analyses.sae import load_sae
    _assert_same(load_sae(ck + "_sae"), ref, tol=1e-6)


def _stops_at_step_5_keeping_step_4(X, tmp_path, spoil, match):
    """Batches from step 5 on are spoiled: training stops there and the step-4 checkpoint stays intact."""
    def source(epoch):
        for i in range(0, 4096, 256):
            b = X[i:i + 256]
            yield spoil(b) if i >= 256 * 5 else b
    with pytest.raises(SAETrainingError, match=match):
        train_sae(source, arch="topk", d_sae=64, k=4, n_tokens=4096, batch_size=256, progress=False,
                  checkpoint_dir=tmp_path, checkpoint_every=2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    X = _data(n=4096)

    # finite, but squares overflow -> inf loss
    _stops_at_step_5_keeping_step_4(X, tmp_path, lambda b: b * 1e30,
                                    r"loss became (nan|inf) at step 5.*last good checkpoint kept at")


def test_nan_input_is_a_clear_error():
    X = _data()
    X[700, 3] = float("nan")
    with pytest.raises(ValueError, match="first bad row: 700"):
        train_sae(X, arch="topk", d_sae=32, k=2, progress=False)


DDP_ARCHS = ("topk", "batchtopk")


def _ddp_kw(arch):
    return dict(arch=arch, d_sae=64, k=4, n_tokens=8 * 256, batch_size=256, lr=3e-3, progress=False,
                dead_tokens=512)


def _ddp_worker(rank, world, ports, X, out):
    torch.set_num_threads(1)
    res = {}
    for arch, port in zip(DDP_ARCHS, ports):   # a fresh rendezvous port per process group:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))   # reusing one can hang
        sae = train_sae(X, **_ddp_kw(arch))   # the trainer sets up and tears down the gloo group
        res.update({f"{arch}.{k}": v.detach() for k, v in sae.state_dict().items()})
    if rank == 0:
        torch.save(res, out)


def _free_ports(n):
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _join_or_fail(ctx, what: str, limit: float = 240) -> None:
    import time
    deadline = time.time() + limit
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {limit:.0f} s")


def test_ddp_gloo_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp
    X = _data(n=2048)
    out = tmp_path / "ddp.pt"
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_ports(len(DDP_ARCHS)), X, str(out)), nprocs=2,
                             join=False, start_method="spawn")
    _join_or_fail(ctx, "2-process gloo training")
    got = torch.load(out, weights_only=True)
    for arch in DDP_ARCHS:
        ref = train_sae(X, **_ddp_kw(arch))
        for name, v in ref.state_dict().items():
            g = got[f"{arch}.{name}"]
            assert torch.allclose(g, v, atol=2e-5, rtol=1e-4), (arch, name, float((g - v).abs().max()))
        # the result is not trivially the init: training moved the weights
        assert not torch.allclose(ref.W_enc, ref.W_dec.t(), atol=1e-3)


def test_callable_and_list_sources_and_default_one_pass():
    X = _data(n=1000)
    a = train_sae(lambda epoch: X.split(100), arch="topk", d_sae=32, k=2, batch_size=250, progress=False)
    assert a.cfg.metadata["workbench"]["n_tokens"] == 1000
    b = train_sae(list(X.split(100)), arch="topk", d_sae=32, k=2, batch_size=250, progress=False)
    _assert_same(a, b)
    with pytest.raises(TypeError, match="one-shot iterator"):
        train_sae(iter(X.split(100)), arch="topk", d_sae=32, k=2, progress=False)


# ------------------------------------------------------------------ guards, density (issue 10 §1)

@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_lr_must_be_positive_and_finite(lr):
    def source(epoch):
        raise AssertionError("the data was read: the lr check must come before any training")
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0"):
        train_sae(source, arch="topk", d_sae=32, k=2, lr=lr, progress=False)


def test_exploding_lr_stops_with_a_clear_error():
    X = _data(n=4096)
    steps = []
    with pytest.raises(SAETrainingError, match=r"exploded: batch FVU .* at step \d+"):
        train_sae(X, arch="topk", d_sae=64, k=4, n_tokens=4096 * 4, batch_size=256, lr=1e6, progress=False,
                  callback=lambda s, info: steps.append(info["fvu"]))
    assert len(steps) < 64          # stopped early, not after the whole run
    assert all(f < 100 for f in steps)   # no step with an exploded FVU was applied and reported


def test_exploding_batch_keeps_last_good_checkpoint(tmp_path):
    X = _data(n=4096)

    # finite loss, but FVU ~1e9: the run is broken
    _stops_at_step_5_keeping_step_4(X, tmp_path, lambda b: b + 1e5,
                                    r"exploded.*at step 5.*last good checkpoint kept at")


def test_density_is_counted_on_the_last_training_tokens():
    # lr ~ 0: the weights hardly move, so the counts the trainer kept over its last batches must equal the
    # firing of the returned SAE on exactly those rows (10 steps: the window is steps 8-9, 512 tokens)
    X = _data(n=2560)
    batches = list(X.split(256))
    sae = train_sae(batches, arch="topk", d_sae=48, k=4, batch_size=256, lr=1e-12, progress=False)
    wb = sae.cfg.metadata["workbench"]
    assert wb["density_tokens"] == 512
    fired = (sae.encode(torch.cat(batches[8:])) > 0).sum(0).double()
    want = torch.log10(fired / 512 + 1e-10).float()
    assert torch.allclose(sae.sparsity, want, atol=1e-6)
    assert wb["dead_fraction"] == pytest.approx(float((fired == 0).double().mean()))


def _cli_worker(rank, world, port, store, out, ws):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from workbench.cli import main
    rc = main(["train-sae", store, "--arch", "topk", "--d-sae", "32", "--k", "3", "--n-tokens", "4096",
               "--batch-size", "256", "--holdout", "0", "--eval-tokens", "512", "--out", out,
               "--workspace", ws])
    if rc:
        raise SystemExit(rc)


@pytest.mark.slow
def test_train_sae_cli_under_torchrun_writes_once(tmp_path):
    """`torchrun -m workbench train-sae STORE`: every rank trains, rank 0 alone writes the SAE and the run row."""
    import torch.multiprocessing as mp
    from workbench.store import write_store
    from workbench.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    X = _data(n=4096)
    s = write_store(ws.root / "stores" / "s", {"blocks.0.hook_resid_post": X},
                    token_ids=torch.zeros(32, 128, dtype=torch.long),
                    attention_mask=torch.ones(32, 128, dtype=torch.bool),
                    doc_ids=torch.arange(32), seq_index=torch.arange(32).repeat_interleave(128),
                    position=torch.arange(128).repeat(32), model_name="tiny-random")
    out = ws.root / "saes" / "t"
    ctx = mp.start_processes(_cli_worker, args=(2, _free_ports(1)[0], str(s.path), str(out), str(ws.root)),
                             nprocs=2, join=False, start_method="spawn")
    _join_or_fail(ctx, "2-process train-sae")
    assert (out / "cfg.json").exists() and not (out / ".checkpoints").exists()
    runs = ws.runs(step="train_sae")
    assert len(runs) == 1 and runs[0].status == "done", runs
