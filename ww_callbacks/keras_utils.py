"""Keras 3 side of the actions (freezing layers, per-layer LR scaling mid-training) and the fit-time
set-up of the analysis on the traced backends.

keras is imported lazily (set ``KERAS_BACKEND`` before the first ``import keras``). Layers are
found by their ``ww_core`` name: ``layer.path`` with ``/`` replaced by ``.``
(``sequential_1.d0``); a name without the model prefix (``d0``) also matches when unambiguous.

What we found on **Keras 3.15.1** (checked by experiment, see ``tests/test_keras_utils.py``, run
on every backend by ``tox -e py311`` (torch), ``keras-jax`` and ``keras-tf``):

* **Freezing, torch**: ``layer.trainable = False`` in a callback takes effect at the next train
  step with no recompile and no optimizer rebuild: the torch trainer re-reads
  ``model.trainable_weights`` every step and Keras sets ``requires_grad=False`` on the
  ``torch.nn.Parameter``. The frozen kernel stays bit-identical under SGD(momentum,
  weight_decay) and AdamW(weight_decay), because the optimizer is only handed the trainable
  variables. (``jit_compile=True`` works too, but ``torch.compile`` recompiles: ~40-90 s.)
* **Freezing, TensorFlow**: the train function is a traced ``tf.function`` that captured the
  trainable variables, so ``trainable = False`` alone changes nothing until it is retraced;
  :func:`freeze_layers` calls the public ``model.make_train_function(force=True)`` (the fit
  loop reads ``model.train_function`` at every step). The optimizer accepts the smaller variable
  list; the frozen weights stay bit-identical.
* **Freezing, JAX**: the train step is a pure function of a state tuple whose layout (trainable /
  non-trainable / optimizer variables) is fixed by the optimizer's build: after ``trainable =
  False`` the next step fails (``stateless_apply`` needs exactly the variables the optimizer was
  built with), and no public API rebuilds an optimizer in place without losing its state. So on
  JAX a frozen layer keeps ``trainable = True`` and its **updates are masked** instead: the
  optimizer-apply wrapper below restores the variables' old values (factor 0), which keeps them
  bit-identical (their moments still advance, unused). :func:`is_frozen` tells either kind.
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
  the rescale. Cost: one copy of the scaled variables per step. On JAX and TF the wrapper is
  traced into the train function with the factors as constants, so a change of factors (or of
  the JAX freeze mask) rebuilds it (``make_train_function(force=True)``): one retrace at the next
  step, only when something changed.
* **Analysis threads** (JAX/TF on the CPU): XLA/Eigen use every core for training, and the
  background analysis' OpenBLAS (numpy, or torch's threads when torch is installed) spun on the
  same cores: on 2 cores a first eigensolve of a 256×256 Gram matrix took 0.4-0.7 s instead of
  5 ms, analyses fell behind (skipped) and the fit itself ran ~3x slower.
  :func:`prepare_fit` limits those pools to one thread for the fit and warms the engine
  (imports, first solve) before training starts.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

__all__ = ["layer_name", "find_layers", "freeze_layers", "unfreeze_layers", "is_frozen",
           "LayerLRScaler", "traced_backend", "prepare_fit"]


def traced_backend() -> bool:
    """Whether Keras traces its train function (JAX, TensorFlow) rather than running eagerly (torch)."""
    import keras

    return keras.config.backend() != "torch"


def layer_name(layer: Any) -> str:
    """The ``ww_core`` name of a Keras layer: ``layer.path`` with ``/`` → ``.``."""
    return str(getattr(layer, "path", None) or layer.name).replace("/", ".")


def _all_layers(model: Any) -> List[Any]:
    # Keras 3.15: the public ``model.layers`` lists only the direct children; the recursive walk
    # (layers held by custom layers too, the order ww_core reads them in) is only the private
    # _flatten_layers, with no public equivalent
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
    # torch re-reads trainable_weights every step; a traced train function is rebuilt, and the
    # fit loop picks up model.train_function at the next step
    if traced_backend() and getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


def _masks_updates() -> bool:
    import keras

    return keras.config.backend() == "jax"


class _UpdateHook:
    """The one wrapper around an optimizer's ``apply``: ``w <- w_old + f * (w_new - w_old)`` for
    each variable with a factor (``f = 0`` for a masked, i.e. frozen-on-JAX, variable)."""

    ATTR = "_ww_update_hook"

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.lr: Dict[int, float] = {}
        self.frozen: Dict[int, Any] = {}      # id -> variable
        self._original: Any = None

    @classmethod
    def of(cls, optimizer: Any, create: bool = True) -> Optional["_UpdateHook"]:
        hook = vars(optimizer).get(cls.ATTR)
        if hook is None and create:
            hook = cls(optimizer)
            object.__setattr__(optimizer, cls.ATTR, hook)
        return hook

    @property
    def installed(self) -> bool:
        return self._original is not None

    def factors(self) -> Dict[int, float]:
        return {**self.lr, **{k: 0.0 for k in self.frozen}}

    def sync(self) -> None:
        """Install the wrapper while any factor is set, remove it when none is."""
        if self.factors() and not self.installed:
            self._install()
        elif not self.factors() and self.installed:
            object.__delattr__(self.optimizer, "apply")
            self._original = None

    def _install(self) -> None:
        original, hook = self.optimizer.apply, self

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            import keras

            factors = hook.factors()    # read at trace time on JAX/TF (hence the rebuilds)
            variables = (list(trainable_variables) if trainable_variables is not None
                         else list(getattr(hook.optimizer, "_trainable_variables", [])))
            scaled = [(v, factors[id(v)], keras.ops.copy(v.value))
                      for v in variables if id(v) in factors]
            out = original(grads, trainable_variables)
            for v, f, old in scaled:
                v.assign(old if f == 0.0 else old + f * (v.value - old))
            return out

        self._original = original
        object.__setattr__(self.optimizer, "apply", apply)


def _layer_variables(layer: Any) -> List[Any]:
    return list(layer.trainable_weights) or list(layer.weights)


def _set_frozen(model: Any, names: Iterable[str], frozen: bool) -> List[str]:
    layers = find_layers(model, names)
    optimizer = getattr(model, "optimizer", None)
    if _masks_updates() and optimizer is not None:
        hook = _UpdateHook.of(optimizer)
        before = set(hook.frozen)
        for layer in layers.values():
            for v in _layer_variables(layer):
                if frozen:
                    hook.frozen[id(v)] = v
                else:
                    hook.frozen.pop(id(v), None)
        hook.sync()
        if set(hook.frozen) != before:
            _refresh(model)
        return list(layers)
    for layer in layers.values():
        layer.trainable = not frozen
    _refresh(model)
    return list(layers)


def freeze_layers(model: Any, names: Iterable[str]) -> List[str]:
    """Freeze the named layers, effective from the next train step.

    torch and TensorFlow: ``layer.trainable = False`` (TF: the train function is rebuilt). JAX:
    the layer's updates are masked and ``trainable`` stays ``True`` (see the module notes).

    Args:
        model: the Keras 3 model, compiled (inside a callback: ``self.model``).
        names: ``ww_core`` layer names.

    Returns:
        The layer names frozen.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d0"),
        ...                           keras.layers.Dense(1, name="d1")], name="sequential")
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> freeze_layers(model, ["sequential.d0"])
        ['sequential.d0']
        >>> is_frozen(model, "sequential.d0"), is_frozen(model, "sequential.d1")
        (True, False)
    """
    return _set_frozen(model, names, True)


def unfreeze_layers(model: Any, names: Iterable[str]) -> List[str]:
    """Undo :func:`freeze_layers` (``trainable = True``; on JAX: unmask the updates)."""
    return _set_frozen(model, names, False)


def is_frozen(model: Any, name: str) -> bool:
    """Whether the named layer is frozen: ``trainable`` is ``False``, or (JAX) its updates are masked."""
    layer = find_layers(model, [name])[name]
    if not layer.trainable:
        return True
    optimizer = getattr(model, "optimizer", None)
    hook = _UpdateHook.of(optimizer, create=False) if optimizer is not None else None
    return bool(hook and layer.weights and all(id(v) in hook.frozen for v in _layer_variables(layer)))


class LayerLRScaler:
    """Per-layer learning-rate factors for any Keras 3 optimizer, by scaling each update.

    Installs a wrapper around ``optimizer.apply`` (the instance attribute; the class is untouched)
    that, for every variable of a layer with factor ``f != 1``, turns the optimizer's step
    ``w_old -> w_new`` into ``w_old + f * (w_new - w_old)``. Factors are absolute (relative to the
    optimizer's own LR/schedule), so :meth:`set_factors` twice with the same values changes
    nothing and new values replace old ones. On JAX/TF a change rebuilds the train function.

    Args:
        model: the Keras model.
        optimizer: defaults to ``model.optimizer`` (compile first).

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d0"),
        ...                           keras.layers.Dense(1, name="d1")], name="sequential")
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> scaler = LayerLRScaler(model).install()
        >>> scaler.set_factors({"sequential.d0": 0.5})      # d0 at half the optimizer's LR
        {'sequential.d0': 0.5}
        >>> _ = model.fit(np.ones((16, 8)), np.ones((16, 1)), epochs=1, verbose=0)
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
        self.installed = False

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
        if self.installed:
            self._push(by_var)
        return dict(clean)

    def _push(self, by_var: Dict[int, float]) -> None:
        hook = _UpdateHook.of(self.optimizer)
        if hook.lr != by_var:
            hook.lr = dict(by_var)
            hook.sync()
            _refresh(self.model)

    def install(self) -> "LayerLRScaler":
        """Wrap ``optimizer.apply``; idempotent. Returns ``self``."""
        if not self.installed:
            self.installed = True
            self._push(self._by_var)
            _UpdateHook.of(self.optimizer).sync()
        return self

    def uninstall(self) -> None:
        """Remove the factors (and the wrapper, unless a JAX freeze mask still needs it)."""
        if self.installed:
            self._push({})
            self.installed = False

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: the factors (re-install them with :meth:`load_state_dict`)."""
        return {"factors": dict(self.factors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_factors(state.get("factors", {}))


# ------------------------------------------------------------------ fit-time set-up
def _trains_on_cpu() -> bool:
    import keras

    try:
        return all(str(d).lower().startswith("cpu") for d in keras.distribution.list_devices())
    except Exception:  # noqa: BLE001 - a backend without device listing: assume the CPU
        return True


def _warm_up(plots: bool) -> None:
    """Pay the analysis' first-use costs now, in the training thread before training: the
    engine's imports (torch too, where ww_core solves with it), the first eigensolve and, for the
    local tracker's plot, matplotlib's imports."""
    import numpy as np

    import ww_core

    ww_core.analyze({"warm_up.weight": np.random.default_rng(0).standard_normal((64, 32))})
    if plots:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except ImportError:
            pass


def _limit_threads(n: int) -> List[Callable[[], Any]]:
    """Limit the BLAS pools (threadpoolctl, when installed) and torch's intra-op pool (when torch
    is loaded) to ``n`` threads; returns the functions that restore them."""
    import sys

    restore: List[Callable[[], Any]] = []
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        restore.append(threadpool_limits(limits=n, user_api="blas").restore_original_limits)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        restore.append(lambda: torch.set_num_threads(old))
    return restore


def prepare_fit(plots: bool = True, threads: Optional[int] = 1) -> Callable[[], None]:
    """Set up the analysis for a fit on a traced backend (JAX, TensorFlow); nothing on torch.

    Warms the engine up (imports, first solve) and, when training runs on the CPU, limits the
    analysis' thread pools (BLAS, torch) to ``threads`` so that the background analysis does not
    spin on the cores XLA trains on (see the module notes).

    Args:
        plots: also import matplotlib's canvas (the local tracker draws a PNG per analysis).
        threads: the pools' size during the fit; ``None`` leaves them alone.

    Returns:
        A function that restores the thread settings (call it when the fit ends).
    """
    if not traced_backend():
        return lambda: None
    _warm_up(plots)
    if not _FIT["depth"] and threads and _trains_on_cpu():   # nested fits/callbacks: the outermost
        _FIT["restore"] = _limit_threads(threads)
    _FIT["depth"] += 1
    done = []

    def undo() -> None:
        if done:
            return
        done.append(True)
        _FIT["depth"] -= 1
        while not _FIT["depth"] and _FIT["restore"]:
            _FIT["restore"].pop()()

    return undo


_FIT: Dict[str, Any] = {"depth": 0, "restore": []}
