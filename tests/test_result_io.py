"""Saving and loading an analysis (``AnalysisResult.save`` / ``ww_core.load_result``) and
``ww-analyze --json``: every column, skipped layers, options, engine version, model identity;
non-finite values round-trip through strict JSON."""

import dataclasses
import json
import math

import numpy as np
import pytest

import ww_core
from helpers import heavy_tailed
from ww_core.cli import main
from ww_core.result import COLUMNS, LayerResult

pytestmark = pytest.mark.core


def _model(seed=0, nan=True):
    rng = np.random.default_rng(seed)
    sd = {"enc.fc1.weight": heavy_tailed(rng, (240, 120)),
          "enc.fc2.weight": (rng.standard_normal((200, 100)) / 10).astype(np.float32),
          "head.weight": heavy_tailed(rng, (160, 80)),
          "tiny.weight": rng.standard_normal((20, 5)).astype(np.float32)}       # skipped: 5 evals
    if nan:
        sd["bad.weight"] = np.full((64, 32), np.nan, np.float32)               # flagged non-finite
    return sd


def _same(a, b):
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_round_trip_every_column_skipped_options_and_identity(tmp_path):
    res = ww_core.analyze(_model(), randomize=True, seed=3, mp_fit=True)
    assert res["bad"].flags == ("non-finite",) and res.skipped
    res.layers[0].xmax = math.inf                       # an infinite value round-trips too
    res.layers[1].D = -math.inf
    path = tmp_path / "sub" / "baseline.json"
    res.save(path)
    doc = _strict_json(path)                            # strict JSON: no NaN/Infinity tokens
    assert doc["format"] == "ww_core.analysis" and doc["engine"]["version"] == ww_core.__version__
    assert doc["model"]["identity"] == res.identity and len(res.identity) == 64

    back = ww_core.load_result(path)
    assert back.names == res.names
    for old, new in zip(res.layers, back.layers):
        for col in [f.name for f in dataclasses.fields(LayerResult) if f.name not in ("evals", "rand_evals")]:
            assert _same(getattr(old, col), getattr(new, col)), (old.name, col)
        assert isinstance(new.flags, tuple) and isinstance(new.N, int)
    assert back.skipped == res.skipped
    assert back.options == res.options
    assert back.identity == res.identity and back.meta["engine_version"] == ww_core.__version__
    assert back.summary().keys() == res.summary().keys()
    # saving the loaded result again gives the same document
    back.save(tmp_path / "again.json")
    again = _strict_json(tmp_path / "again.json")
    assert again["layers"] == doc["layers"] and again["created"] == doc["created"]


def test_identity_is_layer_names_and_shapes_not_weights():
    a = ww_core.analyze(_model(0, nan=False))
    b = ww_core.analyze(_model(1, nan=False))          # other weights, same layers
    assert a.identity == b.identity
    other = _model(0, nan=False)
    other["head.weight"] = other["head.weight"][:, :64]
    assert ww_core.analyze(other).identity != a.identity


def test_a_newer_column_is_ignored_and_a_missing_one_defaults(tmp_path):
    res = ww_core.analyze(_model(nan=False))
    res.save(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["layers"][0]["some_future_metric"] = 1.5
    del doc["layers"][0]["entropy"]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    back = ww_core.load_result(tmp_path / "r.json")
    assert math.isnan(back.layers[0].entropy) and back.layers[0].alpha == res.layers[0].alpha


@pytest.mark.parametrize("content, match", [
    ("not json at all", "not a JSON file"),
    ('{"layers": []}', "not a saved ww_core analysis"),
    ('{"format": "ww_core.analysis", "format_version": 99, "layers": []}', "format version 99"),
    ('{"format": "ww_core.analysis", "format_version": 1, "layers": [{"name": "x", "type": "dense", '
     '"N": 4, "M": 4, "alpha": "high"}]}', "layer 'x', alpha: expected a number"),
    ('{"format": "ww_core.analysis", "format_version": 1, "layers": [{"type": "dense"}]}',
     "a layer entry without a name"),
])
def test_bad_files_raise_one_clear_line(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ww_core.SourceError, match=match) as info:
        ww_core.load_result(path)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ww_core.load_result(tmp_path / "missing.json")


def test_every_field_but_the_eigenvalue_arrays_is_saved(tmp_path):
    res = ww_core.analyze(_model(nan=False), keep_evals=True)
    res.save(tmp_path / "r.json")
    record = json.loads((tmp_path / "r.json").read_text())["layers"][0]
    fields = {f.name for f in dataclasses.fields(LayerResult)}
    assert set(record) == fields - {"evals", "rand_evals"}
    assert list(record)[:len(COLUMNS)] == list(COLUMNS)       # the table columns first, in order


# --------------------------------------------------------------------------- ww-analyze --json
def test_cli_json_writes_a_loadable_analysis_and_prints_it_back(tmp_path, capsys):
    st = pytest.importorskip("safetensors.numpy")
    model = tmp_path / "model.safetensors"
    st.save_file(_model(nan=False), str(model))
    out = tmp_path / "res" / "analysis.json"
    assert main([str(model), "--no-progress", "--layers", "enc", "--json", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = ww_core.load_result(out)
    assert back.names == ["enc.fc1", "enc.fc2"] and back.options["layers"] == "enc"
    assert back.meta["source"] == str(model)
    # the whole model's layers are recorded, so the identity does not depend on --layers
    assert back.identity == ww_core.analyze(_model(nan=False)).identity
    assert {e[0] for e in back.meta["model_layers"]} == {"enc.fc1", "enc.fc2", "head", "tiny"}
    # a saved analysis is printed like a model; --format json prints the document
    assert main([str(out), "--no-progress"]) == 0
    assert "enc.fc2" in capsys.readouterr().out
    assert main([str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["name"] == "enc.fc1"
    # options that change an analysis cannot apply to a saved one
    assert main([str(out), "--no-progress", "--min-evals", "3"]) == 1
    err = capsys.readouterr().err
    assert "is a saved analysis" in err and err.count("\n") == 1
    # an unwritable --json target is an error
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(model), "--no-progress", "--json", str(blocker / "a.json")]) == 1
    assert "cannot write" in capsys.readouterr().err
