"""Run-dir files get the mode the user's umask asks for, like any file `open()` creates (a
temp file's 0600 would hide config.yaml and metrics.json from a team's other accounts)."""

from __future__ import annotations

import os
import stat

import pytest

from jewelclf.fsio import atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        atomic_write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
        with open(tmp_path / "plain.txt", "w") as f:  # what open() itself gives
            f.write("x")
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.json", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
