"""LoRA / PEFT adapters and fine-tuning deltas, as WeightWatcher 0.7.7 analyses them.

:func:`peft_layers` turns the ``lora_A`` / ``lora_B`` layers of a model (a PEFT ``nn.Module``, its
state dict, or an ``adapter_model.safetensors``) into the layers ``analyze(peft=...)`` reports;
:func:`delta_layers` turns each layer into ``W − W₀`` against a base model (``base_model=``).

WeightWatcher 0.7.7 (``weightwatcher.py``, ``WWPeftLayerIterator``):

* ``peft=True`` (``'peft_only'`` is the same): only the adapters. Each ``lora_A``/``lora_B`` pair
  becomes one dense layer, the update ``B·A``, named like ``lora_A``'s path with ``lora_A``
  replaced by ``lora_BA`` (``…query.lora_BA.default``). Its ``num_evals`` is the rank: only the
  ``r`` non-zero eigenvalues are kept (WW: ``svds(k=r)``); ``N``/``M`` are those of ``B·A``.
* ``peft='with_base'``: every other layer as usual, and per pair also ``lora_W_plus_AB``
  (``W + B·A``, again only its top ``r`` eigenvalues, as WW), then ``lora_BA``.
* Only dense adapters count; ``B·A`` is not multiplied by PEFT's ``scaling`` (alpha does not
  depend on it).

Differences from WW, all where WW is wrong: adapters are paired by name (WW pairs each ``lora_B``
with the last ``lora_A`` seen, which mixes up several adapters per layer); ``W + s·B·A`` uses
the adapter's ``scaling`` ``s`` when the module is given (WW adds the unscaled ``B·A``; they
agree when ``lora_alpha == r``); a fan-in-fan-out (GPT-2 ``Conv1D``) base weight is transposed
to match. The eigenvalues of ``B·A`` come from an ``r × r`` matrix (QR of ``A`` and ``B``); the
``N × M`` product is never formed.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .spectrum import is_torch_tensor
from .wrappers import strip_prefixes

__all__ = ["PEFT_MODES", "adapt_layers", "check_peft", "check_trainable", "delta_layers",
           "describe_base", "lora_module_info", "peft_layers", "svd_core"]

#: Values of ``analyze(peft=...)`` (``True`` means ``"peft_only"``, as in WeightWatcher).
PEFT_MODES = (False, True, "peft_only", "with_base")

_LORA_RE = re.compile(r"^(?P<prefix>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>.+))?$")
_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")


def check_peft(peft: Any) -> Union[bool, str]:
    """Normalise ``peft=``: ``False``, ``"peft_only"`` (for ``True`` too) or ``"with_base"``.

    Raises:
        ValueError: any other value.

    Example:
        >>> check_peft(True), check_peft(None), check_peft("with_base")
        ('peft_only', False, 'with_base')
    """
    if peft is None or peft is False:
        return False
    if peft is True or peft == "peft_only":
        return "peft_only"
    if peft == "with_base":
        return "with_base"
    raise ValueError(f"peft must be one of {PEFT_MODES}, got {peft!r}")


def check_trainable(trainable: Any) -> Optional[bool]:
    """Validate ``trainable=`` (``None``, ``True`` or ``False``).

    Raises:
        ValueError: any other value.
    """
    if trainable is not None and not isinstance(trainable, (bool, np.bool_)):
        raise ValueError(f"trainable must be None, True or False, got {trainable!r}")
    return None if trainable is None else bool(trainable)


def describe_base(base_model: Any) -> Any:
    """``base_model`` as ``result.options`` records it: the path, or the type name."""
    if base_model is None or isinstance(base_model, str):
        return base_model
    return str(base_model) if hasattr(base_model, "__fspath__") else type(base_model).__name__


def adapt_layers(layers: List[Any], source: Any, peft: Any, base_model: Any,
                 find_base: Callable[[Any], List[Any]]) -> List[Any]:
    """``layers`` of ``source`` with the LoRA pairs made into layers (``peft``) and as deltas
    to ``base_model`` (its layers from ``find_base(base_model)``)."""
    if peft:
        layers = peft_layers(layers, peft, lora_module_info(source))
    if base_model is not None:
        layers = delta_layers(layers, find_base(base_model))
    return layers


def lora_module_info(model: Any) -> Dict[str, Dict[str, Any]]:
    """Per LoRA-wrapped module path: ``scaling`` (adapter → s), ``merged`` adapters, ``fan_in_fan_out``."""
    info: Dict[str, Dict[str, Any]] = {}
    if not hasattr(model, "named_modules"):
        return info
    for path, mod in model.named_modules():
        scaling = getattr(mod, "scaling", None)
        if hasattr(mod, "lora_A") and isinstance(scaling, Mapping):
            info[path] = {"scaling": {str(k): float(v) for k, v in scaling.items()
                                      if isinstance(v, (int, float))},
                          "merged": set(getattr(mod, "merged_adapters", ()) or ()),
                          "fan_in_fan_out": bool(getattr(mod, "fan_in_fan_out", False))}
    return info


# --------------------------------------------------------------------------- linear algebra

def _f64(x: Any) -> Any:
    if is_torch_tensor(x):
        import torch

        return x.detach().to(torch.float64)
    return np.asarray(x, dtype=np.float64)


def svd_core(b: Any, a: Any) -> Any:
    """A small matrix with the singular values of ``b @ a`` (``b``: out × r, ``a``: r × in).

    With ``b = Q_b R_b`` and ``aᵀ = Q_a R_a``, ``b·a = Q_b (R_b R_aᵀ) Q_aᵀ``: the singular values
    of ``b·a`` are those of ``R_b R_aᵀ`` (at most r × r), computed in float64.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> b, a = rng.standard_normal((50, 3)), rng.standard_normal((3, 40))
        >>> c = svd_core(b, a)
        >>> c.shape, bool(np.allclose(np.linalg.svd(c)[1], np.linalg.svd(b @ a)[1][:3]))
        ((3, 3), True)
    """
    b, a = _f64(b), _f64(a)
    if is_torch_tensor(b) or is_torch_tensor(a):
        import torch

        b, a = torch.as_tensor(b), torch.as_tensor(a, device=getattr(b, "device", None))
        return torch.linalg.qr(b, mode="r")[1] @ torch.linalg.qr(a.mT, mode="r")[1].mT
    return np.linalg.qr(b, mode="r") @ np.linalg.qr(a.T, mode="r").T


def _common(x: Any, like: Any) -> Any:
    """``x`` as the array type of ``like`` (torch when either is torch), at least float32."""
    if is_torch_tensor(x) or is_torch_tensor(like):
        import torch

        def conv(t: Any) -> Any:
            return t.detach() if is_torch_tensor(t) else torch.from_numpy(np.array(t))

        tx, tl = conv(x), conv(like)
        dt = torch.float64 if torch.float64 in (tx.dtype, tl.dtype) else torch.float32
        return tx.to(device=tl.device, dtype=dt), tl.to(dt)
    dt = np.float64 if np.float64 in (np.asarray(x).dtype, np.asarray(like).dtype) else np.float32
    return np.asarray(x, dtype=dt), np.asarray(like, dtype=dt)


def _any_true(*flags: Optional[bool]) -> Optional[bool]:
    known = [f for f in flags if f is not None]
    return any(known) if known else None


# --------------------------------------------------------------------------- PEFT layers

def _replace(lm: Any, **changes: Any) -> Any:
    return dataclasses.replace(lm, **changes)


def _pair_layers(A: Any, B: Any, prefix: str, adapter: Optional[str], base: Any,
                 info: Optional[Dict[str, Any]], mode: str) -> List[Any]:
    """The ``lora_BA`` layer (and ``lora_W_plus_AB`` with ``with_base``) of one adapter pair."""
    tail = f".{adapter}" if adapter else ""
    ba_name, wab_name = f"{prefix}.lora_BA{tail}", f"{prefix}.lora_W_plus_AB{tail}"
    t_a = A.rows > A.cols                           # WW: A is oriented r × in, r = min(A.shape)
    r, n_in = (A.cols, A.rows) if t_a else (A.rows, A.cols)
    t_b = B.cols != r                               # then B out × r
    out_dim = B.cols if t_b else B.rows
    unusable = A.unusable or B.unusable
    if A.type != "dense" or B.type != "dense" or A.rf != 1 or B.rf != 1:
        unusable = unusable or "LoRA adapter on a non-dense layer (WeightWatcher analyses dense LoRA only)"
    elif (B.rows if t_b else B.cols) != r:
        unusable = unusable or (f"lora_A {A.rows}x{A.cols} and lora_B {B.rows}x{B.cols} cannot "
                                f"be aligned as B·A")
    k = min(r, out_dim, n_in)

    def factors() -> Tuple[Any, Any]:
        a, b = A.load()[0], B.load()[0]
        return (b.mT if is_torch_tensor(b) else b.T) if t_b else b, \
            (a.mT if is_torch_tensor(a) else a.T) if t_a else a

    def core() -> Any:
        return svd_core(*factors())[None]

    common = dict(type="dense", rf=1, rows=out_dim, cols=n_in, scale=1.0, num_components=k,
                  streamed=A.streamed or B.streamed, dtype=A.dtype)
    ba = _replace(A, name=ba_name, load=core, unusable=unusable,
                  trainable=_any_true(A.trainable, B.trainable), **common)
    if mode != "with_base":
        return [ba]
    info = info or {}
    scaling = info.get("scaling", {}).get(adapter or "default", 1.0) if info else 1.0
    why = unusable
    if base is None:
        why = why or "no base weight found for this adapter (adapter-only checkpoint?)"
    elif base.unusable:
        why = why or f"base weight: {base.unusable}"
    elif adapter and adapter in info.get("merged", set()):
        why = why or (f"adapter {adapter!r} is merged into the base weight (merge_adapter()): "
                      f"the base layer already holds W + B·A")
    transpose = False
    if base is not None and not why:
        if (base.rows, base.cols) == (out_dim, n_in) and not (info.get("fan_in_fan_out") and out_dim == n_in):
            transpose = False
        elif (base.cols, base.rows) == (out_dim, n_in):
            transpose = True
        else:
            why = f"base weight {base.rows}x{base.cols} does not match B·A {out_dim}x{n_in}"

    def merged() -> Any:
        b, a = factors()
        w = base.load()[0]
        upd, w = _common(b, w)
        a, _ = _common(a, w)
        upd = (upd @ a) * scaling
        return (w + (upd.mT if is_torch_tensor(upd) else upd.T) if transpose else w + upd)[None]

    wab = _replace(A, name=wab_name, load=merged, unusable=why,
                   trainable=_any_true(A.trainable, B.trainable, base.trainable if base else None),
                   **dict(common, streamed=common["streamed"] or bool(base and base.streamed)))
    return [wab, ba]


def peft_layers(layers: List[Any], peft: Any, info: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Any]:
    """The layers ``analyze(peft=...)`` reports, from a model's plain layers (see module doc).

    Args:
        layers: the model's :class:`~ww_core.layer_matrices.LayerMatrices`, in model order.
        peft: ``True`` / ``"peft_only"`` or ``"with_base"`` (see :func:`check_peft`).
        info: :func:`lora_module_info` of the module (scalings, merged adapters), if any.

    Returns:
        New layers: adapter products carry ``num_components`` (the rank); a pair that cannot be
        analysed is kept with ``unusable`` set to the reason.
    """
    mode = check_peft(peft)
    if not mode:
        return list(layers)
    info = info or {}
    by_name = {lm.name: lm for lm in layers}
    pending: Dict[Tuple[str, Optional[str]], Any] = {}
    out: List[Any] = []
    found = False
    for lm in layers:
        m = _LORA_RE.match(lm.name)
        if m is None:
            if mode == "with_base":
                out.append(lm)
            continue
        found = True
        key = (m["prefix"], m["adapter"])
        if m["which"] == "A":
            pending[key] = lm
            continue
        A = pending.pop(key, None)
        if A is None:
            out.append(_replace(lm, unusable="lora_B without a matching lora_A"))
            continue
        base = by_name.get(m["prefix"] + ".base_layer", by_name.get(m["prefix"]))
        out.extend(_pair_layers(A, lm, m["prefix"], m["adapter"], base, info.get(m["prefix"]), mode))
    for A in pending.values():
        out.append(_replace(A, unusable="lora_A without a matching lora_B"))
    if not found:
        warnings.warn(f"peft={peft!r}: no LoRA adapter layer (lora_A / lora_B) found; a merged "
                      f"model (merge_and_unload()) has none: analyse it with peft=False",
                      stacklevel=3)
    return out


# --------------------------------------------------------------------------- base_model deltas

def _norm(name: str) -> str:
    """The name used to match a layer with its base-model counterpart."""
    return strip_prefixes(name, _PREFIXES).replace(".base_layer", "")


def _match(name: str, base: Dict[str, Any], base_keys: List[str]) -> Optional[Any]:
    key = _norm(name)
    if key in base:
        return base[key]
    hits = [k for k in base_keys if key.endswith("." + k) or k.endswith("." + key)]
    return base[hits[0]] if len(hits) == 1 else None


def delta_layers(layers: List[Any], base_layers: List[Any]) -> List[Any]:
    """Each layer as ``W − W₀``, ``W₀`` the base model's layer of the same name.

    Names are matched after removing wrapper prefixes (``base_model.model.``, ``module.``,
    ``_orig_mod.``) and PEFT's ``.base_layer``, then by a unique dotted suffix. A layer without
    a counterpart, or whose shape differs (even transposed), is kept with ``unusable`` set.
    LoRA products (``num_components`` set) pass through unchanged.
    """
    base = {}
    for b in base_layers:
        base.setdefault(_norm(b.name), b)
    keys = list(base)
    out = []
    for lm in layers:
        if lm.num_components is not None or lm.unusable:
            out.append(lm)
            continue
        b = _match(lm.name, base, keys)
        if b is None:
            out.append(_replace(lm, unusable="no layer of this name in base_model"))
            continue
        if b.unusable:
            out.append(_replace(lm, unusable=f"base_model layer {b.name}: {b.unusable}"))
            continue
        if (b.rf, b.rows, b.cols) not in ((lm.rf, lm.rows, lm.cols), (lm.rf, lm.cols, lm.rows)):
            out.append(_replace(lm, unusable=f"shape {lm.rf}x{lm.rows}x{lm.cols} differs from base_model "
                                             f"layer {b.name} {b.rf}x{b.rows}x{b.cols}"))
            continue
        transpose = (b.rows, b.cols) != (lm.rows, lm.cols)

        def diff(lm: Any = lm, b: Any = b, transpose: bool = transpose) -> Any:
            w, w0 = _common(lm.load(), b.load())
            if transpose:
                w0 = w0.mT if is_torch_tensor(w0) else np.swapaxes(w0, -1, -2)
            return w - w0

        out.append(_replace(lm, load=diff, streamed=lm.streamed or b.streamed))
    return out
