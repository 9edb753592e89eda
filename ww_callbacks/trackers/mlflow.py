"""MLflow tracker: per-layer alpha with ``step=``, the layer table and the decisions as artifacts.

Run resolution, at the first analysis:

1. ``client`` + ``run_id`` given (Lightning: ``MLFlowLogger.experiment`` / ``.run_id``): that run.
2. ``run_id`` given without a client: ``MlflowClient(tracking_uri)`` on that run.
3. an active ``mlflow.active_run()`` (HF's ``MLflowCallback`` starts one), used when
   ``tracking_uri`` is None or is the current global tracking URI.
4. otherwise its own run in experiment ``experiment_name`` of ``tracking_uri`` (e.g.
   ``sqlite:///path/mlflow.db``; MLflow 3.17 refuses the plain file store), terminated in
   :meth:`close`. Only a run the tracker created is ever terminated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import warnings
import zlib
from typing import Any, Dict, Iterable, List, Optional

from .base import (
    DECISION_COLUMNS,
    LayerKeys,
    Tracker,
    check_metrics,
    decision_rows,
    finite_float,
    plain_value,
    scalars,
)

__all__ = ["MLflowTracker", "sanitize_metric_key"]

_BAD_CHARS = re.compile(r"[^\w/.\- ]")
_MAX_KEY = 250


def sanitize_metric_key(key: str) -> str:
    """A valid MLflow metric name: ``[\\w/.\\- ]`` only, no ``.``/``..``/empty path segments.

    The tracker's own keys (``ww_alpha/03_encoder_layer_0_attention_self_query``, ``ww/alpha_mean``)
    are valid already; this guards a custom ``prefix`` and keys longer than MLflow's 250
    characters (shortened with a CRC suffix). Other characters (``:``, ``[``, ``(``…) become ``_``.
    """
    key = _BAD_CHARS.sub("_", str(key))
    parts = [p for p in key.split("/") if p != ""]
    parts = ["_" if p in (".", "..") else p for p in parts]
    key = "/".join(parts) or "_"
    if len(key) > _MAX_KEY:
        key = key[: _MAX_KEY - 9] + "_" + format(zlib.crc32(key.encode()), "08x")
    return key


class MLflowTracker(Tracker):
    """Log each analysis into an MLflow run (see the module docstring for which run).

    Args:
        client: an ``mlflow.MlflowClient`` (Lightning's ``MLFlowLogger.experiment``).
        run_id: the run to log into.
        tracking_uri: the store of a run this tracker opens (``sqlite:///…/mlflow.db``).
        experiment_name: experiment of a run this tracker opens.
        run_name: name of a run this tracker opens.
        artifact_location: artifact root of an experiment this tracker creates; default: an
            ``mlartifacts`` folder next to a sqlite database, else MLflow's default.
        log_table: also store the latest per-layer table (every column, plus the layer's ``key``)
            as ``ww/layers.json`` and ``ww/layers.csv`` artifacts (overwritten at each analysis).
        log_metrics: the per-layer columns logged as metrics (default alpha only; e.g.
            ``("alpha", "stable_rank")``); every column is in the table artifact anyway.
        prefix: metric key prefix (``ww``).

    Metrics, with ``step=`` the trainer's global step, one ``MlflowClient.log_batch`` call per
    analysis (finite values only, see :func:`ww_callbacks.trackers.base.scalars`):

    * ``ww_alpha/<NN>_<layer>``: alpha per layer; ``NN`` is the layer's model-order index (fixed
      per tracker by :attr:`layer_keys`), so the keys sort in model order. Other ``log_metrics``
      get their own section (``ww_stable_rank/...``).
    * ``ww/<summary>``: the :data:`~ww_callbacks.trackers.base.SUMMARY_KEYS` (``ww/alpha_mean``,
      ``ww/num_flagged``, ...).
    * ``ww/event/<kind>``: at an action's step, the number of layers it concerns.

    Decisions (freeze, LR factors, early stop) are appended to the table artifact
    ``ww/decisions.json`` (``MlflowClient.log_table``: columns
    :data:`~ww_callbacks.trackers.base.DECISION_COLUMNS`, alpha from the latest analysis, floats
    to pandas' 10 significant digits); without pandas the tracker re-writes it whole per event.
    """

    name = "mlflow"

    def __init__(self, client: Any = None, run_id: Optional[str] = None, *,
                 tracking_uri: Optional[str] = None, experiment_name: str = "ww-callbacks",
                 run_name: Optional[str] = None, artifact_location: Optional[str] = None,
                 log_table: bool = True, log_metrics: Iterable[str] = ("alpha",),
                 prefix: str = "ww") -> None:
        if client is not None and run_id is None:
            raise ValueError("MLflowTracker: a client needs a run_id")
        self._client = client
        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.log_table = log_table
        self.log_metrics = check_metrics(log_metrics)
        self.prefix = prefix
        #: Layer name -> metric key segment, model order, stable for this tracker's lifetime.
        self.layer_keys = LayerKeys()
        self._alphas: Dict[str, Optional[float]] = {}
        self._decisions: List[Dict[str, Any]] = []  # only without pandas (log_table needs it)
        self._owns_run = False
        self._artifact_warned = False

    # -- run handling ---------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        self._resolve()
        return self._run_id  # type: ignore[return-value]

    @property
    def client(self) -> Any:
        self._resolve()
        return self._client

    def _resolve(self) -> None:
        if self._client is not None and self._run_id is not None:
            return
        import mlflow
        from mlflow import MlflowClient

        if self._run_id is not None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return
        active = mlflow.active_run()
        if active is not None and (self.tracking_uri is None
                                   or self.tracking_uri == mlflow.get_tracking_uri()):
            self._client = MlflowClient()
            self._run_id = active.info.run_id
            return
        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = self.artifact_location
            uri = self.tracking_uri or mlflow.get_tracking_uri()
            if location is None and uri.startswith("sqlite:///"):
                db_path = uri[len("sqlite:///"):]
                location = os.path.join(os.path.dirname(os.path.abspath(db_path)), "mlartifacts")
            exp_id = client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=self.run_name)
        self._client = client
        self._run_id = run.info.run_id
        self._owns_run = True

    # -- Tracker interface ----------------------------------------------------------------------
    def _log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self.client, self.run_id
        ts = int(time.time() * 1000)
        items = [Metric(key=sanitize_metric_key(k), value=float(v), timestamp=ts, step=int(step))
                 for k, v in metrics.items()]
        # MlflowClient.log_batch chunks to the REST limit (1000 metrics per request) itself.
        client.log_batch(run_id, metrics=items, synchronous=True)

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        self._log_metrics(scalars(rows, summary, self.layer_keys, self.log_metrics, self.prefix), step)
        self._alphas = {str(r.get("name")): finite_float(r.get("alpha")) for r in rows}
        if self.log_table and rows:
            self._artifact(self._log_table, rows, step, epoch)

    def _artifact(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # metrics matter more than the artifacts
            if not self._artifact_warned:
                warnings.warn(f"MLflowTracker: artifact not stored ({exc!r})", RuntimeWarning,
                              stacklevel=3)
                self._artifact_warned = True

    def _log_table(self, rows: List[Dict[str, Any]], step: int, epoch: int) -> None:
        clean = [{"key": self.layer_keys[str(row.get("name"))],
                  **{k: plain_value(v) for k, v in row.items()}} for row in rows]
        self.client.log_text(self.run_id, json.dumps({"step": int(step), "epoch": int(epoch),
                                                      "layers": clean}, indent=1),
                             f"{self.prefix}/layers.json")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(clean[0].keys()), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(clean)
        self.client.log_text(self.run_id, buf.getvalue(), f"{self.prefix}/layers.csv")

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        rows = decision_rows(step, kind, payload, self._alphas)
        self._log_metrics({f"{self.prefix}/event/{kind}": float(len(rows))}, step)
        if rows:
            self._artifact(self._log_decisions, rows)

    def _log_decisions(self, rows: List[Dict[str, Any]]) -> None:
        path = f"{self.prefix}/decisions.json"
        try:
            import pandas  # noqa: F401  (MlflowClient.log_table builds a DataFrame)
        except ImportError:  # mlflow-skinny: re-write the whole (small) table in the same format
            self._decisions += rows
            table = {"columns": list(DECISION_COLUMNS),
                     "data": [[r[c] for c in DECISION_COLUMNS] for r in self._decisions]}
            self.client.log_text(self.run_id, json.dumps(table), path)
            return
        # appends to an existing artifact (also one written before a resume into the same run)
        self.client.log_table(self.run_id, data={c: [r[c] for r in rows] for c in DECISION_COLUMNS},
                              artifact_file=path)

    def close(self) -> None:
        if self._owns_run and self._run_id is not None:
            self._client.set_terminated(self._run_id)
            self._owns_run = False
