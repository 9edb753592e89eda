"""The Lightning callback for ``pytorch_lightning`` Trainers.

``lightning.pytorch`` and ``pytorch_lightning`` are two packages with two ``Callback`` classes; a
Trainer accepts only its own. :mod:`ww_callbacks.lightning` uses ``lightning.pytorch`` when it is
installed; import from here when your code uses ``import pytorch_lightning as pl``.

Example::

    >>> import pytorch_lightning as pl
    >>> from ww_callbacks.pytorch_lightning import WeightWatcherCallback
    >>> ww = WeightWatcherCallback(every_n_epochs=1)
    >>> trainer = pl.Trainer(callbacks=[ww], logger=False, enable_progress_bar=False)
    >>> ww in trainer.callbacks
    True
"""

from __future__ import annotations

try:
    import pytorch_lightning as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ww_callbacks.pytorch_lightning needs pytorch_lightning: "
                      "pip install pytorch-lightning") from exc

from ww_callbacks import lightning as _lightning
from ww_callbacks.lightning import layer_param_groups

__all__ = ["WeightWatcherCallback", "layer_param_groups"]

if issubclass(_lightning.WeightWatcherCallback, pl.Callback):   # only pytorch_lightning installed
    WeightWatcherCallback = _lightning.WeightWatcherCallback
else:
    class WeightWatcherCallback(_lightning.WeightWatcherCallback, pl.Callback):  # type: ignore[no-redef]
        """:class:`ww_callbacks.lightning.WeightWatcherCallback` (same keywords and behaviour) as a
        ``pytorch_lightning.Callback``."""
