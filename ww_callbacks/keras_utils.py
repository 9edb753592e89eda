"""Keras 3 side of the actions: freezing layers and per-layer LR scaling mid-training.

keras is imported lazily (set ``KERAS_BACKEND`` before the first ``import keras``). Layers are
found by their ``ww_core`` name: ``layer.path`` with ``/`` replaced by ``.``
(``sequential_1.d0``); a name without the model prefix (``d0``) also matches when unambiguous.

What we found on **Keras 3.15.1, torch backend** (checked by experiment, see
``tests/test_keras_utils.py``):

* ``layer.trainable = False`` in a callback (e.g. ``on_epoch_end``) takes effect at the next train
  step with **no recompile and no optimizer rebuild**: the torch trainer re-reads
  ``model.trainable_weights`` every step and Keras sets ``requires_grad=False`` on the underlying
  ``torch.nn.Parameter``; the frozen kernel stays bit-identical under SGD(momentum, weight_decay)
  and AdamW(weight_decay), because the optimizer is only handed the trainable variables. With
  ``jit_compile=True`` it also works (``torch.compile`` guards recompile, slowly: ~40-90 s for a
  3-layer model). On TF/JAX the train function is traced, so :func:`freeze_layers` also calls
  ``model.make_train_function(force=True)`` there (the fit loop reads ``model.train_function``
  each step); that path is untested here.
* ``trainable`` is not in ``.weights.h5``: re-freeze after restoring weights (resume).
* Per-layer LR: Keras has no per-variable learning rate. ``keras.optimizers.MultiOptimizer``
  (new in 3.15) routes variables to *separate* optimizers by ``variable.path`` regex — usable for
  fixed groups but one optimizer (and one LR schedule) per factor, with the state split across
  them, and it cannot change factors per analysis. Scaling *gradients* per variable equals LR
  scaling for plain SGD only; Adam/AdamW/RMSprop normalise the gradient, so a gradient factor
  mostly cancels. :class:`LayerLRScaler` instead scales each variable's **update**:
  ``w <- w_old + f * (w_new - w_old)`` around ``optimizer.apply``. Every Keras optimizer's step is
  linear in the learning rate given its state (SGD, momentum, Adam, AdamW including its decoupled
  decay ``lr * wd * w``, RMSprop, Adagrad, Lion, ...), so this **is** a per-variable LR of
  ``f × lr`` for all of them, schedules included, with one caveat: Keras' momentum SGD keeps
  ``lr`` inside its velocity buffer, so when ``f`` changes the old velocity is rescaled at once
  (torch's SGD has the same convention as the scaler). Variable constraints are applied before
  the rescale. Cost: one copy of the scaled variables per step.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping

__all__ = ["layer_name", "find_layers", "freeze_layers", "unfreeze_layers", "LayerLRScaler"]


def layer_name(layer: Any) -> str:
    """The ``ww_core`` name of a Keras layer: ``layer.path`` with ``/`` → ``.``."""
    return str(getattr(layer, "path", None) or layer.name).replace("/", ".")


def _all_layers(model: Any) -> List[Any]:
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))  # pragma: no cover - very old Keras


def find_layers(model: Any, names: Iterable[str]) -> Dict[str, Any]:
    """``{name: layer}`` for ``ww_core`` layer names.

    Raises:
        ValueError: a name that matches no layer, or a short name matching several.
    """
    if isinstance(names, str):
        raise ValueError("names must be a sequence of layer names, not one string")
    layers = _all_layers(model)
    by_path = {layer_name(l): l for l in layers}
    out, missing = {}, []
    for name in names:
        layer = by_path.get(name)
        if layer is None:   # tolerate a missing model prefix ("d0" for "sequential_1.d0")
            hits = [l for p, l in by_path.items() if p.endswith("." + name)]
            if len(hits) > 1:
                raise ValueError(f"layer name {name!r} is ambiguous: "
                                 f"{[layer_name(h) for h in hits][:5]}")
            layer = hits[0] if hits else None
        if layer is None:
            missing.append(name)
        else:
            out[name] = layer
    if missing:
        raise ValueError(f"{len(missing)} layer name(s) match no layer of the model: {missing[:5]}"
                         f"; known: {list(by_path)[:10]}")
    return out


def _refresh(model: Any) -> None:
    import keras

    # torch trainer re-reads trainable_weights every step; traced backends need a new function
    if keras.config.backend() != "torch" and getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


def freeze_layers(model: Any, names: Iterable[str]) -> List[str]:
    """Set ``trainable = False`` on the named layers, effective from the next train step.

    Args:
        model: the Keras 3 model (inside a callback: ``self.model``).
        names: ``ww_core`` layer names.

    Returns:
        The layer names frozen.

    Example:
        >>> freeze_layers(model, ["sequential.d0"])      # doctest: +SKIP
        ['sequential.d0']
    """
    layers = find_layers(model, names)
    for layer in layers.values():
        layer.trainable = False
    _refresh(model)
    return list(layers)


def unfreeze_layers(model: Any, names: Iterable[str]) -> List[str]:
    """Set ``trainable = True`` on the named layers (the optimizer builds slots lazily if needed)."""
    layers = find_layers(model, names)
    for layer in layers.values():
        layer.trainable = True
    _refresh(model)
    return list(layers)


class LayerLRScaler:
    """Per-layer learning-rate factors for any Keras 3 optimizer, by scaling each update.

    Installs a wrapper around ``optimizer.apply`` (the instance attribute; the class is untouched)
    that, for every variable of a layer with factor ``f != 1``, turns the optimizer's step
    ``w_old -> w_new`` into ``w_old + f * (w_new - w_old)``. Factors are absolute (relative to the
    optimizer's own LR/schedule), so :meth:`set_factors` twice with the same values changes
    nothing and new values replace old ones.

    Args:
        model: the Keras model.
        optimizer: defaults to ``model.optimizer`` (compile first).

    Example:
        >>> scaler = LayerLRScaler(model).install()                  # doctest: +SKIP
        >>> scaler.set_factors({"sequential.d0": 0.5})               # doctest: +SKIP
    """

    def __init__(self, model: Any, optimizer: Any = None) -> None:
        optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        if optimizer is None or not hasattr(optimizer, "apply"):
            raise ValueError("LayerLRScaler needs a compiled model or an optimizer with .apply")
        self.model = model
        self.optimizer = optimizer
        #: ``{layer name: factor}`` in force (layers absent run at factor 1).
        self.factors: Dict[str, float] = {}
        self._by_var: Dict[int, float] = {}
        self._original_apply: Any = None

    @property
    def installed(self) -> bool:
        return self._original_apply is not None

    def set_factors(self, factors: Mapping[str, float]) -> Dict[str, float]:
        """Replace the factors (``{ww_core layer name: factor}``); returns them.

        Raises:
            ValueError: a non-finite or non-positive factor, or an unknown layer name.
        """
        clean: Dict[str, float] = {}
        for name, f in dict(factors).items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise ValueError(f"factors must be finite numbers > 0; {name!r}: {f!r}")
            clean[str(name)] = float(f)
        layers = find_layers(self.model, list(clean))
        by_var: Dict[int, float] = {}
        for name, layer in layers.items():
            if clean[name] != 1.0:
                for v in layer.weights:
                    by_var[id(v)] = clean[name]
        self.factors, self._by_var = clean, by_var
        return dict(clean)

    def install(self) -> "LayerLRScaler":
        """Wrap ``optimizer.apply``; idempotent. Returns ``self``."""
        if self.installed:
            return self
        original = self.optimizer.apply
        scaler = self

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            import keras

            variables = (list(trainable_variables) if trainable_variables is not None
                         else list(getattr(scaler.optimizer, "_trainable_variables", [])))
            scaled = [(v, scaler._by_var[id(v)], keras.ops.copy(v.value))
                      for v in variables if id(v) in scaler._by_var]
            out = original(grads, trainable_variables)
            for v, f, old in scaled:
                v.assign(old + f * (v.value - old))
            return out

        self._original_apply = original
        object.__setattr__(self.optimizer, "apply", apply)
        return self

    def uninstall(self) -> None:
        """Restore the optimizer's own ``apply``."""
        if self.installed:
            try:
                object.__delattr__(self.optimizer, "apply")
            except AttributeError:  # pragma: no cover - defensive
                object.__setattr__(self.optimizer, "apply", self._original_apply)
            self._original_apply = None

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: the factors (re-install them with :meth:`load_state_dict`)."""
        return {"factors": dict(self.factors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_factors(state.get("factors", {}))
