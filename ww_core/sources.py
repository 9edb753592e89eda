"""Find the analysable layers of a model source and load their weights lazily, one layer at a time.

Every source becomes a list of :class:`~ww_core.layer_matrices.LayerMatrices`: a name, a type, the
shape of the stack of matrices the layer contributes, an eigenvalue scale, and a ``load()`` that
returns the stack as an array of shape ``(rf, rows, cols)``. Nothing is read until ``load()`` is
called, so a large checkpoint never has more than one layer's weights in memory. The matrix
conventions (convolutions, fused q/k/v) are in :mod:`ww_core.layer_matrices`.

A torch parameter that cannot be read as the dense weight it stands for (a shard of a partitioned
weight, a quantized, lazy or meta parameter, a sparse or integer tensor) is a layer with
``unusable`` set to the reason, never analysed as it is.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np

from .errors import SourceError, in_layer
from .file_io import LazyTensor, load_torch_file, read_safetensors_header
from .keras_source import keras_model_layers
from .layer_matrices import LayerMatrices, conv_type, make_layer, split_qkv_layers
from .partitioned import full_shape, gather_full, gather_problem, partition_kind, sharded_reason
from .selection import LayerSelector
from .snapshot_memory import copy_layers
from .spectrum import is_torch_tensor

__all__ = ["Snapshot", "file_layers", "find_layers", "quantized_reason", "snapshot", "state_dict_layers",
           "torch_module_layers"]


# --------------------------------------------------------------------------- torch modules

def quantized_reason(p: Any) -> Optional[str]:
    """``"quantized weight (…)"`` for a bitsandbytes (or similar packed) parameter, else None."""
    cls = type(p).__name__
    state = getattr(p, "quant_state", None)
    if state is None and cls not in ("Params4bit", "Int8Params") and getattr(p, "SCB", None) is None:
        return None
    kind = getattr(p, "quant_type", None) or getattr(state, "quant_type", None)
    return f"quantized weight ({cls}{', ' + kind if kind else ''}, {str(p.dtype).replace('torch.', '')})"


def _torch_unusable(p: Any) -> Optional[str]:
    import torch

    sharded = sharded_reason(p)         # never analyse a local shard as if it were the weight
    if sharded:
        return sharded
    if isinstance(p, torch.nn.parameter.UninitializedParameter):
        return "uninitialised (lazy) parameter"
    if quantized_reason(p):
        return quantized_reason(p)
    if p.device.type == "meta":
        return "parameter on the meta device"
    if p.layout != torch.strided:     # sparse / mkldnn weights: no dense eigensolve
        return f"unsupported layout {p.layout}"
    if not (p.is_floating_point()):
        return f"non-float dtype {p.dtype}"
    return None


def _gatherable(p: Any) -> bool:
    return partition_kind(p) is not None and gather_problem(p) is None


def torch_module_layers(model: Any, conv_norm: bool = True, split_qkv: bool = True) -> List[LayerMatrices]:
    """Layers of a ``torch.nn.Module`` in ``named_modules()`` order; tied weights appear once."""
    import torch.nn as nn

    layers: List[LayerMatrices] = []
    seen: set = set()

    def add(name: str, ltype: str, p: Any, layout: str) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        unusable = _torch_unusable(p)
        shape = full_shape(p) if unusable != "uninitialised (lazy) parameter" else (0, 0)
        if len(shape) < (2 if layout == "matrix" else 3):     # e.g. a flat FSDP1 shard
            unusable, shape = (unusable or f"weight of shape {shape} is not a {ltype} weight "
                               f"(an FSDP1 shard? pass the FSDP-wrapped model)"), (0, 0)
        layers.append(make_layer(name, ltype, shape, layout, lambda: gather_full(p), conv_norm,
                                 str(p.dtype).replace("torch.", ""), unusable))
        layers[-1].collective = _gatherable(p)
        layers[-1].trainable = bool(p.requires_grad)

    for path, mod in model.named_modules():
        name = path or type(mod).__name__
        w = getattr(mod, "weight", None)
        cls = type(mod).__name__
        if isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is not None and id(mod.in_proj_weight) not in seen:
                p = mod.in_proj_weight
                seen.add(id(p))
                if split_qkv:
                    parts = split_qkv_layers(name, full_shape(p), lambda p=p: gather_full(p),
                                             str(p.dtype).replace("torch.", ""), _torch_unusable(p))
                    for part in parts:
                        part.collective = _gatherable(p)
                        part.trainable = bool(p.requires_grad)
                    layers.extend(parts)
            else:
                for part in "qkv":
                    p = getattr(mod, f"{part}_proj_weight", None)
                    if p is not None:
                        add(f"{name}.{part}_proj", "dense", p, "matrix")
            continue  # out_proj is a Linear submodule, found on its own
        if not isinstance(w, nn.Parameter) and not is_torch_tensor(w):
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            add(name, conv_type(len(mod.kernel_size)), w, "torch_conv")   # (lazy w has no dim())
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            add(name, "embedding", w, "matrix")
        elif isinstance(mod, nn.Linear) or ("linear" in cls.lower() and w.dim() == 2):
            add(name, "dense", w, "matrix")
        elif cls == "Conv1D" and w.dim() == 2:          # Hugging Face GPT-2 style, (in, out)
            add(name, "dense", w, "matrix")
    return layers


# --------------------------------------------------------------------------- state dicts

_EMBED_RE = re.compile(r"(embed|(^|\.)(wte|wpe)$)", re.IGNORECASE)


def _classify_key(key: str, shape: Tuple[int, ...]) -> Optional[Tuple[str, str, str]]:
    """(name, type, layout) for a weight key, or None when it is not a layer weight.

    For a fused in-projection the name is the attention module's path (``enc.self_attn`` for
    ``enc.self_attn.in_proj_weight``), as :func:`torch_module_layers` names it, so that
    :func:`~ww_core.layer_matrices.split_qkv_layers` gives the same
    ``enc.self_attn.in_proj_q/_k/_v`` from a module, its state dict or a file.
    """
    if key.endswith("in_proj_weight") and len(shape) == 2:
        if key == "in_proj_weight" or key.endswith(".in_proj_weight"):
            return key[: -len("in_proj_weight")].rstrip("."), "in_proj", "matrix"
        return key[: -len("_weight")], "in_proj", "matrix"       # e.g. ``attn.my_in_proj_weight``
    if key.endswith(".weight") or key == "weight":
        name = key[: -len(".weight")] if key != "weight" else "weight"
    else:
        return None
    if len(shape) == 2:
        return name, ("embedding" if _EMBED_RE.search(name) else "dense"), "matrix"
    if len(shape) in (3, 4, 5):
        return name, conv_type(len(shape) - 2), "torch_conv"
    return None


def _as_array(v: Any) -> Any:
    return v.detach() if is_torch_tensor(v) else np.asarray(v)


def _dtype_name(v: Any) -> str:
    return str(getattr(v, "dtype", "")).replace("torch.", "")


def _value_unusable(v: Any) -> Optional[str]:
    if is_torch_tensor(v):
        return _torch_unusable(v)
    dt = np.dtype(getattr(v, "dtype", np.float64))
    if dt.kind != "f":
        return f"non-float dtype {dt}"
    if dt.itemsize > 8:
        return f"unsupported dtype {dt}"
    return None


def state_dict_layers(sd: Mapping[str, Any], conv_norm: bool = True,
                      split_qkv: bool = True) -> List[LayerMatrices]:
    """Layers of a name → tensor/array mapping (a ``state_dict``), in key order.

    Keys ending in ``.weight`` are layers: 2-D dense (embedding when the name says ``embed``,
    ``wte`` or ``wpe``), 3/4/5-D convolutions in torch layout; ``*in_proj_weight`` is split into
    q, k, v. Norm weights and 1-D tensors are ignored. Tensors sharing storage appear once.
    """
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    layers: List[LayerMatrices] = []
    seen: set = set()
    for key, value in sd.items():
        shape = tuple(int(s) for s in getattr(value, "shape", ()))
        info = _classify_key(str(key), shape)
        if info is None:
            continue
        if is_torch_tensor(value):
            plain = (value.device.type != "meta" and str(value.layout) == "torch.strided"
                     and partition_kind(value) is None)      # (a DTensor's data_ptr() is 0)
            ident = (value.data_ptr(), shape, value.stride()) if plain else id(value)
            if ident in seen:
                continue
            seen.add(ident)
        name, ltype, layout = info
        get = value.read if isinstance(value, LazyTensor) else functools.partial(_as_array, value)
        dtype = value.dtype_name if isinstance(value, LazyTensor) else _dtype_name(value)
        unusable = value.unusable if isinstance(value, LazyTensor) else _value_unusable(value)
        if ltype == "in_proj":
            if split_qkv:
                layers.extend(split_qkv_layers(name, shape, get, dtype, unusable))
            continue
        layers.append(make_layer(name, ltype, shape, layout, get, conv_norm, dtype, unusable))
    return layers


# --------------------------------------------------------------------------- files

#: Files a training framework writes beside the weights (the HF Trainer's checkpoint folders):
#: never read, since they are not weights and unpickling them could run code.
NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt"
                         r"|rng_state(_\d+)?\.pth)$")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def folder_weight_files(path: Path) -> List[Path]:
    """The weight files of a folder: the shards its ``*.index.json`` lists (safetensors first),
    else its ``.safetensors`` files, else its ``.bin``/``.pt``/``.pth`` files other than the
    trainer's own (``training_args.bin``, optimizer, scheduler, scaler and RNG states), sorted.

    Raises:
        SourceError: an index that cannot be read or names a missing file; no weight file.
    """
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({path / str(f) for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SourceError(f"{index}: not a readable weight index ({exc})") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"{index}: lists shards that are not in the folder: {missing[:5]}")
            return files
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    files = sorted(p for p in path.iterdir()
                   if p.suffix in (".bin", ".pt", ".pth") and not NOT_WEIGHTS.match(p.name))
    if not files:
        raise SourceError(f"{path}: folder holds no .safetensors, .bin or .pt weight files")
    return files


def file_layers(path: Path, conv_norm: bool = True, split_qkv: bool = True) -> List[LayerMatrices]:
    """Layers of a .safetensors / .pt / .bin / .pth / .ckpt file or a folder of shards."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        layers: List[LayerMatrices] = []
        for f in folder_weight_files(path):  # shards in sorted order, as WeightWatcher
            layers.extend(file_layers(f, conv_norm, split_qkv))
        return layers
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        layers = state_dict_layers(read_safetensors_header(path), conv_norm, split_qkv)
    elif suffix in (".pt", ".bin", ".pth", ".ckpt"):
        layers = state_dict_layers(load_torch_file(path), conv_norm, split_qkv)   # memory-mapped
    else:
        raise SourceError(f"{path}: unknown format {suffix or '(no extension)'!r}; expected .safetensors, "
                      f".pt, .bin, .pth, .ckpt or a folder of shards")
    for layer in layers:
        layer.streamed = True
    return layers


# --------------------------------------------------------------------------- dispatch

def _is_keras_model(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras") for c in type(obj).__mro__)


def _is_torch_module(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


def find_layers(source: Any, conv_norm: bool = True, split_qkv: bool = True) -> List[LayerMatrices]:
    """Every weight-carrying layer of ``source``, weights not loaded.

    Raises:
        FileNotFoundError: a path that does not exist.
        SourceError: an unknown, unreadable or corrupt source.
    """
    if isinstance(source, Snapshot):
        return list(source.layers)
    if isinstance(source, (str, os.PathLike)):
        return file_layers(Path(source), conv_norm, split_qkv)
    if _is_keras_model(source):          # before torch: on the torch backend Keras models are Modules
        return keras_model_layers(source, conv_norm)
    if _is_torch_module(source):
        return torch_module_layers(source, conv_norm, split_qkv)
    if isinstance(source, Mapping):
        return state_dict_layers(source, conv_norm, split_qkv)
    raise SourceError(f"cannot analyse a {type(source).__name__}: expected a torch nn.Module, a Keras "
                      f"model, a state dict or a path to a weights file")


class Snapshot:
    """A private copy of the analysable weights of a model, taken at one moment.

    ``ww_core.analyze(snapshot)`` analyses it later (e.g. in a background thread) while training
    goes on changing the live weights. Tensors are copied on their own device (GPU stays GPU).

    Example:
        >>> import torch, ww_core
        >>> model = torch.nn.Linear(64, 32)
        >>> snap = ww_core.snapshot(model)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(0)                    # training goes on...
        >>> ww_core.analyze(snap)["Linear"].alpha > 0       # ...the snapshot is unchanged
        True
    """

    #: Bytes copied to the device and to the host (:func:`snapshot`), else ``None``.
    placement: Optional[dict] = None

    def __init__(self, layers: List[LayerMatrices], conv2d_norm: bool = True, split_qkv: bool = True):
        self.layers = layers
        #: Fixed when the snapshot was taken; ``analyze(snapshot)`` reports these.
        self.conv2d_norm, self.split_qkv = conv2d_norm, split_qkv

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"Snapshot({len(self.layers)} layers)"


def snapshot(source: Any, *, layers: Any = None, layer_types: Any = None, conv2d_norm: bool = True,
             split_qkv: bool = True, budget: Any = "auto", trainable: Optional[bool] = None) -> Snapshot:
    """Copy the weights of the layers of ``source`` that an analysis would look at.

    Args:
        source: anything :func:`ww_core.analyze` accepts (a file source is read once, now).
        layers: regex or list of regexes; only matching layer names are copied.
        layer_types: only these layer types are copied.
        conv2d_norm, split_qkv: as in :func:`ww_core.analyze`; fixed at snapshot time.
        trainable: ``True`` copies only weights that may train (``requires_grad``, or unknown),
            ``False`` only frozen ones; ``None`` all (as :func:`ww_core.analyze`'s ``trainable``).
        budget: bytes the copies may take (:mod:`ww_core.snapshot_memory`): on the weights'
            device first; from CUDA, the rest in pinned host memory (within the same number, or
            the host's default when ``"auto"``). ``"auto"``: the smaller of 2 GB and 10 % of the
            device's memory. ``None``: no limit, everything on the weights' device.

    Returns:
        A :class:`Snapshot`; ``snapshot.placement`` says how many bytes went where. An exception
        raised while a layer is copied carries its name (:func:`ww_core.errors.failing_layer`).

    Raises:
        ValueError: invalid ``layers``, ``layer_types`` or ``budget``.
        ww_core.SnapshotBudgetError: the copies would exceed the budget (raised
            before anything is copied; a ``MemoryError``).
        FileNotFoundError: as :func:`find_layers`.
        SourceError: as :func:`find_layers`.
    """
    selector = LayerSelector(layers, layer_types)
    found = selector.select(find_layers(source, conv_norm=conv2d_norm, split_qkv=split_qkv))
    if trainable is not None:            # unknown (None) counts as trainable, as in analyze()
        found = [lm for lm in found if (lm.trainable is False) != bool(trainable)]
    kept, placement = copy_layers(found, budget, in_layer)
    snap = Snapshot(kept, conv2d_norm=conv2d_norm, split_qkv=split_qkv)
    snap.placement = placement
    return snap
