"""Starting the prefix cache of ``Freeze(cache=...)`` in a fit (torch only, no framework import).

The adapters call :func:`start_prefix_cache` when a fit starts; ``cache="auto"`` turns it on only
where :func:`text_data_is_deterministic` vouches for the training data.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Tuple

from torch import nn

from ww_callbacks.prefix_cache import PrefixCache
from ww_callbacks.warnings import warn

__all__ = ["text_data_is_deterministic", "start_prefix_cache", "CACHE_MODES"]

#: The values of ``Freeze(cache=...)``.
CACHE_MODES = (False, True, "auto")

#: Collators (Hugging Face's, torch's) that pad or stack and draw nothing at random.
_DETERMINISTIC_COLLATORS = {"DataCollatorWithPadding", "DefaultDataCollator", "default_data_collator",
                            "DataCollatorForTokenClassification", "DataCollatorForSeq2Seq",
                            "default_collate"}


def text_data_is_deterministic(dataset: Any, collate_fn: Any) -> Tuple[bool, str]:
    """Whether a training set is tokenised text that a deterministic collator batches.

    Args:
        dataset: the training data set (``datasets.Dataset``, list, ``torch`` data set).
        collate_fn: the data loader's collate function (the Trainer's collator, or its
            column-removing wrapper).

    Returns:
        ``(ok, reason)``; the reason says what was found when ``ok`` is false.

    Example:
        >>> from torch.utils.data import default_collate
        >>> text_data_is_deterministic([{"input_ids": [101, 7, 102]}], default_collate)[0]
        True
        >>> text_data_is_deterministic([(1.0, 2)], default_collate)[1]
        'the examples are not tokenised text (no input_ids)'
    """
    if dataset is None:
        return False, "no training data set to inspect"
    fmt = getattr(dataset, "format", None)
    if isinstance(fmt, dict) and fmt.get("type") == "custom":
        return False, "the data set has a custom transform (set_transform/with_transform)"
    try:
        first = dataset[0]
    except Exception as exc:  # noqa: BLE001 - an iterable data set, a lazy one that fails...
        return False, f"the data set's first example could not be read ({type(exc).__name__})"
    if not isinstance(first, Mapping) or "input_ids" not in first:
        return False, "the examples are not tokenised text (no input_ids)"
    inner = getattr(collate_fn, "data_collator", collate_fn)   # the Trainer's column-removing wrapper
    name = getattr(inner, "__name__", None) or type(inner).__name__
    if name not in _DETERMINISTIC_COLLATORS:
        return False, (f"the collator {name} is not one known to be deterministic "
                       f"({sorted(_DETERMINISTIC_COLLATORS)})")
    return True, "tokenised text batched by a deterministic collator"


def start_prefix_cache(model: nn.Module, settings: Any, output_dir: Optional[str], *, loader: Any = None,
                       log_fn: Callable[[str], Any] = print,
                       warn_fn: Optional[Callable[..., Any]] = None) -> Optional[PrefixCache]:
    """The prefix cache a fit asked for with ``Freeze(cache=...)``, or ``None``.

    Args:
        model: the trained module.
        settings: the :class:`~ww_callbacks.settings.Freeze` settings (the cache needs
            ``mode="apply"``).
        output_dir: the run folder (the disk tier goes to ``<output_dir>/prefix_cache``).
        loader: the training ``DataLoader``: its data set and collate function decide
            ``cache="auto"`` (:func:`text_data_is_deterministic`), its size bounds the distinct
            inputs. ``None``: ``"auto"`` stays off.
        log_fn: where the line saying why ``"auto"`` stayed off goes.
        warn_fn: passed to :class:`~ww_callbacks.prefix_cache.PrefixCache`.

    Returns:
        The cache (attached to ``model``), or ``None`` (off, or no block list in ``model``: then
        with a :class:`~ww_callbacks.warnings.WeightWatcherWarning`).
    """
    mode = getattr(settings, "cache", False)
    if getattr(settings, "mode", "off") != "apply" or mode is False:
        return None
    dataset = getattr(loader, "dataset", None)
    if mode == "auto":
        ok, why = text_data_is_deterministic(dataset, getattr(loader, "collate_fn", None)) \
            if loader is not None else (False, "this trainer's data cannot be inspected")
        if not ok:
            log_fn(f"prefix cache off (cache='auto'): {why}; pass Freeze(cache=True) if the inputs "
                   f"are deterministic")
            return None
    folder = os.path.join(output_dir, "prefix_cache") if output_dir else None
    try:
        return PrefixCache(model, ram_mb=float(getattr(settings, "cache_ram_mb", 1024.0)),
                           disk_mb=float(getattr(settings, "cache_disk_mb", 0.0)) if folder else 0.0,
                           folder=folder, warn_fn=warn_fn,
                           expected_examples=len(dataset) if hasattr(dataset, "__len__") else None)
    except ValueError as exc:
        warn(f"prefix cache off: {exc}", stacklevel=2, warn_fn=warn_fn)
        return None
