"""``LayerMatrices``, the unit the engine analyses, and the builders that make one from a weight.

Every reader (:mod:`ww_core.sources` for torch modules, state dicts and files;
:mod:`ww_core.keras_source` for Keras 3 models) turns a weight into a :class:`LayerMatrices` with
:func:`make_layer`: its shape as a stack of matrices ``(rf, rows, cols)``, its eigenvalue scale,
and a ``load()`` that reshapes the weight when called. Nothing here imports a framework.

Matrix conventions (so that alphas agree with WeightWatcher):

* Linear / Dense / HF ``Conv1D`` / Embedding: one matrix (rf = 1); orientation does not matter.
* Convolutions (1-D, 2-D, 3-D; torch layout ``(out, in, *k)``, Keras layout ``(*k, in, out)``):
  one ``out × in`` matrix per kernel position (rf = prod(k)), pooled; the eigenvalues are multiplied
  by 0.5 (WeightWatcher's ``conv2d_norm``; we apply it to every convolution).
* A fused attention in-projection (3d × d) is split into q, k and v (:func:`split_qkv_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .spectrum import is_torch_tensor

__all__ = ["CONV_SCALE", "LAYOUTS", "LayerMatrices", "conv_type", "make_layer", "split_qkv_layers"]

#: Eigenvalue scale of pooled convolution slices (WeightWatcher multiplies each slice by sqrt(1/2)).
CONV_SCALE = 0.5
#: How a weight is laid out: one matrix, a torch convolution ``(out, in, *k)`` or a Keras one
#: ``(*k, in, out)``.
LAYOUTS = ("matrix", "torch_conv", "keras_conv")


@dataclass
class LayerMatrices:
    """One analysable layer, its weights not yet loaded."""

    name: str
    type: str
    rf: int
    rows: int
    cols: int
    load: Callable[[], Any]
    scale: float = 1.0
    #: Why the layer cannot be analysed even though it has weights (e.g. "meta device").
    unusable: Optional[str] = None
    dtype: str = ""
    #: Read from a file on demand: never batched with other layers, so one layer is in memory.
    streamed: bool = False
    #: ``requires_grad`` of the weight (Keras: ``trainable``); None when unknown (state dicts).
    trainable: Optional[bool] = None
    #: Keep only the top this many eigenvalues (WeightWatcher's LoRA layers: the rank).
    num_components: Optional[int] = None
    #: ``load()`` gathers a sharded weight (FSDP2 / ZeRO-3), a collective: the layer is
    #: ``unusable`` for ``analyze``; :func:`ww_core.gather_snapshot` calls it on every rank.
    collective: bool = False

    @property
    def N(self) -> int:
        return max(self.rows, self.cols)

    @property
    def M(self) -> int:
        return min(self.rows, self.cols)

    @property
    def num_evals(self) -> int:
        return self.M * self.rf if self.num_components is None else self.num_components

    @property
    def size(self) -> int:
        """Weight entries of the loaded ``(rf, rows, cols)`` stack."""
        return self.rf * self.rows * self.cols


def _as_stack(w: Any, layout: str) -> Any:
    """Reshape one weight tensor (numpy or torch) into a (rf, rows, cols) stack of matrices."""
    if layout == "matrix":
        return w[None]
    shape = tuple(w.shape)
    if layout == "torch_conv":            # (out, in, *k) -> (k, out, in), kernel positions row-major
        out_c, in_c = shape[0], shape[1]
        w3 = w.reshape(out_c, in_c, -1)
        return w3.permute(2, 0, 1) if is_torch_tensor(w3) else w3.transpose(2, 0, 1)
    if layout == "keras_conv":            # (*k, in, out) -> (k, in, out)
        return w.reshape(-1, shape[-2], shape[-1])
    raise ValueError(layout)


def _stack_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, int, int]:
    if layout == "matrix":
        return 1, shape[0], shape[1]
    if layout == "torch_conv":
        return int(np.prod(shape[2:])), shape[0], shape[1]
    return int(np.prod(shape[:-2])), shape[-2], shape[-1]


def conv_type(ndim_kernel: int) -> str:
    """The layer type of a convolution with a kernel of ``ndim_kernel`` dimensions.

    Example:
        >>> conv_type(2)
        'conv2d'
    """
    return {1: "conv1d", 2: "conv2d", 3: "conv3d"}[ndim_kernel]


def make_layer(name: str, ltype: str, shape: Tuple[int, ...], layout: str, get: Callable[[], Any],
               conv_norm: bool, dtype: str = "", unusable: Optional[str] = None) -> LayerMatrices:
    """A :class:`LayerMatrices` for a weight of ``shape`` in ``layout`` (one of :data:`LAYOUTS`),
    read by ``get()`` only when the layer's ``load()`` is called.

    Example:
        >>> lm = make_layer("c", "conv2d", (8, 4, 3, 3), "torch_conv", lambda: np.ones((8, 4, 3, 3)), True)
        >>> (lm.rf, lm.rows, lm.cols, lm.scale), lm.load().shape
        ((9, 8, 4, 0.5), (9, 8, 4))
    """
    rf, rows, cols = _stack_shape(tuple(int(s) for s in shape), layout)
    scale = CONV_SCALE if (ltype.startswith("conv") and conv_norm) else 1.0
    return LayerMatrices(name=name, type=ltype, rf=rf, rows=rows, cols=cols,
                         load=lambda: _as_stack(get(), layout), scale=scale, unusable=unusable,
                         dtype=dtype)


def split_qkv_layers(name: str, shape: Tuple[int, ...], get: Callable[[], Any], dtype: str,
                     unusable: Optional[str]) -> List[LayerMatrices]:
    """Split a fused (3d × d) in-projection of the attention module ``name`` into its q, k and v
    matrices, ``<name>.in_proj_q/_k/_v`` (``in_proj_q/_k/_v`` when ``name`` is empty).

    Example:
        >>> [lm.name for lm in split_qkv_layers("attn", (24, 8), lambda: np.ones((24, 8)), "", None)]
        ['attn.in_proj_q', 'attn.in_proj_k', 'attn.in_proj_v']
    """
    prefix = f"{name}." if name else ""
    d3 = int(shape[0])
    if d3 % 3:
        return [make_layer(prefix + "in_proj", "dense", shape, "matrix", get, False, dtype, unusable)]
    d = d3 // 3
    out = []
    for i, part in enumerate("qkv"):
        def getter(i: int = i) -> Any:
            return get()[i * d:(i + 1) * d]
        out.append(make_layer(f"{prefix}in_proj_{part}", "dense", (d,) + tuple(shape[1:]), "matrix",
                              getter, False, dtype, unusable))
    return out
