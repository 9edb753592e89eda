"""A crash loses no analysis: real fits killed with ``SIGKILL`` and resumed in a new process.

Each framework's fit runs in a child process that sends itself ``SIGKILL`` from a callback at a
fixed hook, right after the framework wrote a checkpoint while the analysis due at that
checkpoint's step was still running in the background (held there, so the kill always finds it
in flight). A second child resumes from that checkpoint. The controller redoes the lost analysis
from the checkpoint's weights at the first hook after the restore, so ``history.jsonl`` holds
every due analysis exactly once, in step order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow   # real fits in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the analysis of the N-th call (counted in this process) hangs: the kill finds it in flight
COMMON = textwrap.dedent("""
    import json, os, signal, sys, time
    import ww_core
    out, phase, hang_call = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = []

    def analyze(source, **options):
        calls.append(1)
        if phase == "crash" and len(calls) == hang_call:
            time.sleep(600)
        return ww_core.analyze(source, **options)

    def kill():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    # crash: analyses in the background (the one at the checkpoint is in flight at the kill)
    WW = dict(start_fraction=0.0, output_dir=os.path.join(out, "ww"), trackers=None,
              analyze_fn=analyze, async_analysis=phase == "crash", log_fn=lambda line: None)
""")

LIGHTNING = COMMON + textwrap.dedent("""
    import glob, torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from ww_callbacks.lightning import WeightWatcherCallback

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(32, 24), torch.nn.Linear(24, 16)
        def training_step(self, batch, _):
            return self.fc2(torch.relu(self.fc1(batch[0]))).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class KillAtEpoch5(Callback):     # the first batch of epoch 5: epoch 4's checkpoint is written
        def on_train_batch_start(self, trainer, *args):
            if trainer.current_epoch == 5:
                kill()

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 32)), batch_size=8)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_epochs=1, save_top_k=-1)
    cbs = [WeightWatcherCallback(every_n_epochs=1, **WW), ckpt]
    cbs += [KillAtEpoch5()] if phase == "crash" else []
    trainer = Trainer(max_epochs=14, callbacks=cbs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=out, accelerator="cpu")
    path = None if phase == "crash" else os.path.join(out, "ckpt", "epoch=4-step=20.ckpt")
    trainer.fit(Net(), data, ckpt_path=path)
""")

HUGGINGFACE = COMMON + textwrap.dedent("""
    import torch, transformers

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(32, 24), torch.nn.Linear(24, 16)
        def forward(self, x, labels=None):
            return {"loss": self.fc2(torch.relu(self.fc1(x))).pow(2).mean()}

    class KillAfterCheckpoint40(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 40:
                kill()

    from ww_callbacks.huggingface import WeightWatcherCallback
    torch.manual_seed(0)
    ds = [{"x": torch.randn(32)} for _ in range(32)]
    args = transformers.TrainingArguments(os.path.join(out, "hf"), max_steps=60,
                                          per_device_train_batch_size=8, save_strategy="steps",
                                          save_steps=10, report_to="none", use_cpu=True, disable_tqdm=True,
                                          seed=0, logging_strategy="no", dataloader_num_workers=0)
    cbs = [WeightWatcherCallback(every_n_steps=10, **WW)]
    cbs += [KillAfterCheckpoint40()] if phase == "crash" else []
    trainer = transformers.Trainer(Net(), args, train_dataset=ds, callbacks=cbs)
    trainer.train(resume_from_checkpoint=phase != "crash" or None)
""")

KERAS = COMMON + textwrap.dedent("""
    import keras, numpy as np
    from ww_callbacks.keras import WeightWatcherCallback

    class KillAtEpoch5(keras.callbacks.Callback):     # BackupAndRestore saved epoch 4
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 5:
                kill()

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(24, name="fc1"),
                              keras.layers.Dense(16, name="fc2")])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 32)).astype("float32")
    y = np.zeros((32, 16), "float32")
    cbs = [WeightWatcherCallback(every_n_epochs=1, **WW),
           keras.callbacks.BackupAndRestore(os.path.join(out, "backup"))]
    cbs += [KillAtEpoch5()] if phase == "crash" else []
    model.fit(x, y, epochs=14, batch_size=8, verbose=0, callbacks=cbs)
""")


def _child(script, out, phase, hang_call):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, str(out), phase, str(hang_call)],
                          capture_output=True, text=True, cwd=str(out), env=env, timeout=180)


def _crash_and_resume(tmp_path, script, hang_call):
    crashed = _child(script, tmp_path, "crash", hang_call)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    before = _steps(tmp_path / "ww" / "history.jsonl")
    resumed = _child(script, tmp_path, "resume", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return before, _analyses(tmp_path / "ww" / "history.jsonl")


def _steps(path):
    with open(path) as fh:
        return sorted({json.loads(line)["step"] for line in fh})


def _analyses(path):
    """``[(step, epoch, layers)]`` in file order, one entry per analysis."""
    seen = []
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if not seen or seen[-1][0] != row["step"]:
                seen.append((row["step"], row["epoch"], []))
            seen[-1][2].append(row["name"])
    return seen


def _check(analyses, expected_steps, layers):
    assert [a[0] for a in analyses] == expected_steps          # every due step once, in order
    assert all(sorted(a[2]) == sorted(layers) for a in analyses)   # each one whole, no duplicate row


def test_lightning_sigkill_at_epoch_5_then_fit_ckpt_path(tmp_path):
    pytest.importorskip("lightning")
    before, analyses = _crash_and_resume(tmp_path, LIGHTNING, hang_call=5)
    assert before == [4, 8, 12, 16]                            # epoch 4's analysis was in flight
    _check(analyses, [4 * (e + 1) for e in range(14)], ["fc1", "fc2"])
    assert [a[1] for a in analyses] == list(range(14))
    # redone from the checkpoint's weights, not from weights trained further
    import torch

    import ww_core

    ckpt = torch.load(tmp_path / "ckpt" / "epoch=4-step=20.ckpt", map_location="cpu", weights_only=False)
    expected = {la.name: la.alpha for la in ww_core.analyze(
        {k: v.numpy() for k, v in ckpt["state_dict"].items() if k.endswith(".weight")}).layers}
    with open(tmp_path / "ww" / "history.jsonl") as fh:
        got = {r["name"]: r["alpha"] for r in map(json.loads, fh) if r["step"] == 20}
    assert got == pytest.approx(expected, rel=1e-6, nan_ok=True)


def test_huggingface_sigkill_after_checkpoint_40_then_resume(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    before, analyses = _crash_and_resume(tmp_path, HUGGINGFACE, hang_call=4)
    assert before == [10, 20, 30]                              # step 40's analysis was in flight
    _check(analyses, [10, 20, 30, 40, 50, 60], ["fc1", "fc2"])


def test_keras_backup_and_restore_sigkill_at_epoch_5(tmp_path):
    pytest.importorskip("keras")
    before, analyses = _crash_and_resume(tmp_path, KERAS, hang_call=5)
    assert before == [4, 8, 12, 16]                            # epoch 4's analysis was in flight
    _check(analyses, [4 * (e + 1) for e in range(14)], ["sequential.fc1", "sequential.fc2"])
    assert [a[1] for a in analyses] == list(range(14))
