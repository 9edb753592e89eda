"""ww-analyze: table, CSV, plots and error handling (no torch needed: numpy + safetensors)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, heavy_tailed
from ww_core.cli import TABLE_COLUMNS, main
from ww_core.result import COLUMNS

pytestmark = pytest.mark.core
st = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def model_path(tmp_path):
    rng = np.random.default_rng(7)
    sd = {
        "encoder.fc1.weight": (rng.standard_normal((160, 80)) / np.sqrt(160)).astype(np.float32),
        "encoder.fc1.bias": np.zeros(160, np.float32),
        "encoder.fc2.weight": heavy_tailed(rng, (240, 120)),
        "head.weight": heavy_tailed(rng, (64, 120)),
        "norm.weight": np.ones(64, np.float32),
    }
    path = tmp_path / "model.safetensors"
    st.save_file(sd, str(path))
    return path


LAYERS = ["encoder.fc1", "encoder.fc2", "head"]


def _table_rows(stdout):
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("name"))
    rows = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        rows.append(line.split()[0])
    return lines[header], rows


def test_table_and_summary(model_path, capsys):
    assert main([str(model_path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    header, rows = _table_rows(out)
    assert header.split() == list(TABLE_COLUMNS)
    assert rows == LAYERS
    # aligned: every table line is as wide as the separator line (rstrip only shortens the
    # trailing text columns)
    lines = out.splitlines()
    i = lines.index(header)
    sep = lines[i + 1]
    assert set(sep.replace(" ", "")) == {"-"}
    for line in lines[i + 2:i + 2 + len(rows)]:
        assert line.index(line.split()[1]) == header.index("type")  # type column lines up
    assert "summary: 3 layers analysed" in out
    assert "mean over successful fits" in out


def test_csv_written_and_parseable(model_path, tmp_path, capsys):
    out_csv = tmp_path / "sub" / "layers.csv"
    assert main([str(model_path), "--no-progress", "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == list(COLUMNS)
        rows = list(reader)
    assert [r["name"] for r in rows] == LAYERS
    for r in rows:
        float(r["alpha"])  # parseable (may be nan)
        assert int(r["N"]) >= int(r["M"]) >= 8
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(out_csv)
    assert list(df.columns) == list(COLUMNS) and len(df) == 3


def test_layer_and_type_filters(model_path, tmp_path, capsys):
    out_csv = tmp_path / "f.csv"
    assert main([str(model_path), "--no-progress", "--layers", r"fc\d", "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["encoder.fc1", "encoder.fc2"]
    assert main([str(model_path), "--no-progress", "--types", "conv2d"]) == 2  # nothing matches
    assert main([str(model_path), "--no-progress", "--types", "bogus"]) == 2
    assert "unknown layer type" in capsys.readouterr().err


def test_options_are_passed(model_path, capsys):
    rc = main([str(model_path), "--no-progress", "--randomize", "--seed", "3", "--fix-fingers",
               "--min-evals", "10", "--max-evals", "100"])
    assert rc == 0
    _, rows = _table_rows(capsys.readouterr().out)
    assert rows == ["encoder.fc1", "head"]  # encoder.fc2 has 120 > 100 eigenvalues


def test_plots_written(model_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    assert main([str(model_path), "--no-progress", "--plots", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert "alpha_by_layer.png" in names
    assert {"esd_encoder.fc1.png", "esd_encoder.fc2.png", "esd_head.png"} <= set(names)
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ww-analyze: error: ")
    return lines[0]


def test_missing_file(tmp_path, capsys):
    rc = main([str(tmp_path / "nope.safetensors")])
    assert rc != 0
    out, err = capsys.readouterr()
    assert "nope.safetensors" in _one_line_error(err)
    assert out == ""


def test_unknown_format(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    assert main([str(path), "--no-progress"]) != 0
    _one_line_error(capsys.readouterr().err)


def test_corrupt_safetensors(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main([str(path), "--no-progress"]) != 0
    _one_line_error(capsys.readouterr().err)


def test_only_biases(tmp_path, capsys):
    path = tmp_path / "biases.safetensors"
    st.save_file({"fc.bias": np.zeros(10, np.float32), "ln.weight": np.ones(10, np.float32)},
                 str(path))
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ww-analyze: error: no analysable layer")


def test_only_small_layers_lists_reasons(tmp_path, capsys):
    path = tmp_path / "small.safetensors"
    st.save_file({"tiny.weight": np.ones((7, 5), np.float32)}, str(path))
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ww-analyze: error: no analysable layer")
    assert "tiny" in err  # the skipped layer and its reason are listed


def test_help_and_bad_arguments(capsys):
    assert main(["--help"]) == 0
    assert "--fix-fingers" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["x.safetensors", "--layers", "("]) == 2


def test_subprocess_module_entry_point(model_path, tmp_path):
    out_csv = tmp_path / "sub.csv"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "ww_core.cli", str(model_path), "--csv", str(out_csv)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    header, rows = _table_rows(proc.stdout)
    assert rows == LAYERS
    assert out_csv.exists()
    proc = subprocess.run([sys.executable, "-m", "ww_core.cli", str(tmp_path / "missing.pt")],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_line_error(proc.stderr)
