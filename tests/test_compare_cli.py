"""ww-analyze's model-level options, each checked for its effect: --json, --compare-to, --fail-on,
--format, --top, --rank-by and several PATHs (a ranking). The fixture model is
test_cli_options.py's; more cases in test_compare.py and test_result_io.py."""

import json

import numpy as np
import pytest

import ww_core
from test_cli_options import ORDER, _state_dict, run

pytestmark = pytest.mark.core
st = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    st.save_file(_state_dict(), str(path))
    return path

def _variant(model_path, tmp_path, name, scale_key=None):
    """A copy of the fixture model, with one layer replaced by a Gaussian matrix of its norm."""
    sd = _state_dict()
    if scale_key:
        r = np.random.default_rng(11).standard_normal(sd[scale_key].shape)
        sd[scale_key] = (r * np.linalg.norm(sd[scale_key]) / np.linalg.norm(r)).astype(np.float32)
    path = tmp_path / name
    st.save_file(sd, str(path))
    return path


def test_json_option_saves_the_analysis(model_path, tmp_path, capsys):
    rc, out, err = run([model_path, "--no-progress", "--json", tmp_path / "a.json"], capsys)
    assert rc == 0 and f"wrote {tmp_path / 'a.json'}" in out
    assert ww_core.load_result(tmp_path / "a.json").names == ORDER


def test_compare_to_fail_on_and_top(model_path, tmp_path, capsys):
    broken = _variant(model_path, tmp_path, "broken.safetensors", "enc.fc2.weight")
    rc, out, err = run([model_path, "--no-progress", "--compare-to", model_path], capsys)
    assert rc == 0 and out.rstrip().endswith("no regression")
    rc, out, err = run([broken, "--no-progress", "--compare-to", model_path, "--top", "1"], capsys)
    assert rc == 3 and "REGRESSION: 1 layer regressed" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert [l.split()[0] for l in lines[header + 2:header + 4]] == ["enc.fc2", "..."]
    rc, out, err = run([broken, "--no-progress", "--compare-to", model_path, "--fail-on", "none"], capsys)
    assert rc == 0 and "regression: never" in out


def test_format_option(model_path, tmp_path, capsys):
    rc, out, err = run([model_path, "--no-progress", "--format", "json"], capsys)
    assert rc == 0 and [l["name"] for l in json.loads(out)["layers"]] == ORDER
    rc, out, err = run([model_path, "--no-progress", "--compare-to", model_path, "--format", "markdown"],
                       capsys)
    assert rc == 0 and out.startswith("### Spectral comparison: ✅ no regression")


def test_several_paths_rank_models_and_rank_by(model_path, tmp_path, capsys):
    broken = _variant(model_path, tmp_path, "broken.safetensors", "enc.fc2.weight")
    same = _variant(model_path, tmp_path, "same.safetensors")
    rc, out, err = run([broken, model_path, same, "--no-progress", "--format", "json",
                        "--json", tmp_path / "rank.json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / "rank.json").read_text())
    rows = doc["models"]
    assert [r["rank"] for r in rows] == [1, 2, 3] and doc["same_architecture"] and doc["notes"] == []
    values = [r["alpha_weighted"] for r in rows]
    assert values == sorted(values) and rows[-1]["model"] == str(broken)
    assert rows[0]["alpha_weighted"] == rows[1]["alpha_weighted"]      # identical weights tie
    rc, out, err = run([model_path, broken, "--no-progress", "--rank-by", "num_flagged"], capsys)
    assert rc == 0 and out.startswith("models ranked by num_flagged (lower is better)")
    lines = [l for l in out.splitlines() if l.strip().startswith(("1 ", "2 "))]
    assert str(model_path) in lines[0] and str(broken) in lines[1]
    # different architectures: ranked, with a note that says why that is weak evidence
    other = tmp_path / "other.safetensors"
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    st.save_file({"x.weight": x}, str(other))
    rc, out, err = run([model_path, other, "--no-progress", "--format", "markdown"], capsys)
    assert rc == 0 and out.startswith("### Models ranked by alpha_weighted")
    assert "meaningful only within one architecture family" in out
    rc, out, err = run([model_path, tmp_path / "missing.pt", "--no-progress"], capsys)
    assert rc == 1 and "missing.pt" in err and err.count("\n") == 1
