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


#: WeightWatcher 0.7.7 on the reference matrices (tests/data/ww077_reference.json, written by
#: benchmarks/ww_reference_tables.py and checked against WeightWatcher itself by tox -e agreement).
WW077 = json.loads((REPO / "tests" / "data" / "ww077_reference.json").read_text())

#: ours in float64 against WeightWatcher's float64 values: two routes to the same eigenvalues
#: (here numpy's eigensolve of the Gram matrix, there an SVD), each within ~n·eps·λ_max of the
#: exact ones on any LAPACK build; alpha, xmin, D are smooth functions of them once the tail is
#: chosen (num_pl_spikes is compared exactly). Measured: ≤ 4e-14 relative; 1e-9 holds on any CPU.
F64_REL = 1e-9


def test_analyze_numpy_state_dict_and_safetensors_without_torch(tmp_path):
    path = tmp_path / "model.safetensors"
    out = _run(f"""
        import hashlib, json, math, sys
        import numpy as np
        from safetensors.numpy import save_file
        import ww_core
        sys.path.insert(0, "tests")
        from helpers import spec_matrices              # numpy only

        fc1 = spec_matrices()[0]                       # 1000×500 Gaussian, float32
        small = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
        sd = {{"fc1.weight": fc1, "fc1.bias": np.zeros(1000, np.float32), "small.weight": small}}

        res = ww_core.analyze(sd)                      # the default, precision="auto"
        save_file(sd, {str(path)!r})
        res_file = ww_core.analyze({str(path)!r})
        ref = ww_core.analyze({str(path)!r}, precision="float64")["fc1"]   # WW's precision
        out = {{
            "loaded": {_loaded(FORBIDDEN)},
            "sha256": hashlib.sha256(np.ascontiguousarray(fc1).tobytes()).hexdigest(),
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
    # module, its state dict and its file reach the same solver); in the core env it is not.
    # (`import torch` itself imports tqdm.)
    loaded = [m for m in out["loaded"] if m not in ("torch", "tqdm")]
    assert loaded == [], f"analysing numpy weights imported {loaded}"
    assert out["names"] == ["fc1"] and out["file_names"] == ["fc1"]
    assert "small" in out["skipped"]  # M = 5 < min_evals = 8
    # WeightWatcher 0.7.7's values for the same fc1 (checked by its hash), against float64.
    assert out["sha256"] == WW077["weights_sha256"]["fc1"]
    expected = WW077["analyze"]["fc1"]
    assert (out["N"], out["M"], out["num_evals"]) == (expected["N"], expected["M"], expected["num_evals"])
    ref = out["ref"]
    for key in ("alpha", "xmin", "D"):
        assert ref[key] == pytest.approx(expected[key], rel=F64_REL), key
    assert ref["num_pl_spikes"] == expected["num_pl_spikes"]
    assert ref["warning"] == expected["warning"] == "under-trained"
    # The default (float32 where the checks pass), from the in-memory arrays and from the file:
    # the same values, read into another buffer, which a BLAS build may round differently, so each
    # within the float32 bound of ww_core/precision.py (helpers.float32_alpha_tol), whatever the
    # CPU's LAPACK rounds, rather than bit for bit.
    assert_alpha_float32_close(out["alpha"], ref)
    assert_alpha_float32_close(out["file_alpha"], ref)
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
