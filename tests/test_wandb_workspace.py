"""The W&B workspace of :func:`ww_callbacks.trackers.wandb_workspace.wandb_workspace`, built offline.

CI has no W&B server: a real controller logs a few analyses and a freeze suggestion into an offline
run, the workspace is built from the run folder's ``history.jsonl`` and serialised with the
library's own serialiser (what ``save()`` sends), and every key a panel draws must be a key the
run logged, and every ``ww`` key the run logged must be drawn by a panel.
"""

from __future__ import annotations

import json
import os

import pytest

from ww_callbacks.trackers.base import SUMMARY_KEYS, LayerKeys
from ww_callbacks.trackers.wandb_workspace import (
    SECTION_NAMES,
    layer_keys,
    wandb_workspace,
    workspace_keys,
    workspace_spec,
)

STEP = "global_step"

# wandb-workspaces 0.4.13 still declares pydantic-v1-style validators
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic V1 style:DeprecationWarning")


def _strings(obj):
    """Every string value inside a JSON-like object."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _sections(spec):
    return spec["spec"]["section"]["panelBankConfig"]["sections"]


def _panel_keys(panel, logged):
    """The logged keys a serialised panel refers to (metrics, media keys, table names)."""
    return [s for s in _strings(panel["config"]) if s in logged]


@pytest.fixture
def offline_run(wandb_offline, tmp_path):
    """A 3-layer model analysed 4 times through the controller into an offline W&B run, with a
    freeze suggestion (``ww/decisions``): ``(logged ww keys, run folder, layer names)``."""
    wandb = pytest.importorskip("wandb")
    torch = pytest.importorskip("torch")
    from wandb_offline import logical_keys, read_offline_run
    from ww_callbacks import Freeze, WeightWatcherController
    from ww_callbacks.trackers.wandb import WandbTracker

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 24))
    run = wandb.init(project="ww-workspace", dir=str(tmp_path))
    run.define_metric(STEP)
    out = tmp_path / "ww"
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=str(out),
                                  trackers=[WandbTracker(step_metric=STEP, max_images=2)],
                                  freeze=Freeze.suggest(tol=10.0, window=2), async_analysis=False)
    ctl.configure(total_steps=4, total_epochs=1)
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        ctl.maybe_run(model, step=step, epoch=0)
    ctl.close()
    run_dir = os.path.dirname(run.dir)
    run.finish()
    wandb.teardown()
    data = read_offline_run(run_dir, timeout=15)
    assert data["exited"]
    logged = {k for k in logical_keys(data["history"]) if k.startswith("ww")}
    return logged, out, ["0", "2", "4"]


def test_workspace_draws_what_the_run_logged(offline_run):
    pytest.importorskip("wandb_workspaces")
    logged, out, names = offline_run
    assert "ww/decisions" in logged and "ww/alpha_heatmap" in logged and "ww/num_frozen" in logged

    ws = wandb_workspace("my-team", "my-project", layers=out, step_metric=STEP)
    spec = json.loads(json.dumps(workspace_spec(ws)))  # serialisable as it is sent
    assert spec["entity"] == "my-team" and spec["project"] == "my-project"
    assert spec["spec"]["section"]["settings"]["shouldAutoGeneratePanels"] is False
    sections = _sections(spec)
    assert [s["name"] for s in sections] == list(SECTION_NAMES)
    assert sections[0]["pinned"] is True and sections[0]["isOpen"] is True

    drawn = set()
    for section in sections:
        assert section["panels"], section["name"]
        for panel in section["panels"]:
            keys = _panel_keys(panel, logged)
            assert keys, (section["name"], panel["config"].get("chartTitle"))
            drawn.update(keys)
            if panel["viewType"] == "Run History Line Plot":
                assert panel["config"]["xAxis"] == STEP
                assert set(panel["config"]["metrics"]) <= logged, panel["config"]["metrics"]
    assert drawn == logged  # every logged key has a panel; no panel draws a key never logged

    # the alpha section: one chart per layer, in model order
    expected = LayerKeys()
    expected.update(names)
    alpha = sections[3]["panels"]
    assert [p["config"]["metrics"] for p in alpha] == [[f"ww_alpha/{expected[n]}"] for n in names]
    media = {k for p in sections[1]["panels"] for k in p["config"]["mediaKeys"]}
    assert media == {"ww/alpha_heatmap", "ww/esd"}
    assert {k for p in sections[2]["panels"] for k in _panel_keys(p, logged)} == {
        "ww/decisions", "ww/layers"}
    # workspace_keys (no W&B library needed) names the same keys, section by section
    assert {k for ks in workspace_keys(out).values() for k in ks} == logged


def test_workspace_without_layers_uses_a_regex_chart():
    pytest.importorskip("wandb_workspaces")
    spec = workspace_spec(wandb_workspace("e", "p", log_metrics=["alpha", "stable_rank"]))
    sections = _sections(spec)
    assert [s["name"] for s in sections] == [*SECTION_NAMES, "stable_rank per layer"]
    for section, metric in ((sections[3], "ww_alpha"), (sections[4], "ww_stable_rank")):
        (panel,) = section["panels"]
        assert panel["config"]["useMetricRegex"] is True
        assert panel["config"]["metricRegex"] == f"^{metric}/.*"


def test_summary_section_draws_every_summary_key():
    keys = workspace_keys(["fc"], drift=True)[SECTION_NAMES[0]]
    assert sorted(keys) == sorted(f"ww/{k}" for k in SUMMARY_KEYS) and len(set(keys)) == len(keys)
    plain = workspace_keys(["fc"])[SECTION_NAMES[0]]
    assert sorted(plain) == sorted(f"ww/{k}" for k in SUMMARY_KEYS if not k.startswith("drift_"))
    assert workspace_keys(["fc"], prefix="wx")["Alpha per layer"] == ["wx_alpha/00_fc"]


def test_layer_keys_and_bad_input(tmp_path):
    assert layer_keys(["embed", "encoder.0.fc", "head"]) == ["00_embed", "01_encoder_0_fc", "02_head"]
    assert layer_keys(None) == []
    with pytest.raises(FileNotFoundError, match="no history.jsonl"):
        layer_keys(tmp_path)
    with pytest.raises(ValueError, match="layer names"):
        layer_keys([1, 2])
    with pytest.raises(ValueError, match="log_metrics"):
        workspace_keys(["a"], log_metrics=[])
    pytest.importorskip("wandb_workspaces")
    with pytest.raises(ValueError, match="entity must be a non-empty string"):
        wandb_workspace("", "p")
    with pytest.raises(ValueError, match="workspace must be"):
        workspace_spec(object())
