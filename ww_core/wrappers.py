"""Training wrappers around the user's model, and the names they add to its modules.

:func:`unwrap_model` is the one place that strips wrappers (``DistributedDataParallel`` /
``DataParallel`` / ``DeepSpeedEngine``'s ``.module``, ``torch.compile``'s ``._orig_mod``);
:func:`strip_prefixes` removes the prefixes they add to parameter names, :func:`clean_name` the
path segments that FSDP1 and activation checkpointing insert. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["WRAPPER_PREFIXES", "WRAPPER_SEGMENTS", "clean_name", "strip_prefixes", "unwrap_model"]

#: Class names whose ``.module`` is the user's model.
_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")
#: Path segments that FSDP1 (and activation checkpointing) insert into module names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
#: Name prefixes that wrappers add to parameter names: DDP/DataParallel, ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: Any) -> Any:
    """The model under ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, in any nesting (at most 8 levels).

    Other objects with a ``.module`` attribute (FSDP units included) are returned as they are.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 4)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    for _ in range(8):
        inner = None
        if any(c.__name__ in _DATA_PARALLEL for c in type(model).__mro__):
            inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            break
        model = inner
    return model


def strip_prefixes(name: str, prefixes: Sequence[str] = WRAPPER_PREFIXES) -> str:
    """``name`` without any leading ``prefixes``, repeatedly (``module._orig_mod.fc`` -> ``fc``).

    Example:
        >>> strip_prefixes("module._orig_mod.encoder.fc")
        'encoder.fc'
    """
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def clean_name(name: str) -> str:
    """The user's module path under FSDP1 / activation-checkpointing wrappers.

    Example:
        >>> clean_name("_fsdp_wrapped_module.body.0._checkpoint_wrapped_module")
        'body.0'
    """
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)
