"""The freeze study's own machinery (``benchmarks/freeze_study.py``, ``freeze_tasks.py``),
on small models built here: the backward-compute count, the AutoFreeze-style baseline, the
static prefix and the report's pairing. The pretrained tasks themselves are not run."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import freeze_report  # noqa: E402
import freeze_study  # noqa: E402
from freeze_tasks import BackwardCost  # noqa: E402

from ww_callbacks.torch_utils import freeze_layers  # noqa: E402


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.LayerNorm(32),
                         nn.Linear(32, 4))


def test_backward_cost_counts_weight_and_input_gradients():
    model = mlp()
    x = torch.randn(5, 8)
    cost = BackwardCost(model, lambda: model(x))
    assert cost.macs == {"0": 5 * 8 * 32, "2": 5 * 32 * 32, "4": 5 * 32 * 4}
    # nothing frozen: weight gradients everywhere, input gradients after the first layer
    assert cost.full == 1280 + 2 * 5120 + 2 * 640
    freeze_layers(model, ["0", "2"])                   # by name: the LayerNorms still train
    assert cost.current() == 5120 + 2 * 640
    freeze_layers(model, ["0", "2"], whole_prefix=True)
    # layer 4 only (the LayerNorm before it trains, so its input gradient is still needed)
    assert cost.current() == 2 * 640
    cost.step()
    cost.step()
    assert cost.saved == pytest.approx(1 - 1280 / cost.full)


def test_autofreeze_freezes_leading_layers_whose_gradient_norm_settled():
    model = mlp()
    names = ["0", "2", "4"]
    auto = freeze_study.AutoFreeze(model, names, max_share=1.0)
    norms = iter([[1.0, 1.0, 1.0], [1.01, 2.0, 3.0]])    # per check: the grads' scale per layer

    def interval():
        scale = next(norms)
        for n, s in zip(names, scale):
            for p in auto.params[n]:
                p.grad = torch.full_like(p, s)
        auto.after_backward()
        return auto.check()

    assert interval() == []                            # the first check only records
    # relative changes 0.01, 1.0 (the head, 2.0, is never frozen): median 0.505, so only "0"
    assert interval() == ["0"] and auto.frozen == 1


def test_static_prefix_freezes_everything_up_to_layer_k():
    model = mlp()
    freeze_study.freeze_prefix(model, ["0", "2", "4"], 2)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


def test_report_pairs_runs_with_the_none_run_of_the_same_seed(tmp_path):
    def rec(config, seed, acc, cpu):
        return {"task": "t", "config": config, "seed": seed, "final_acc": acc, "wall_s": cpu,
                "cpu_s": cpu, "analysis_s": 0.0, "bwd_saved": 0.2, "events": [], "frozen": [],
                "layers": 3, "steps": 10}
    records = [rec("none", 0, 0.90, 10.0), rec("none", 1, 0.80, 20.0),
               rec("alpha", 0, 0.91, 8.0), rec("alpha", 1, 0.78, 15.0)]
    rows = {(r["config"], r["seed"]): r for r in freeze_report.paired(records)}
    assert rows[("alpha", 0)]["d_acc_pts"] == pytest.approx(1.0)
    assert rows[("alpha", 1)]["d_acc_pts"] == pytest.approx(-2.0)
    assert rows[("alpha", 1)]["cpu_saved"] == pytest.approx(0.25)
    text = freeze_report.table(records)
    assert "| t | alpha | 2 |" in text and "(1/1/0)" in text
    path = freeze_report.figure(records, str(tmp_path / "f.png"))
    assert path and os.path.getsize(path) > 1000
