"""Plots of an analysis: the empirical spectral density (ESD) of a layer with its power-law fit,
and alpha per layer. matplotlib is imported only when a function here is called.

Example:
    (not run as a doctest: it writes files)::

        res = ww_core.analyze(model, keep_evals=True)
        ww_core.plots.plot_esd(res["fc1"])
        ww_core.plots.save_plots(res, "ww-plots/")
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

# Public (README "Quickstart"): the plots of a result. The rest serves them and ``ww-analyze``.
__all__ = ["plot_alphas", "plot_esd", "save_plots"]

#: WeightWatcher's thresholds: alpha < 2 "over-trained", alpha > 6 "under-trained".
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0
#: Eigenvalues at or below this are not fitted (WeightWatcher's EVALS_THRESH) nor plotted.
EVALS_THRESH = 1e-5
_FIT_GID = "powerlaw-fit"
_XMIN_GID = "xmin"


def require_matplotlib():
    """Import matplotlib (with the Agg backend when there is no display) or raise ImportError."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install 'ww-callbacks[plot]' (or pip install matplotlib)"
        ) from exc
    if ("matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND")
            and sys.platform.startswith("linux")
            and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))):
        matplotlib.use("Agg")
    return matplotlib


def _new_axes():
    require_matplotlib()
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(6.4, 4.8))
    return ax


def _figure_axes(figsize):
    """An Axes on a standalone Figure (not registered with pyplot: freed when dropped)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot(1, 1, 1)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def powerlaw_line(alpha: float, xmin: float, xmax: float, tail_fraction: float,
                  num: int = 64) -> "tuple[np.ndarray, np.ndarray]":
    """Points of the fitted density ``p(x) = f (alpha-1)/xmin (x/xmin)^-alpha`` on [xmin, xmax].

    ``f`` (``tail_fraction``) is the share of eigenvalues >= xmin, so the line has the same
    normalisation as a density histogram of all eigenvalues.
    """
    x = np.logspace(math.log10(xmin), math.log10(xmax), num)
    y = tail_fraction * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)
    return x, y


def plot_esd(layer, ax=None, *, evals: Optional[np.ndarray] = None, bins: int = 100):
    """Histogram of a layer's eigenvalues on log-log axes with the fitted power law.

    Args:
        layer: a :class:`~ww_core.result.LayerResult`.
        ax: matplotlib Axes to draw on (a new pyplot figure when None).
        evals: the eigenvalues; default ``layer.evals`` (``analyze(..., keep_evals=True)``).
        bins: number of log-spaced bins.

    Draws the density histogram (log-spaced bins), the power law
    ``p(lambda) ~ lambda^-alpha`` over [xmin, xmax] normalised to the tail's share of the
    eigenvalues, a dashed vertical line at xmin, and the randomised ESD as an outline when
    ``layer.rand_evals`` is available. Returns the Axes.
    """
    if evals is None:
        evals = layer.evals
    if evals is None:
        raise ValueError(
            f"layer {layer.name!r} has no eigenvalues: run ww_core.analyze(..., keep_evals=True) "
            "or pass evals=")
    ev = np.asarray(evals, dtype=float).ravel()
    ev = ev[np.isfinite(ev) & (ev > EVALS_THRESH)]
    if ax is None:
        ax = _new_axes()
    if ev.size == 0:
        ax.set_title(f"{layer.name}: no positive eigenvalues")
        return ax

    lo, hi = float(ev.min()), float(ev.max())
    if hi <= lo:
        lo, hi = lo / 1.1, hi * 1.1
    edges = np.logspace(math.log10(lo), math.log10(hi), max(int(bins), 1) + 1)
    ax.hist(ev, bins=edges, density=True, color="tab:blue", alpha=0.6, label="ESD")

    rand = getattr(layer, "rand_evals", None)
    if rand is not None:
        rv = np.asarray(rand, dtype=float).ravel()
        rv = rv[np.isfinite(rv) & (rv > EVALS_THRESH)]
        if rv.size:
            r_edges = np.logspace(math.log10(min(lo, rv.min())), math.log10(max(hi, rv.max())),
                                  max(int(bins), 1) + 1)
            ax.hist(rv, bins=r_edges, density=True, histtype="step", color="tab:red",
                    label="randomised ESD")

    alpha, xmin, xmax = layer.alpha, layer.xmin, layer.xmax
    fitted = _finite(alpha) and _finite(xmin) and xmin > 0 and alpha > 1
    if fitted:
        if not (_finite(xmax) and xmax > xmin):
            xmax = hi
        tail = float(np.count_nonzero(ev >= xmin)) / ev.size
        if tail > 0:
            x, y = powerlaw_line(float(alpha), float(xmin), float(xmax), tail)
            ax.plot(x, y, color="black", lw=2, gid=_FIT_GID,
                    label=f"power law fit, alpha={alpha:.2f}")
        ax.axvline(xmin, color="tab:red", ls="--", lw=1, gid=_XMIN_GID, label=f"xmin={xmin:.3g}")
        title = f"{layer.name}  alpha={alpha:.3f}  D={layer.D:.3f}"
    else:
        reason = ", ".join(layer.flags) if layer.flags else "no fit"
        title = f"{layer.name}  alpha=nan ({reason})"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue  lambda")
    ax.set_ylabel("density  p(lambda)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return ax


def plot_alphas(result, ax=None, *, cap: float = 20.0):
    """Alpha of each analysed layer in model order, with the 2-6 band marked.

    Layers with a flag are drawn in red; failed fits (alpha nan) as a red dotted vertical line;
    alphas above ``cap`` are drawn at ``cap`` with an up-pointing marker. Returns the Axes.
    """
    if ax is None:
        ax = _new_axes()
    layers = list(result.layers)
    n = len(layers)
    x = np.arange(n)
    alpha = np.array([float(l.alpha) for l in layers], dtype=float)
    flagged = np.array([bool(l.flags) for l in layers], dtype=bool)
    finite = np.isfinite(alpha)

    top = max(8.0, min(cap, float(np.nanmax(alpha)) * 1.08 if finite.any() else 8.0))
    shown = np.minimum(alpha, top)
    over = finite & (alpha > top)

    ax.axhspan(ALPHA_LOW, ALPHA_HIGH, color="tab:green", alpha=0.08, zorder=0,
               label=f"{ALPHA_LOW:g} <= alpha <= {ALPHA_HIGH:g}")
    ax.axhline(ALPHA_LOW, color="tab:green", lw=0.8, ls="--", zorder=1)
    ax.axhline(ALPHA_HIGH, color="tab:orange", lw=0.8, ls="--", zorder=1)
    if n:
        ax.plot(x[finite], shown[finite], color="0.6", lw=0.8, zorder=2)
    ok = finite & ~flagged
    bad = finite & flagged
    ax.scatter(x[ok & ~over], shown[ok & ~over], color="tab:blue", s=22, zorder=3, label="alpha")
    ax.scatter(x[bad & ~over], shown[bad & ~over], color="tab:red", s=30, zorder=4,
               label="flagged layer")
    if over.any():
        ax.scatter(x[over], shown[over], marker="^", s=40, zorder=4,
                   color=np.where(flagged[over], "tab:red", "tab:blue"),
                   label=f"alpha > {top:.3g} (clipped)")
    for i in np.flatnonzero(~finite):
        ax.axvline(i, color="tab:red", ls=":", lw=1, zorder=1)
    if (~finite).any():
        ax.plot([], [], color="tab:red", ls=":", label="fit failed (nan)")

    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.set_ylim(0, top * 1.02)
    if 0 < n <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels([l.name for l in layers], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("layer index (model order)")
    ax.set_ylabel("alpha")
    mean = float(np.mean(alpha[finite])) if finite.any() else float("nan")
    ax.set_title(f"alpha by layer ({n} layers, mean alpha {mean:.2f})", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return ax


def safe_name(name: str) -> str:
    """``name`` reduced to characters that are safe in a file name on every platform."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe[:150] or "layer"


def save_plots(result, directory) -> List[Path]:
    """Write ``alpha_by_layer.png`` and ``esd_<layer name>.png`` per layer into ``directory``.

    ESD plots need the eigenvalues (``analyze(..., keep_evals=True)``); layers without them are
    left out with a warning, and a ValueError is raised when no layer has them.
    Returns the written paths, ``alpha_by_layer.png`` first.
    """
    require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(result.layers)
    with_evals = [l for l in layers if l.evals is not None]
    if layers and not with_evals:
        raise ValueError("no layer has eigenvalues: run ww_core.analyze(..., keep_evals=True) "
                         "before save_plots()")
    missing = [l.name for l in layers if l.evals is None]
    if missing:
        warnings.warn(f"no eigenvalues kept for {len(missing)} layers, no ESD plot for them: "
                      f"{missing[:5]}", stacklevel=2)

    written: List[Path] = []
    width = min(max(6.4, 0.18 * len(layers) + 2), 40)
    fig, ax = _figure_axes((width, 4.8))
    plot_alphas(result, ax)
    fig.tight_layout()
    path = directory / "alpha_by_layer.png"
    fig.savefig(path, dpi=100)
    written.append(path)

    used = set()
    for layer in with_evals:
        stem = f"esd_{safe_name(layer.name)}"
        candidate, k = stem, 2
        while candidate in used:
            candidate, k = f"{stem}_{k}", k + 1
        used.add(candidate)
        fig, ax = _figure_axes((6.4, 4.8))
        plot_esd(layer, ax)
        fig.tight_layout()
        path = directory / f"{candidate}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
