"""Docstring examples that are not doctests (their libraries print at import) run here as written.

The code block is read from the docstring itself, so the example and the test cannot drift apart.
"""

import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ww_callbacks import huggingface  # noqa: E402

pytestmark = pytest.mark.slow


def example_code(obj) -> str:
    """The indented block that follows the ``Example...::`` line of ``obj``'s docstring."""
    doc = obj.__doc__
    head = doc.index("Example")
    start = doc.index("::\n", head) + 3
    block = []
    for line in doc[start:].splitlines():
        if line.strip() and not line.startswith(" " * 8):
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block)).strip()
    assert code, f"no example code in {obj.__qualname__}'s docstring"
    return code


def test_hf_callback_example_runs_and_records_the_steps_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = example_code(huggingface.WeightWatcherCallback)
    ns: dict = {}
    exec(compile(code, "<WeightWatcherCallback example>", "exec"), ns)
    assert sorted({(r["step"], r["name"]) for r in ns["ww"].history.rows}) == [(2, "fc"), (4, "fc")]
    assert (tmp_path / "out" / "ww" / "history.jsonl").is_file()


def test_create_layer_optimizer_example_runs(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

        def forward(self, x, labels=None):
            return {"loss": self.b(torch.relu(self.a(x))).pow(2).mean()}

    monkeypatch.chdir(tmp_path)
    ns = {
        "Trainer": Trainer, "WeightWatcherCallback": huggingface.WeightWatcherCallback,
        "create_layer_optimizer": huggingface.create_layer_optimizer, "model": Net(),
        "args": TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                                  report_to="none", save_strategy="no"),
        "ds": [{"x": torch.randn(32)} for _ in range(32)],
    }
    exec(compile(example_code(huggingface.create_layer_optimizer), "<create_layer_optimizer>", "exec"), ns)
    groups = ns["trainer"].optimizer.param_groups
    # one group (two with HF's weight-decay split) per layer, each named after its layer
    assert {g.get("name") for g in groups} >= {"a", "b"}
