"""Defaults that work (issue 10 §1): train_sae with default hyperparameters (lr, AuxK, init, batch size,
schedule), d_sae = number of true features and k = number active, recovers features in superposition
within 5 passes. The sweep over shapes is benchmarks/bench_sae_recovery.py; this keeps two cheap shapes,
plus the BatchTopK / Matryoshka inference threshold after a short run (inference L0 vs k, also through
SAELens' own loader)."""

import math

import pytest
import torch

from analyses.sae import default_lr, save_saelens, train_sae
from test_sae_helpers import mmcs, one_thread, synthetic  # noqa: F401  (one_thread: autouse)


@pytest.mark.parametrize("d, n_true, active", [(64, 128, 4), (64, 256, 4)])
def test_default_hyperparameters_recover_features(d, n_true, active):
    X, F = synthetic(n=100_000, d=d, n_features=n_true, active=active, seed=11, offset=0.0)
    sae = train_sae(X, arch="topk", d_sae=n_true, k=active, n_tokens=5 * X.shape[0], progress=False)
    assert mmcs(sae, F) >= 0.95, (mmcs(sae, F), sae.cfg.metadata["workbench"]["lr"])


def test_default_lr_rule():
    # the sparsify / OpenAI value from 2^14 latents up (Gao et al. 2024) ...
    assert default_lr(2 ** 14) == pytest.approx(2e-4)
    assert default_lr(2 ** 16) == pytest.approx(2e-4 / math.sqrt(4))
    # ... larger below, capped, and never smaller for fewer latents
    assert default_lr(128) == pytest.approx(2e-2)
    lrs = [default_lr(2 ** i) for i in range(4, 20)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


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
