"""Typed settings of the three actions: :class:`Freeze`, :class:`BalanceLR`, :class:`EarlyStop`.

Each action keyword (``freeze=``, ``balance_lr=``, ``early_stop=``) of the controller and of the
three callbacks takes the same values:

* ``None``, ``False`` or ``"off"``: the action is off (the default);
* ``"suggest"``: decide and log, change nothing;
* ``True`` or ``"apply"``: act (freeze, set LR factors, stop);
* a settings object, which carries the mode and the options: ``Freeze(mode="apply", tol=0.1)``
  or ``Freeze.apply(tol=0.1)``. A mode string is the settings object with its defaults:
  ``freeze="apply"`` is ``Freeze(mode="apply")``.

Every field is checked when the object is made (a ``ValueError`` naming the field). The objects
are frozen, have a ``repr`` and a stable JSON form (:meth:`to_dict` / :meth:`from_dict`), which
the action state in checkpoints carries.

``metric`` means the same in all three: the alpha estimator the action reads from each layer
(``"alpha"``, WeightWatcher's CSN fit, or ``"alpha_hill"``, the Hill estimator).

Example:
    >>> Freeze.apply(band="weightwatcher", window=2)
    Freeze(mode='apply', band='weightwatcher', tol=0.05, window=2, max_share=0.5, protect=(), \
protect_head=True, unfreeze=False, unfreeze_margin=0.0, metric='alpha', \
exclude_flags=('correlation-trap', 'rank-collapse', 'non-finite', 'fit-failed', 'too-few-evals'), \
order='prefix', adapter_tol=0.15, start_fraction=None, cache=False, cache_ram_mb=1024.0, cache_disk_mb=0.0)
    >>> BalanceLR.from_dict(BalanceLR(mode="suggest", s1=0.6).to_dict()) == BalanceLR("suggest", s1=0.6)
    True
    >>> coerce_settings("early_stop", True)
    EarlyStop(mode='apply', patience=3, min_delta=0.0, lower_bound=2.0, metric='alpha')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Union

from ww_callbacks.actions.early_stop import EarlyStopPolicy
from ww_callbacks.actions.freeze import DEFAULT_ADAPTER_TOL, DEFAULT_EXCLUDE_FLAGS, FreezePolicy
from ww_callbacks.actions.lr_balance import LRBalancePolicy

__all__ = ["Freeze", "BalanceLR", "EarlyStop", "ActionSettings", "MODES", "coerce_settings",
           "settings_class", "settings_to_json", "settings_from_json"]

#: The modes of every action.
MODES = ("off", "suggest", "apply")
_ALIASES = {"off": "off", "suggest": "suggest", "apply": "apply"}
Mode = Union[str, bool, None]


def _mode(name: str, value: Any) -> str:
    if value is None or value is False:
        return "off"
    if value is True:
        return "apply"
    if isinstance(value, str) and value in _ALIASES:
        return _ALIASES[value]
    raise ValueError(f"{name}.mode must be None/False/'off', 'suggest' or True/'apply', got {value!r}")


def _patterns(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class ActionSettings:
    """Base of the three settings classes: the mode, validation, the JSON form."""

    mode: str = "off"

    #: The policy that checks the options (its constructor raises the ``ValueError``).
    _policy: ClassVar[Any] = None
    #: The controller / callback keyword these settings belong to.
    keyword: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _mode(type(self).__name__, self.mode))
        self._normalise()
        try:
            self.make_policy()
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None

    def _normalise(self) -> None:
        """Canonical field types (tuples, floats), set in place on the frozen object."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def options(self) -> Dict[str, Any]:
        """The fields other than ``mode``, as keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mode"}

    def make_policy(self) -> Any:
        """A new policy with these settings (a policy object holds the run's state)."""
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def off(cls, **options: Any) -> Any:
        return cls(mode="off", **options)

    @classmethod
    def suggest(cls, **options: Any) -> Any:
        return cls(mode="suggest", **options)

    @classmethod
    def apply(cls, **options: Any) -> Any:
        return cls(mode="apply", **options)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable form (tuples as lists); :meth:`from_dict` reads it back."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """The settings :meth:`to_dict` wrote.

        Raises:
            ValueError: an unknown key or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict needs a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; fields: {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class Freeze(ActionSettings):
    """Early freezing of settled layers (:class:`~ww_callbacks.actions.FreezePolicy`).

    Args:
        mode: ``"off"``, ``"suggest"`` (record and log the freezable layers) or ``"apply"``.
        band: ``None`` (no band test, the default), a ``(lo, hi)`` alpha band, or a preset name:
            ``"weightwatcher"`` (2, 6), ``"vision"`` (2, 3), ``"nlp"`` (3, 4).
        tol: largest relative range of the last ``window`` alphas for a layer to count as settled.
        window: analyses the settle test compares (``>= 2``).
        max_share: most layers frozen at once, as a share of the analysed layers.
        protect: regex or regexes of layer names never frozen.
        protect_head: never freeze the output head (the last analysed layer).
        unfreeze: release frozen layers whose alpha leaves the band by ``unfreeze_margin``.
        unfreeze_margin: the hysteresis of ``unfreeze``.
        metric: the alpha read (``"alpha"``, the band's scale, or ``"alpha_hill"``).
        exclude_flags: layer flags that disqualify a layer.
        order: ``"prefix"`` (front to back only) or ``"any"``; ``None``: ``"prefix"``, or
            ``"any"`` with ``unfreeze=True``.
        adapter_tol: largest relative range of a LoRA adapter update's norm over the last two
            analyses for the adapter to count as settled (adapters are not judged on alpha).
        start_fraction: share of the planned training from which freezing decisions may be made;
            ``None`` (default): the callback's ``start_fraction``. When earlier, the analyses that
            fall due before the callback's start cover only the layers auto-freeze judges next
            (:meth:`~ww_callbacks.actions.FreezePolicy.layers_to_watch`).
        cache: replay the frozen prefix's output per example instead of recomputing it
            (:mod:`ww_callbacks.prefix_cache`; ``"apply"`` only; the frozen prefix then runs in
            eval mode, dropout off): ``False``, ``True`` (the inputs are declared deterministic)
            or ``"auto"`` (on where the callback detects deterministic inputs: tokenised text
            in the Hugging Face Trainer).
        cache_ram_mb, cache_disk_mb: budgets of the cached rows in memory, then on disk in the
            run folder.
    """

    keyword: ClassVar[str] = "freeze"

    band: Union[None, str, Tuple[float, float]] = None
    tol: float = 0.05
    window: int = 3
    max_share: float = 0.5
    protect: Union[str, Tuple[str, ...], None] = ()
    protect_head: bool = True
    unfreeze: bool = False
    unfreeze_margin: float = 0.0
    metric: str = "alpha"
    exclude_flags: Tuple[str, ...] = DEFAULT_EXCLUDE_FLAGS
    order: Optional[str] = None
    adapter_tol: float = DEFAULT_ADAPTER_TOL
    start_fraction: Optional[float] = None
    cache: Union[bool, str] = False
    cache_ram_mb: float = 1024.0
    cache_disk_mb: float = 0.0

    def _normalise(self) -> None:
        self._set("protect", _patterns(self.protect))
        sf = self.start_fraction
        if sf is not None and (isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 <= sf <= 1):
            raise ValueError(f"Freeze: start_fraction must be None or a number in [0, 1], got {sf!r}")
        if not (isinstance(self.cache, bool) or self.cache == "auto"):
            raise ValueError(f"Freeze: cache must be True, False or 'auto', got {self.cache!r}")
        for name in ("cache_ram_mb", "cache_disk_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Freeze: {name} must be a number >= 0, got {value!r}")
            self._set(name, float(value))
        if isinstance(self.exclude_flags, str):
            raise ValueError("Freeze: exclude_flags must be a sequence of flag names, not one string")
        self._set("exclude_flags", tuple(self.exclude_flags))
        if self.band is not None and not isinstance(self.band, str):
            try:
                self._set("band", tuple(float(b) for b in self.band))
            except (TypeError, ValueError):
                raise ValueError(f"Freeze: band must be (lo, hi), a preset name or None, "
                                 f"got {self.band!r}") from None
        if self.order is None:
            self._set("order", "any" if self.unfreeze else "prefix")

    def make_policy(self) -> FreezePolicy:
        options = {k: v for k, v in self.options().items()   # cache*: the adapters'; start: the controller's
                   if not k.startswith("cache") and k != "start_fraction"}
        return FreezePolicy(self.mode, **{**options, "protect": list(self.protect) or None})


@dataclass(frozen=True)
class BalanceLR(ActionSettings):
    """Per-layer learning rates from alpha (TempBalance, :class:`~ww_callbacks.actions.LRBalancePolicy`).

    Args:
        mode: ``"off"``, ``"suggest"`` (log the factors) or ``"apply"`` (set them).
        s1, s2: the factor for the lowest and the highest alpha.
        metric: the alpha read (``"alpha_hill"``, TempBalance's, or ``"alpha"``).
        min_layer_evals: layers with fewer eigenvalues keep factor 1 (TempBalance's 50; not the
            analysis' ``min_evals``, below which a layer is not fitted at all).
        exclude_first, exclude_last: leave the first / last (head) analysed layer untuned.
        exclude: regex or regexes of further layers left untuned.
    """

    keyword: ClassVar[str] = "balance_lr"

    s1: float = 0.5
    s2: float = 1.5
    metric: str = "alpha_hill"
    min_layer_evals: int = 50
    exclude_first: bool = True
    exclude_last: bool = True
    exclude: Union[str, Tuple[str, ...], None] = ()

    def _normalise(self) -> None:
        self._set("exclude", _patterns(self.exclude))

    def make_policy(self) -> LRBalancePolicy:
        return LRBalancePolicy(self.mode, **{**self.options(), "exclude": list(self.exclude) or None})


@dataclass(frozen=True)
class EarlyStop(ActionSettings):
    """Stop when the mean alpha plateaus or falls below a bound
    (:class:`~ww_callbacks.actions.EarlyStopPolicy`).

    Args:
        mode: ``"off"``, ``"suggest"`` (log an ``early-stop-suggestion`` event once, training
            goes on) or ``"apply"`` (ask the trainer to stop).
        patience: analyses without improvement before stopping; ``None`` disables the trigger.
        min_delta: the drop of the mean alpha that counts as an improvement.
        lower_bound: stop when the mean alpha is below it; ``None`` disables the trigger.
        metric: the alpha averaged (``"alpha"``, the bound's scale, or ``"alpha_hill"``).
    """

    keyword: ClassVar[str] = "early_stop"

    patience: Optional[int] = 3
    min_delta: float = 0.0
    lower_bound: Optional[float] = 2.0
    metric: str = "alpha"

    def make_policy(self) -> EarlyStopPolicy:
        return EarlyStopPolicy(**self.options())


_CLASSES = {"freeze": Freeze, "balance_lr": BalanceLR, "early_stop": EarlyStop}


_JSON_TAG = "__settings__"


def settings_to_json(settings: ActionSettings) -> Dict[str, Any]:
    """``settings`` as a tagged JSON object (for a framework that rebuilds a callback from JSON
    keywords, the Hugging Face Trainer's stateful callbacks); :func:`settings_from_json` reads it."""
    return {_JSON_TAG: type(settings).keyword, **settings.to_dict()}


def settings_from_json(value: Any) -> Any:
    """The settings object of a :func:`settings_to_json` form; any other value unchanged."""
    if isinstance(value, Mapping) and _JSON_TAG in value:
        data = dict(value)
        return settings_class(data.pop(_JSON_TAG)).from_dict(data)
    return value


def settings_class(keyword: str) -> Any:
    """The settings class of an action keyword (``"freeze"`` -> :class:`Freeze`).

    Raises:
        ValueError: not an action keyword.
    """
    try:
        return _CLASSES[keyword]
    except KeyError:
        raise ValueError(f"{keyword!r} is not an action keyword; those are {sorted(_CLASSES)}") from None


def coerce_settings(keyword: str, value: Any) -> ActionSettings:
    """The settings object of an action keyword's value (a mode, ``True``/``False``/``None`` or
    a settings object of the right class).

    Raises:
        ValueError: any other value (a dict included: use the settings class).
    """
    cls = _CLASSES[keyword]
    if isinstance(value, cls):
        return value
    if isinstance(value, ActionSettings):
        raise ValueError(f"{keyword}= takes {cls.__name__}(...), got {type(value).__name__}(...)")
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value in _ALIASES):
        return cls(mode=value)
    raise ValueError(f"{keyword} must be None/False/'off', 'suggest', True/'apply' or "
                     f"{cls.__name__}(...), got {value!r}")
