"""Principal component analysis that streams, runs on the GPU when there is one, and matches
scikit-learn's `PCA` (names, conventions, component signs).

Exact fits accumulate the mean and the covariance (sums in float64; products of float32 rows in
float32 by default, see ``precision``) in one pass over the rows (a tensor,
an array, or any iterable of [b, d] batches such as ``store.batches(hook, bs, shuffle=False)``),
then take the eigen-decomposition of the d x d covariance. Rows are shifted by a reference point
(the mean of the first 1024 rows) before their products are summed, so a large common offset costs no
precision (Chan et al.'s shifted/pairwise update: mean = shift + sum/n and
cov = (S - n delta delta^T) / (n - 1) with a small delta). Memory is O(threads * (d^2 + chunk * d)),
whatever n.

Randomized fits (Halko, Martinsson & Tropp 2011, with power iterations and QR re-orthonormalisation)
give the top-k directions of wide in-memory inputs without forming d x d. For an iterable input,
"randomized" accumulates the covariance in the same streaming pass and runs the randomized
eigensolver on it.

Signs follow scikit-learn's ``svd_flip(u_based_decision=False)``: in each component the entry of
largest absolute value is positive, so components of this class and of ``sklearn.decomposition.PCA``
compare entry by entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ._util import as_tensor, atomic_write, check_finite_rows, is_batch_iterable, resolve_device
from .moments import CHUNK_ROWS, MomentAccumulator, as_batch, resolve_precision, small_linalg

__all__ = ["PCA", "svd_flip_rows"]

FORMAT = "workbench-pca"


def svd_flip_rows(V: torch.Tensor) -> torch.Tensor:
    """scikit-learn's sign rule for components (rows of V): the entry of largest |.| is positive."""
    idx = V.abs().argmax(dim=1)
    signs = torch.sign(V.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return V * signs


def _to_like(t: torch.Tensor, like: Any, dtype: torch.dtype | None = None):
    if dtype is not None:
        t = t.to(dtype)
    if isinstance(like, np.ndarray):
        return t.detach().cpu().numpy()
    return t


class PCA:
    """PCA with scikit-learn's names.

    Parameters: ``n_components`` (k), ``method`` "exact" (float64 covariance + eigh, one streaming
    pass) or "randomized" (Halko et al.; ``n_oversamples``, ``n_iter`` power iterations, ``seed``),
    ``whiten`` (transform divides by sqrt(explained variance), as scikit-learn), ``device``
    ("auto": cuda when available; inputs already on a GPU stay there), ``precision`` of the
    covariance pass: "auto" (default) = "mixed" for float32 / half rows (every activation store):
    float32 products of centred chunks added in float64, ~2e-8 relative error on the spectrum,
    1.1-1.2x the speed of scikit-learn's float32 ``covariance_eigh`` whose error is ~3e-4
    (benchmarks/bench_pca.py), and "float64" for float64 rows (what scikit-learn does with them);
    "exact" / "float64" forces float64 products (~1e-15, about half the speed); "mixed" forces
    float32 products. The fitted ``precision_`` says which ran.

    Fitted attributes (torch tensors): ``components_`` [k, d], ``explained_variance_`` [k]
    (variance with n - 1), ``explained_variance_ratio_`` [k], ``singular_values_`` [k]
    (sqrt(variance * (n - 1))), ``mean_`` [d] (float64), ``n_samples_``, ``n_features_in_``,
    ``noise_variance_``, ``total_variance_``, and ``eigenvalues_`` (the whole covariance spectrum,
    descending; exact fits only) for geometry (participation ratio, effective rank, ...).
    """

    def __init__(self, n_components: int, method: str = "exact", whiten: bool = False,
                 device: str | torch.device | None = "auto", n_oversamples: int = 10,
                 n_iter: int | str = "auto", seed: int = 0, precision: str = "auto"):
        if method not in ("exact", "randomized"):
            raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
        if not isinstance(n_components, (int, np.integer)) or isinstance(n_components, bool) \
                or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        self.n_components = int(n_components)
        self.method = method
        self.whiten = bool(whiten)
        self.device = device
        self.n_oversamples = int(n_oversamples)
        self.n_iter = n_iter
        self.seed = int(seed)
        resolve_precision(precision)            # raises on an unknown value
        self.precision = precision
        self.precision_: str | None = None      # what the fit used ("mixed" | "float64")
        self.eigenvalues_: torch.Tensor | None = None

    # ---------------------------------------------------------------- fitting
    def _device_for(self, x: Any) -> torch.device:
        if self.device in (None, "auto") and isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
        return resolve_device(self.device)

    def fit(self, X: Any, y: Any = None) -> "PCA":
        """Fit on a tensor / array [n, d], or on an iterable of [b, d] batches (one pass)."""
        if is_batch_iterable(X) or callable(X):
            src = X() if callable(X) else X
            return self._fit_stream(src)
        X = as_tensor(X, name="X", check_finite=False)      # both paths check NaN/inf on the way
        n, d = X.shape
        self._check_k(n, d)
        if self.method == "randomized":
            return self._fit_randomized(X)
        dev = self._device_for(X)
        # the accumulator checks NaN/inf per chunk (cheap)
        acc = MomentAccumulator(d, dev, name="X", precision=self.precision).update(X)
        self.precision_ = acc.precision
        return self._finish_exact(acc)

    def fit_transform(self, X: Any, y: Any = None):
        return self.fit(X).transform(X)

    def _fit_stream(self, batches: Iterable) -> "PCA":
        dev = None
        acc = None
        for b in batches:
            b = as_batch(b)
            if acc is None:
                dev = self._device_for(b)
                acc = MomentAccumulator(None, dev, name="X", precision=self.precision)
            acc.update(b)
        if acc is None or acc.n == 0:
            raise ValueError("PCA.fit got an empty iterable of batches (no rows)")
        self._check_k(acc.n, acc.d)
        self.precision_ = acc.precision
        if self.method == "randomized":
            return self._finish_randomized_cov(acc)
        return self._finish_exact(acc)

    def _check_k(self, n: int, d: int) -> None:
        if self.n_components > min(n, d):
            raise ValueError(f"n_components={self.n_components} must be <= min(n_samples, n_features) "
                             f"= min({n}, {d}) = {min(n, d)}")
        if n < 2:
            raise ValueError(f"PCA needs at least 2 rows, got n_samples={n}")

    def _finish_exact(self, acc: MomentAccumulator) -> "PCA":
        n, d, k = acc.n, acc.d, self.n_components
        C = acc.covariance()
        with small_linalg(C):
            evals, evecs = torch.linalg.eigh(C)
        evals = evals.flip(0).clamp_min(0.0)
        evecs = evecs.flip(1)
        V = svd_flip_rows(evecs[:, :k].T.contiguous())
        total = float(torch.diagonal(C).sum())
        self._set(V, evals[:k], acc.mean(), n, d, total, full=evals)
        return self

    def _set(self, V, ev, mean, n, d, total, full=None) -> None:
        self.components_ = V.to(torch.float64)
        self.explained_variance_ = ev.to(torch.float64).clone()
        self.total_variance_ = float(total)
        self.explained_variance_ratio_ = self.explained_variance_ / (total if total > 0 else 1.0)
        self.singular_values_ = torch.sqrt(self.explained_variance_ * (n - 1))
        self.mean_ = mean.to(device=V.device, dtype=torch.float64)
        self.n_samples_ = int(n)
        self.n_features_in_ = int(d)
        self.n_components_ = int(V.shape[0])
        rest = min(n, d) - self.n_components_
        self.noise_variance_ = float((total - float(self.explained_variance_.sum())) / rest) if rest > 0 else 0.0
        self.eigenvalues_ = None if full is None else full.to(torch.float64).clone()

    def _power_iters(self, k: int, d: int) -> int:
        if self.n_iter == "auto":
            return 7 if k < 0.1 * d else 4
        return int(self.n_iter)

    def _fit_randomized(self, X: torch.Tensor) -> "PCA":
        """Halko et al. on one centred copy of X (float64 when X is, else float32, as scikit-learn)."""
        dev = self._device_for(X)
        n, d = X.shape
        k = self.n_components
        l = min(k + self.n_oversamples, min(n, d))
        cdt = torch.float64 if X.dtype == torch.float64 else torch.float32
        self.precision_ = "float64" if cdt == torch.float64 else "float32"
        mean = _mean_checked(X, dev)                      # float64; names the first NaN/inf row
        if dev.type == "cpu" and X.device.type == "cpu" and X.dtype == cdt:
            Xc = torch.from_numpy(np.subtract(X.numpy(), mean.to(cdt).numpy()))   # numpy: ~2x torch here
        else:
            Xc = X.to(dev).to(cdt) - mean.to(cdt)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        omega = torch.randn(d, l, generator=g, dtype=torch.float64).to(dev, cdt)
        Q = Xc @ omega
        for _ in range(self._power_iters(k, d)):
            Q = _orth(Q)
            Q = Xc @ _orth(Xc.T @ Q)
        Q = _orth(Q)
        B = (Q.T @ Xc).to(torch.float64)                   # [l, d]
        with small_linalg(B[:, :0] if d > 4096 else B):
            _, S, Vt = torch.linalg.svd(B, full_matrices=False)
        V = svd_flip_rows(Vt[:k].contiguous())
        ev = S[:k] ** 2 / (n - 1)
        total = _sum_sq(Xc) / (n - 1)
        self._set(V, ev, mean, n, d, total)
        return self

    def _finish_randomized_cov(self, acc: MomentAccumulator) -> "PCA":
        """Randomized subspace iteration on the accumulated covariance (streaming input)."""
        n, d, k = acc.n, acc.d, self.n_components
        C = acc.covariance()
        dev = C.device
        l = min(k + self.n_oversamples, d)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        Q = C @ torch.randn(d, l, generator=g, dtype=torch.float64).to(dev)
        for _ in range(self._power_iters(k, d)):
            Q, _ = torch.linalg.qr(Q)
            Q = C @ Q
        Q, _ = torch.linalg.qr(Q)
        with small_linalg(C):
            w, U = torch.linalg.eigh(Q.T @ C @ Q)
        w, U = w.flip(0), U.flip(1)
        V = svd_flip_rows((Q @ U[:, :k]).T.contiguous())
        self._set(V, w[:k].clamp_min(0.0), acc.mean(), n, d, float(torch.diagonal(C).sum()))
        return self

    # ---------------------------------------------------------------- using
    def _need_fit(self):
        if not hasattr(self, "components_"):
            raise RuntimeError("this PCA is not fitted yet: call fit(X) first")

    def transform(self, X: Any):
        """Project rows onto the components: (X - mean) @ components^T [/ sqrt(variance)].
        Returns the input's kind (torch / numpy), in X's float dtype (float32 for non-floats)."""
        self._need_fit()
        Xt = as_tensor(X, name="X")
        if Xt.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xt.shape[1]} features, this PCA was fitted on "
                             f"{self.n_features_in_} (shape {tuple(Xt.shape)})")
        dt = Xt.dtype if Xt.dtype in (torch.float32, torch.float64) else torch.float32
        V = self.components_.to(Xt.device, dt)
        Z = (Xt.to(dt) - self.mean_.to(Xt.device, dt)) @ V.T
        if self.whiten:
            Z = Z / torch.sqrt(self.explained_variance_.to(Xt.device, dt)).clamp_min(1e-300)
        return _to_like(Z, X)

    def inverse_transform(self, Z: Any):
        """Back to the input space: Z @ components (times sqrt(variance) when whitened) + mean."""
        self._need_fit()
        Zt = as_tensor(Z, name="Z")
        if Zt.shape[1] != self.n_components_:
            raise ValueError(f"Z has {Zt.shape[1]} columns, this PCA has {self.n_components_} components")
        dt = Zt.dtype if Zt.dtype in (torch.float32, torch.float64) else torch.float32
        V = self.components_.to(Zt.device, dt)
        if self.whiten:
            V = V * torch.sqrt(self.explained_variance_.to(Zt.device, dt))[:, None]
        return _to_like(Zt.to(dt) @ V + self.mean_.to(Zt.device, dt), Z)

    def to(self, device: str | torch.device) -> "PCA":
        for name in ("components_", "explained_variance_", "explained_variance_ratio_",
                     "singular_values_", "mean_", "eigenvalues_"):
            v = getattr(self, name, None)
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.to(device))
        return self

    # ---------------------------------------------------------------- disk
    def save(self, path: str | os.PathLike) -> Path:
        """A folder with pca.safetensors (tensors) and pca.json (settings + counts)."""
        from safetensors.torch import save_file

        self._need_fit()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous().clone() for name in
                   ("components_", "explained_variance_", "explained_variance_ratio_",
                    "singular_values_", "mean_")}
        if self.eigenvalues_ is not None:
            tensors["eigenvalues_"] = self.eigenvalues_.detach().cpu().contiguous().clone()
        save_file(tensors, path / "pca.safetensors")
        meta = {"format": FORMAT, "version": 1, "n_components": self.n_components,
                "method": self.method, "whiten": self.whiten, "n_oversamples": self.n_oversamples,
                "n_iter": self.n_iter, "seed": self.seed, "precision": self.precision, "precision_": self.precision_,
                "n_samples_": self.n_samples_,
                "n_features_in_": self.n_features_in_, "noise_variance_": self.noise_variance_,
                "total_variance_": self.total_variance_}
        atomic_write(path / "pca.json", lambda f: f.write(json.dumps(meta, indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "PCA":
        from safetensors.torch import load_file

        path = Path(path)
        mf = path / "pca.json"
        if not mf.exists():
            raise FileNotFoundError(f"{path} is not a saved PCA (no pca.json)")
        meta = json.loads(mf.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{mf} is not a workbench PCA file (format {meta.get('format')!r})")
        p = cls(meta["n_components"], method=meta["method"], whiten=meta["whiten"], device=device,
                n_oversamples=meta.get("n_oversamples", 10), n_iter=meta.get("n_iter", "auto"),
                seed=meta.get("seed", 0), precision=meta.get("precision", "float64"))
        p.precision_ = meta.get("precision_", meta.get("precision", "float64"))
        t = load_file(path / "pca.safetensors")
        for name, v in t.items():
            setattr(p, name, v.to(device))
        for name in ("n_samples_", "n_features_in_", "noise_variance_", "total_variance_"):
            setattr(p, name, meta[name])
        p.n_components_ = int(p.components_.shape[0])
        return p

    def __repr__(self) -> str:
        fitted = f", fitted on {self.n_samples_} x {self.n_features_in_}" if hasattr(self, "components_") else ""
        return f"PCA(n_components={self.n_components}, method={self.method!r}, whiten={self.whiten}{fitted})"


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall Y by CholeskyQR2 (two GEMM-based passes: fast on
    CPU and GPU, unlike Householder QR of a tall matrix); Householder QR when Cholesky fails."""
    Q = Y
    for _ in range(2):
        G = (Q.T @ Q).to(torch.float64)
        with small_linalg(G):
            L, info = torch.linalg.cholesky_ex(G)
            if int(info) != 0:
                return torch.linalg.qr(Y)[0]
            Rinv = torch.linalg.solve_triangular(L.T, torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
                                                 upper=True)
        Q = Q @ Rinv.to(Q.dtype)
    return Q


def _mean_checked(X: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Column means in float64 on `dev`; a non-finite mean means a NaN/inf row (named) or overflow."""
    if X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
        with np.errstate(over="ignore", invalid="ignore"):              # reported below
            mean = torch.from_numpy(X.numpy().mean(0, dtype=np.float64)).to(dev)   # numpy: ~5x torch here
    else:
        mean = torch.zeros(X.shape[1], dtype=torch.float64, device=dev)
        for i in range(0, X.shape[0], CHUNK_ROWS):
            mean += X[i:i + CHUNK_ROWS].to(dev).to(torch.float64).sum(0)
        mean /= X.shape[0]
    if not bool(torch.isfinite(mean).all()):
        check_finite_rows(X, "X")
        raise ValueError("X: values too large: the float64 column sums overflow")
    return mean


def _sum_sq(Xc: torch.Tensor) -> float:
    """||Xc||_F^2 accumulated in float64, chunk by chunk (no float64 copy of Xc)."""
    if Xc.device.type == "cpu":
        a = Xc.numpy()
        return float(sum(float(np.square(a[s:s + CHUNK_ROWS]).sum(dtype=np.float64))
                         for s in range(0, a.shape[0], CHUNK_ROWS)))
    return float(sum(float((Xc[s:s + CHUNK_ROWS].to(torch.float64) ** 2).sum())
                     for s in range(0, Xc.shape[0], CHUNK_ROWS)))
