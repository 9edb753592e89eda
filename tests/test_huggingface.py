"""The HF Trainer adapter with real (tiny, CPU) Trainers and real trackers read back."""

from __future__ import annotations

import glob
import json
import os
import types

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")

import ww_core  # noqa: E402
from helpers import TRACKER_TIMEOUT  # noqa: E402
from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402

pytestmark = pytest.mark.slow

SEQ, VOCAB = 16, 64


@pytest.fixture(autouse=True)
def _env(wandb_offline, monkeypatch):
    # wandb_offline (conftest.py): W&B offline under tmp_path, started afresh
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_PROJECT", "ww-hf-test")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


class _Tokens(torch.utils.data.Dataset):
    """Generated token sequences with structure (arithmetic progressions mod VOCAB)."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                  n_inner=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _trainer(out, callback, model=None, report_to="none", **kw):
    opts = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=4,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=report_to,
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    opts.update(kw)
    args = transformers.TrainingArguments(**opts)
    return transformers.Trainer(model=model or _model(), args=args, train_dataset=_Tokens(),
                                callbacks=[callback])


def _steps(rows):
    return sorted({r["step"] for r in rows})


def test_epoch_schedule_wandb_and_tensorboard(tmp_path):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wandb_offline import read_offline_run

    ww = WeightWatcherCallback(start_fraction=0.5, every_n_epochs=1, output_dir=str(tmp_path / "ww"),
                               async_analysis=False,  # exact steps asserted below
                               tracker_timeout=TRACKER_TIMEOUT)  # cold backends: slow, not hung
    trainer = _trainer(tmp_path / "out", ww, report_to=["wandb", "tensorboard"])
    trainer.train()  # 16 samples / 4 = 4 steps per epoch, 16 steps
    run = wandb.run
    assert run is not None
    run_dir = os.path.dirname(run.dir)
    assert run_dir.startswith(str(tmp_path))
    names = {type(t).__name__ for t in ww.controller.trackers}
    assert {"WandbTracker", "TensorBoardTracker", "LocalTracker"} <= names
    assert _steps(ww.history.rows) == [8, 12, 16]  # epochs 2..4 (start at 50 %), final = last
    assert {r["epoch"] for r in ww.history.rows} == {1, 2, 3}
    assert _steps(read_jsonl(str(tmp_path / "ww" / "history.jsonl"))) == [8, 12, 16]

    final = ww_core.analyze(trainer.model)
    wandb.finish()
    wandb.teardown()
    data = read_offline_run(run_dir, timeout=120)
    assert data["exited"]
    hist = data["history"]
    assert [r["_step"] for r in hist] == sorted(r["_step"] for r in hist)
    assert any("train/loss" in r for r in hist)  # HF's own rows are intact
    ww_rows = [r for r in hist if "ww/alpha_mean" in r]
    assert [r["train/global_step"] for r in ww_rows] == [8, 12, 16]
    last = ww_rows[-1]
    from ww_callbacks.trackers.base import LayerKeys

    keys = LayerKeys()
    keys.update(layer.name for layer in final.layers)
    for layer in final.layers:
        if layer.alpha == layer.alpha:  # finite
            assert last[f"ww_alpha/{keys[layer.name]}"] == pytest.approx(layer.alpha, rel=1e-9), layer.name
    assert sorted(k for k in last if k.startswith("ww_alpha/")) == [
        f"ww_alpha/{keys[l.name]}" for l in final.layers if l.alpha == l.alpha]  # model order
    assert last["ww/layers/_type"] == "table-file"
    assert last["ww/alpha_heatmap/_type"] == "image-file"
    with open(os.path.join(run_dir, "files", last["ww/layers/path"])) as fh:
        table = json.load(fh)  # log_norm and stable_rank: in the table, not as charts
    got = {r[table["columns"].index("name")]: r for r in table["data"]}
    for layer in final.layers:
        for metric in ("log_norm", "stable_rank"):
            value = getattr(layer, metric)
            if value == value:
                cell = got[layer.name][table["columns"].index(metric)]
                assert cell == pytest.approx(value, rel=1e-9), (layer.name, metric)

    # TensorBoard: HF's TensorBoardCallback writer (closed by HF before our final analysis)
    tb_dirs = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.*"))}
    assert len(tb_dirs) == 1
    ea = EventAccumulator(tb_dirs.pop(), size_guidance={"scalars": 0})
    ea.Reload()
    assert "train/loss" in ea.Tags()["scalars"]
    from ww_callbacks.trackers.base import LayerKeys

    keys = LayerKeys()
    keys.update(l.name for l in final.layers)  # model order, as the tracker numbers them
    layer = final.layers[0]
    events = ea.Scalars(f"ww_alpha/{keys[layer.name]}")
    assert [e.step for e in events] == [8, 12, 16]
    assert events[-1].value == pytest.approx(layer.alpha, rel=1e-6)


@pytest.mark.parametrize("restore", [False, True])
def test_step_schedule_and_resume(tmp_path, restore):
    out, wwdir = tmp_path / "out", tmp_path / "ww"
    kw = dict(max_steps=8, num_train_epochs=1, save_strategy="steps", save_steps=4,
              restore_callback_states_from_checkpoint=restore)
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_steps=2, output_dir=str(wwdir),
                               async_analysis=False)
    _trainer(out, ww, **kw).train()
    assert _steps(ww.history.rows) == [2, 4, 6, 8]
    saved = json.load(open(out / "checkpoint-4" / "trainer_state.json"))["stateful_callbacks"]
    pointer = saved["WeightWatcherCallback"]["attributes"]["controller_state"]["history"]
    # the state points into history.jsonl instead of carrying the rows (checkpoints stay small)
    assert pointer["last_step"] == 4 and pointer["output_dir"] == str(wwdir)
    assert pointer["num_rows"] == len([r for r in ww.history.rows if r["step"] <= 4])

    # resume from step 4 as if the run had crashed after its checkpoint: 6 and 8 are redone
    ww2 = WeightWatcherCallback(start_fraction=0.0, every_n_steps=2, output_dir=str(wwdir),
                               async_analysis=False)
    trainer = _trainer(out, ww2, **kw)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    active = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightWatcherCallback)]
    assert len(active) == 1
    assert (active[0] is ww2) is (not restore)  # HF rebuilds a restored callback
    # the state from trainer_state.json, else from the run folder's ww_state.json
    assert active[0].controller.state.restored
    rows = active[0].history.rows
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert _steps(rows) == [2, 4, 6, 8]
    assert len(rows) == len(ww.history.rows)
    file_rows = read_jsonl(str(wwdir / "history.jsonl"))
    assert [r["step"] for r in file_rows] == [r["step"] for r in rows]
    final = ww_core.analyze(trainer.model)
    got = {r["name"]: r["alpha"] for r in rows if r["step"] == 8}
    assert got == pytest.approx({l.name: l.alpha for l in final.layers}, nan_ok=True)


def test_non_zero_process_writes_nothing(tmp_path):
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_steps=1, output_dir=str(tmp_path / "ww"),
                               async_analysis=False)
    args = types.SimpleNamespace(report_to=["wandb"], output_dir=str(tmp_path), num_train_epochs=1)
    state = types.SimpleNamespace(is_world_process_zero=False, global_step=0, max_steps=2, epoch=0.0,
                                  num_train_epochs=1)
    model = _model()
    ww.on_train_begin(args, state, None, model=model)
    state.global_step, state.epoch = 1, 0.5
    ww.on_step_end(args, state, None, model=model)
    ww.on_train_end(args, state, None, model=model)
    assert _steps(ww.history.rows) == [1]  # analysed on this rank...
    assert ww.controller.trackers == []
    assert not os.path.exists(tmp_path / "ww")  # ...but nothing written or logged
