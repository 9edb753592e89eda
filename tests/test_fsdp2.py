"""Sharded training beyond FSDP1, real 2-process runs on CPU (gloo): FSDP2 (``fully_shard``) under
a plain loop and under Lightning's ``ModelParallelStrategy``, Lightning's ``FSDPStrategy`` (FSDP1
wrapping the LightningModule from outside) and DeepSpeed ZeRO-3 (CPU accelerator; skipped without
deepspeed) in a plain loop, under the HF Trainer (``TrainingArguments(deepspeed=...)``) and under
Lightning's ``DeepSpeedStrategy``. Scripts in tests/ddp_scripts/; every run is also checked by
``test_ddp.check_run`` (sharded analysis, identical results on both ranks, rank-0-only files).
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")

from helpers import (  # noqa: E402
    REPO,
    SUBPROCESS_TIMEOUT,
    assert_alpha_float32_close,
    assert_records_close,
    torchrun_command,
)
from test_ddp import LAYERS, SCRIPTS, check_run  # noqa: E402
from ww_callbacks.history import read_jsonl  # noqa: E402

pytestmark = pytest.mark.slow


def launch(cmd, tmp_path, **env_extra):
    """Run ``cmd OUT_DIR``; PYTHONPATH = the repository, then the caller's (deepspeed may be there)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **env_extra)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(cmd + [str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def check_against_reference(ranks, refs):
    """Every rank's last result equals the float64 analysis of the full weights within the
    float32 bound of the default precision (tests/helpers.py)."""
    for r, (rank, ref) in enumerate(zip(ranks, refs)):
        assert [x["name"] for x in ref] == LAYERS
        for rec, exp in zip(rank["last_result"], ref):
            assert rec["name"] == exp["name"]
            assert_alpha_float32_close(rec["alpha"], exp, (r, rec["name"]))


def test_fsdp2_controller_gathers_one_layer_at_a_time(tmp_path):
    ranks = launch(torchrun_command(2) + [str(SCRIPTS / "fsdp2_controller.py")], tmp_path)
    check_run(ranks, tmp_path, steps=[2, 4, 6])
    probes = [json.loads((tmp_path / f"fsdp2_{r}.json").read_text()) for r in range(2)]
    check_against_reference(ranks, [p["ref"] for p in probes])
    largest = max(probes[0]["layer_numel"].values())
    for p in probes:
        # one full_tensor() per layer per analysis, each one weight, the previous one already
        # freed (its CPU copy kept): at most one layer unsharded at any time
        assert p["per_run"] == [len(LAYERS)] * 3
        assert all(g["alive_before"] == 0 for g in p["gathers"])
        assert p["alive_after"] == 0
        for g in p["gathers"]:
            assert g["shape"][0] == 2 * g["local"][0]           # a real gather of a dim-0 shard
            assert g["shape"][0] * g["shape"][1] <= largest
        assert p["unshards"] == [] and p["still_sharded"]      # FSDP2's own state untouched
        # gather_snapshot + analyze in float64: the reference to rounding
        for got, exp in zip(p["gathered"], p["ref"]):
            assert_records_close(got, exp, rel=1e-9, label=got["name"])
        # plain analyze never reads a local shard: every layer skipped, saying what to do
        assert p["plain_names"] == []
        assert [n for n, _ in p["plain_skipped"]] == LAYERS
        assert all("sharded weight" in why and "gather_snapshot" in why for _, why in p["plain_skipped"])
        # a DTensor that cannot be gathered (process group gone): skipped, no hang, no number
        assert p["orphan_names"] == []
        assert all("cannot be gathered: no initialised" in why for _, why in p["orphan_skipped"])
    assert [g["shape"] for g in probes[0]["gathers"]] == [g["shape"] for g in probes[1]["gathers"]]


@pytest.mark.parametrize("kind,steps", [("fsdp2", [4, 8, 12]), ("fsdp1", [2, 4, 6])])
def test_lightning_sharded_strategies(tmp_path, kind, steps):
    """``ModelParallelStrategy`` (FSDP2) runs on CPU as it is; ``FSDPStrategy`` needs the test's
    ``CPUFSDPStrategy`` (Lightning refuses FSDP1 on CPU), the wrapping is Lightning's. The
    callback finds FSDP1's root unit from the LightningModule (``trainer.strategy.model``)."""
    pytest.importorskip("lightning")
    ranks = launch([sys.executable, str(SCRIPTS / "lightning_sharded.py"), kind], tmp_path)
    check_run(ranks, tmp_path, steps=steps)
    refs = [json.loads((tmp_path / f"ref{r}.json").read_text())["records"] for r in range(2)]
    check_against_reference(ranks, refs)


def test_deepspeed_zero3_gathers_one_parameter_at_a_time(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = launch(torchrun_command(2) + [str(SCRIPTS / "zero3_controller.py")], tmp_path,
                   DS_ACCELERATOR="cpu")
    check_run(ranks, tmp_path, steps=[2, 4, 6])
    probes = [json.loads((tmp_path / f"zero3_{r}.json").read_text()) for r in range(2)]
    check_against_reference(ranks, [p["ref"] for p in probes])
    for p in probes:
        assert len(p["gathers"]) == 3 * len(LAYERS)
        assert all(g["num"] == 1 and g["available_before"] == 0 for g in p["gathers"])
        assert set(p["after"]) == {"NOT_AVAILABLE"}            # re-partitioned after each gather
        assert p["plain_names"] == []
        assert all("DeepSpeed ZeRO-3" in why and "gather_snapshot" in why
                   for _, why in p["plain_skipped"])


#: ``ds_shape`` of the weights of ``LAYERS`` (tests/ddp_scripts/common.py), in model order.
WEIGHT_SHAPES = [[64, 32], [64, 64], [48, 64], [16, 48]]


def check_float64_records(got, refs, label):
    """The callback's float64 records equal the float64 analysis of the full weights gathered at
    once (tests/ddp_scripts/zero3_probe.py), to rounding."""
    assert [g["name"] for g in got] == [x["name"] for x in refs] == LAYERS, label
    for g, x in zip(got, refs):
        assert g["alpha"] == pytest.approx(x["alpha"], abs=1e-6, nan_ok=True), (label, g["name"])
        assert_records_close(g, x, rel=1e-9, label=(label, g["name"]))     # every field


def check_zero3_framework_run(ranks, tmp_path, steps):
    """A framework's ZeRO-3 run (zero3_hf_trainer.py / zero3_lightning.py) with the callback."""
    out = check_run(ranks, tmp_path, steps=steps)
    probes = [json.loads((tmp_path / f"zero3_{r}.json").read_text()) for r in range(2)]
    assert json.dumps(probes[0]["refs"]) == json.dumps(probes[1]["refs"])
    for r, (rank, p) in enumerate(zip(ranks, probes)):
        assert p["engine"] == "DeepSpeedEngine" and p["stage"] == 3
        assert p["global_step"] == steps[-1]                        # training ran to its end
        # each analysis gathered every layer alone, from an empty local partition, while no other
        # parameter was gathered
        assert [g["shape"] for g in p["gathers"]] == WEIGHT_SHAPES * len(steps)
        assert all(g["num"] == 1 and g["local_numel"] == 0 and g["available_before"] == 0
                   for g in p["gathers"])
        # right after each analysis (the next callback) and at the end: all partitioned again
        assert p["status_before_ref"] == {str(s): ["NOT_AVAILABLE"] for s in steps}
        assert p["local_numel"] == {str(s): 0 for s in steps}
        assert p["final_status"] == ["NOT_AVAILABLE"] and p["final_local_numel"] == 0
        check_float64_records(rank["last_result"], p["refs"][str(steps[-1])], (r, "last"))
    # what rank 0 recorded at each analysed step: that step's full weights
    disk = read_jsonl(str(out / "history.jsonl"))
    for s in steps:
        rows = [{k: v for k, v in row.items() if k not in ("step", "epoch", "time")}
                for row in disk if row["step"] == s]
        check_float64_records(rows, probes[0]["refs"][str(s)], s)
    # the weights moved between the analyses: each step was compared with its own weights
    first, last = probes[0]["refs"][str(steps[0])], probes[0]["refs"][str(steps[-1])]
    assert all(a["spectral_norm"] != b["spectral_norm"] for a, b in zip(first, last))
    return probes


def test_deepspeed_zero3_under_hf_trainer(tmp_path):
    """``TrainingArguments(deepspeed=<ZeRO-3 dict>, use_cpu=True, ddp_backend="gloo")`` under
    torchrun: the Trainer's own ``DeepSpeedEngine``; 64 samples, 8 per device, 6 steps."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ranks = launch(torchrun_command(2) + [str(SCRIPTS / "zero3_hf_trainer.py")], tmp_path,
                   DS_ACCELERATOR="cpu")
    probes = check_zero3_framework_run(ranks, tmp_path, steps=[2, 4, 6])
    for p in probes:
        assert p["distributed_type"] == "DEEPSPEED" and p["deepspeed_enabled"] and p["loss_finite"]


def test_deepspeed_zero3_under_lightning_strategy(tmp_path):
    """Lightning ``DeepSpeedStrategy`` (stage 3) on CPU: refused by Lightning as it is, run with
    the script's ``CPUDeepSpeedStrategy`` (skips the CUDA check) and ``parallel_devices=[cpu:0,
    cpu:1]``; the engine around the LightningModule is Lightning's. 4 steps per epoch, 6 steps."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("lightning")
    ranks = launch([sys.executable, str(SCRIPTS / "zero3_lightning.py")], tmp_path,
                   DS_ACCELERATOR="cpu")
    probes = check_zero3_framework_run(ranks, tmp_path, steps=[2, 4, 6])
    assert [p["rank_env"] for p in probes] == [0, 1]
    assert all(p["status"] == "finished" for p in probes)
