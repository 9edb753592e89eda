"""Every Python block of README.md runs, as written, with W&B offline.

Blocks that use "your" objects (``lit_model``, ``train_loader``; ``keras_model``, ``x``, ``y``;
``model``, ``loader``, ``opt``, ``loss_fn``) get small real ones from :func:`_yours`; nothing in a
block is changed. Each block runs in a fresh namespace in a scratch folder and must leave a new
``report.html`` behind (the local record every callback writes).
"""

from __future__ import annotations

import glob
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # the frameworks' own notes on tiny runs
]


def python_blocks(text: str) -> list:
    """The README's fenced ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _yours(block: str) -> dict:
    """Small real stand-ins for the objects a block says are the reader's."""
    names = set(re.findall(r"[A-Za-z_]\w*", block))
    out: dict = {}
    if {"lit_model", "model", "loader"} & names:
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        xs, ys = torch.randn(256, 32), torch.randint(0, 4, (256,))
        data = torch.utils.data.TensorDataset(xs, ys)
        out["loader"] = out["train_loader"] = torch.utils.data.DataLoader(data, batch_size=32)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48),
                                  torch.nn.ReLU(), torch.nn.Linear(48, 4))
        out["model"], out["loss_fn"] = net, torch.nn.functional.cross_entropy
        out["opt"] = torch.optim.SGD(net.parameters(), lr=0.05)
    if "lit_model" in names:
        pl = pytest.importorskip("lightning.pytorch")
        torch = pytest.importorskip("torch")

        class Lit(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                               torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                               torch.nn.Linear(48, 16))

            def training_step(self, batch, _):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        out["lit_model"] = Lit()
    if "keras_model" in names:
        keras = pytest.importorskip("keras")
        import numpy as np

        rng = np.random.default_rng(0)
        out["x"] = rng.standard_normal((256, 32)).astype("float32")
        out["y"] = rng.integers(0, 4, 256)
        model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(4)])
        model.compile(optimizer="sgd",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        out["keras_model"] = model
    return out


def test_readme_has_the_hf_wandb_quickstart_first():
    text = open(README, encoding="utf-8").read()
    head = "\n".join(text.splitlines()[:40])
    assert "WeightWatcherCallback" in head and 'report_to="wandb"' in head
    assert "ww_callbacks.huggingface" in head


def test_readme_settings_table_matches_the_controller():
    """Each keyword of the README's settings table exists, with the default the table states."""
    import ast
    import inspect

    from ww_callbacks import WeightWatcherController

    params = inspect.signature(WeightWatcherController.__init__).parameters
    text = open(README, encoding="utf-8").read()
    table = text.split("## Main settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", table, re.M)
    assert len(rows) >= 10, rows
    checked = 0
    for names, default in rows:
        for name in re.findall(r"`(\w+)`", names):
            assert name in params, f"README settings table: {name} is not a keyword"
            literal = re.match(r"`([^`]+)`", default.strip())
            if literal:
                assert ast.literal_eval(literal.group(1)) == params[name].default, (name, default)
                checked += 1
    assert checked >= 10


BLOCKS = python_blocks(open(README, encoding="utf-8").read())


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, wandb_offline, tmp_path, monkeypatch):
    block = BLOCKS[index]
    for module in re.findall(r"^(?:from|import) ([\w.]+)", block, re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": f"readme_block_{index}", **_yours(block)}
    exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
    reports = glob.glob(str(tmp_path / "**" / "report.html"), recursive=True)
    assert reports, f"block {index + 1} wrote no report.html"
    if "wandb" in block.lower():
        runs = glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True)
        assert runs, f"block {index + 1} logged no offline W&B run"
    import sys

    if "wandb" in sys.modules:  # the HF Trainer leaves its run open: finish it, then start afresh
        wandb = sys.modules["wandb"]
        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()
