"""Keras 3 models as ``LayerMatrices``: kernels of Dense, Conv and EinsumDense layers.

Variables are read with ``keras.ops.convert_to_numpy``, so this works on every backend (torch,
JAX, TensorFlow) without torch.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import numpy as np

from .layer_matrices import LayerMatrices, conv_type, make_layer
from .spectrum import is_torch_tensor

__all__ = ["keras_model_layers"]


def _keras_to_numpy(v: Any) -> np.ndarray:
    value = getattr(v, "value", v)
    if is_torch_tensor(value):
        return value.detach()
    try:
        import keras

        return keras.ops.convert_to_numpy(value)
    except Exception:  # noqa: BLE001 - any backend tensor that numpy understands
        return np.asarray(value)


def _einsum_kernel_matrix_shape(equation: str, kshape: Tuple[int, ...]) -> Tuple[int, int]:
    """Rows = kernel axes contracted with the input, cols = the rest (e.g. 'abc,cde->abde')."""
    lhs, _ = equation.split("->")
    inp, ker = lhs.split(",")
    rows = int(np.prod([s for ax, s in zip(ker, kshape) if ax in inp]))
    cols = int(np.prod([s for ax, s in zip(ker, kshape) if ax not in inp]))
    return rows, cols


def keras_model_layers(model: Any, conv_norm: bool = True) -> List[LayerMatrices]:
    """Layers of a Keras 3 model (Dense, EinsumDense, Conv1D/2D/3D, Embedding, MHA projections)."""
    layers: List[LayerMatrices] = []
    seen: set = set()
    if hasattr(model, "_flatten_layers"):
        found = list(model._flatten_layers(include_self=False, recursive=True))
    else:  # pragma: no cover - very old Keras
        found = list(getattr(model, "layers", []))
    for layer in found:
        cls = type(layer).__name__
        name = str(getattr(layer, "path", None) or layer.name).replace("/", ".")
        if cls in ("Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D"):
            attrs = ("_kernel", "kernel")
        elif cls == "Embedding":
            attrs = ("_embeddings", "embeddings")
        else:
            continue
        # (Keras variables refuse bool(), so no `a or b` here)
        var = next((v for v in (getattr(layer, a, None) for a in attrs) if v is not None), None)
        if var is None or id(var) in seen:
            continue
        seen.add(id(var))
        shape = tuple(int(s) for s in var.shape)
        def get(var: Any = var) -> Any:
            return _keras_to_numpy(var)
        dtype = str(getattr(var, "dtype", ""))
        if cls in ("Conv1D", "Conv2D", "Conv3D"):
            layers.append(make_layer(name, conv_type(len(shape) - 2), shape, "keras_conv", get,
                                     conv_norm, dtype))
        elif cls == "EinsumDense" and len(shape) != 2:
            rows, cols = _einsum_kernel_matrix_shape(layer.equation, shape)
            def getter(get: Callable[[], Any] = get, rows: int = rows, cols: int = cols) -> Any:
                return get().reshape(rows, cols)
            layers.append(make_layer(name, "dense", (rows, cols), "matrix", getter, conv_norm, dtype))
        else:
            layers.append(make_layer(name, "embedding" if cls == "Embedding" else "dense", shape,
                                     "matrix", get, conv_norm, dtype))
        layers[-1].trainable = bool(getattr(var, "trainable", True))
    return layers

