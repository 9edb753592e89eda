"""TRL's ``SFTTrainer`` (a ``transformers.Trainer`` subclass) with LoRA and the HF callback, unchanged.

No packaged pretrained causal LM exists (the packaged models are an encoder, CNNs and a pitch
tracker), so the model is a tiny ``GPT2LMHeadModel`` built from a ``GPT2Config``, with a word-level
tokenizer trained in memory on the handful of training sentences. LoRA r=8: the callback analyses
each adapter's update ``….lora_BA.default`` at every analysis and the frozen base at the first.
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402
from ww_callbacks.trackers.report_live import read_report_data  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # raised inside transformers for SFTConfig's own gradient_checkpointing field (TRL 1.16)
    pytest.mark.filterwarnings("ignore:.*(is_)?gradient_checkpointing` is deprecated.*:FutureWarning"),
]

TEXTS = [f"the {a} {b} sat on the {c} ." for a in ("big", "small", "red", "old")
         for b in ("cat", "dog", "fox") for c in ("mat", "log", "hat")]
TARGETS = ("c_attn", "c_fc")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


def _model(tokenizer):
    import torch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  n_inner=64, bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_loss(model, tokenizer) -> float:
    """Mean next-token loss of ``model`` on all of ``TEXTS`` (one padded batch, eval mode, no grad)."""
    import torch

    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
    model.train(was_training)
    return float(loss)


def test_sft_trainer_with_lora(tmp_path):
    tokenizer = _tokenizer()
    out = tmp_path / "ww"
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_steps=2, output_dir=str(out),
                               async_analysis=False)  # exact steps asserted below
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=True, disable_tqdm=True, seed=0, max_length=32)
    # r=8 (PEFT's default): a LoRA update of rank r < min_evals (8) is skipped, "too few eigenvalues"
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS),
                           fan_in_fan_out=True, task_type="CAUSAL_LM")  # GPT-2's Conv1D: (in, out)
    trainer = trl.SFTTrainer(model=_model(tokenizer), args=args,
                             train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer, peft_config=lora, callbacks=[ww])
    assert isinstance(trainer, transformers.Trainer)
    assert isinstance(trainer.model, peft.PeftModel)
    before = _lm_loss(trainer.model, tokenizer)
    result = trainer.train()
    assert result.global_step == 6
    assert math.isfinite(result.training_loss), result.training_loss  # NaN and inf both fail
    # logging_steps=1: one logged loss per optimizer step, each finite
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    # training moved the model: the loss on the whole (fixed) training text went down
    # (measured 2.899 -> 2.878; the per-step losses are of different batches, too noisy to compare)
    after = _lm_loss(trainer.model, tokenizer)
    assert math.isfinite(after) and after < before, (before, after)

    assert ww.history.steps == [2, 4, 6]  # every 2 steps; the final analysis is the step-6 one
    assert [r["step"] for r in read_jsonl(str(out / "history.jsonl"))] == [r["step"] for r in ww.history.rows]
    modules = [f"base_model.model.transformer.h.{i}.{sub}.{t}" for i in range(2)
               for sub, t in (("attn", "c_attn"), ("mlp", "c_fc"))]
    updates = {f"{m}.lora_BA.default" for m in modules}  # each adapter's B·A (WeightWatcher's peft=True)
    by_step = {step: {r["name"]: r for r in ww.history.rows_at(step)} for step in ww.history.steps}
    first = by_step[2]
    frozen = set(first) - updates
    assert set(modules) <= frozen, sorted(first)  # the LoRA base weights, under their module path
    for step, at in by_step.items():
        assert updates <= set(at), (step, sorted(at))  # the updates: at every analysis
        for name in updates:
            assert at[name]["num_evals"] == 8, at[name]  # only the r non-zero eigenvalues
        assert not any(".lora_A." in n or ".lora_B." in n for n in at)
        if step != 2:
            assert set(at) == updates, (step, sorted(at))  # the frozen base: the first analysis only
    assert len(updates) == 4  # c_attn and c_fc of 2 blocks
    assert all(by_step[6][n]["status"] == "success" and math.isfinite(by_step[6][n]["alpha"])
               for n in updates), [by_step[6][n] for n in updates]
    assert ww.controller.num_analyses == 3
    data = read_report_data(str(out))   # the live report's data files
    assert data["steps"] == [2, 4, 6] and updates <= set(data["layers"]), data["layers"]
    with open(out / "history.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(int(r["step"]), r["name"]) for r in csv_rows] == \
        [(r["step"], r["name"]) for r in ww.history.rows]


def _report_data(text: str) -> dict:
    """The JSON that ``report.html`` embeds (``<script type="application/json" id="ww-data">``)."""
    m = re.search(r'<script type="application/json" id="ww-data">(.*?)</script>', text, re.S)
    assert m, text[:500]
    return json.loads(m.group(1))
