"""Honest resumes (issue 20, items 2 and 3).

- A SIGKILL inside a stage-2 unfreezing step, then ``fit --resume``: the run trains exactly the
  epochs of an uninterrupted run (every step its own share, numbered on), and with
  ``--deterministic`` its history and test metrics are bit-identical to that run's.
- A SIGKILL in stage 1, then two images swap contents under the same names: ``--resume``
  refuses in one line naming a changed file, rather than training on stale cached features.

The kill is precise: the fit runs in a subprocess whose per-epoch backup callback of one phase
SIGKILLs the process at a chosen batch of a chosen epoch (after the backups of the epochs
before it), so there is no race with the polling of ``history.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.training.plateau import ResumedEarlyStopping

from conftest import TESTS, make_split_folder

FLAGS = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "3", "--fine-tune-epochs", "6", "--unfreeze-blocks", "2",
         "--learning-rate", "0.01", "--fine-tune-learning-rate", "0.001", "--seed", "7",
         "--deterministic"]

# ``python -c KILLER PHASE EPOCH BATCH fit ...``: jewelclf's CLI (with tiny_cnn registered), whose
# backup callback of PHASE kills the process at BATCH of EPOCH (0-based, as Keras counts).
KILLER = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # noqa: F401  registers tiny_cnn
from jewelclf.training import checkpoints as progress
from jewelclf.cli import main

phase, epoch, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
del sys.argv[1:4]
backup = progress.Progress.backup

def killing_backup(self, name):
    callback = backup(self, name)
    if name == phase:
        begin = callback.on_epoch_begin
        seen = {{}}

        def on_epoch_begin(e, logs=None):
            seen["epoch"] = e
            begin(e, logs)

        def on_train_batch_begin(b, logs=None):
            if seen.get("epoch") == epoch and b == batch:
                os.kill(os.getpid(), signal.SIGKILL)

        callback.on_epoch_begin = on_epoch_begin
        callback.on_train_batch_begin = on_train_batch_begin
    return callback

progress.Progress.backup = killing_backup
main()
"""


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def killed_fit(data: Path, run_dir: Path, phase: str, epoch: int, batch: int = 1) -> None:
    """``jewelclf fit`` SIGKILLed at ``batch`` of ``epoch`` of ``phase``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, phase, str(epoch), str(batch), "fit",
                           str(data), "--run-dir", str(run_dir), *FLAGS],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "running"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("honest") / "data", train=12, val=4, test=6)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = run("fit", data, "--run-dir", run_dir, *FLAGS)
    assert result.exit_code == 0, result.output
    return run_dir


def figures(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without their wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_in_a_stage2_step_trains_the_epochs_and_figures_of_an_uninterrupted_run(
        data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # Inside step 1 of stage 2: in its second epoch, the first one backed up.
    killed_fit(data, run_dir, "stage2.1", epoch=1, batch=1)
    assert [r["phase"] for r in history(run_dir)] == ["stage1"] * 3 + ["stage2.1"]

    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert "stage 2 step 1: unfrozen" in result.output and "resuming after epoch 1" in result.output
    plain, resumed = history(uninterrupted), history(run_dir)
    assert [(r["epoch"], r["phase"]) for r in resumed] == [(r["epoch"], r["phase"]) for r in plain]
    assert {r["phase"] for r in plain} == {"stage1", "stage2.1", "stage2.2"}  # both steps ran
    # --deterministic: the same numbers, to the last digit written.
    assert figures(resumed) == figures(plain)
    assert json.loads((run_dir / "metrics.json").read_text()) == \
        json.loads((uninterrupted / "metrics.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and len(info["resumed"]) == 1


def test_resume_refuses_images_whose_contents_changed(uninterrupted, tmp_path):
    copy = tmp_path / "data"
    make_split_folder(copy, train=12, val=4, test=6)
    run_dir = tmp_path / "run"
    killed_fit(copy, run_dir, "stage1", epoch=1, batch=0)
    assert (run_dir / "resume" / "features.npz").is_file()  # the stale features are there
    a, b = copy / "train" / "ring" / "ring_003.jpg", copy / "train" / "watch" / "watch_005.jpg"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)

    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]  # after the data check's progress lines
    assert line.startswith("error: ") and result.output.count("error") == 1, result.output
    assert "changed since the run started" in line and "start a new run" in line, line
    assert "ring_003.jpg" in line or "watch_005.jpg" in line, line
    # The refusal leaves the run as it was: restoring the files makes it resumable again.
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "running"
    a.write_bytes(a_bytes)
    b.write_bytes(b_bytes)
    again = run("fit", "--resume", "--run-dir", run_dir)
    assert again.exit_code == 0, again.output
    assert "stage 1: resuming after epoch 1" in again.output
    # The same images (under another folder) as the uninterrupted run's: a resume inside
    # stage 1 is bit-identical too (each epoch's order and random draws follow its number).
    assert figures(history(run_dir)) == figures(history(uninterrupted))


def _epochs_until_stopped(callback, values: list[float], start: int = 0) -> int:
    """Drive ``callback`` through ``values`` from epoch ``start``; the epochs trained in all."""
    model = types.SimpleNamespace(stop_training=False)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch in range(start, len(values)):
        callback.on_epoch_end(epoch, {"val_loss": values[epoch]})
        if model.stop_training:
            return epoch + 1
    return len(values)


def test_stage1_early_stopping_counts_on_across_a_resume():
    values = [1.0, 0.8, 0.85, 0.7, 0.75, 0.76, 0.77, 0.78]
    plain = _epochs_until_stopped(keras.callbacks.EarlyStopping("val_loss", patience=2), values)
    assert plain == 6
    for k in range(1, plain + 1):  # resumed after k epochs (k == plain: killed after the stop)
        early = ResumedEarlyStopping(values[:k], patience=2)
        trained = k if early.stopped_before else _epochs_until_stopped(early, values, start=k)
        assert trained == plain, k
    # What a resume did before: a fresh EarlyStopping with the best so far as its baseline.
    fresh = keras.callbacks.EarlyStopping("val_loss", patience=2, baseline=min(values[:5]))
    assert _epochs_until_stopped(fresh, values, start=5) == 7
