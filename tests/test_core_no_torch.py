"""ww_core without torch: importing and analysing numpy weights and .safetensors files written
without torch must not load any deep-learning framework, tracker or plotting library.

Runs in the `core` tox env (numpy/scipy/pytest only installed) and in the full env, where the
subprocess check proves that nothing heavy is imported even when it is installed.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import REPO, assert_alpha_float32_close

pytestmark = pytest.mark.core

#: Modules that `import ww_core, ww_callbacks` and a numpy/safetensors analysis must not import
#: (docs/architecture.md: torch, keras, pandas, matplotlib and tqdm are imported lazily).
FORBIDDEN = ("torch", "lightning", "pytorch_lightning", "transformers", "accelerate", "keras",
             "tensorflow", "jax", "wandb", "mlflow", "tensorboard", "pandas", "matplotlib", "tqdm")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (cwd: repo root) and return the JSON it prints last."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(names):
    return "[m for m in %r if m in sys.modules]" % (tuple(names),)


def test_env_without_torch_when_requested():
    """In `tox -e core` (WW_EXPECT_NO_TORCH=1) torch must really be absent."""
    if os.environ.get("WW_EXPECT_NO_TORCH") != "1":
        pytest.skip("only meaningful in the numpy/scipy-only environment")
    import importlib.util

    for name in ("torch", "lightning", "transformers", "keras"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the core env"


def test_import_loads_no_framework():
    out = _run(f"""
        import json, sys
        import ww_core, ww_callbacks
        print(json.dumps({{"loaded": {_loaded(FORBIDDEN)}, "analyze": callable(ww_core.analyze)}}))
    """)
    assert out["analyze"] is True
    assert out["loaded"] == [], f"importing ww_core/ww_callbacks imported {out['loaded']}"


def test_analyze_numpy_state_dict_and_safetensors_without_torch(tmp_path):
    path = tmp_path / "model.safetensors"
    out = _run(f"""
        import json, math, sys
        import numpy as np
        from safetensors.numpy import save_file
        import ww_core

        rng = np.random.default_rng(12345)
        # weightwatcher-spec.md section 12: fc1 = the first draw of default_rng(12345), float32.
        fc1 = (rng.standard_normal((1000, 500)) / np.sqrt(1000)).astype(np.float32)
        small = rng.standard_normal((7, 5)).astype(np.float32)
        sd = {{"fc1.weight": fc1, "fc1.bias": np.zeros(1000, np.float32), "small.weight": small}}

        res = ww_core.analyze(sd)                      # the default, precision="auto"
        save_file(sd, {str(path)!r})
        res_file = ww_core.analyze({str(path)!r})
        ref = ww_core.analyze({str(path)!r}, precision="float64")["fc1"]   # WW's precision
        out = {{
            "loaded": {_loaded(FORBIDDEN)},
            "names": res.names, "file_names": res_file.names,
            "skipped": [s.name for s in res_file.skipped],
            "N": res["fc1"].N, "M": res["fc1"].M, "num_evals": res["fc1"].num_evals,
            "alpha": res["fc1"].alpha, "file_alpha": res_file["fc1"].alpha,
            "file_warning": res_file["fc1"].warning,
            "ref": ref.to_dict(),
        }}
        print(json.dumps(out))
    """)
    # ww_core.spectrum deliberately uses torch's eigensolver whenever torch is *installed* (so a
    # module, its state dict and its file give bit-identical spectra); in the core env it is not.
    # (`import torch` itself imports tqdm.)
    loaded = [m for m in out["loaded"] if m not in ("torch", "tqdm")]
    assert loaded == [], f"analysing numpy weights imported {loaded}"
    assert out["names"] == ["fc1"] and out["file_names"] == ["fc1"]
    assert "small" in out["skipped"]  # M = 5 < min_evals = 8
    assert (out["N"], out["M"], out["num_evals"]) == (1000, 500, 500)
    # WeightWatcher 0.7.7 reference values (spec section 12, CPU float64), against float64.
    ref = out["ref"]
    assert ref["alpha"] == pytest.approx(7.943733, rel=1e-5)
    assert ref["xmin"] == pytest.approx(2.034505, rel=1e-5)
    assert ref["D"] == pytest.approx(0.124828, rel=1e-5)
    assert ref["num_pl_spikes"] == 58
    assert ref["warning"] == "under-trained"
    # The default (float32 where the checks pass): within the float32 bound of
    # ww_core/precision.py (helpers.float32_alpha_tol), whatever the CPU's LAPACK rounds.
    assert_alpha_float32_close(out["alpha"], ref)
    # The state dict and its file reach the same solver with the same values: same result.
    assert out["file_alpha"] == pytest.approx(out["alpha"], rel=1e-12)
    assert out["file_warning"] == "under-trained"              # alpha ≈ 7.9, far above 6


def test_analyze_in_process_numpy():
    import ww_core
    from ww_core.result import COLUMNS

    rng = np.random.default_rng(0)
    res = ww_core.analyze({"fc.weight": rng.standard_normal((200, 100))})
    assert res.names == ["fc"]
    layer = res["fc"]
    assert (layer.N, layer.M) == (200, 100)
    assert layer.ok and np.isfinite(layer.alpha) and layer.alpha > 1
    records = res.to_records()
    assert list(records[0]) == list(COLUMNS)
    json.dumps(records)  # JSON-serialisable
