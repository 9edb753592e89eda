"""Eigenvalues of WᵀW for a batch of same-shaped weight matrices.

The eigenvalues of WᵀW are the squared singular values of W. They are computed from the Gram
matrix of the smaller side with a symmetric eigensolver, which is several times cheaper than an SVD
and gives the same spectrum to float64 rounding for every eigenvalue that matters to the tail fit.
torch is used whenever it is installed (for torch tensors on their own device, GPU included);
numpy's LAPACK otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np

PRECISIONS = ("auto", "float64", "float32")
SOLVERS = ("gram", "svd")


def is_torch_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch when it has not been imported."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def eigenvalues(batch: Any, precision: str = "float64", solver: str = "gram") -> np.ndarray:
    """Eigenvalues of WᵀW for each matrix of ``batch`` (shape ``(rf, rows, cols)``).

    Args:
        batch: a numpy array or torch tensor of shape (rf, rows, cols), any float dtype.
        precision: ``"auto"`` (float32 for weights on a GPU, float64 otherwise), ``"float64"``
            (matches WeightWatcher to rounding) or ``"float32"``. On a 2-core CPU float32 saves
            ~40% on a small transformer (MiniLM-L6: 0.27 s vs 0.46 s) and changes alpha by at
            most 8e-5 on real models (docs/performance.md), but its rounding floor (~1e-7·λ_max)
            hides near-zero eigenvalues, so CPUs default to exact float64.
        solver: ``"gram"`` (eigvalsh of the smaller Gram matrix) or ``"svd"`` (singular values).

    Returns:
        float64 array of shape (rf, min(rows, cols)), each row ascending, clipped at 0.

    Raises:
        NonFiniteError: the weights hold NaN/inf, or their squares overflow. Detected on the
            Gram matrix's diagonal (Σ w², non-finite exactly when a row or column is), so healthy
            weights need no separate full pass.

    Example:
        >>> w = np.diag([3.0, 2.0, 1.0])[None]
        >>> eigenvalues(w).round(6).tolist()
        [[1.0, 4.0, 9.0]]
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if is_torch_tensor(batch):
        return _torch_eigenvalues(batch, precision, solver)
    if torch_available():
        # One solver for every source: a module, its state dict and its safetensors file then give
        # bit-identical eigenvalues (numpy's LAPACK and torch's round differently).
        import torch

        return _torch_eigenvalues(torch.from_numpy(np.require(batch, dtype=batch.dtype.newbyteorder("="), requirements=["C", "W"])), precision, solver)
    return _numpy_eigenvalues(np.asarray(batch), precision, solver)


@functools.lru_cache(maxsize=None)
def torch_available() -> bool:
    """True when torch is installed (it is then used for every eigensolve)."""
    return importlib.util.find_spec("torch") is not None


class NonFiniteError(FloatingPointError):
    """The weights (or the squares of their entries) are not finite."""


def _numpy_eigenvalues(batch: np.ndarray, precision: str, solver: str) -> np.ndarray:
    dtype = np.float32 if precision == "float32" else np.float64
    w = batch.astype(dtype, copy=False)
    if solver == "svd":
        if not np.isfinite(w).all():
            raise NonFiniteError("non-finite weights")
        sv = np.linalg.svd(w, compute_uv=False)
        return np.sort(sv.astype(np.float64) ** 2, axis=-1)
    rows, cols = w.shape[-2:]
    wt = np.swapaxes(w, -1, -2)
    with np.errstate(over="ignore", invalid="ignore"):
        gram = wt @ w if rows >= cols else w @ wt
    if not np.isfinite(np.diagonal(gram, axis1=-2, axis2=-1)).all():
        raise NonFiniteError("non-finite Gram matrix")
    ev = np.linalg.eigvalsh(gram).astype(np.float64)
    return np.clip(ev, 0.0, None)


def _torch_eigenvalues(batch: Any, precision: str, solver: str) -> np.ndarray:
    import torch

    if precision == "auto":
        precision = "float64" if batch.device.type == "cpu" else "float32"   # (MPS has no float64)
    dtype = torch.float64 if precision == "float64" else torch.float32
    with torch.no_grad():
        w = batch.detach().to(dtype)
        if solver == "svd":
            if not bool(torch.isfinite(w).all()):
                raise NonFiniteError("non-finite weights")
            ev = torch.linalg.svdvals(w) ** 2
            ev = torch.sort(ev, dim=-1).values
        else:
            rows, cols = w.shape[-2:]
            gram = w.mT @ w if rows >= cols else w @ w.mT
            if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all()):
                raise NonFiniteError("non-finite Gram matrix")
            ev = torch.linalg.eigvalsh(gram)
        return np.clip(ev.cpu().numpy().astype(np.float64), 0.0, None)
