"""``ww_core.compare`` and ``ww-analyze CANDIDATE --compare-to BASELINE``: per-layer deltas, flags
raised and cleared, added / removed / not analysed layers, the regression policy, the three
report formats and exit code 3 (numpy models: runs without torch)."""

import json

import numpy as np
import pytest

import ww_core
from helpers import heavy_tailed
from ww_core.cli import main
from ww_core.compare_policy import SERIOUS_FLAGS

pytestmark = pytest.mark.core
st = pytest.importorskip("safetensors.numpy")


def _base(seed=0):
    rng = np.random.default_rng(seed)
    return {"enc.fc1.weight": heavy_tailed(rng, (240, 120)),
            "enc.fc2.weight": heavy_tailed(rng, (300, 150)),
            "head.weight": heavy_tailed(rng, (160, 80)),
            "small.weight": rng.standard_normal((20, 5)).astype(np.float32)}       # skipped


def _randomised(sd, key, seed=1):
    """``sd`` with ``key`` replaced by a Gaussian matrix of the same shape and Frobenius norm."""
    out = dict(sd)
    r = np.random.default_rng(seed).standard_normal(sd[key].shape)
    out[key] = (r * np.linalg.norm(sd[key]) / np.linalg.norm(r)).astype(np.float32)
    return out


def _save(sd, path):
    st.save_file(sd, str(path))
    return str(path)


def test_identical_weights_no_change_no_regression():
    cmp = ww_core.compare(_base(), _base())
    assert [c.status for c in cmp.layers] == ["compared"] * 3
    assert all(c.d_alpha == 0 and c.d_log_norm == 0 and c.d_stable_rank == 0 for c in cmp.compared)
    assert cmp.regressions() == [] and not cmp.regressed()
    assert cmp.not_analysed == [] and cmp.removed == []    # "small": skipped on both sides
    assert cmp.summary()["same_architecture"] and cmp.notes == []


def test_a_layer_replaced_by_a_random_matrix_of_the_same_norm_regresses_alone():
    base = _base()
    cmp = ww_core.compare(base, _randomised(base, "enc.fc2.weight"))
    [reg] = cmp.regressions()
    assert reg.layer == "enc.fc2" and "under-trained" in reg.reasons
    change = cmp["enc.fc2"]
    assert change.flags_raised == ("under-trained",) and change.d_alpha > 1
    assert abs(change.d_log_norm) < 1e-6                      # same Frobenius norm
    assert change.spectrum_change > 0.1
    assert [c.name for c in cmp.worst_first()][0] == "enc.fc2"
    # the reverse direction clears the flag; a layer the baseline found under-trained is not
    # judged by its alpha or spectrum change: no regression
    back = ww_core.compare(_randomised(base, "enc.fc2.weight"), base)
    assert back["enc.fc2"].flags_cleared == ("under-trained",) and back.regressions() == []
    # a trained layer replaced while its alpha stays in range: the spectrum change catches it
    quiet = ww_core.compare(base, _randomised(base, "head.weight"))
    assert quiet["head"].flags_raised == () and abs(quiet["head"].d_alpha) < 1
    change = quiet["head"].spectrum_change
    assert [r.reasons for r in quiet.regressions()] == [(f"spectrum-change {change:.2f}",)]


def test_a_small_update_is_not_a_regression():
    base = _base()
    rng = np.random.default_rng(5)
    cand = {k: (v * (1 + 1e-3 * rng.standard_normal(v.shape))).astype(np.float32) for k, v in base.items()}
    cmp = ww_core.compare(base, cand)
    assert cmp.regressions() == []
    assert max(c.spectrum_change for c in cmp.compared) < 0.01


def test_serious_flags_regress_worst_first():
    base = _base()
    cand = dict(base)
    cand["enc.fc1.weight"] = base["enc.fc1.weight"].copy()
    cand["enc.fc1.weight"][3, 4] = np.nan
    rng = np.random.default_rng(2)
    low = rng.standard_normal((160, 8)) @ rng.standard_normal((8, 80))     # rank 8 of 80
    cand["head.weight"] = (low / np.linalg.norm(low) * np.linalg.norm(base["head.weight"])).astype(np.float32)
    cmp = ww_core.compare(base, cand)
    regs = cmp.regressions()
    assert [r.layer for r in regs] == ["enc.fc1", "head"]
    assert regs[0].reasons[0] == "non-finite" and "rank-collapse" in regs[1].reasons
    # a policy that watches only rank collapse
    only = ww_core.RegressionPolicy(flags=("rank-collapse",), max_delta_alpha=None)
    assert [r.layer for r in cmp.regressions(only)] == ["head"]


def test_partial_analysis_reads_not_analysed_never_removed(tmp_path):
    base = _base()
    partial = ww_core.analyze(base, layers="enc")              # options say what was selected
    cmp = ww_core.compare(ww_core.analyze(base), partial)
    assert cmp["head"].status == "not analysed" and cmp["head"].missing_in == "candidate"
    assert cmp.removed == [] and cmp.regressions(ww_core.RegressionPolicy(removed=True)) == []
    # saved from the command line, the analysis knows every layer of the model
    model = _save(base, tmp_path / "m.safetensors")
    assert main([model, "--no-progress", "--layers", "fc1", "--json", str(tmp_path / "p.json")]) == 0
    cmp = ww_core.compare(str(tmp_path / "p.json"), base, layer_types=["dense"])
    assert set(cmp.not_analysed) == {"enc.fc2", "head"} and cmp.added == []
    # a layer skipped by a size bound is not analysed, with the reason
    cmp = ww_core.compare(ww_core.analyze(base), ww_core.analyze(base, min_evals=100))
    assert cmp["head"].status == "not analysed" and "too few eigenvalues" in cmp["head"].note


def test_removed_and_added_layers():
    base = _base()
    cand = {k: v for k, v in base.items() if not k.startswith("head")}
    cand["extra.weight"] = heavy_tailed(np.random.default_rng(9), (128, 64))
    cmp = ww_core.compare(base, cand)
    assert cmp.removed == ["head"] and cmp.added == ["extra"]
    assert not cmp.regressed()                                  # reported, not gated, by default
    strict = ww_core.RegressionPolicy.parse("default,removed,added")
    assert sorted(r.layer for r in cmp.regressions(strict)) == ["extra", "head"]
    assert not cmp.summary()["same_architecture"]
    reshaped = dict(base, **{"head.weight": base["head.weight"][:, :64]})
    assert "1 layer(s) changed shape: head" in ww_core.compare(base, reshaped).notes


def test_layer_names_aligned_across_a_wrapper_prefix():
    base = _base()
    cand = {f"model.{k}": v for k, v in base.items()}
    cand["classifier.weight"] = heavy_tailed(np.random.default_rng(4), (96, 48))
    cmp = ww_core.compare(base, cand)
    assert {c.name for c in cmp.compared} == {"enc.fc1", "enc.fc2", "head"}
    assert cmp.added == ["classifier"] and "'model.'" in cmp.notes[0]


def test_a_saved_baseline_sets_how_the_candidate_is_analysed(tmp_path):
    base = _base()
    saved = ww_core.analyze(base, layers="enc", fix_fingers="clip_xmax")
    saved.save(tmp_path / "b.json")
    cmp = ww_core.compare(tmp_path / "b.json", base)
    assert cmp.candidate.options["fix_fingers"] == "clip_xmax"
    assert cmp.candidate.names == ["enc.fc1", "enc.fc2"]
    assert all(c.d_alpha == 0 for c in cmp.compared) and cmp.notes == []
    # explicit options win, and the difference is noted
    cmp = ww_core.compare(tmp_path / "b.json", base, layers="enc")
    assert any("fix_fingers" in n for n in cmp.notes)


def test_policy_parsing():
    P = ww_core.RegressionPolicy
    assert P.parse("default") == P()
    assert P.parse("rank-collapse,alpha=0.5") == P(flags=("rank-collapse",), max_delta_alpha=0.5,
                                                   max_spectrum_change=None)
    assert P.parse("flags").flags == SERIOUS_FLAGS and P.parse("flags").max_delta_alpha is None
    assert P.parse("none").describe() == "regression: never (report only)"
    assert P.parse("default,spectrum=0.25,change=0.2") == P(max_spectrum_change=0.25, min_spectrum_change=0.2)
    for bad, match in (("bogus", "unknown item 'bogus'"), ("alpha=x", "needs a number"),
                       ("alpha=-1", "must be >= 0"), ("", "empty")):
        with pytest.raises(ValueError, match=match):
            P.parse(bad)
    with pytest.raises(ValueError, match="unknown flag"):
        P(flags=("sleepy",))


def test_reports_text_markdown_json():
    base = _base()
    cmp = ww_core.compare(base, _randomised(base, "head.weight"), labels=("old", "new"))
    text = cmp.to_text()
    assert text.startswith("baseline:  old") and text.rstrip().endswith("REGRESSION: 1 layer regressed")
    md = cmp.to_markdown()
    assert md.startswith("### Spectral comparison: ❌") and "| head | compared |" in md
    doc = json.loads(cmp.to_json())
    assert doc["regressed"] and [r["layer"] for r in doc["regressions"]] == ["head"]
    assert doc["layers"][0]["name"] == "head" and doc["summary"]["compared"] == 3
    assert {l["status"] for l in doc["layers"]} == {"compared"}


# --------------------------------------------------------------------------- ww-analyze --compare-to
def test_cli_exit_codes_and_formats(tmp_path, capsys):
    base = _base()
    old = _save(base, tmp_path / "old.safetensors")
    same = _save(base, tmp_path / "same.safetensors")
    broken = _save(_randomised(base, "enc.fc1.weight"), tmp_path / "broken.safetensors")
    assert main([old, "--no-progress", "--json", str(tmp_path / "old.json")]) == 0
    capsys.readouterr()
    assert main([same, "--compare-to", str(tmp_path / "old.json"), "--no-progress"]) == 0
    assert "no regression" in capsys.readouterr().out
    assert main([broken, "--compare-to", old, "--no-progress", "--format", "json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in doc["regressions"]] == ["enc.fc1"]
    out_json = tmp_path / "cmp" / "comparison.json"
    assert main([broken, "--compare-to", old, "--no-progress", "--format", "markdown",
                 "--json", str(out_json)]) == 3
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| ")][1:]          # after the header
    assert [r.split(" | ")[0] for r in rows if not r.endswith("| - |")] == ["| enc.fc1"]
    assert json.loads(out_json.read_text())["regressed"] is True
    assert main([broken, "--compare-to", old, "--no-progress", "--fail-on", "none"]) == 0
    assert main([broken, "--compare-to", old, "--no-progress", "--fail-on", "rank-collapse"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv, code, message", [
    (["{old}", "--compare-to", "{tmp}/missing.safetensors"], 1, "no such file or directory"),
    (["{old}", "--compare-to", "{tmp}/missing.json"], 1, "no such file"),
    (["{old}", "--compare-to", "{tmp}/other.json"], 1, "not a saved ww_core analysis"),
    (["{old}", "{old}", "--compare-to", "{old}"], 2, "--compare-to takes one candidate PATH"),
    (["{old}", "--compare-to", "{old}", "--fail-on", "sometimes"], 2, "unknown item 'sometimes'"),
    (["{old}", "--fail-on", "flags"], 2, "--fail-on applies only with --compare-to"),
    (["{old}", "--compare-to", "{old}", "--csv", "{tmp}/x.csv"], 2, "--csv and --plots apply"),
    (["{old}", "--compare-to", "{old}", "--base-model", "{old}"], 2, "do not go together"),
    (["{old}", "--format", "markdown"], 2, "--format markdown applies"),
    (["{old}", "--compare-to", "{old}", "--top", "-1"], 2, "--top must be >= 0"),
])
def test_cli_bad_inputs_one_line(tmp_path, capsys, argv, code, message):
    old = _save(_base(), tmp_path / "old.safetensors")
    (tmp_path / "other.json").write_text('{"something": "else"}')
    argv = [a.format(old=old, tmp=tmp_path) for a in argv] + ["--no-progress"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
