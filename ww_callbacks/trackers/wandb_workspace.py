"""A W&B workspace for the keys :class:`~ww_callbacks.trackers.wandb.WandbTracker` logs, in one call.

W&B builds a project's default workspace from the logged keys, alphabetically, one auto-generated
panel per key. :func:`wandb_workspace` builds a curated one instead, with W&B's own workspace
library (``pip install "ww-callbacks[wandb-workspace]"``, i.e. ``wandb-workspaces``):

1. **WeightWatcher summary** (pinned, open): mean/median/min/max alpha, the flagged, under- and
   over-trained and frozen layer counts, the mean log norm, the analysis and hook seconds;
2. **WeightWatcher heatmap and ESDs**: ``ww/alpha_heatmap`` (layers x steps; the step slider
   shows its history) and ``ww/esd`` (the worst layers' spectra);
3. **WeightWatcher decisions and layers**: the ``ww/decisions`` table (step, layer, action,
   reason, alpha, factor) and this analysis' ``ww/layers`` table;
4. **Alpha per layer**: one chart per ``ww_alpha/<NN_layer>`` key, in model order (with no
   ``layers`` given, one chart of every ``ww_alpha/`` key, by regular expression);
5. one section per other metric passed as ``log_metrics`` (as given to the tracker).

The view is built and checked offline; only :meth:`Workspace.save` (``save=True``) needs a W&B
login (``wandb login`` or ``WANDB_API_KEY``) and a server.

Example:
    >>> ws = wandb_workspace("my-team", "my-project", layers=["embed", "encoder.0.fc", "head"],
    ...                      step_metric="train/global_step")
    >>> [s.name for s in ws.sections]  # doctest: +NORMALIZE_WHITESPACE
    ['WeightWatcher summary', 'WeightWatcher heatmap and ESDs',
     'WeightWatcher decisions and layers', 'Alpha per layer']
    >>> [p.title for p in ws.sections[-1].panels]
    ['00_embed', '01_encoder_0_fc', '02_head']

    ``ws.save()`` (or ``save=True``) then saves it to W&B, with a W&B login.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

from ww_callbacks.trackers.base import SUMMARY_KEYS, LayerKeys, metric_section

__all__ = ["wandb_workspace", "workspace_spec", "layer_keys", "workspace_keys", "SECTION_NAMES"]

#: Section titles, in the order the workspace shows them (the per-metric sections follow).
SECTION_NAMES = ("WeightWatcher summary", "WeightWatcher heatmap and ESDs",
                 "WeightWatcher decisions and layers", "Alpha per layer")

#: The summary panels: (title, summary keys drawn together).
SUMMARY_PANELS = (
    ("alpha (mean, median, min, max)", ("alpha_mean", "alpha_median", "alpha_min", "alpha_max")),
    ("flagged layers", ("num_flagged", "num_under_trained", "num_over_trained")),
    ("frozen layers", ("num_frozen",)),
    ("mean log norm", ("log_norm_mean",)),
    ("analysed layers", ("num_layers",)),
    ("seconds per analysis", ("analysis_seconds", "hook_seconds")),
    ("drift from the reference: layers", ("drift_newly_flagged", "drift_regressions")),
    ("drift from the reference: change", ("drift_max_abs_delta_alpha", "drift_max_spectrum_change",
                                          "drift_delta_alpha_weighted")),
)

Layers = Union[None, str, "os.PathLike[str]", Sequence[str]]


def _summary_panels(drift: bool = False) -> List[tuple]:
    """:data:`SUMMARY_PANELS` restricted to the tracker's summary keys, plus one panel for each
    summary key no panel names (so every key the tracker logs is drawn); the ``drift_*`` keys
    only with ``drift`` (a run given a ``reference``)."""
    known = [k for k in SUMMARY_KEYS if drift or not k.startswith("drift_")]
    panels = [(title, [k for k in keys if k in known]) for title, keys in SUMMARY_PANELS]
    named = {k for _, keys in panels for k in keys}
    panels += [(k, [k]) for k in known if k not in named]
    return [(title, keys) for title, keys in panels if keys]


def layer_keys(layers: Layers) -> List[str]:
    """The ``<NN_layer>`` key segments the W&B tracker gives ``layers``, in model order.

    Args:
        layers: layer names in model order (e.g. a finished run's
            ``callback.history.rows`` names, or ``ww_core.analysis_layers(model)``), or the path of
            a run folder or of its ``history.jsonl`` (the layers of every analysis in it, numbered
            as the tracker numbered them). ``None``: no layers (an empty list).

    Returns:
        The key segments, e.g. ``["00_embed", "01_encoder_0_fc"]``.

    Raises:
        FileNotFoundError: a path with no ``history.jsonl``.
        ValueError: ``layers`` is a mapping or holds a non-string.

    Example:
        >>> layer_keys(["embed", "encoder.0.fc", "head"])
        ['00_embed', '01_encoder_0_fc', '02_head']
    """
    if layers is None:
        return []
    if isinstance(layers, (str, os.PathLike)):
        path = os.fspath(layers)
        if os.path.isdir(path):
            path = os.path.join(path, "history.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no history.jsonl at {os.fspath(layers)!r}")
        from ww_callbacks.history import read_jsonl

        by_step: Dict[int, List[str]] = {}
        for row in read_jsonl(path, skip_bad_lines=True):
            by_step.setdefault(int(row["step"]), []).append(str(row["name"]))
        keys = LayerKeys()
        for step in sorted(by_step):   # each analysis in turn, as the tracker saw them
            keys.update(by_step[step])
        return [key for _, key in keys.items()]
    if isinstance(layers, dict) or not all(isinstance(n, str) for n in layers):
        raise ValueError("layers must be layer names in model order, a run folder or a "
                         f"history.jsonl path, got {type(layers).__name__}")
    keys = LayerKeys()
    keys.update(layers)
    return [key for _, key in keys.items()]


def workspace_keys(layers: Layers = None, *, prefix: str = "ww",
                   log_metrics: Sequence[str] = ("alpha",), drift: bool = False) -> Dict[str, List[str]]:
    """The W&B keys each section of :func:`wandb_workspace` draws, by section title.

    Needs no W&B library: a test can compare these with the keys an offline run logged.

    Example:
        >>> keys = workspace_keys(["fc1", "fc2"])
        >>> keys["Alpha per layer"]
        ['ww_alpha/00_fc1', 'ww_alpha/01_fc2']
        >>> keys["WeightWatcher decisions and layers"]
        ['ww/decisions', 'ww/layers']
    """
    names = layer_keys(layers)
    out = {
        SECTION_NAMES[0]: [f"{prefix}/{k}" for _, ks in _summary_panels(drift) for k in ks],
        SECTION_NAMES[1]: [f"{prefix}/alpha_heatmap", f"{prefix}/esd"],
        SECTION_NAMES[2]: [f"{prefix}/decisions", f"{prefix}/layers"],
    }
    for metric in _metrics(log_metrics):
        section = metric_section(metric, prefix)
        title = SECTION_NAMES[3] if metric == "alpha" else f"{metric} per layer"
        out[title] = [f"{section}/{k}" for k in names]
    return out


def _metrics(log_metrics: Sequence[str]) -> List[str]:
    metrics = [log_metrics] if isinstance(log_metrics, str) else list(log_metrics)
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"log_metrics must be metric names, got {log_metrics!r}")
    return list(dict.fromkeys(metrics))


def wandb_workspace(entity: str, project: str, *, layers: Layers = None,
                    name: str = "WeightWatcher", prefix: str = "ww",
                    log_metrics: Sequence[str] = ("alpha",), step_metric: Optional[str] = None,
                    drift: bool = False, save: bool = False) -> Any:
    """Build (and with ``save=True`` save) the W&B workspace of a WeightWatcher run.

    Args:
        entity: W&B entity (user or team) that owns the project.
        project: W&B project the runs were logged to.
        layers: layer names in model order, a run folder or its ``history.jsonl``: one chart
            per layer in the alpha section, in model order. ``None``: one chart of every
            ``ww_alpha/`` key.
        name: the workspace's name in the W&B UI.
        prefix: the tracker's ``prefix`` (default ``"ww"``).
        log_metrics: the tracker's ``log_metrics`` (one per-layer section each).
        step_metric: the x-axis of every chart, e.g. ``"train/global_step"`` (HF Trainer) or
            ``"trainer/global_step"`` (Lightning); ``None``: W&B's step.
        drift: draw the ``drift_*`` keys of a run given a ``reference`` (default ``False``).
        save: save the workspace to W&B (needs a login); otherwise only build it.

    Returns:
        The ``wandb_workspaces.workspaces.Workspace`` (call ``.save()`` on it later, or
        ``.url`` after saving).

    Raises:
        ImportError: ``wandb-workspaces`` is not installed.
        ValueError: an empty entity or project, or bad ``layers`` / ``log_metrics``.

    Example:
        >>> ws = wandb_workspace("my-team", "my-project", layers=["fc1", "fc2"])
        >>> ws.sections[0].pinned, len(ws.sections[-1].panels)
        (True, 2)
    """
    for label, value in (("entity", entity), ("project", project), ("name", name)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{label} must be a non-empty string, got {value!r}")
    keys = workspace_keys(layers, prefix=prefix, log_metrics=log_metrics, drift=drift)
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as exc:
        raise ImportError("wandb_workspace() needs W&B's workspace library: "
                          'pip install "ww-callbacks[wandb-workspace]"') from exc

    x = {"x": step_metric} if step_metric else {}

    def line(title: str, ys: List[str]) -> Any:
        return wr.LinePlot(title=title, y=ys, **x)

    summary = [line(title, [f"{prefix}/{k}" for k in ks]) for title, ks in _summary_panels(drift)]
    media = [wr.MediaBrowser(title="alpha heatmap (layers x steps)",
                             media_keys=[f"{prefix}/alpha_heatmap"], num_columns=1,
                             layout=wr.Layout(w=24, h=12)),
             wr.MediaBrowser(title="ESD of the worst layers", media_keys=[f"{prefix}/esd"],
                             num_columns=4, layout=wr.Layout(w=24, h=10))]
    tables = [wr.WeavePanelSummaryTable(table_name=f"{prefix}/decisions", layout=wr.Layout(w=24, h=10)),
              wr.WeavePanelSummaryTable(table_name=f"{prefix}/layers", layout=wr.Layout(w=24, h=12))]
    sections = [ws.Section(name=SECTION_NAMES[0], panels=summary, is_open=True, pinned=True),
                ws.Section(name=SECTION_NAMES[1], panels=media, is_open=True),
                ws.Section(name=SECTION_NAMES[2], panels=tables, is_open=True)]
    for metric in _metrics(log_metrics):
        title = SECTION_NAMES[3] if metric == "alpha" else f"{metric} per layer"
        ys = keys[title]
        if ys:
            panels = [line(k.split("/", 1)[1], [k]) for k in ys]
        else:  # layers unknown: every key of the section in one chart, by regular expression
            panels = [wr.LinePlot(title=f"{metric} of every layer",
                                  metric_regex=f"^{metric_section(metric, prefix)}/.*", **x)]
        sections.append(ws.Section(name=title, panels=panels, is_open=metric == "alpha"))
    workspace = ws.Workspace(entity=entity, project=project, name=name, sections=sections)
    if save:
        workspace.save()
    return workspace


def workspace_spec(workspace: Any) -> Dict[str, Any]:
    """The JSON form of a workspace, as :meth:`save` would send it to W&B (no server needed).

    Args:
        workspace: a ``wandb_workspaces.workspaces.Workspace`` (e.g. from :func:`wandb_workspace`).

    Returns:
        A JSON-serialisable dict; ``spec.section.panelBankConfig.sections`` holds the sections.

    Raises:
        ValueError: ``workspace`` is not a workspace.
    """
    to_model = getattr(workspace, "_to_model", None)  # the library's serialiser, used by save()
    if not callable(to_model):
        raise ValueError(f"workspace must be a wandb_workspaces Workspace, got {type(workspace).__name__}")
    return to_model().model_dump(by_alias=True, exclude_none=True)
