"""``fit --resume``: an interrupted run (SIGKILL, Ctrl-C, SIGTERM) continues where it stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jewelclf.cli import main

from conftest import TESTS, make_split_folder

# Enough epochs in both stages that an interruption lands mid-run; tiny_cnn has two blocks.
FLAGS = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "6", "--fine-tune-epochs", "6", "--unfreeze-blocks", "2",
         "--learning-rate", "0.01", "--fine-tune-learning-rate", "0.001", "--seed", "7"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def start(data: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(TESTS / "tiny_cli.py"), "fit", str(data), "--run-dir",
                             str(run_dir), *FLAGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_row(proc: subprocess.Popen, run_dir: Path, phase: str, count: int = 1,
                 timeout: float = 240) -> None:
    """Block until ``history.csv`` has ``count`` rows of ``phase`` (the process still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fit ended (rc {proc.returncode}) before a {phase} row:\n{out}\n{err}")
        if (run_dir / "history.csv").is_file() and sum(
                r["phase"] == phase for r in history(run_dir)) >= count:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {phase} row within {timeout}s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("resume") / "data", train=12, val=4, test=6)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = run("fit", data, "--run-dir", run_dir, *FLAGS)
    assert result.exit_code == 0, result.output
    return run_dir


def assert_epochs_continue(rows: list[dict[str, str]]) -> None:
    """Epoch numbers run 1..N without a repeat; phases come in schedule order."""
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    order = [r["phase"] for r in rows]
    assert order == sorted(order, key=lambda p: (p != "stage1", p))


def test_resume_after_sigkill_in_stage2_matches_an_uninterrupted_run(data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(data, run_dir)
    wait_for_row(proc, run_dir, "stage2.1")
    proc.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    proc.wait()
    before = history(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "running" and not (run_dir / "model.keras").exists()
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    assert "stage1" in state["done"] and "stage2.1" not in state["done"]

    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert "resuming: stage1 had finished" in result.output
    assert "stage 1 (head" not in result.output  # stage 1 is not trained again
    rows = history(run_dir)
    assert_epochs_continue(rows)
    # The finished stage-1 epochs and the backed-up stage-2 epochs are kept, not repeated.
    assert [r for r in rows if r["phase"] == "stage1"] == [r for r in before if r["phase"] == "stage1"]
    assert sum(r["phase"] == "stage1" for r in rows) == sum(
        r["phase"] == "stage1" for r in history(uninterrupted))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    plain = json.loads((uninterrupted / "metrics.json").read_text())
    # Same seed and data: the same test metrics within noise (tiny data, reshuffled batches).
    assert abs(resumed["accuracy"] - plain["accuracy"]) <= 0.12, (resumed["accuracy"], plain["accuracy"])
    assert resumed["accuracy"] >= 0.8
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and len(info["resumed"]) == 1
    assert not (run_dir / "resume").exists()  # the resume state goes once the run is finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_says_how_to_resume_and_resume_restores_the_stage(data, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = start(data, run_dir)
    # After the second stage-1 epoch's row, the first epoch's backup is surely on disk.
    wait_for_row(proc, run_dir, "stage1", count=2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert f"Resume with: jewelclf fit --resume --run-dir {run_dir}" in err
    assert "Traceback" not in err
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "interrupted"
    stage1_done = "stage1" in json.loads((run_dir / "resume" / "state.json").read_text())["done"] \
        if (run_dir / "resume" / "state.json").is_file() else False

    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    rows = history(run_dir)
    assert_epochs_continue(rows)
    if stage1_done:  # the signal came just as stage 1 ended
        assert "resuming: stage1 had finished" in result.output, result.output
    else:
        assert "stage 1: resuming after epoch" in result.output, result.output
    assert {r["phase"] for r in rows} >= {"stage1", "stage2.1"}
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "finished"


def test_resume_refusals_are_one_line(tiny_run, tmp_path):
    finished = run("fit", "--resume", "--run-dir", tiny_run)
    assert finished.exit_code == 2 and "already finished" in finished.output
    nothing = run("fit", "--resume", "--run-dir", tmp_path / "none")
    assert nothing.exit_code == 2 and "holds no jewelclf run to resume" in nothing.output
    flags = run("fit", "--resume", "--run-dir", tiny_run, "--epochs", "3")
    assert flags.exit_code == 2 and "drop --epochs" in flags.output
    no_data = run("fit", "--run-dir", tmp_path / "new")
    assert no_data.exit_code == 2 and "missing DATA" in no_data.output
    for result in (finished, nothing, flags, no_data):
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
