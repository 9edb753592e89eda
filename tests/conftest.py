"""Shared fixtures and session setup. Plain helper functions are in ``tests/helpers.py``.

``tox -e core`` collects this file without torch (or any framework) installed: nothing heavy is
imported at module level, only inside the fixtures that need it.
"""

import os
import sys
import tempfile

import pytest

# Scripts that the tests launch under torchrun, not test modules: importing them (e.g. for
# --doctest-modules) would need their optional packages (DeepSpeed) and a process group.
collect_ignore_glob = ["ddp_scripts/*"]

# Keras 3 reads its backend once, at its first import: every Keras test runs on torch, and keeps
# its cache/config out of the real home directory. (Set before any test module imports keras.)
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras-home-"))


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, silent, writing its runs under ``tmp_path``.

    wandb reads ``WANDB_DIR`` etc. once per process setup, so an already imported wandb is torn
    down to start afresh with these settings. (wandb itself is not imported here.)
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    return tmp_path


# ---------------------------------------------------------------------------------------------
# No silent skips in CI: with WW_FAIL_ON_SKIP=1 or true (set from CI in the py311 tox env, which
# installs every optional package), a skipped test fails the run unless its reason matches
# WW_ALLOWED_SKIPS (a regex for skips no package can lift on this machine, e.g. "needs CUDA").
def _unexpected_skips(stats) -> list:
    import re

    allowed = os.environ.get("WW_ALLOWED_SKIPS", "")
    out = []
    for rep in stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if allowed and re.search(allowed, reason):
            continue
        out.append(f"{rep.nodeid}: {reason}")
    return out


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("WW_FAIL_ON_SKIP", "").lower() not in ("1", "true"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    unexpected = _unexpected_skips(reporter.stats)
    if unexpected:
        reporter.write_sep("=", f"{len(unexpected)} unexpected skip(s) (WW_FAIL_ON_SKIP=1)", red=True)
        for line in unexpected:
            reporter.write_line(line)
        if session.exitstatus == 0:
            session.exitstatus = 1
