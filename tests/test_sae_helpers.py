"""Shared helpers for the tests/test_sae_*.py files (synthetic features in superposition)."""

import pytest
import torch


def synthetic(n=20000, d=48, n_features=128, active=3, seed=1234, offset=0.3):
    """Unit-norm features F [n_features, d] (more features than dims), each sample a sum of `active`
    random features with magnitudes in [0.5, 2.5], plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n_features, d, generator=g)
    F /= F.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    mag = torch.rand(n, active, generator=g) * 2 + 0.5
    C = torch.zeros(n, n_features).scatter_(1, idx, mag)
    return C @ F + offset, F


def mmcs(sae, F):
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True)
    return float((F @ W.T).max(1).values.mean())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Shared 2-core machines: oversubscribed torch threads make element-wise ops ~10x slower.
    Importing this fixture into a test module makes it apply there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
