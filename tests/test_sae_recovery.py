"""Defaults that work (issue 10 §1): train_sae with default hyperparameters (lr, AuxK, init, batch size,
schedule), d_sae = number of true features and k = number active, recovers features in superposition
within 5 passes. The sweep over shapes is benchmarks/bench_sae_recovery.py; this keeps two cheap shapes,
plus the BatchTopK / Matryoshka inference threshold after a short run (inference L0 vs k, also through
SAELens' own loader)."""

import math

import pytest
import torch

from analyses.sae import default_lr, save_saelens, train_sae
from analyses.sae.train import default_batch_size, default_dead_tokens
from test_sae_helpers import mmcs, one_thread, synthetic  # noqa: F401  (one_thread: autouse)


# 16 of 128 active in 64 dims: at batch 4096 (122 steps) the same lr stops at MMCS ~0.57. 16 of 256 in 64
# dims (the densest corner) and BatchTopK at 16 of 128 need Adam beta1 = 0 (train.ADAM_BETAS): with (0.9,
# 0.999) they stop near 0.90
@pytest.mark.parametrize("arch, d, n_true, active", [("topk", 64, 128, 16), ("topk", 64, 256, 8),
                                                     ("topk", 64, 256, 16), ("batchtopk", 64, 128, 16)])
def test_default_hyperparameters_recover_features(arch, d, n_true, active):
    X, F = synthetic(n=100_000, d=d, n_features=n_true, active=active, seed=11, offset=0.0)
    sae = train_sae(X, arch=arch, d_sae=n_true, k=active, n_tokens=5 * X.shape[0], progress=False)
    wb = sae.cfg.metadata["workbench"]
    assert mmcs(sae, F) >= 0.95, (mmcs(sae, F), wb["lr"], wb["batch_size"])
    assert wb["batch_size"] == 500 and wb["steps"] == 1000


def test_default_dead_tokens_is_two_percent_of_the_run():
    # 2% of the run's tokens, >= 50 x d_sae / k (50 firings at the mean rate), >= 4 batches, <= 10M (Gao et
    # al.'s fixed window)
    assert default_dead_tokens(1000, 500) == 10_000
    assert default_dead_tokens(1000, 500, d_sae=1024, k=16) == 10_000
    assert default_dead_tokens(431, 256, d_sae=16384, k=32) == 25_600     # wide SAE, short run: the floor
    assert default_dead_tokens(10, 256) == 4 * 256
    assert default_dead_tokens(10 ** 6, 4096) == 10_000_000
    X = torch.randn(4000, 8)
    sae = train_sae(X, arch="topk", d_sae=16, k=8, batch_size=5, lr=1e-3, progress=False)   # 800 steps
    assert sae.cfg.dead_tokens == 100 and sae.cfg.metadata["workbench"]["aux_dead_tokens"] == 100
    sae = train_sae(X, arch="topk", d_sae=16, k=2, batch_size=5, lr=1e-3, progress=False)
    assert sae.cfg.dead_tokens == 400
    sae = train_sae(X, arch="topk", d_sae=16, k=2, batch_size=5, lr=1e-3, progress=False, dead_tokens=999)
    assert sae.cfg.dead_tokens == 999


def test_default_batch_size_gives_enough_steps(monkeypatch):
    # 4096 (SAELens' train_batch_size_tokens) for runs of >= 1000 x 4096 tokens, else ~1000 steps, >= 256
    assert default_batch_size(10 ** 8) == 4096 and default_batch_size(4_096_000) == 4096
    assert default_batch_size(500_000) == 500 and default_batch_size(1000) == 256
    # a callable source without n_tokens: one counted pass decides (10 target steps keep it cheap)
    import analyses.sae.train as train_mod
    monkeypatch.setattr(train_mod, "TARGET_STEPS", 10)
    X = torch.randn(5000, 8)
    sae = train_sae(lambda e: X.split(700), arch="topk", d_sae=16, k=2, progress=False, lr=1e-3)
    assert sae.cfg.metadata["workbench"]["batch_size"] == 500 and sae.cfg.metadata["workbench"]["steps"] == 10
    sae = train_sae(lambda e: X.split(700), arch="topk", d_sae=16, k=2, progress=False, batch_size=1000,
                    n_tokens=3000)
    assert sae.cfg.metadata["workbench"]["batch_size"] == 1000 and sae.cfg.metadata["workbench"]["steps"] == 3


def test_default_lr_rule():
    # the sparsify / OpenAI value from 2^14 latents up (Gao et al. 2024) ...
    assert default_lr(2 ** 14) == pytest.approx(2e-4)
    assert default_lr(2 ** 16) == pytest.approx(2e-4 / math.sqrt(4))
    # ... larger below, capped, and never smaller for fewer latents
    assert default_lr(128) == pytest.approx(2e-2)
    lrs = [default_lr(2 ** i) for i in range(4, 20)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # given d_in, small SAEs get at most 1.28 / d_in (measured best: ~2e-2 at d_in 64, ~5e-3 at 256)
    assert default_lr(128, 64) == pytest.approx(2e-2)
    assert default_lr(512, 256) == pytest.approx(5e-3)
    assert default_lr(1024, 256) == pytest.approx(5e-3)
    assert default_lr(4608, 576) == pytest.approx(2e-4 * (2 ** 14 / 4608) ** 1.5)   # the d_sae rule binds
    assert default_lr(2 ** 16, 4096) == pytest.approx(1e-4)   # 16k+ regime unchanged


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_inference_threshold_fires_k_after_a_short_run(arch, tmp_path):
    import sae_lens
    k = 4
    X, _ = synthetic(n=30_000, d=48, n_features=128, active=4, seed=5)
    train, held = X[:25_600], X[25_600:]
    sae = train_sae(train, arch=arch, d_sae=128, k=k, batch_size=256, progress=False)   # 100 steps
    assert sae.cfg.metadata["workbench"]["steps"] == 100
    cal = sae.cfg.metadata["workbench"]["threshold_calibration"]
    assert cal["data"] == "last_training_batches" and cal["tokens"] == 100 * 256 and cal["batches"] == 100
    l0 = float((sae.encode(held) != 0).sum(1).double().mean())
    assert abs(l0 - k) <= 0.05 * k, l0
    save_saelens(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
    with torch.no_grad():
        l0_theirs = float((theirs.encode(held) != 0).sum(1).double().mean())
    assert l0_theirs == pytest.approx(l0, abs=1e-3)


def test_threshold_calibrated_on_held_out_rows_when_given():
    X, _ = synthetic(n=30_000, d=48, n_features=128, active=4, seed=6)
    sae = train_sae(X[:12_800], arch="batchtopk", d_sae=128, k=4, batch_size=256, progress=False,
                    calibration=X[12_800:], calibration_tokens=8192)
    cal = sae.cfg.metadata["workbench"]["threshold_calibration"]
    assert cal["data"] == "held_out" and cal["tokens"] == 8192 and cal["batches"] == 32
    l0 = float((sae.encode(X[20_000:]) != 0).sum(1).double().mean())
    assert abs(l0 - 4) <= 0.2, l0
