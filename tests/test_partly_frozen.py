"""Partly frozen models in real trainers: what trains is analysed at every analysis, frozen layers
once (a baseline); on a PEFT LoRA model the adapters' updates B·A, and the actions act on them."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def _steps_by_layer(history):
    out = {}
    for row in history.rows:
        out.setdefault(row["name"], []).append(row["step"])
    return out


def test_lightning_frozen_backbone_is_analysed_once(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from ww_callbacks.lightning import WeightWatcherCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                                torch.nn.Linear(64, 64))
            self.head = torch.nn.Linear(64, 16)
            self.backbone.requires_grad_(False)

        def training_step(self, batch, _):
            return self.head(torch.relu(self.backbone(batch[0]))).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 32))
    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False,
                               output_dir=str(tmp_path / "ww"))
    pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=str(tmp_path)).fit(Net(), torch.utils.data.DataLoader(data, batch_size=32))
    steps = _steps_by_layer(cb.history)
    assert steps["head"] == [2, 4, 6]                              # trains: every analysis
    assert steps["backbone.0"] == steps["backbone.2"] == [2]       # frozen: the baseline only

    every = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False,
                                  output_dir=str(tmp_path / "all"), analyze_frozen="always")
    pl.Trainer(max_epochs=2, callbacks=[every], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=str(tmp_path)).fit(Net(), torch.utils.data.DataLoader(data, batch_size=32))
    assert _steps_by_layer(every.history)["backbone.0"] == [2, 4]


def _wait_for_analysis(transformers, cb):
    """A callback after ``cb`` that waits for its background analysis at every step end, so each
    analysis is recorded at the step it was taken, as in the synchronous run, however slow the
    machine: without it a step falling due while the previous analysis still runs is skipped
    by design, and which steps (and freeze decisions) those are depends on the CPU's speed.
    What is asynchronous is unchanged: the snapshot copy, the background thread, the collection."""

    class WaitForAnalysis(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            cb.controller.poll(wait=True)

    return WaitForAnalysis()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_hf_trainer_on_a_lora_model_analyses_the_adapters(tmp_path, asynchronous):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from ww_callbacks import Freeze
    from ww_callbacks.huggingface import WeightWatcherCallback

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128, num_labels=8)
    base = transformers.BertForSequenceClassification(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                                      task_type="SEQ_CLS"))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(1, 64, (12,), generator=g)
            return {"input_ids": ids, "labels": int(ids[0]) % 8}

    cb = WeightWatcherCallback(every_n_steps=4, start_fraction=0.0, async_analysis=asynchronous,
                               output_dir=str(tmp_path / "ww"), trackers=None,
                               freeze=Freeze.apply(band=[0.0, 100.0], tol=10.0, exclude_flags=[],
                                                   window=2, max_share=0.5, adapter_tol=10.0))
    # (exclude_flags=[]: a rank-8 update has 8 eigenvalues, always flagged too-few-evals)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8,
                                          max_steps=12, learning_rate=5e-3, report_to="none",
                                          use_cpu=True, disable_tqdm=True, save_strategy="no",
                                          logging_steps=50)
    callbacks = [cb]
    if asynchronous:
        callbacks.append(_wait_for_analysis(transformers, cb))
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks).train()
    assert cb.controller.asynchronous is asynchronous and cb.controller.skipped_analyses == 0
    steps = _steps_by_layer(cb.history)
    adapters = sorted(n for n in steps if ".lora_BA." in n)
    assert len(adapters) == 4
    # every analysis until an adapter is frozen (then, like any frozen layer, no longer)
    assert all(steps[n] == ([4, 8] if n in cb.frozen_layers else [4, 8, 12]) for n in adapters)
    frozen = [n for n in steps if ".lora_" not in n and "classifier" not in n]
    assert frozen and all(steps[n] == [4] for n in frozen)         # the base: once, a baseline
    assert not any(n.endswith((".lora_A.default", ".lora_B.default")) for n in steps)
    # the trained head (PEFT's modules_to_save copy) at every analysis, its frozen original once
    head = [n for n in steps if "classifier" in n and "modules_to_save" in n]
    assert head and all(steps[n] == [4, 8, 12] for n in head)
    assert all(steps[n] == [4] for n in steps if "classifier.original_module" in n)
    # freezing acts on the adapters' own parameters
    assert cb.frozen_layers and all(".lora_BA." in n for n in cb.frozen_layers)
    params = dict(model.named_parameters())
    for name in cb.frozen_layers:
        prefix = name.replace(".lora_BA.default", "")
        for ab in ("A", "B"):
            assert not params[f"{prefix}.lora_{ab}.default.weight"].requires_grad
