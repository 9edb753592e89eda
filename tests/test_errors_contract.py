"""The engine names the layer an escaping exception came from (``ww_core.errors.failing_layer``),
without changing the exception's type, so callers never inspect stack frames."""

import importlib

import numpy as np
import pytest

import ww_core
from ww_core.errors import failing_layer

pytestmark = pytest.mark.core          # numpy only: runs in the torch-free env too


class Broken:
    """A state-dict value with a shape and a float dtype that raises when converted to an array."""

    shape, dtype = (48, 32), "float32"

    def __array__(self, *args, **kwargs):
        raise RuntimeError("boom: cannot read this tensor")


def state_dict():
    rng = np.random.default_rng(0)
    return {"enc.fc1.weight": rng.standard_normal((64, 32)),
            "enc.fc2.weight": Broken(),
            "head.weight": rng.standard_normal((40, 32))}


@pytest.mark.parametrize("batch_elements", [0, 1 << 24])       # alone, and in a shape group
def test_analyze_names_the_layer_whose_load_failed(batch_elements):
    with pytest.raises(RuntimeError, match="boom") as info:
        ww_core.analyze(state_dict(), batch_elements=batch_elements)
    assert type(info.value) is RuntimeError                     # the type is unchanged
    assert failing_layer(info.value) == "enc.fc2"


def test_analyze_with_randomize_and_distributed_without_group():
    with pytest.raises(RuntimeError) as info:
        ww_core.analyze(state_dict(), randomize=True, seed=0)
    assert failing_layer(info.value) == "enc.fc2"
    with pytest.raises(RuntimeError) as info:
        ww_core.analyze_distributed(state_dict())
    assert failing_layer(info.value) == "enc.fc2"


def test_snapshot_names_the_layer_it_could_not_copy():
    with pytest.raises(RuntimeError) as info:
        ww_core.snapshot(state_dict())
    assert failing_layer(info.value) == "enc.fc2"


def test_error_inside_the_analysis_of_one_layer(monkeypatch):
    engine = importlib.import_module("ww_core.layer_analysis")
    real = engine.fit_powerlaw

    def fit(evals, **kw):
        if evals.size == 40:                                    # layer "b" (64 x 40)
            raise KeyError("fit exploded")
        return real(evals, **kw)

    sd = {"a.weight": np.random.default_rng(1).standard_normal((64, 32)),
          "b.weight": np.random.default_rng(2).standard_normal((64, 40))}
    monkeypatch.setattr(engine, "fit_powerlaw", fit)
    with pytest.raises(KeyError) as info:
        ww_core.analyze(sd)
    assert failing_layer(info.value) == "b"


def test_errors_outside_any_layer_carry_no_name(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ww_core.analyze(tmp_path / "missing.safetensors")
    assert failing_layer(info.value) is None
    with pytest.raises(ValueError) as info:
        ww_core.analyze({}, layers="((")
    assert failing_layer(info.value) is None
    assert failing_layer(RuntimeError("not from ww_core")) is None
