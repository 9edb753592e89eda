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
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np

PRECISIONS = ("auto", "float64", "float32")
SOLVERS = ("gram", "svd")


def is_torch_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch when it has not been imported."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def eigenvalues(batch: Any, precision: str = "float64", solver: str = "gram") -> np.ndarray:
    """Eigenvalues of WᵀW for each matrix of ``batch`` (shape ``(rf, rows, cols)``).

    Args:
        batch: a numpy array or torch tensor of shape (rf, rows, cols), any float dtype; or a
            list of them whose matrices have the same smaller side and the same larger side (in
            either orientation), solved in one call without copying the weights together.
        precision: ``"float64"`` (matches WeightWatcher to rounding), ``"float32"`` (about twice
            as fast on a CPU; eigenvalues off by at most ~1e-6·λ_max on real layers, see
            :mod:`ww_core.precision`) or ``"auto"`` (here the same as float32; it is
            :func:`ww_core.analyze` that checks the result and re-solves where needed).
        solver: ``"gram"`` (eigvalsh of the smaller Gram matrix) or ``"svd"`` (singular values).

    Returns:
        float64 array of shape (total rf, min(rows, cols)), each row ascending, clipped at 0.

    Raises:
        NonFiniteError: the weights hold NaN/inf, or their squares overflow. Detected on the
            Gram matrix's diagonal (Σ w², non-finite exactly when a row or column is), so healthy
            weights need no separate full pass.

    Example:
        >>> w = np.diag([3.0, 2.0, 1.0])[None]
        >>> eigenvalues(w).round(6).tolist()
        [[1.0, 4.0, 9.0]]
        >>> eigenvalues([w, np.ones((1, 3, 4))]).round(6).tolist()
        [[1.0, 4.0, 9.0], [0.0, 0.0, 12.0]]
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if any(is_torch_tensor(p) for p in parts) or torch_available():
        # One solver for every source: a module, its state dict and its safetensors file then give
        # bit-identical eigenvalues (numpy's LAPACK and torch's round differently).
        return _torch_eigenvalues([p if is_torch_tensor(p) else _from_numpy(p) for p in parts],
                                  precision, solver)
    return _numpy_eigenvalues(np.concatenate([_tall(np.asarray(p)) for p in parts]), precision,
                              solver)


def _from_numpy(a: Any) -> Any:
    import torch

    a = np.asarray(a)
    return torch.from_numpy(np.require(a, dtype=a.dtype.newbyteorder("="), requirements=["C", "W"]))


def _tall(w: np.ndarray) -> np.ndarray:
    return w if w.shape[-2] >= w.shape[-1] else np.swapaxes(w, -1, -2)


@functools.lru_cache(maxsize=None)
def torch_available() -> bool:
    """True when torch is installed (it is then used for every eigensolve)."""
    return importlib.util.find_spec("torch") is not None


class NonFiniteError(FloatingPointError):
    """The weights (or the squares of their entries) are not finite."""


#: What an eigensolve raises on numerical trouble (a flag on the layer, never an error).
SOLVE_ERRORS = (NonFiniteError, RuntimeError, ValueError, np.linalg.LinAlgError)


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


def _torch_eigenvalues(parts: List[Any], precision: str, solver: str) -> np.ndarray:
    import torch

    dtype = torch.float64 if precision == "float64" else torch.float32
    with torch.no_grad():
        if solver == "svd":
            device = parts[0].device
            w = torch.cat([_tall_tensor(p.detach().to(device=device, dtype=dtype)) for p in parts])
            if not bool(torch.isfinite(w).all()):
                raise NonFiniteError("non-finite weights")
            ev = torch.linalg.svdvals(w) ** 2
            ev = torch.sort(ev, dim=-1).values
        else:
            ev = _batched_eigvalsh(_torch_gram(parts, dtype))
        return _as_evals(ev)


def _torch_gram(parts: List[Any], dtype: Any) -> Any:
    """The Gram matrices of ``parts`` (smaller side), part by part (the weights themselves are
    never copied together), stacked; :class:`NonFiniteError` when one is not finite."""
    import torch

    device = parts[0].device
    grams = []
    with torch.no_grad():
        for p in parts:
            w = p.detach().to(dtype)
            rows, cols = w.shape[-2:]
            grams.append((w.mT @ w if rows >= cols else w @ w.mT).to(device))
        gram = grams[0] if len(grams) == 1 else torch.cat(grams)
        if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all()):
            raise NonFiniteError("non-finite Gram matrix")
    return gram


def _as_evals(ev: Any) -> np.ndarray:
    return np.clip(ev.cpu().numpy().astype(np.float64), 0.0, None)


class Later:
    """What :func:`eigenvalues_later` returns: call it for the eigenvalues (it waits for them and
    raises what :func:`eigenvalues` would); :attr:`ready` is ``True`` when they were computed at
    once (nothing runs in the background)."""

    __slots__ = ("_get", "ready", "_futures")

    def __init__(self, get: Callable[[], np.ndarray], ready: bool, futures: Sequence[Any] = ()) -> None:
        self._get, self.ready, self._futures = get, ready, tuple(futures)

    def __call__(self) -> np.ndarray:
        return self._get()

    @property
    def running(self) -> int:
        """How many of its eigensolves (one per solver thread used) are queued or running."""
        return sum(not future.done() for future in self._futures)

    def cancel(self) -> None:
        """Drop the eigensolves that have not started yet (the result is not wanted)."""
        for future in self._futures:
            future.cancel()


def eigenvalues_later(batch: Any, precision: str = "float64", solver: str = "gram") -> Later:
    """:func:`eigenvalues`, started now and collected later.

    Where :func:`eigenvalues` would solve small matrices on the solver pool (torch on a CPU with
    two or more threads, the ``"gram"`` solver, matrices below :data:`POOL_MAX_N`), the Gram
    matrices are formed here and the eigensolve is queued on that pool, split as
    :func:`eigenvalues` splits it (one thread per matrix): the same eigenvalues to the bit, while
    the caller goes on with other work. Everything else is solved here and now
    (:attr:`Later.ready`).

    Args:
        batch, precision, solver: as :func:`eigenvalues`.

    Returns:
        A :class:`Later`: call it for what :func:`eigenvalues` returns.

    Raises:
        ValueError: an invalid ``precision`` or ``solver``.
        NonFiniteError: the weights are not finite (here, or when the :class:`Later` is called).

    Example:
        >>> later = eigenvalues_later(np.diag([3.0, 2.0, 1.0])[None])
        >>> later().round(6).tolist()
        [[1.0, 4.0, 9.0]]
    """
    parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if solver != "gram" or precision not in PRECISIONS or not torch_available():
        done = eigenvalues(batch, precision, solver)
        return Later(lambda: done, True)
    import torch

    parts = [p if is_torch_tensor(p) else _from_numpy(p) for p in parts]
    gram = _torch_gram(parts, torch.float64 if precision == "float64" else torch.float32)
    futures = _queue_eigvalsh(gram)
    if futures is None:
        done = _as_evals(torch.linalg.eigvalsh(gram))
        return Later(lambda: done, True)
    return Later(lambda: _as_evals(torch.cat([f.result() for f in futures])), False, futures)


def _tall_tensor(w: Any) -> Any:
    return w if w.shape[-2] >= w.shape[-1] else w.mT


# A batch of small symmetric eigenproblems barely profits from LAPACK's own threads, but solving
# its matrices side by side, one thread each, uses every core: 30 Gram matrices of 384² solve in
# 0.06 s this way instead of 0.11 s on 2 cores. The workers pin torch's intra-op threads to 1 (a
# per-thread setting: the caller's threads are untouched). LAPACK's rounding depends on its thread
# count, so the route depends only on the matrix size, never on the batch: a layer gets the same
# eigenvalues alone, in a batch, from a file or on one rank of many. Large matrices keep LAPACK's
# threads (4096²: 0.92 s with 2 threads, 1.37 s with 1).
POOL_MAX_N = 2048
_POOL: Optional[ThreadPoolExecutor] = None
_RETIRED: List[ThreadPoolExecutor] = []       # smaller pools replaced by a larger one
_POOL_LOCK = threading.Lock()


def _solver_pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:   # grows, never shrinks
            import torch

            if _POOL is not None:       # (not shut down: another thread may still submit to it)
                _RETIRED.append(_POOL)
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="ww-eigvalsh",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _POOL


def _forget_pool_in_child() -> None:
    # A forked child (a DataLoader worker, say) inherits the executor but not its threads.
    global _POOL
    _POOL = None
    _RETIRED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _queue_eigvalsh(gram: Any) -> Optional[List[Any]]:
    """The futures of ``torch.linalg.eigvalsh`` of a ``(b, n, n)`` batch queued on the solver
    pool, split over the torch threads (small CPU matrices, one thread each), in order; ``None``
    when the batch is to be solved on the calling thread (large matrices, a GPU, one thread)."""
    import torch

    threads = pool_solves("gram", gram.shape[-1], gram.device.type)
    if not threads:
        return None
    chunks = gram.tensor_split(min(gram.shape[0], threads))
    pool = _solver_pool(threads)        # (one worker per thread: several calls may be queued)
    return [pool.submit(torch.linalg.eigvalsh, chunk) for chunk in chunks]


def pool_solves(solver: str = "gram", n: int = 0, device: str = "cpu") -> int:
    """The solver pool's threads when the eigensolve of ``n×n`` Gram matrices on ``device`` goes
    to that pool (torch installed, the ``"gram"`` solver, a CPU, ``n`` below :data:`POOL_MAX_N`,
    two or more torch threads), else 0: the one route rule of :func:`eigenvalues`,
    :func:`eigenvalues_later` and the layers solved ahead (:mod:`ww_core.batching`).

    Example:
        >>> pool_solves("svd")
        0
    """
    if solver != "gram" or device != "cpu" or n >= POOL_MAX_N or not torch_available():
        return 0
    import torch

    threads = torch.get_num_threads()
    return threads if threads >= 2 else 0


def _batched_eigvalsh(gram: Any) -> Any:
    """``torch.linalg.eigvalsh`` of a ``(b, n, n)`` batch; small CPU matrices one thread each."""
    import torch

    futures = _queue_eigvalsh(gram)
    if futures is None:
        return torch.linalg.eigvalsh(gram)
    return torch.cat([f.result() for f in futures])


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> List[Any]:
    """``[fn(x) for x in items]``, spread over the caller's torch threads for CPU work."""
    items = list(items)
    if len(items) < 2 or not torch_available():
        return [fn(x) for x in items]
    import torch

    workers = min(len(items), torch.get_num_threads())
    if workers < 2:
        return [fn(x) for x in items]
    return list(_solver_pool(workers).map(fn, items))
