"""Ctrl-C and SIGTERM during a run end it as ``interrupted`` (exit 130), however the signal lands."""

from __future__ import annotations

import json
import os
import signal

import pytest

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.training.fit import RunInterrupted, _locked


def running_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fsio.atomic_write_json(run_dir / rd.RUN_INFO, {"status": "running"})
    return run_dir


def status(run_dir):
    return json.loads((run_dir / rd.RUN_INFO).read_text())["status"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_whose_cleanup_fails_inside_a_library_is_still_an_interruption(tmp_path, sig):
    run_dir = running_run(tmp_path)

    def work():
        try:
            os.kill(os.getpid(), sig)
            signal.sigtimedwait([], 0)  # let the handler run here
            raise AssertionError("the handler did not raise")
        except BaseException:
            # What TensorFlow's half-built iterator did in CI: its cleanup raised instead.
            raise TypeError("int() argument must be ... not 'TensorShape'") from None

    with pytest.raises(RunInterrupted, match="Resume with: jewelclf fit --resume"):
        _locked(run_dir, work)
    assert status(run_dir) == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_an_error_without_a_signal_is_not_mistaken_for_one(tmp_path):
    run_dir = running_run(tmp_path)

    def work():
        raise TypeError("a real bug")

    with pytest.raises(TypeError, match="a real bug"):
        _locked(run_dir, work)
    assert status(run_dir) == "running"
